"""What a GPU box meets first, tested on CPU: the compute dtype by capability (and forced bf16/fp16 on a 4-bit
base), peft's parameter counts, tokens/s without the warm-up step, and attention for packed rows without a
dense mask."""

import json

import pytest
import torch
from safetensors.torch import load_file

from edgeft.batches import collate, loss_sum, pack
from edgeft.dataset import Example
from edgeft.merge import MergeConfig, merge, nf4_roundtrip
from edgeft.packed_attention import PACKED_SDPA, choose, register
from edgeft.train import TrainConfig, build_model, compute_dtype, hardware

from .conftest import train_tiny


@pytest.mark.parametrize("choice,device,capability,model_type,expected", [
    ("auto", "cpu", None, "llama", "float32"),
    ("auto", "cuda", (9, 0), "llama", "bfloat16"),      # H100
    ("auto", "cuda", (8, 0), "gemma2", "bfloat16"),     # A100
    ("auto", "cuda", (7, 5), "llama", "float16"),       # T4: torch's is_bf16_supported() says yes (emulated)
    ("auto", "cuda", (7, 0), "gemma3_text", "float32"),  # V100 and a family that overflows fp16
    ("fp16", "cuda", (9, 0), "llama", "float16"),
    ("bf16", "cpu", None, "llama", "bfloat16"),
    ("fp32", "cuda", (9, 0), "llama", "float32"),
])
def test_compute_dtype_follows_the_card(choice, device, capability, model_type, expected):
    dtype, why = compute_dtype(choice, device, capability, model_type)
    assert dtype == expected and why


def test_forced_bf16_on_a_card_without_it_is_one_line():
    from edgeft.errors import EdgeftError

    with pytest.raises(EdgeftError, match="no native bf16; use fp16"):
        compute_dtype("bf16", "cuda", (7, 5), "llama")


def test_packed_rows_get_a_kernel_without_a_dense_mask_on_a_gpu():
    # no flash-attn here: sdpa per example; CPU keeps transformers' block-diagonal mask; --attn is the user's
    assert choose("auto", True, "cuda", (9, 0), "bfloat16", False) == (PACKED_SDPA, "sdpa per example (no mask)")
    assert choose("auto", True, "cpu", None, "float32", False)[0] == "auto"
    assert choose("eager", True, "cuda", (9, 0), "bfloat16", False)[0] == "eager"
    assert choose("auto", False, "cuda", (9, 0), "bfloat16", False) == ("auto", "none (padded batches)")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_4bit_base_in_16_bit_compute_keeps_lora_in_float32_and_rounds_as_bitsandbytes(tiny_llama, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    config = TrainConfig(data="demo", base_quant="4bit", compute_dtype=dtype)
    hw = hardware(config)
    assert hw["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert hw["loss_scaling"] == (dtype == "fp16")
    model, _ = build_model(tiny_llama, config, hw)
    sixteen = getattr(torch, hw["compute_dtype"])
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert model.get_base_model().model.embed_tokens.weight.dtype == sixteen  # the frozen base: 16 bits
    layer = model.get_base_model().model.layers[1].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    seen = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[1].self_attn.q_proj.weight
    assert torch.equal(nf4_roundtrip(original.data, hw["compute_dtype"]), seen)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_qlora_in_16_bit_compute_trains_counts_right_and_merges_into_auto(tiny_llama, tmp_path, dtype):
    result = train_tiny(tiny_llama, tmp_path / "q", base_quant="4bit", compute_dtype=dtype, lr=1e-2, max_steps=3)
    metrics = result.entry["metrics"]
    assert metrics["hardware"]["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert all(loss == loss and loss > 0 for loss in metrics["loss_curve"])  # finite: fp16 did not overflow
    adapter = load_file(result.adapter / "adapter_model.safetensors")
    b = [t for n, t in adapter.items() if "lora_B" in n]
    assert len(b) == 14 and all(t.abs().sum() > 0 for t in b)  # B starts at zero: every one got gradients
    assert all(t.dtype == torch.float32 for t in adapter.values())

    # the ledger's counts are peft's (a Params4bit's numel() is half its weights)
    model, _ = build_model(tiny_llama, TrainConfig(data="demo", base_quant="4bit", compute_dtype=dtype),
                           hardware(TrainConfig(data="demo", base_quant="4bit", compute_dtype=dtype)))
    trainable, total = model.get_nb_trainable_parameters()
    assert (metrics["trainable_params"], metrics["total_params"]) == (trainable, total)
    assert total > sum(p.numel() for p in model.parameters())
    assert metrics["trainable_pct"] == round(100 * trainable / total, 3)

    merged = merge(MergeConfig(adapter=str(result.run), dtype="float32", window=128, stride=128, eval_generate=0,
                               max_drift=0.05))
    steps = json.loads((result.run / "manifest.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["train", "merge", "merge", "merge-choice"]
    assert merged.into in ("original", "dequantized") and (result.run / "merged" / "config.json").is_file()
    # merged into the base rounded from this compute dtype, it reproduces the 4-bit base + adapter
    assert abs(steps[2]["metrics"]["drift_vs_unmerged"]) < 1e-2


def test_tokens_per_s_leaves_out_the_warm_up_step(tiny_llama, tmp_path):
    metrics = train_tiny(tiny_llama, tmp_path / "t", max_steps=3).entry["metrics"]
    assert metrics["tokens_per_s_warmup_steps"] == 1 and metrics["tokens_per_s"] > 0
    assert metrics["peak_gpu_mb_training_allocated"] is None and "peak_gpu_mb_training_reserved" in metrics


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, 1500, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        out.append(Example(ids, labels, sum(x != -100 for x in labels[1:]), {}))
    return out


def test_per_example_sdpa_gives_the_padded_batch_loss_and_gradients(tiny_llama):
    """The packed loss still equals the padded batch's with the mask-free kernel (and with sdpa's dense mask)."""
    from transformers import AutoModelForCausalLM

    register()
    rows = _examples([37, 64, 5, 50])
    results = {}
    for name, attn, batch in [("padded", "sdpa", collate(rows, 0, "cpu")), ("dense", "sdpa", pack(rows, "cpu")),
                              ("per-example", PACKED_SDPA, pack(rows, "cpu"))]:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn, dtype=torch.float32)
        loss, n = loss_sum(model, batch)
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        results[name] = (loss.detach(), n, grad)
    ref_loss, ref_n, ref_grad = results["padded"]
    for name in ("dense", "per-example"):
        loss, n, grad = results[name]
        assert n == ref_n
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_training_with_per_example_sdpa_records_it_and_then_evaluates_with_sdpa(tiny_llama, tmp_path):
    result = train_tiny(tiny_llama, tmp_path / "p", attn=PACKED_SDPA, max_steps=2, eval_generate=2)
    hw = result.entry["metrics"]["hardware"]
    assert hw["attn"] == PACKED_SDPA and hw["packing_attention"] == "sdpa per example (no mask)"
    assert result.entry["status"] == "ok"
