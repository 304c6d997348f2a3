"""Batches from examples: padded, packed, and the summed loss on their labels."""

from dataclasses import replace

import torch

from edgeft.batches import collate, loss_sum, pack
from edgeft.dataset import load_examples
from edgeft.models import load_model, load_tokenizer
from edgeft.dataset import demo_data_path


def test_packed_batch_has_the_same_loss_as_the_padded_one(tiny_llama):
    """Padding-free packing: one row, positions restarting per example, attention kept inside each example.
    If attention leaked across examples, or the next example's first token were a target, the sums differ."""
    tok = load_tokenizer(tiny_llama)
    rows = load_examples(demo_data_path(), tok, 1024, strict=True)[0][:5]
    # every token labelled (text rows): a next example's first token must still never be a target
    rows = [replace(r, labels=list(r.input_ids)) for r in rows[:2]] + rows[2:]
    for impl in ("sdpa", "eager"):
        model = load_model(tiny_llama, "float32", attn_implementation=impl)
        padded, n_padded = loss_sum(model, collate(rows, tok.pad_token_id, "cpu"))
        packed, n_packed = loss_sum(model, pack(rows, "cpu"))
        assert n_packed == n_padded
        assert torch.allclose(padded, packed, rtol=1e-5), (impl, float(padded), float(packed))
        # the mask matters: the same rows as one causal sequence (no restart) score differently
        flat = pack(rows, "cpu")
        flat["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        leaked = float(loss_sum(model, flat)[0])
        assert abs(leaked - float(packed)) > 100 * abs(float(padded) - float(packed)) + 1e-2, (leaked, float(packed))
