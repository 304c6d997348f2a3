"""`edgeft eval`: perplexity of a model on the run's held-out token ids (torch backend)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from .config import to_dict
from .errors import EdgeftError
from .heldout import TOKENS_FILE, EvalTokens, eval_tokens, read_text
from .ledger import Run
from .models import DEFAULT_BASE, load_model, load_tokenizer, resolve_model
from .perplexity import DEFAULT_STRIDE, DEFAULT_WINDOW, PerplexityResult, score, torch_logits_fn
from .progress import bar

DEFAULT_BUDGET = 8192


@dataclass
class EvalConfig:
    model: str = field(default=DEFAULT_BASE, metadata={"help": "model name, HF folder or hub id"})
    text: str = field(default="pydoc", metadata={"help": "held-out text file ('pydoc' = the CPython docs)"})
    budget: int = field(default=DEFAULT_BUDGET, metadata={"help": "tokens of held-out text to score"})
    window: int = field(default=DEFAULT_WINDOW, metadata={"help": "tokens per scoring window"})
    stride: int = field(default=DEFAULT_STRIDE, metadata={"help": "tokens between window starts"})
    dtype: str = field(default="float32", metadata={"help": "float32|bfloat16|float16"})
    run: str = field(default="", metadata={"help": "run folder (default: runs/eval-TIMESTAMP)"})


@dataclass
class EvalResult:
    run: Path
    model: Path
    perplexity: PerplexityResult


def default_run_dir(step: str) -> Path:
    return Path("runs") / f"{step}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def check_windows(budget: int, window: int, stride: int) -> None:
    if budget < 2:
        raise EdgeftError(f"--budget {budget}: must be at least 2 tokens")
    if window < 2:
        raise EdgeftError(f"--window {window}: must be at least 2 tokens")
    if not 1 <= stride <= window:
        raise EdgeftError(f"--stride {stride}: must be between 1 and --window ({window})")


def measure(model, tokens: EvalTokens, window: int, stride: int, label: str) -> PerplexityResult:
    """Perplexity of a loaded torch model on the run's ids, with a progress bar."""
    with bar(f"perplexity {label}") as update:
        return score(tokens.ids, torch_logits_fn(model), window=window, stride=stride, backend="torch",
                     progress=update)


def perplexity_entry(result: PerplexityResult, label: str, tokens: EvalTokens) -> dict:
    return {**result.to_json(), "model": label, "text": tokens.source}


def evaluate(config: EvalConfig) -> EvalResult:
    check_windows(config.budget, config.window, config.stride)
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise EdgeftError(f"--dtype {config.dtype}: use float32, bfloat16 or float16")
    if config.text not in ("", "pydoc"):
        read_text(config.text)  # a bad text file should fail before any model is loaded
    path = resolve_model(config.model)
    tokenizer = load_tokenizer(path)
    run = Run(config.run or default_run_dir("eval"))
    tokens = eval_tokens(tokenizer, config.text, config.budget, run.path)
    inputs = {"model": str(path), "eval_tokens": TOKENS_FILE, "text": tokens.source, "n_tokens": len(tokens.ids)}
    with run.step("eval", to_dict(config), inputs) as entry:
        import torch

        model = load_model(path, config.dtype)
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        result = measure(model, tokens, config.window, config.stride, config.model)
        entry["perplexity"] = perplexity_entry(result, config.model, tokens)
    return EvalResult(run=run.path, model=path, perplexity=result)
