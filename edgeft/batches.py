"""Tensors from training examples, and the loss summed over their labelled tokens.

`collate` pads a micro-batch; `pack` puts it in one row without padding. `loss_sum` is the one loss every
step uses (training, task eval loss): the vocabulary head runs only where there is a label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import IGNORE, Example


def collate(examples: list[Example], pad_id: int, device) -> dict:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    # Counted here, on the host: counting on the device would make every step wait for the GPU.
    n_labels = int((labels[:, 1:] != IGNORE).sum())
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "n_labels": n_labels}


def pack(examples: list[Example], device) -> dict:
    """The micro-batch as one row, its examples back to back with no padding. Position ids restart at 0 for
    each example: that is how transformers recognises packed rows and keeps attention inside each one
    (variable-length kernels for flash attention, a block-diagonal causal mask for sdpa, eager and flex).
    Each example's first label is masked so that no example learns to predict the next one's first token;
    the loss is then the same as on the padded batch."""
    ids, labels, positions = [], [], []
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE] + e.labels[1:]
        positions += range(len(e.input_ids))
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long).to(device)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "labels": as_row(labels),
            "attention_mask": None, "n_labels": sum(x != IGNORE for x in labels[1:])}


def _plain_head(model) -> bool:
    """True when logits are just lm_head(hidden): then the head can be applied to the labelled positions
    only. Models that cap or scale logits (Gemma 2's softcapping, Cohere's logit_scale) take the full path,
    and so does a sharded model (train --shard): it gathers its embeddings and head in its own forward, which
    calling the decoder and the head one by one would skip."""
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return (not isinstance(base, FSDPModule) and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None and hasattr(base, "get_decoder")
            and base.get_output_embeddings() is not None)


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled tokens, and their count. Summing (not averaging per batch) lets
    the trainer normalise by the tokens of a whole optimizer step, whatever the micro-batching.

    The vocabulary projection is applied only where there is a label: on chat data most positions are
    prompt, and for a small model with a 49k vocabulary the head is a fifth of the step's FLOPs (measured on
    the demo set: ~20% faster steps, and no [batch, seq, vocab] logits tensor in memory)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if batch.get("position_ids") is not None:  # a packed batch (see pack)
        inputs["position_ids"] = batch["position_ids"]
    if _plain_head(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(**inputs).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    else:
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    return loss, batch["n_labels"]


class SummedLoss(torch.nn.Module):
    """loss_sum as a module: what a data-parallel wrapper needs to see as the forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return loss_sum(self.model, batch)[0]
