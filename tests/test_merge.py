"""edgeft merge on tiny config-built Llamas: exactness, refusals, the NF4 path, sharding, the ledger."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from edgeft.cli import cli
from edgeft.merge import MergeConfig, merge, nf4_roundtrip

from .conftest import train_tiny


def _other_llama(tiny_llama, path, seed=1, **changes):
    """A Llama like tiny_llama but with other weights (and optionally another shape)."""
    config = LlamaConfig.from_pretrained(tiny_llama)
    for k, v in changes.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def lora_adapter(base, out, seed=0):
    """A PEFT LoRA (r 4, attention + MLP) with random nonzero A and B, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_merged_equals_unmerged_and_loads_with_plain_transformers(tiny_llama, tiny_adapter_run, tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_run, run)
    result = merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128))
    assert result.merged == run / "merged" and result.into == "original"
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")  # plain transformers, nothing of ours
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    assert tokenizer.chat_template and merged.dtype == torch.float32

    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = list(range(1000, 1100))
    assert not torch.allclose(_logits(base, ids), _logits(unmerged, ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(_logits(merged, ids), _logits(unmerged, ids), atol=2e-5, rtol=1e-5)

    (entry,) = result.entries
    assert entry["status"] == "ok" and entry["gate"]["passed"]
    assert abs(entry["metrics"]["drift_vs_unmerged"]) < 1e-3  # float32: within 0.1%
    assert entry["perplexity"]["ppl"] > 1 and entry["reference"]["ppl"] > 1
    assert entry["metrics"]["fingerprint"]["checked"] and entry["outputs"][0]["bytes"] > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["step"] for s in manifest["steps"]] == ["train", "merge"]


def test_float16_merge_is_close_and_sharding_works(tiny_adapter_run, tmp_path):
    result = merge(MergeConfig(adapter=str(tiny_adapter_run), run=str(tmp_path / "r"), out=str(tmp_path / "m16"),
                               dtype="float16", shard_mb=0.1, window=128, stride=128, eval_budget=300,
                               eval_generate=0))
    files = sorted(p.name for p in (tmp_path / "m16").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "m16" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert model.dtype == torch.float16
    assert abs(result.entries[0]["metrics"]["drift_vs_unmerged"]) < 0.01


def test_wrong_base_is_refused_naming_both_and_force_is_recorded(tiny_llama, tiny_adapter_run, tmp_path):
    other = _other_llama(tiny_llama, tmp_path / "other")
    args = ["merge", "--adapter", str(tiny_adapter_run), "--base", str(other), "--run", str(tmp_path / "r")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "was trained on" in line and str(tiny_llama) in line and str(other) in line and "--force" in line
    assert not (tmp_path / "r" / "merged").exists()

    result = CliRunner().invoke(cli, args + ["--force", "--max-drift", "100", "--eval-budget", "300",
                                             "--window", "128", "--stride", "128"])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "r" / "manifest.json").read_text())["steps"][-1]
    assert entry["metrics"]["fingerprint"]["forced"] is True


def test_missing_modules_and_wrong_shapes_are_refused(tiny_llama, tiny_adapter_run, tmp_path):
    one_layer = _other_llama(tiny_llama, tmp_path / "one", num_hidden_layers=1)
    run = ["--run", str(tmp_path / "r")]  # not the adapter's run: a session fixture the later tests read
    result = CliRunner().invoke(cli, ["merge", "--adapter", str(tiny_adapter_run), "--base", str(one_layer), "--force",
                                      *run])
    assert result.exit_code == 2 and "does not have" in result.output and "layers.1" in result.output
    wider = _other_llama(tiny_llama, tmp_path / "wide", intermediate_size=256)
    result = CliRunner().invoke(cli, ["merge", "--adapter", str(tiny_adapter_run), "--base", str(wider), "--force",
                                      *run])
    assert result.exit_code == 2 and "another size" in result.output


def test_nf4_roundtrip_is_what_the_4bit_training_base_multiplies_with(tiny_llama):
    import bitsandbytes.functional as bnbf

    from edgeft.train import TrainConfig, hardware, build_model

    cfg = TrainConfig(data="demo", quant="4bit")
    model, _ = build_model(tiny_llama, cfg, hardware(cfg))
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    seen = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0].mlp.down_proj.weight
    assert torch.equal(nf4_roundtrip(original.data, "float32"), seen)


def test_auto_merges_a_qlora_adapter_both_ways_and_records_the_choice(tiny_llama, tmp_path):
    run = train_tiny(tiny_llama, tmp_path / "q", quant="4bit", lr=1e-2, max_steps=4, eval_generate=4).run
    result = merge(MergeConfig(adapter=str(run), dtype="float32", window=128, stride=128, eval_generate=4,
                               max_drift=0.01))
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["train", "merge", "merge", "merge-choice"]
    assert [s["inputs"]["into"] for s in steps[1:3]] == ["original", "dequantized"]
    choice = steps[-1]["metrics"]
    assert choice["chosen"] == result.into and set(choice["candidates"]) == {"original", "dequantized"}
    assert "exact answers" in choice["reason"]
    assert (run / "merged" / "model.safetensors").is_file()
    assert not (run / "merged-original").exists() and not (run / "merged-dequantized").exists()
    # the NF4-rounded base is what the adapter was trained on: merged into it, it matches base+adapter
    assert abs(steps[2]["metrics"]["drift_vs_unmerged"]) < 1e-3


def test_a_bf16_base_is_scored_at_16_bits_exactly_as_in_float32(tiny_tokenizer, tmp_path):
    """merge keeps the 16-bit checkpoints at 16 bits while scoring them; the gate still sees float32 scores."""
    from peft import PeftModel

    from edgeft.models import add_adapter, load_for_scoring, load_model
    from edgeft.scoring import score, torch_logits_fn

    from .tiny_models import tiny_model

    base = tiny_model("llama", tmp_path / "base", tiny_tokenizer, dtype="bfloat16")
    adapter = lora_adapter(base, tmp_path / "adapter")
    lean = add_adapter(load_for_scoring(base), adapter)
    assert {p.dtype for n, p in lean.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    full = PeftModel.from_pretrained(load_model(base, "float32"), adapter).eval()
    ids = list(range(1000, 1100))
    assert torch.equal(_logits(lean, ids), _logits(full, ids))
    assert not torch.allclose(_logits(lean, ids), _logits(load_model(base, "float32"), ids), atol=1e-3)

    run = tmp_path / "run"
    result = merge(MergeConfig(adapter=str(adapter), model=str(base), run=str(run), dtype="bfloat16", window=128,
                               stride=128, eval_budget=300))
    (entry,) = result.entries
    ids = json.loads((run / "eval_tokens.json").read_text())["ids"]

    def float32_ppl(model):
        return score(ids, torch_logits_fn(model), window=128, stride=128).ppl

    assert entry["reference"]["ppl"] == pytest.approx(float32_ppl(full), rel=1e-6)
    merged = load_model(result.merged, "float32").eval()
    assert entry["perplexity"]["ppl"] == pytest.approx(float32_ppl(merged), rel=1e-6)
