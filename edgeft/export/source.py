"""What an export starts from, for every format: the run, the HF folder to convert, the LoRA to fuse, and
the HF perplexity the unquantized artifact must match."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..adapter import Adapter, base_weights, check_adapter_fits, find_adapter
from ..errors import EdgeftError
from ..ledger import Run
from ..models import load_model, resolve_model
from ..progress import console
from ..scoring import PerplexityResult, measure


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


def resolve_source(c) -> Source:
    """--run, else the adapter's run, else runs/export; then --adapter (base + adapter fused), --model, or
    the run's merged model."""
    c.check_heldout()
    run = Run(c.run or (Path(c.adapter) if c.adapter and (Path(c.adapter) / "manifest.json").is_file()
                        else Path("runs") / "export"))
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
    merged = run.path / "merged"
    if (merged / "config.json").is_file():
        return Source(run, merged, {}, "merged", None)
    raise EdgeftError(f"--model is required (no {merged} to export); pass a model folder/name, or --adapter")


def hf_reference(source: Source, tokens, window: int, stride: int) -> tuple[PerplexityResult, str]:
    """The HF perplexity of what is exported, on the run's ids: base + adapter through PEFT when fusing;
    else reused from the ledger when a step already measured exactly this folder; else measured now."""
    if source.loras:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(source.path, "float32"), source.adapter.path).eval()
        return measure(model, tokens.ids, window, stride, "base+adapter (HF)"), "measured now (torch, PEFT)"
    for entry in reversed(source.run.steps()):
        for out in entry.get("outputs", []):
            if entry["status"] == "ok" and (source.run.path / out["path"]).resolve() == source.path.resolve() and \
                    (entry.get("perplexity") or {}).get("window") == window:
                return PerplexityResult.from_entry(entry["perplexity"]), f"ledger ({entry['step']})"
    model = load_model(source.path, "float32").eval()
    return measure(model, tokens.ids, window, stride, source.path.name), "measured now (torch)"
