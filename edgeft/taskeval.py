"""How well a model does the user's task: loss on the held-out split, and exact answers to held-out prompts.

Both are measured on the split the model never trained on. `exact_match` generates greedily from each
held-out prompt (rendered with the generation prompt, as inference will) and compares with the expected
final answer; it is the metric that tells whether the trained output format survived a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .dataset import IGNORE, Example, as_messages


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
    only. Models that cap or scale logits (Gemma 2's softcapping, Cohere's logit_scale) take the full path."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return (getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and hasattr(base, "get_decoder") and base.get_output_embeddings() is not None)


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


@torch.inference_mode()
def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> float | None:
    if not examples:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = loss_sum(model, collate(examples[i:i + batch_size], pad_id, device))
        total += float(loss)
        count += n
    return total / count if count else math.nan


@dataclass
class ExactMatch:
    rate: float
    n: int
    samples: list[dict]  # a few (prompt, expected, got) for the ledger, so a person can see what happened


def prompts_and_answers(examples: list[Example]) -> list[tuple[list[dict], str]]:
    """(messages up to the last assistant turn, that turn's content) for chat-like held-out rows."""
    out = []
    for e in examples:
        messages = as_messages(e.row)
        if messages and messages[-1]["role"] == "assistant":
            out.append((messages[:-1], messages[-1]["content"]))
    return out


@torch.inference_mode()
def exact_match(model, tokenizer, examples: list[Example], limit: int = 20, max_new_tokens: int = 64,
                check: Callable[[str, str], bool] | None = None) -> ExactMatch | None:
    pairs = prompts_and_answers(examples)[:limit]
    if not pairs or not tokenizer.chat_template:
        return None
    device = next(model.parameters()).device
    check = check or (lambda got, want: got.strip() == want.strip())
    hits, samples = 0, []
    for messages, want in pairs:
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        got = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        ok = check(got, want)
        hits += ok
        if len(samples) < 3:
            samples.append({"prompt": messages[-1]["content"][-120:], "expected": want, "got": got, "ok": ok})
    return ExactMatch(rate=hits / len(pairs), n=len(pairs), samples=samples)
