"""Iteration speed (issue 15, item 6): measurements reused from the ledger when their inputs are identical,
and --checks quick."""

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.merge import MergeConfig, merge

from .conftest import WINDOW, train_tiny


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A tiny training run whose checks answer two held-out prompts (so exact match is measured too)."""
    return train_tiny(tiny_llama, tmp_path_factory.mktemp("checks") / "full", eval_generate=2).run


def _ledger(run):
    return json.loads((run / "manifest.json").read_text())["steps"]


def _merge(run, **kw):
    return merge(MergeConfig(**{"adapter": str(run), "dtype": "float32", "window": 128, "stride": 128,
                                "eval_generate": 2, **kw}))


def test_merge_after_train_reuses_the_unmerged_measurement_exactly(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    after = _ledger(run)[0]
    entry = _merge(run).entries[0]
    assert entry["reused_from"] == "train" and "reused from train" in entry["note"]
    # the unmerged base + adapter is train's "after", number for number, perplexity and task
    assert entry["reference"]["ppl"] == after["perplexity"]["ppl"]
    assert entry["reference"]["tokens"] == after["perplexity"]["tokens"]
    assert entry["task"]["reference"]["ppl"] == after["task"]["ppl"]
    assert entry["task"]["reference"]["exact_match"] == after["task"]["exact_match"]
    m = entry["metrics"]
    assert (m["eval_loss_unmerged"], m["exact_match_unmerged"]) == (after["metrics"]["eval_loss_after"],
                                                                     after["metrics"]["exact_match_after"])
    assert entry["status"] == "ok" and entry["gate"]["passed"]

    # Other inputs (here: another number of answers) measure afresh, and find what train recorded: the
    # reuse stands for a measurement that gives the same numbers.
    again = _merge(run, eval_generate=1).entries[0]
    assert "reused_from" not in again
    assert again["reference"]["ppl"] == pytest.approx(after["perplexity"]["ppl"], rel=1e-6)
    assert again["task"]["reference"]["ppl"] == pytest.approx(after["task"]["ppl"], rel=1e-6)


def test_a_changed_adapter_is_measured_again(trained, tmp_path):
    """Same ids, same base, but the adapter's files differ from what train measured: no reuse."""
    from safetensors.torch import load_file, save_file

    run = shutil.copytree(trained, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    entry = _merge(run).entries[0]
    assert "reused_from" not in entry and entry["reference"]["ppl"] != _ledger(run)[0]["perplexity"]["ppl"]


def test_quick_checks_score_a_quarter_of_the_ids_answer_nothing_and_are_marked(tiny_llama, trained, tmp_path):
    full = _ledger(trained)[0]
    quick = train_tiny(tiny_llama, tmp_path / "quick", eval_generate=2, checks="quick").entry
    assert quick["config"]["checks"] == "quick" and quick["config"]["eval_generate"] == 0
    # the run keeps all its ids; the quick checks scored the first quarter of them (300 ids: 75)
    assert len(json.loads((tmp_path / "quick" / "eval_tokens.json").read_text())["ids"]) == 300
    assert quick["perplexity"]["tokens"] == 74 < full["perplexity"]["tokens"] == 297
    assert quick["reference"]["tokens"] == 74
    assert full["task"]["answered"] == 2 and full["task"]["exact_match"] is not None
    assert quick["task"]["answered"] == 0 and quick["task"]["exact_match"] is None
    assert quick["metrics"]["exact_match_n"] == 0 and quick["metrics"]["exact_match_after"] is None

    merged = _merge(tmp_path / "quick", checks="quick").entries[0]  # quick after quick: the same inputs again
    assert merged["reused_from"] == "train" and merged["config"]["checks"] == "quick"
    assert merged["perplexity"]["tokens"] == 74 and merged["task"]["exact_match"] is None

    shown = CliRunner().invoke(cli, ["show", "--run", str(tmp_path / "quick")]).output
    assert "train (quick)" in shown and "merge (quick)" in shown
    assert "(quick)" not in CliRunner().invoke(cli, ["show", str(trained)]).output


def test_checks_is_checked_and_export_checks_quickly_too(tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--adapter", str(tmp_path), "--checks", "fast"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == \
        "error: --checks fast: use full or quick"
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama), "--quant", "f16", "--run", str(run),
                                      "--checks", "quick", *WINDOW])
    assert result.exit_code == 0, result.output
    (entry,) = _ledger(run)
    assert entry["config"]["checks"] == "quick" and entry["config"]["task_answers"] == 0
    assert entry["perplexity"]["tokens"] == entry["reference"]["tokens"] == 74  # HF and GGUF on the same quarter
