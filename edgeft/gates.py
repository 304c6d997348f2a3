"""Quality gates: the limit each step's result must stay within, and the one way a gate is recorded.

Every step that can degrade the model records its gate in its ledger entry with `check`, which raises
GateFailed when the gate fails: the entry is then written as failed with that reason (see run.Run.record), and
the command exits 3. A value that is not a finite number (NaN, inf) always fails: "NaN > limit" is False,
so a comparison alone would let a broken model through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import EdgeftError, GateFailed

# The unquantized GGUF or the fp32 ONNX graph must score within 0.1% of the HF model: a conversion is exact
# up to float rounding, so anything more is a wrong conversion.
HF_MATCH = 0.001
# base GGUF + LoRA GGUF vs the GGUF with the adapter fused in.
LORA_MATCH = 0.005
# The board vs the host on the same GGUF and ids: ARM's dot-product kernels round differently. Per token
# that rounding is large but unbiased: on the default model's Q4_K_M, emulated Pi 5 vs x86, the per-token
# NLL differences have mean +0.0001 and sd 0.10 nats over 1,022 tokens, so 128 tokens' perplexity ratio
# wanders by ~0.9% (one standard error) around no change at all: measured -1.05% to +0.98% over eight
# 128-token blocks; +1.89% was seen on another fine-tune. A gate on the raw ratio fails a healthy board by
# chance. The gate is therefore on the part of the change beyond BOARD_Z standard errors of the mean
# per-token difference (scoring.TokenDifference.excess): a healthy build fails it with probability below
# Phi(-3) = 0.13% even if its true change were at the limit, whatever the number of tokens; a broken build
# (garbage, or a real change beyond BOARD_MATCH) fails it as soon as the tokens show it (with the 8,176 ids
# of a real board, a true change of 2% + 3 x 0.11%; under emulation's 128 tokens, a gross one).
BOARD_MATCH = 0.02
BOARD_Z = 3.0

# The largest held-out perplexity rise vs the unquantized GGUF. Measured on the 135M default model (its
# weights were already 4-bit before we got them): Q8_0 +0.1%, Q4_K_M +4.3% (llama.cpp's own chunks).
# 8-bit should be nearly lossless, so 2% flags a broken quantization, not noise; 4/5-bit rounding costs a
# small model several percent, so 15% passes honest results and stops the broken ones (Q2/Q3 often are).
GGUF_GATES = {"q8_0": 0.02, "q6_k": 0.05, "q5_k_m": 0.08, "q5_0": 0.08, "q4_k_m": 0.15, "q4_k_s": 0.15,
              "q4_0": 0.15, "q3_k_m": 0.30}
GGUF_GATE_OTHER = 0.15
# The task (the fine-tune's held-out answers, see task.py): the largest task-perplexity rise and the largest
# drop in the exact-answer rate vs the unquantized artifact, per quant. Measured on the demo fine-tune (20
# held-out JSON answers, 2026-12-04): task perplexity rise Q8_0 +0.07%, Q4_K_M +0.48%, ONNX int8 +0.07%, int4
# +3.3%; exact answers 100% for every artifact (no drop). A fine-tune's answers are learned nearly exactly (task
# perplexity ~1.02), so quantization moves them far less than the held-out text (Q4_K_M +8.05% there, int4
# +34.6%): these limits leave a 5-30x margin over those measurements, so they stop a quant that broke the task,
# not honest rounding. One answer of 20 is 5 points: 8-bit may lose at most one, 4-6-bit two.
TASK_PPL_GATES = {"q8_0": 0.02, "int8": 0.02, "q6_k": 0.03, "q5_k_m": 0.05, "q5_0": 0.05, "q4_k_m": 0.10,
                  "q4_k_s": 0.10, "q4_0": 0.10, "q3_k_m": 0.20, "int4": 0.15}
TASK_PPL_GATE_OTHER = 0.10
EXACT_DROP_GATES = {"q8_0": 0.05, "int8": 0.05, "q3_k_m": 0.20, "int4": 0.15}
EXACT_DROP_GATE_OTHER = 0.10
# ONNX weight-only: int8 measured +0.7% on the default model, so 2% catches a broken graph. int4 costs this
# model ~35% (its weights were already 4-bit), so its gate is 50%; on a real fp16 fine-tune expect far
# less, and tighten it with --max-ppl-rise int4=0.15.
ONNX_GATES = {"int8": 0.02, "int4": 0.50}


@dataclass
class Gate:
    """A limit on one measured value: it passes when value <= limit (|value| with `absolute`) and `also`. A
    measurement with no limit (limit None: eval's perplexity) must still be a number."""

    metric: str
    value: float | None
    limit: float | None
    failure: str  # the one-line reason when it fails
    absolute: bool = False
    also: bool = True


def check(entry: dict, *gates: Gate) -> None:
    """Record every gate in the ledger entry (entry["gates"]; entry["gate"] is the first, the step's main
    one) and raise one GateFailed naming each gate that failed."""
    records = entry.setdefault("gates", [])
    failures = []
    for g in gates:
        shown = abs(g.value) if g.absolute and g.value is not None else g.value
        finite = isinstance(shown, (int, float)) and math.isfinite(shown)
        passed = finite and (g.limit is None or shown <= g.limit) and bool(g.also)
        record = {"metric": g.metric, "max": g.limit, "value": round(shown, 6) if finite else None, "passed": passed}
        if not finite:
            record["not_finite"] = str(shown)
            failures.append(f"{g.failure} ({g.metric} is {shown}, not a number: the model's output is broken)")
        elif not passed:
            failures.append(g.failure)
        records.append(record)
    entry.setdefault("gate", records[0])
    if failures:
        raise GateFailed("; ".join(failures))


def passed(entry: dict) -> bool:
    """Whether every gate the entry recorded passed (an entry without gates passes)."""
    return all(g["passed"] for g in entry.get("gates") or ([entry["gate"]] if entry.get("gate") else []))


def parse_gates(spec: str | float | None, defaults: dict[str, float], made: list[str], other: float | None = None,
                flag: str = "--max-ppl-rise") -> dict[str, float]:
    """The gate of each artifact in `made`: `defaults`, overridden by `flag` (--max-ppl-rise, --max-drift,
    --max-task-ppl-rise, --max-exact-drop), which is one number for all ('0.1') or per artifact
    ('q8_0=0.02,q4_k_m=0.15'): the one syntax of every gate flag of every command."""
    gates = {q: defaults.get(q, other) for q in made}
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return gates
    try:
        number = float(spec)  # a Python or YAML number, or its text
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):
            raise EdgeftError(f"{flag} {spec}: a gate's limit must be a finite number")
        gates = {q: number for q in gates}
    else:
        for part in str(spec).split(","):
            q, _, v = part.partition("=")
            if q.strip() not in gates:
                raise EdgeftError(f"{flag} {spec}: '{q.strip()}' is not among the artifacts being made "
                                  f"({', '.join(gates) or 'none'})")
            try:
                gates[q.strip()] = float(v)
            except ValueError:
                raise EdgeftError(f"{flag} {spec}: '{v}' is not a number") from None
    # Every gate is a relative change (of perplexity, of exact answers): nothing can fall by 100% or more, so a
    # limit at or below -1 is a gate no artifact can pass, found only after the work (a typo for 0.1, 5 for 5%).
    low = next((v for v in gates.values() if v is not None and (v <= -1 or not math.isfinite(v))), None)
    if low is not None:
        raise EdgeftError(f"{flag} {spec}: {low:g} is a change of {100 * low:g}%, which nothing can reach; a limit is "
                          f"a fraction above -1 (0.1 = 10%)")
    return gates
