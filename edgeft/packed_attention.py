"""Attention for packed rows (train --packing) that keeps each example to itself without a dense mask.

A packed micro-batch is one row of examples back to back, position ids restarting at 0 for each (batches.pack).
transformers turns that into a block-diagonal [1, 1, L, L] boolean mask for sdpa: on CUDA a mask rules out the
flash kernel, and the mask and the attention both grow with the square of the *packed* length (8 examples of
1,024 tokens: 8,192^2), although no example attends past its own end. Two ways around it, chosen by `choose`:
- flash_attention_2, when the flash-attn package is installed and the GPU runs it: transformers reads the
  example boundaries from the position ids and calls the variable-length kernel;
- otherwise "edgeft_packed_sdpa", registered here with transformers' AttentionInterface: sdpa once per example
  with is_causal=True (no mask at all), so the flash/efficient kernels apply and the cost is the sum of the
  examples' squares. Its mask hook is transformers' flash-attention one, which hands over no 4-D mask.

On CPU the default stays transformers' sdpa with its block-diagonal mask (what every ledger so far measured).
The choice is recorded in the ledger (`hardware.packing_attention`). The packed loss equals the padded batch's
either way (tests/test_batches.py).
"""

from __future__ import annotations

import torch

PACKED_SDPA = "edgeft_packed_sdpa"

# One forward passes the same position-ids tensor to every layer: the example boundaries are read from it once
# (one device sync per forward, not one per layer).
_boundaries: tuple[object, list[int]] | None = None


def _segments(position_ids: torch.Tensor) -> list[int]:
    global _boundaries
    if _boundaries is not None and _boundaries[0] is position_ids:
        return _boundaries[1]
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, position_ids.shape[-1]]
    _boundaries = (position_ids, bounds)
    return bounds


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves heads // kv_heads query heads."""
    kv_heads = x.shape[1]
    return x if kv_heads == heads else x.repeat_interleave(heads // kv_heads, dim=1)


def _causal(q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """Query i (at absolute position kv_len - q_len + i) sees keys j <= its position (and within the window)."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=device)[None, :]
    keep = cols <= rows
    if window:
        keep &= rows - cols < window
    return keep


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, Q, D], key/value [B, KVH, K, D] -> ([B, Q, H, D], None), as transformers' interfaces return.

    attention_mask is what the flash mask hook gives: None (no padding) or a 2-D [B, K] padding mask."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{PACKED_SDPA} does not cap attention logits; use eager attention for this model")
    heads = query.shape[1]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    window = kwargs.get("sliding_window")
    dropout = dropout if module.training else 0.0
    position_ids = kwargs.get("position_ids")
    q_len, kv_len = query.shape[2], key.shape[2]
    packed = (attention_mask is None and position_ids is not None and q_len == kv_len and query.shape[0] == 1)
    if packed:
        bounds = _segments(position_ids)
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
            if window and b - a > window:
                mask = _causal(b - a, b - a, window, query.device)
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling))
            else:
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=dropout, scale=scaling))
        out = torch.cat(outs, dim=2)
    else:  # not a packed row (evaluation, generation): causal, with padding and a cache offset when given
        mask = _causal(q_len, kv_len, window, query.device)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -kv_len:].bool()
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                               dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make PACKED_SDPA a valid attn_implementation for every transformers model (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, flash_attention_mask)


def flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def choose(attn: str, packing: bool, device: str, capability: tuple[int, int] | None, compute_dtype: str,
           softcapped: bool) -> tuple[str, str]:
    """(attn_implementation to load the model with, or "auto" for transformers' default; what packed rows get).

    `attn` is --attn: anything but auto is the user's choice and kept."""
    if not packing:
        return attn, "none (padded batches)"
    if attn != "auto":
        return attn, {"flash_attention_2": "flash_attention_2 (variable-length kernel)",
                      "sdpa": "sdpa with a block-diagonal mask",
                      "eager": "eager with a block-diagonal mask",
                      "flex_attention": "flex_attention (block mask)",
                      PACKED_SDPA: "sdpa per example (no mask)"}.get(attn, attn)
    if device != "cuda":
        return "auto", "sdpa with a block-diagonal mask"
    if softcapped:  # logit soft-capping (Gemma 2): neither sdpa path computes it; transformers picks eager
        return "auto", "transformers' default (logit soft-capping)"
    if flash_attn_available() and capability and capability >= (8, 0) and compute_dtype != "float32":
        return "flash_attention_2", "flash_attention_2 (variable-length kernel)"
    return PACKED_SDPA, "sdpa per example (no mask)"
