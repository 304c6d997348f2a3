"""Every converter family through the rest of the chain: `edgeft train` finds the family's projections, `merge`
folds the adapter in within its drift gate, and the ONNX export of the merged model matches HF within 0.1% with
the same greedy answer. The families come from the converter's registry (adding a family there adds its case
here); each runs on its tiny config-built model (tests/tiny_models.py) in seconds.

The perplexity windows and the greedy answer are longer than every length at which a family changes behaviour
(Gemma's sliding window, Phi-3's longrope switch from short to long factors), so the export has to reproduce
HF on both sides of it, in one forward and through the KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from edgeft.cli import cli

from . import tiny_models as tm
from .conftest import train_tiny

# The LoRA targets `edgeft train` must pick for each architecture: every attention and MLP projection, never the
# head. Named here, not derived from the model, so a family whose projections are found wrong fails.
SPLIT = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FUSED = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # Phi-3: q/k/v and gate/up are one matrix each
EXPECTED_TARGETS = {
    "LlamaForCausalLM": SPLIT, "MistralForCausalLM": SPLIT, "Qwen2ForCausalLM": SPLIT, "Qwen3ForCausalLM": SPLIT,
    "Gemma2ForCausalLM": SPLIT, "Gemma3ForCausalLM": SPLIT, "SmolLM3ForCausalLM": SPLIT, "Phi3ForCausalLM": FUSED,
}


def context_for(config: dict) -> int:
    """Tokens per perplexity window: 64 beyond the sliding window and beyond a longrope model's original context
    (where HF switches to the long factors). The greedy answer, after its prompt, runs 8 tokens beyond them."""
    lengths = [config.get("sliding_window") or 0]
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "longrope":
        lengths.append(rope.get("original_max_position_embeddings") or config["original_max_position_embeddings"])
    return max(64, *lengths) + 64


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _ok_entry(run: Path, step: str, result) -> dict:
    assert result.exit_code == 0, result.output
    entry = [s for s in json.loads((run / "manifest.json").read_text())["steps"] if s["step"] == step][-1]
    assert entry["status"] == "ok" and entry["gate"]["passed"], entry.get("gate")
    return entry


@pytest.mark.slow  # 30-70 s a family on 2 cores (torch.onnx.export dominates): the end-to-end tier
@pytest.mark.parametrize("arch,key", [pytest.param(arch, key, id=key or arch) for arch, key in tm.registry_cases()])
def test_family_trains_merges_and_exports_onnx_like_hf(arch, key, tiny_root):
    assert key is not None, f"{arch} is registered in the converter but has no tiny model in tests/tiny_models.TINY"
    assert arch in EXPECTED_TARGETS, f"{arch}: name the LoRA targets `edgeft train` must find in EXPECTED_TARGETS"
    base = tm.tiny_model(key, tiny_root / key, tm.tokenizer_for(key, tiny_root / "tokenizers"))
    config = json.loads((base / "config.json").read_text())
    ctx = context_for(config)
    held_out = ["--window", str(ctx), "--stride", str(ctx), "--eval-budget", str(2 * ctx)]

    # (a) two steps of `edgeft train`: the adapter sits on every attention and MLP projection of every layer.
    run = train_tiny(base, tiny_root / f"{key}-run", max_steps=2, batch_size=2, lr=1e-2, window=ctx, stride=ctx,
                     eval_budget=2 * ctx).run
    targets = EXPECTED_TARGETS[arch]
    assert set(json.loads((run / "manifest.json").read_text())["steps"][0]["metrics"]["target_modules"]) == targets
    assert set(json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]) == targets
    lora = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(lora) == 2 * len(targets) * config["num_hidden_layers"], sorted(lora)

    # (b) `edgeft merge` in float32: within 0.1% of base + adapter unmerged; exactly the targets' weights change.
    entry = _ok_entry(run, "merge", CliRunner().invoke(cli, [
        "merge", "--adapter", str(run), "--dtype", "float32", "--eval-generate", "0", *held_out]))
    assert abs(entry["metrics"]["drift_vs_unmerged"]) < 1e-3, entry["metrics"]
    before, after = load_file(base / "model.safetensors"), load_file(run / "merged" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # LoRA adapts the projections' weights only (bias="none"): Qwen2's q/k/v biases stay as they were.
    adapted = {name for name in before if name.endswith(".weight") and name.split(".")[-2] in targets}
    assert changed == adapted, sorted(changed ^ adapted)

    # (c) ONNX fp32 of the merged model: onnxruntime's perplexity within 0.1% of HF's on windows longer than the
    # family's special lengths, and the same greedy answer, decoded through the KV cache past them.
    entry = _ok_entry(run, "export-onnx", CliRunner().invoke(cli, [
        "export", "--format", "onnx", "--run", str(run), "--quant", "fp32", "--task-answers", "0",
        "--generate-tokens", str(ctx - 56), *held_out]))
    assert abs(entry["gate"]["value"]) < 1e-3 and entry["metrics"]["greedy_identical_to_hf"], entry["metrics"]
    assert len(entry["metrics"]["sample"]["ids"]) > ctx - 64, "the greedy answer stopped before the special lengths"
    assert entry["perplexity"]["window"] == ctx and entry["perplexity"]["windows"] >= 1
