"""edgeft run (the chain from a pipeline file, --from) and edgeft report, on the tiny Llama."""

import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli


def _pipeline(tmp_path, tiny_llama, data):
    spec = {
        "run": str(tmp_path / "run"),
        "train": {"model": str(tiny_llama), "data": str(data), "max_steps": 3, "batch_size": 4, "lr": 0.01,
                  "eval_budget": 300, "window": 128, "stride": 128, "eval_generate": 0, "max_ppl_rise": 100.0},
        "merge": {"dtype": "float32", "window": 128, "stride": 128, "eval_generate": 0},
        "export": [{"format": "gguf", "quant": ["f16", "q8_0"], "window": 128, "stride": 128,
                    "max_ppl_rise": "0.5", "max_task_ppl_rise": "100", "max_exact_drop": "1"}],
        "smoke": {"local": True, "quant": "q8_0"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.mark.slow  # smoke --local builds llama.cpp for this host
def test_chain_report_and_resume_from_export(tiny_llama, tmp_path):
    from edgeft.data.demo_task import make_rows

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)))
    pipeline = _pipeline(tmp_path, tiny_llama, data)
    result = CliRunner().invoke(cli, ["run", str(pipeline)])
    run = tmp_path / "run"
    entries = json.loads((run / "manifest.json").read_text())["steps"]
    steps = [s["step"] for s in entries]
    assert steps == ["train", "merge", "export-gguf", "export-gguf", "smoke"], result.output
    # Every gate is open but smoke's answer check: a random tiny model's greedy answer may be blank lines, and
    # that check is then the one that failed (exit 3 naming the step); otherwise the chain passed.
    answer_ok = entries[-1]["metrics"]["generation"]["ok"]
    assert result.exit_code == (0 if answer_ok else 3), result.output
    if not answer_ok:
        assert "step 'smoke' failed its gate: the board's answer failed its checks" in result.output
    else:
        png = run / "report.png"
        assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page = (run / "report.html").read_text()
        assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
        first_train_ppl = json.loads((run / "manifest.json").read_text())["steps"][0]["perplexity"]["ppl"]
        assert f"{first_train_ppl:.4f}" in page

    # resume from export: no new train or merge entry; the GGUFs are rewritten, the same smoke runs again
    again = CliRunner().invoke(cli, ["run", str(pipeline), "--from", "export"])
    assert again.exit_code == result.exit_code, again.output
    steps2 = [s["step"] for s in json.loads((run / "manifest.json").read_text())["steps"]]
    assert steps2.count("train") == 1 and steps2.count("merge") == 1 and steps2.count("export-gguf") == 4


def test_resume_refuses_a_changed_artifact(tiny_llama, tmp_path):
    from edgeft.data.demo_task import make_rows

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)))
    pipeline = _pipeline(tmp_path, tiny_llama, data)
    spec = json.loads(pipeline.read_text())
    del spec["export"], spec["smoke"]
    pipeline.write_text(json.dumps(spec))
    assert CliRunner().invoke(cli, ["run", str(pipeline)]).exit_code == 0
    weights = tmp_path / "run" / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    result = CliRunner().invoke(cli, ["run", str(pipeline), "--from", "smoke"])
    assert result.exit_code == 2 and "changed since" in result.output.strip().splitlines()[-1]
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2


def test_shipped_demo_pipeline_is_valid():
    from edgeft.pipeline import load_pipeline

    spec = load_pipeline("demo")
    assert spec["train"]["data"] == "demo" and spec["smoke"]["emulate"] is True
    assert spec["export"][0]["quant"] == ["f16", "q8_0", "q4_k_m"]


def test_the_step_table_names_real_functions_and_every_entry_they_write():
    import importlib

    from edgeft import run
    from edgeft.steps import CHAIN, STEPS

    assert list(STEPS) == ["train", "merge", "export", "smoke"]  # the chain's order
    for step in CHAIN:
        module, function = step.function.split(":")
        assert callable(getattr(importlib.import_module(module), function)), step.function
    written = {name for step in CHAIN for name in step.ledger}
    assert written == {run.TRAIN, run.MERGE, run.MERGE_CHOICE, run.EXPORT_GGUF, run.EXPORT_GGUF_CHOICE,
                       run.EXPORT_GGUF_LORA, run.EXPORT_ONNX, run.SMOKE}
