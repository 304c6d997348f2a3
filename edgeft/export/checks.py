"""The task checks every exported artifact gets, whatever its format (GGUF through llama.cpp, ONNX through
onnxruntime): task perplexity and exact answers, their changes vs the step's reference and vs the HF model
that was exported, and the task gates of a quant."""

from __future__ import annotations

from ..gates import (EXACT_DROP_GATE_OTHER, EXACT_DROP_GATES, TASK_PPL_GATE_OTHER, TASK_PPL_GATES, Gate,
                     parse_gates)
from ..progress import bar
from ..scoring import compare_pieces
from ..task import TaskScore, answers, changes, score_task


def task_gate_limits(c, made: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(max task-perplexity rise, max exact-answer drop) per quant being made."""
    return (parse_gates(c.max_task_ppl_rise, TASK_PPL_GATES, made, TASK_PPL_GATE_OTHER, "--max-task-ppl-rise"),
            parse_gates(c.max_exact_drop, EXACT_DROP_GATES, made, EXACT_DROP_GATE_OTHER, "--max-exact-drop"))


def record_reference_task(entry: dict, task, model, generate, tokenizer, backend: str, c, label: str,
                          hf_task: dict | None) -> dict:
    """The unquantized artifact's task, against the HF model it was converted from."""
    with bar(f"task {label}") as update:
        scored = score_task(task, model.logits, generate, tokenizer, backend, answer_limit=c.task_answers,
                            progress=update)
    out = scored.record(entry, label, task.source, hf_task, "hf")
    if hf_task:
        out["vs_merged"] = changes(out, hf_task)
    return out


def record_quant_task(entry: dict, task, reference, model, generate, tokenizer, backend: str, c, label: str,
                      reference_task: dict, reference_label: str, hf_task: dict | None, quant: str,
                      limits: tuple[dict[str, float], dict[str, float]]) -> list[Gate]:
    """A quant's task: perplexity window by window against the reference artifact (with KL and top-1),
    exact answers, both changes recorded; returns its two task gates."""
    with bar(f"task {label} vs {reference_label}") as update:
        cmp = compare_pieces(reference, model, task.pieces(), progress=update, backends=(backend, backend))
    with bar(f"answers {label}") as update:  # greedy generation: minutes on a big model, so it shows
        rate, fields, answered, samples = answers(task, generate, tokenizer, c.task_answers, update)
    scored = TaskScore(ppl=cmp.measured, exact_match=rate, field_accuracy=fields, answered=answered,
                       samples=samples, items=len(task.items), of=len(task.items))
    out = scored.record(entry, label, task.source, reference_task, reference_label)
    out.update(kl_mean=cmp.kl_mean, top1_agreement=cmp.top1_agreement)
    if hf_task:
        out["vs_merged"] = changes(out, hf_task)
    rise_limit, drop_limit = limits[0][quant], limits[1][quant]
    rise, change = out["ppl_change"], out["exact_match_change"]
    gates = [Gate(f"task perplexity rise vs {reference_label}", rise, rise_limit,
                  f"{quant.upper()}: task perplexity rose {100 * (rise or 0):.1f}% vs {reference_label.upper()} "
                  f"(task gate {100 * rise_limit:.0f}%)")]
    if change is not None:
        gates.append(Gate(f"exact-answer drop vs {reference_label}", -change, drop_limit,
                          f"{quant.upper()}: exact answers fell {100 * -change:.0f} points vs "
                          f"{reference_label.upper()} (task gate {100 * drop_limit:.0f} points)"))
    return gates
