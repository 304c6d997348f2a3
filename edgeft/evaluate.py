"""`edgeft eval`: a model's perplexity on the run's held-out token ids and, with --data, its task metrics.

The model is an HF folder (scored with torch) or a GGUF file (scored with llama.cpp, using the HF tokenizer
of --tokenizer for the ids), so a base, a merged model and a quantized GGUF can be compared on the user's
own task file in one run folder, with the same ids and the same definitions as every other step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .config import accepts_old_names, to_dict
from .errors import EdgeftError
from .gates import Gate, check
from .heldout import HeldOutOptions
from .run import EVAL, TOKENS_FILE, Run, default_run_dir
from .models import DEFAULT_BASE, load_model, load_tokenizer, resolve_model
from .scoring import PerplexityResult, measure, score


@accepts_old_names
@dataclass
class EvalConfig(HeldOutOptions):
    ALIASES: ClassVar[dict[str, str]] = {"budget": "eval_budget"}  # one vocabulary across commands (README "Flags")

    model: str = field(default=DEFAULT_BASE, metadata={"help": "model name, HF folder, hub id, or a .gguf file"})
    data: str = field(default="", metadata={
        "help": "task JSONL (rows as for train; 'demo' or 'dates' = a shipped task's set): also score task "
                "perplexity and exact answers on all its rows"})
    tokenizer: str = field(default="", metadata={
        "help": "HF tokenizer folder for a .gguf model (default: the folder beside it, or RUN/merged)"})
    task_answers: int = field(default=20, metadata={"help": "task prompts answered greedily (with --data)"})
    max_seq_len: int = field(default=1024, metadata={"help": "longer task rows are truncated"})
    dtype: str = field(default="float32", metadata={"help": "float32|bfloat16|float16 (HF models)"})
    run: str = field(default="", metadata={"help": "run folder (default: runs/eval-TIMESTAMP)"})


@dataclass
class EvalResult:
    run: Path
    model: Path
    perplexity: PerplexityResult
    entry: dict


def _gguf_tokenizer(c: EvalConfig, gguf: Path, run: Run) -> Path:
    candidates = [Path(c.tokenizer)] if c.tokenizer else [gguf.parent, Run(gguf.parent.parent).merged,
                                                          run.merged]
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    raise EdgeftError(f"--model {gguf}: a GGUF is scored on ids made by its HF tokenizer; pass --tokenizer FOLDER "
                      f"(the model folder it was exported from)")


def evaluate(config: EvalConfig) -> EvalResult:
    from .task import build_task_set, read_task_set, store_task_set

    c = config
    c.check_heldout()
    c = c.checked("task_answers")
    if c.dtype not in ("float32", "bfloat16", "float16"):
        raise EdgeftError(f"--dtype {c.dtype}: use float32, bfloat16 or float16")
    run = Run(c.run or default_run_dir(EVAL))
    gguf = Path(c.model) if c.model.endswith(".gguf") else None
    if gguf is not None and not gguf.is_file():
        raise EdgeftError(f"--model {c.model}: no such GGUF file")
    path = gguf or resolve_model(c.model)
    tokenizer = load_tokenizer(_gguf_tokenizer(c, gguf, run) if gguf else path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    task = None
    if c.data:
        from .dataset import data_file, load_examples

        examples, _ = load_examples(data_file(c.data), tokenizer, c.max_seq_len, strict=False)
        task = read_task_set(run.path, tokenizer)
        if task is not None and task.source != str(c.data):
            raise EdgeftError(f"{run.task_set}: this run's task set came from {task.source}, not {c.data}; "
                              f"use a new --run")
        task = task or store_task_set(run.path, build_task_set(tokenizer, examples, str(c.data)))
    tokens = c.heldout_tokens(tokenizer, run.path)
    inputs = {"model": str(path), "eval_tokens": TOKENS_FILE, "text": tokens.source, "n_tokens": len(tokens.ids),
              "backend": "llama.cpp" if gguf else "torch", "task": c.data or None}
    with run.record(EVAL, to_dict(c), inputs) as entry:
        if gguf:
            result, scored = _eval_gguf(gguf, tokens, task, tokenizer, c)
        else:
            result, scored = _eval_hf(path, tokens, task, tokenizer, c)
        entry["perplexity"] = result.entry(c.model, tokens.source)
        check(entry, Gate("perplexity", result.ppl, None, f"the perplexity of {c.model} is not a number: its weights "
                          f"or outputs are broken (NaN/inf)"))
        if scored is not None:
            scored.record(entry, c.model, task.source)
    return EvalResult(run=run.path, model=path, perplexity=result, entry=entry)


def _eval_hf(path: Path, tokens, task, tokenizer, c: EvalConfig):
    import torch

    from .task import score_torch

    model = load_model(path, c.dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    result = measure(model, tokens.ids, c.window, c.stride, c.model, tokens.bos)
    return result, (score_torch(model, task, tokenizer, c.model, c.task_answers) if task else None)


def _eval_gguf(gguf: Path, tokens, task, tokenizer, c: EvalConfig):
    from .llamacpp import LlamaCpp
    from .progress import bar
    from .task import score_task

    model = LlamaCpp(gguf, n_ctx=max(c.window, task.longest if task else 0))
    try:
        with bar(f"llama.cpp perplexity {gguf.name}") as update:
            result = score(tokens.ids, model.logits, window=c.window, stride=c.stride, backend="llama.cpp",
                           progress=update, bos=tokens.bos)
        scored = score_task(task, model.logits, lambda p, n: model.generate(p, n)[0], tokenizer, "llama.cpp",
                            answer_limit=c.task_answers) if task else None
    finally:
        model.close()
    return result, scored
