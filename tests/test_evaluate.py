"""edgeft eval on the real default model, and its bad-input errors."""

import json
import os
import time

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.evaluate import EvalConfig, evaluate
from edgeft.run import TOKENS_FILE

from .conftest import assert_one_line_error


def test_nonexistent_model(tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--model", "/nonexistent", "--run", str(tmp_path / "r")])
    assert_one_line_error(result, "/nonexistent", "no such folder")
    assert not (tmp_path / "r").exists()  # nothing written for bad input


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(cli, ["eval", "--model", str(tmp_path), "--run", str(tmp_path / "r")])
    assert_one_line_error(result, str(tmp_path), "no config.json")


def test_empty_text_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = CliRunner().invoke(cli, ["eval", "--text", str(empty), "--run", str(tmp_path / "r")])
    assert_one_line_error(result, "empty.txt", "empty")


def test_bad_stride_and_config_key(tmp_path):
    assert_one_line_error(CliRunner().invoke(cli, ["eval", "--window", "64", "--stride", "128"]), "--stride")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("windw: 64\n")
    assert_one_line_error(CliRunner().invoke(cli, ["eval", "--config", str(cfg)]), "windw", "valid keys")


@pytest.mark.slow
def test_default_model_is_materialised_once_and_answers(default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.models import resolve_model

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in default_model.iterdir()}
    mtime = (default_model / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("smollm2-135m") == default_model
    assert time.perf_counter() - start < 1  # reused, not rebuilt
    assert (default_model / "model.safetensors").stat().st_mtime_ns == mtime

    os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_eval_default_model_records_ledger_and_reuses_tokens(default_model, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["eval", "--budget", "1024", "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.output.strip().splitlines()[-1])
    # a small model on Python's docs: 15-40 on the full budget; the first 1k tokens are a bit easier
    assert 5 < first["ppl"] < 60 and first["tokens"] == 2 * 511
    tokens = json.loads((run / TOKENS_FILE).read_text())
    assert tokens["n_tokens"] == 1024 and tokens["source"].startswith("pydoc_data.topics")

    # a second eval in the same run scores the stored ids: same number to the last digit
    again = evaluate(EvalConfig(eval_budget=1024, run=str(run)))
    assert again.perplexity.ppl == first["ppl"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["step"] for s in manifest["steps"]] == ["eval", "eval"]
    entry = manifest["steps"][0]
    assert entry["perplexity"]["ppl"] == first["ppl"] and entry["peak_rss_mb"] > 100
    assert entry["config"]["eval_budget"] == 1024 and entry["versions"]["transformers"]


@pytest.mark.slow
def test_default_tokenizer_matches_llama_cpp_on_the_source_gguf(default_model):
    """llama.cpp's tokenization of the shipped GGUF is the reference; the materialised HF tokenizer must agree
    on the held-out text (digits included: SmolLM splits them one by one)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgeft.heldout import read_text
    from edgeft.models import embedded_gguf

    text = read_text(None)[0][:60000] + " In 1998 she paid 12345.67 dollars"
    reference = Llama(model_path=str(embedded_gguf("smollm2-135m")), vocab_only=True, verbose=False)
    ids = AutoTokenizer.from_pretrained(default_model)(text, add_special_tokens=False)["input_ids"]
    assert ids == reference.tokenize(text.encode(), add_bos=False, special=False)


def test_eval_data_scores_a_model_folder_and_its_gguf_alike(tiny_llama, tmp_path):
    """`edgeft eval --data` gives a user the task metrics of any model folder or GGUF on their own file, with
    one definition: the GGUF (F32, llama.cpp) and the folder (torch) agree."""
    from edgeft.converters.hf_to_gguf import convert
    from edgeft.data.demo_task import make_rows

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(4)))
    gguf = tmp_path / "m.gguf"
    convert(tiny_llama, gguf, "f32")
    run = tmp_path / "run"
    common = ["--data", str(data), "--run", str(run), "--window", "128", "--stride", "128", "--eval-budget", "300",
              "--task-answers", "2", "--json"]
    hf = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), *common])
    assert hf.exit_code == 0, hf.output
    cpp = CliRunner().invoke(cli, ["eval", "--model", str(gguf), "--tokenizer", str(tiny_llama), *common])
    assert cpp.exit_code == 0, cpp.output
    a, b = (json.loads(r.output.strip().splitlines()[-1]) for r in (hf, cpp))
    assert a["task"]["items"] == b["task"]["items"] == 4 and a["task"]["tokens"] == b["task"]["tokens"]
    assert abs(b["task"]["ppl"] / a["task"]["ppl"] - 1) < 1e-3 and abs(b["ppl"] / a["ppl"] - 1) < 1e-3
    assert a["task"]["answered"] == 2 and a["task"]["exact_match"] is not None
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert [s["inputs"]["backend"] for s in steps] == ["torch", "llama.cpp"]
    # another task file cannot be mixed into the same run's comparison
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), *common[:0], "--data", str(other), "--run",
                                      str(run)])
    assert_one_line_error(result, "task set came from", "new --run")


def test_eval_data_takes_a_shipped_task_by_name_as_train_does(tiny_llama, tmp_path):
    """`train --data dates` names the shipped set; eval --data must accept the same word, not look for a file."""
    from edgeft.dataset import shipped_data_path

    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_llama), "--data", "dates", "--run", str(tmp_path),
                                      "--window", "128", "--stride", "128", "--eval-budget", "300",
                                      "--task-answers", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = len(shipped_data_path("dates").read_text().splitlines())
    assert 0 < json.loads(result.output.strip().splitlines()[-1])["task"]["items"] <= rows
