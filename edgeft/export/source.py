"""What an export starts from, for every format: the run, the HF folder to convert, the LoRA to fuse, and
the HF perplexity the unquantized artifact must match."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..adapter import Adapter, base_weights, check_adapter_fits, find_adapter
from ..errors import EdgeftError
from ..run import Run
from ..models import add_adapter, load_for_scoring, resolve_model
from ..progress import console
from ..scoring import PerplexityResult, measure, windows


@dataclass
class Source:
    run: Run
    path: Path  # the HF folder converted
    loras: dict  # LoRA factors fused while converting ({} for none)
    label: str  # how the ledger names it
    adapter: Adapter | None

    def inputs(self, tokens_file: str, **more) -> dict:
        """The ledger inputs every export entry starts from."""
        return {"source": str(self.path), "label": self.label,
                "fused_adapter": str(self.adapter.path) if self.adapter else None, "eval_tokens": tokens_file,
                **more}


class Inputs(NamedTuple):
    """What both exporters score every artifact with, loaded once the outputs are known to be free."""

    tokenizer: object
    tokens: object  # heldout.EvalTokens
    task: object  # task.TaskSet | None


def load_inputs(c, source: Source, outputs) -> Inputs:
    """Refuse outputs that exist (unless --overwrite), then the tokenizer, the run's held-out ids and task
    set; a chat template that fails is refused here, before anything is written."""
    from ..models import load_tokenizer
    from ..prompt import prompt_ids
    from ..task import read_task_set

    existing = [p for p in outputs if Path(p).exists()]
    if existing and not c.overwrite:
        raise EdgeftError(f"{existing[0]}: already exists; pass --overwrite to replace it, or another --out")
    tokenizer = load_tokenizer(source.path)
    prompt_ids(tokenizer)
    return Inputs(tokenizer, c.heldout_tokens(tokenizer, source.run.path), read_task_set(source.run.path, tokenizer))


def resolve_source(c) -> Source:
    """--run, else the adapter's run, else runs/export; then --adapter (base + adapter fused), --model, or
    the run's merged model."""
    c.check_heldout()
    run = Run(c.run or (Path(c.adapter) if c.adapter and Run(c.adapter).is_run() else Path("runs") / "export"))
    if c.adapter:
        adapter = find_adapter(c.adapter)
        base = resolve_model(c.model or adapter.base, what="--model")
        if adapter.trained_quant == "4bit":
            console.print("[yellow]note: the adapter was trained on a 4-bit base; it is fused into the original "
                          "weights (like `merge --into original`); run `edgeft merge` to measure both ways")
        check_adapter_fits(adapter, base, base_weights(base), force=False)
        return Source(run, base, adapter.loras, f"{base.name}+adapter (fused)", adapter)
    if c.model:
        return Source(run, resolve_model(c.model, what="--model"), {}, c.model, None)
    merged = run.merged
    if (merged / "config.json").is_file():
        return Source(run, merged, {}, "merged", None)
    raise EdgeftError(f"--model is required (no {merged} to export); pass a model folder/name, or --adapter")


@dataclass
class Reference:
    """What the unquantized artifact must match: the exported model measured with transformers."""

    ppl: PerplexityResult
    how: str  # "measured now (torch)" or "ledger (merge)"
    task: dict | None  # its task entry (task.TaskScore.entry), when the run has a task


def hf_reference(source: Source, tokens, task, tokenizer, window: int, stride: int, answers: int) -> Reference:
    """The HF perplexity (and task) of what is exported, on the run's ids: base + adapter through PEFT when
    fusing; else reused from the ledger when a step already measured exactly this folder on the same ids;
    else measured now."""
    from ..task import score_torch

    label = "base+adapter (HF)" if source.loras else source.path.name
    reused = None
    # The same scored tokens too: a step run with --checks quick scored only part of the run's ids; and the same
    # BOS convention (an entry from before BOS-aware scoring has no "bos": scored without).
    bos = tokens.bos is not None
    scored = sum(w.end - w.score_from for w in windows(len(tokens.ids), window, stride, bos))
    if not source.loras:
        def same(entry: dict) -> bool:
            measured = entry.get("perplexity") or {}
            return ((measured.get("window"), measured.get("tokens"), bool(measured.get("bos"))) == (window, scored, bos)
                    and any((source.run.path / out["path"]).resolve() == source.path.resolve()
                            for out in entry["outputs"]))

        reused = source.run.last(where=same)
    if reused is not None and (task is None or reused.get("task")):
        return Reference(PerplexityResult.from_entry(reused["perplexity"]), f"ledger ({reused['step']})",
                         reused.get("task"))
    # float32 scores from weights held at their stored 16 bits (models.load_for_scoring): the exporters load
    # their artifacts next, and this model is freed before they do.
    model = load_for_scoring(source.path)
    if source.loras:
        model = add_adapter(model, source.adapter.path)
    how = "measured now (torch, PEFT)" if source.loras else "measured now (torch)"
    ppl = measure(model, tokens.ids, window, stride, label, tokens.bos)
    task_entry = score_torch(model, task, tokenizer, label, answers).entry(f"HF {source.label}", task.source) \
        if task else None
    del model
    gc.collect()
    return Reference(ppl, how, task_entry)
