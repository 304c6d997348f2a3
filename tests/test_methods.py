"""PEFT methods: `train --method lora|rslora|dora|ia3`, each folded into the 16-bit weights by merge and by the
fused GGUF export exactly as peft computes the unmerged model; what llama.cpp's adapter format cannot hold
is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgeft.cli import cli
from edgeft.merge import MergeConfig, merge

from .conftest import WINDOW, assert_one_line_error, train_tiny

METHODS = ["lora", "rslora", "dora", "ia3"]


def _perturbed(run):
    """The adapter with every trained tensor pushed far from its init, so that a fold with the wrong axis, a
    missing norm or a missing bias changes the logits by far more than rounding does."""
    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(1)
    for k, t in tensors.items():
        noise = torch.randn(t.shape, generator=g) * (0.3 if ("ia3_l" in k or "magnitude" in k) else 0.05)
        tensors[k] = t + noise * (t.abs().mean() if "magnitude" in k else 1)
    save_file(tensors, path)


def _peft_logits(base, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# Every method on the Llama; on Qwen2 the one whose fold touches its k/v biases (IA³ scales them), slow tier.
@pytest.mark.parametrize("method,family", [*[(m, "llama") for m in METHODS],
                                           pytest.param("ia3", "qwen2", marks=pytest.mark.slow)])
def test_each_method_merges_and_fuses_like_peft(method, family, tiny_llama, tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    run = tmp_path / "run"
    train_tiny(base, run, method=method, max_steps=2, save_every=2)
    manifest = json.loads((run / "manifest.json").read_text())
    trained = next(e for e in manifest["steps"] if e["step"] == "train" and e["status"] == "ok")
    assert trained["metrics"]["method"] == method and trained["metrics"]["trainable_params"] > 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    assert bool(config.get("use_dora")) == (method == "dora") and bool(config.get("use_rslora")) == (method == "rslora")
    if method == "ia3":
        assert set(config["target_modules"]) == {"k_proj", "v_proj", "down_proj"}
        assert config["feedforward_modules"] == ["down_proj"]
    _perturbed(run)

    ids = list(range(5, 69))
    want = _peft_logits(base, run / "adapter", ids)
    merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128, max_drift="100"))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    with torch.no_grad():
        got = merged(torch.tensor([ids])).logits[0]
    base_logits = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    assert (want - base_logits).abs().max() > 0.05  # the adapter changes the model: the check below can fail
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()

    # the fused GGUF export applies the same update while converting: llama.cpp's logits = peft's
    result = CliRunner().invoke(cli, ["export", "--adapter", str(run), "--quant", "f32", "--max-ppl-rise", "100",
                                      "--json", *WINDOW])
    assert result.exit_code == 0, result.output
    from edgeft.llamacpp import LlamaCpp

    (fused,) = (run / "gguf").glob("*-fused-F32.gguf")
    cpp = LlamaCpp(fused, n_ctx=128)
    cpp_logits = torch.tensor(cpp.logits(ids))
    cpp.close()
    # llama.cpp keeps its KV cache in F16: ~1e-3 of rounding, a tenth of what the adapter moves at most
    error, effect = (cpp_logits - want).abs().max(), (want - base_logits).abs().max()
    assert error < 1e-2 and error < effect / 10, (error, effect)

    only = CliRunner().invoke(cli, ["export", "--adapter", str(run), "--quant", "f16", "--adapter-only", *WINDOW])
    if method in ("dora", "ia3"):
        assert_one_line_error(only, "--adapter-only", "holds LoRA only", f"a {method} adapter")
    else:
        assert only.exit_code == 0, only.output


@pytest.mark.parametrize("method,needle", [("prompt", "virtual tokens"), ("prefix", "virtual tokens"),
                                           ("loha", "unknown; use lora, rslora, dora, ia3")])
def test_methods_no_board_can_run_are_refused_in_one_line(method, needle, tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_llama), "--data", "demo", "--method", method,
                                      "--run", str(tmp_path / "r")])
    assert_one_line_error(result, f"--method {method}", needle)
    assert not (tmp_path / "r" / "manifest.json").exists()
    shutil.rmtree(tmp_path / "r", ignore_errors=True)


def test_each_method_trains_at_its_own_default_rate_which_the_ledger_records(tiny_llama, tmp_path):
    """--lr 0 (the default): LoRA's 2e-4 would leave IA³'s scales almost where they start."""
    from edgeft.methods import lr_defaults
    from edgeft.train import TrainConfig

    METHOD_LR = lr_defaults("lr")
    assert TrainConfig().lr == 0 and set(METHOD_LR) == set(METHODS)
    for method in ("lora", "ia3"):
        train_tiny(tiny_llama, tmp_path / method, method=method, lr=0.0, max_steps=1, save_every=0)
        (entry,) = json.loads((tmp_path / method / "manifest.json").read_text())["steps"]
        saved = json.loads((tmp_path / method / "train_config.json").read_text())
        assert entry["config"]["lr"] == saved["lr"] == METHOD_LR[method]


def test_compare_takes_a_rate_per_method_and_refuses_a_bad_one_in_one_line(tmp_path):
    from edgeft.compare import DEFAULT_LR, method_lrs

    assert method_lrs("0.002,ia3=0.02", ["lora", "ia3"]) == {"lora": 0.002, "ia3": 0.02}
    assert method_lrs(DEFAULT_LR, ["dora"]) == {"dora": 0.001}  # rates for methods not compared are unused
    for spec, needle in (("fast", "'fast' is not a positive rate"), ("0.001,foo=1", "'foo' is not a method"),
                         ("ia3=0.01", "no rate for lora")):
        result = CliRunner().invoke(cli, ["compare", "--methods", "lora,ia3", "--data", "demo", "--lr", spec, "--run",
                                          str(tmp_path / "cmp")])
        assert_one_line_error(result, f"--lr {spec}", needle)
        assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_one_command_compares_methods_through_merge_and_quants(tiny_llama, tmp_path):
    """`edgeft compare`: each method's chain in its own run, one table from their ledgers, the plot, the
    report's table; a second call reads the finished methods instead of training them again."""
    import json as _json

    from edgeft.data.demo_task import make_rows

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in make_rows(24)))
    # A random tiny model's quants may fail their task gates: opened here, so every chain passes (what is
    # tested is the comparison, not the tiny model's quality).
    opened = tmp_path / "opened.yaml"
    opened.write_text("train: {max_ppl_rise: 100}\n"
                      "export:\n- {format: gguf, max_ppl_rise: '100', max_task_ppl_rise: '100', max_exact_drop: '1'}\n")
    args = ["compare", "--methods", "lora,ia3", "--model", str(tiny_llama), "--data", str(data), "--quant", "q8_0",
            "--max-steps", "3", "--lr", "0.01", "--eval-generate", "2", "--run", str(tmp_path / "cmp"), *WINDOW]
    result = CliRunner().invoke(cli, [*args, "--pipeline", str(opened), "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "cmp" / "manifest.json").read_text())["steps"][-1]
    rows = {r["method"]: r for r in entry["metrics"]["rows"]}
    assert set(rows) == {"lora", "ia3"} and (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    lora, ia3 = rows["lora"], rows["ia3"]
    assert ia3["trainable_params"] < lora["trainable_params"]  # IA³: a vector per module, LoRA: two matrices
    for r in (lora, ia3):
        assert r["merged"]["ppl"] > 0 and r["base_ppl"] > 0 and r["forgetting"] is not None
        assert set(r["quants"]) == {"f16", "q8_0"} and r["quants"]["f16"]["ppl"] > 0
        assert r["adapter_mb"] >= 0 and r["train_seconds"] > 0 and r["peak_ram_mb"] > 0
        assert abs(r["adapter_mb"] * 2**20 - 4 * r["trainable_params"]) < 2**15  # float32 weights, not the folder
    page = CliRunner().invoke(cli, ["report", str(tmp_path / "cmp")])
    assert page.exit_code == 0, page.output
    assert "PEFT methods compared" in (tmp_path / "cmp" / "report.html").read_text()
    again = CliRunner().invoke(cli, [*args, "--pipeline", str(opened), "--json"])
    runs = json.loads((tmp_path / "cmp" / "lora" / "manifest.json").read_text())["steps"]
    assert again.exit_code == result.exit_code and sum(e["step"] == "train" for e in runs) == 1

    # a method whose training fails its forgetting gate is still a row with what it measured (a gate no
    # adapter can pass: perplexity must fall by 99%)
    strict = tmp_path / "strict.yaml"
    strict.write_text("train:\n  max_ppl_rise: '-0.99'\n")
    failed = CliRunner().invoke(cli, [*args[:2], "rslora", *args[3:-len(WINDOW) - 2], "--run", str(tmp_path / "strict"),
                                      "--pipeline", str(strict), *WINDOW])
    assert failed.exit_code == 3, failed.output
    (row,) = json.loads((tmp_path / "strict" / "manifest.json").read_text())["steps"][-1]["metrics"]["rows"]
    assert not row["ok"] and "--max-ppl-rise" in row["error"] and row["merged"] is None
    assert row["trainable_params"] == lora["trainable_params"] and row["forgetting"] is not None
