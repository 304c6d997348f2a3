"""`edgeft eval`: perplexity of a model on the run's held-out token ids (torch backend)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .config import to_dict
from .errors import EdgeftError
from .gates import check
from .heldout import TOKENS_FILE, HeldOutOptions
from .ledger import Run, default_run_dir
from .models import DEFAULT_BASE, load_model, load_tokenizer, resolve_model
from .scoring import PerplexityResult, measure


@dataclass
class EvalConfig(HeldOutOptions):
    ALIASES: ClassVar[dict[str, str]] = {"budget": "eval_budget"}

    model: str = field(default=DEFAULT_BASE, metadata={"help": "model name, HF folder or hub id"})
    dtype: str = field(default="float32", metadata={"help": "float32|bfloat16|float16"})
    run: str = field(default="", metadata={"help": "run folder (default: runs/eval-TIMESTAMP)"})


@dataclass
class EvalResult:
    run: Path
    model: Path
    perplexity: PerplexityResult


def evaluate(config: EvalConfig) -> EvalResult:
    config.check_heldout()
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise EdgeftError(f"--dtype {config.dtype}: use float32, bfloat16 or float16")
    path = resolve_model(config.model)
    tokenizer = load_tokenizer(path)
    run = Run(config.run or default_run_dir("eval"))
    tokens = config.heldout_tokens(tokenizer, run.path)
    inputs = {"model": str(path), "eval_tokens": TOKENS_FILE, "text": tokens.source, "n_tokens": len(tokens.ids)}
    with run.step("eval", to_dict(config), inputs) as entry:
        import torch

        model = load_model(path, config.dtype)
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        result = measure(model, tokens.ids, config.window, config.stride, config.model)
        entry["perplexity"] = result.entry(config.model, tokens.source)
        check(entry, "perplexity", result.ppl, None, f"the perplexity of {config.model} is not a number: its "
              f"weights or outputs are broken (NaN/inf)")
    return EvalResult(run=run.path, model=path, perplexity=result)
