"""Measurements taken from the ledger instead of measured again.

A perplexity and a task score are functions of their inputs: the weights (the base's fingerprint, the adapter
files' sha256, how the base is held and computed, on which device), the scored ids and their window plan,
the task set and how many of its prompts are answered. A step records `measured_key`, a hash of those inputs,
beside what it measured (the entry's perplexity and task); a later step about to measure exactly the same
inputs takes the recorded numbers instead of loading the model again, and its entry says so (`reused_from`).
`edgeft merge` right after `edgeft train`: the unmerged base + adapter is train's "after", measured minutes
earlier on the same ids.

Anything that could change a logit is in the key, so a reuse is exact or does not happen: an adapter trained
on a 4-bit base (bitsandbytes computes in 16 bits) or compiled, another device, other ids or another number
of answers all measure afresh.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

KEY = "measured_key"


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def torch_weights(base_fingerprint: dict, adapter_sha256: str, base_held: str, compute: str, device: str,
                  attn: str = "auto", compiled: bool = False) -> dict:
    """What decides a transformers model's logits besides the ids: the base (models.fingerprint), the adapter
    folder's sha256 (ledger.artifact), the base as held ('none': its own values; '4bit'/'8bit': bitsandbytes),
    the compute dtype, the device type, the attention implementation, and whether layers were compiled."""
    return {"base": base_fingerprint, "adapter": adapter_sha256, "base_held": base_held, "compute": compute,
            "device": device, "attn": attn, "compiled": compiled}


def measurement_key(weights: dict, ids: Sequence[int], window: int, stride: int, task=None, answers: int = 0,
                    bos: int | None = None) -> str:
    """The hash of a measurement's inputs: `weights` (torch_weights), the held-out ids as scored and their
    windows (with the BOS that starts each, if any), and the task set (task.TaskSet) with the number of its
    prompts answered."""
    inputs = {"weights": weights, "ids": _sha256(list(ids)), "window": window, "stride": stride,
              "task": _sha256(task.to_json()) if task is not None else None,
              "answers": answers if task is not None else 0}
    if bos is not None:  # only then: a model without BOS keeps the keys its runs recorded before
        inputs["bos"] = bos
    return _sha256(inputs)



def find_measurement(run, key: str) -> dict | None:
    """The latest entry of `run` (run.Run) that measured exactly these inputs. A failed gate does not
    disqualify it: the gate judged the numbers, it did not change them."""
    return run.last(status=None, where=lambda e: e.get(KEY) == key and bool(e.get("perplexity")))
