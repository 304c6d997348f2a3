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

from .batches import collate, loss_sum
from .dataset import Example, as_messages


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
        # An answer that has not ended well past the expected one's length cannot equal it: stop there
        # (a model that rambles would otherwise cost the full max_new_tokens per prompt).
        budget = min(max_new_tokens, 2 * len(tokenizer(want, add_special_tokens=False)["input_ids"]) + 8)
        out = model.generate(**enc, max_new_tokens=budget, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        got = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        ok = check(got, want)
        hits += ok
        if len(samples) < 3:
            samples.append({"prompt": messages[-1]["content"][-120:], "expected": want, "got": got, "ok": ok})
    return ExactMatch(rate=hits / len(pairs), n=len(pairs), samples=samples)
