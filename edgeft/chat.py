"""`edgeft chat RUN|MODEL|GGUF`: try a model. One answer (--prompt), or a conversation read from stdin one line per
turn until EOF or /exit, each answer seeing the turns before it.

Every turn is rendered with the model's HF chat template (the text training rendered, a default system prompt
included) and handed to the backend as token ids, as edgeft.prompt does for every sample answer: llama.cpp never
guesses the template from the GGUF. A GGUF runs on llama.cpp, a model folder on transformers, both greedy, so an
answer here is the answer the ledger's checks saw for the same prompt.

What a RUN means: its merged model, else (by the ledger) the GGUF deploy would ship, else base + its adapter;
--quant picks one of its GGUFs by type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import EdgeftError

EXIT = "/exit"


@dataclass
class ChatConfig:
    model: str = field(default="", metadata={"help": "a run folder, a model folder/name/hub id, or a .gguf file"})
    prompt: str = field(default="", metadata={
        "help": "ask this, print the answer and exit (default: read turns from stdin until EOF or /exit)"})
    system: str = field(default="", metadata={"help": "system message (default: the chat template's own, if any)"})
    max_tokens: int = field(default=256, metadata={"help": "longest answer, in tokens"})
    quant: str = field(default="", metadata={"help": "chat with the run's GGUF of this type (e.g. q4_k_m)"})
    tokenizer: str = field(default="", metadata={
        "help": "HF tokenizer folder for a .gguf (default: the folder beside it, or the model its run exported)"})
    context: int = field(default=2048, metadata={"help": "context in tokens; the oldest turns are dropped to fit"})
    threads: int = field(default=0, metadata={"help": "CPU threads for llama.cpp (0: all cores)"})


@dataclass
class Turn:
    user: str
    answer: str
    prompt_ids: list[int]  # the whole conversation so far, rendered with the chat template
    answer_ids: list[int]
    stopped_at_eos: bool  # ended by the model (else at --max-tokens or the context)
    seconds: float

    def to_json(self) -> dict:
        return {"user": self.user, "answer": self.answer, "stopped_at_eos": self.stopped_at_eos,
                "prompt_tokens": len(self.prompt_ids), "answer_tokens": len(self.answer_ids),
                "seconds": round(self.seconds, 3), "prompt_ids": self.prompt_ids, "answer_ids": self.answer_ids}


@dataclass
class ChatResult:
    model: Path  # what answered: a GGUF file or an HF folder
    backend: str  # "llama.cpp" or "transformers"
    turns: list[Turn]


@dataclass
class Target:
    path: Path  # the GGUF or HF folder that answers
    tokenizer: Path  # the HF folder whose tokenizer and chat template render the turns
    adapter: Path | None = None  # a PEFT adapter applied to the HF folder (a run not merged yet)
    trusted: bool = False  # a GGUF the run's ledger vouches for (sha256 checked): no load probe needed

    @property
    def backend(self) -> str:
        return "llama.cpp" if self.path.suffix == ".gguf" else "transformers"


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _gguf_tokenizer(c: ChatConfig, gguf: Path) -> Path:
    """The tokenizer of a GGUF given by path: --tokenizer, the folder beside it, or what its run exported it from."""
    from .run import Run

    if c.tokenizer:
        if not _has_tokenizer(Path(c.tokenizer)):
            raise EdgeftError(f"--tokenizer {c.tokenizer}: no tokenizer there (tokenizer.json/tokenizer_config.json)")
        return Path(c.tokenizer)
    if _has_tokenizer(gguf.parent):
        return gguf.parent
    run = Run(gguf.parent.parent)  # exports write RUN/gguf/NAME.gguf
    if run.is_run():
        entry = next((e for e in run.gguf_exports() if (run.path / e["outputs"][0]["path"]).resolve() ==
                      gguf.resolve()), None)
        if entry is not None:
            return run.export_source(entry)
    raise EdgeftError(f"{gguf}: a GGUF is chatted with through its HF tokenizer and chat template; pass --tokenizer "
                      f"FOLDER (the model folder it was exported from)")


def resolve_target(c: ChatConfig) -> Target:
    """What answers for c.model, refused in one line before anything is loaded."""
    from .run import Run
    from .models import EMBEDDED_MODELS, hub_id, resolve_model

    if not c.model:
        raise EdgeftError("give a run folder, a model folder/name or a .gguf file to chat with")
    path = Path(c.model).expanduser()
    if c.model.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise EdgeftError(f"{c.model}: no such GGUF file")
        if c.quant:
            raise EdgeftError(f"--quant picks one of a run's GGUFs; {c.model} is a GGUF already")
        return Target(path, _gguf_tokenizer(c, path))
    run = Run(path)
    if path.is_dir() and run.is_run():
        merged = run.merged
        if c.quant or (not (merged / "config.json").is_file() and run.gguf_exports()):
            gguf, entry = run.chosen_gguf(c.quant)
            return Target(gguf, run.export_source(entry), trusted=True)
        if (merged / "config.json").is_file():
            return Target(merged, merged)
        if (run.adapter / "adapter_config.json").is_file():
            from .adapter import find_adapter

            adapter = find_adapter(path)
            if not adapter.base:
                raise EdgeftError(f"{adapter.path}: no base recorded with the adapter; run "
                                  f"`edgeft merge --adapter RUN --model BASE` first")
            base = resolve_model(adapter.base, what="the adapter's base")
            return Target(base, adapter.path if _has_tokenizer(adapter.path) else base, adapter=adapter.path)
        raise EdgeftError(f"{path}: this run has nothing to chat with yet (no merged model, GGUF or adapter); "
                          f"run `edgeft train --run {path}` first")
    if c.quant:
        raise EdgeftError(f"--quant picks one of a run's GGUFs; {c.model} is not a run folder (no manifest.json)")
    if not path.exists() and c.model not in EMBEDDED_MODELS and not hub_id(c.model):
        raise EdgeftError(f"{c.model}: no such run, model folder or GGUF; pass a run folder, a model folder, name "
                          f"({', '.join(EMBEDDED_MODELS)}) or hub id, or a .gguf file")
    folder = resolve_model(c.model, what="model")
    return Target(folder, folder)


class _LlamaCppAnswers:
    def __init__(self, target: Target, c: ChatConfig):
        from .llamacpp import LlamaCpp

        self.model = LlamaCpp(target.path, n_ctx=c.context, threads=c.threads or None, trusted=target.trusted)

    def __call__(self, ids: list[int], max_new: int) -> tuple[list[int], bool]:
        return self.model.generate(ids, max_new)

    def close(self) -> None:
        self.model.close()


class _TransformersAnswers:
    def __init__(self, target: Target, tokenizer):
        import torch

        from .models import load_model, stored_dtype
        from .task import torch_generate

        cuda = torch.cuda.is_available()
        model = load_model(target.path, stored_dtype(target.path) if cuda else "float32")
        if target.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, target.adapter)
        model = model.to("cuda" if cuda else "cpu").eval()
        self.generate = torch_generate(model, tokenizer)

    def __call__(self, ids: list[int], max_new: int) -> tuple[list[int], bool]:
        new = self.generate(ids, max_new)
        return new, len(new) < max_new  # torch_generate leaves out the end-of-turn token it stopped at

    def close(self) -> None:
        pass


def user_turns(lines: Iterable[str]) -> Iterator[str]:
    """The user's turns from input lines: blank lines skipped, until /exit."""
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == EXIT:
            return
        if text.strip():
            yield text


def chat(config: ChatConfig, lines: Iterable[str] = (), on_turn: Callable[[Turn], None] | None = None) -> ChatResult:
    """--prompt: one answer. Otherwise one turn per line of `lines` (see user_turns), the history kept. `on_turn`
    sees each turn as soon as it is answered."""
    from .models import load_tokenizer
    from .progress import console
    from .prompt import apply_template

    c = config
    if c.max_tokens < 1:
        raise EdgeftError(f"--max-tokens {c.max_tokens}: must be at least 1")
    if c.context < 16:
        raise EdgeftError(f"--context {c.context}: must be at least 16 tokens")
    target = resolve_target(c)
    tokenizer = load_tokenizer(target.tokenizer)
    system = [{"role": "system", "content": c.system}] if c.system else []
    apply_template(tokenizer, [*system, {"role": "user", "content": "?"}], generation_prompt=True, tokenize=False)
    answer = _LlamaCppAnswers(target, c) if target.backend == "llama.cpp" else _TransformersAnswers(target, tokenizer)
    history: list[dict] = []
    turns: list[Turn] = []
    try:
        for text in [c.prompt] if c.prompt else user_turns(lines):
            ask = [{"role": "user", "content": text}]
            while True:
                ids = list(apply_template(tokenizer, [*system, *history, *ask], generation_prompt=True,
                                          tokenize=True))
                if len(ids) + c.max_tokens <= c.context or not history:
                    break
                history = history[2:]  # the oldest exchange goes first; the system message stays
                console.print(f"note: the oldest turn was dropped to fit --context {c.context}", style="yellow",
                              markup=False, highlight=False)
            room = min(c.max_tokens, c.context - len(ids))
            if room < 1:
                raise EdgeftError(f"the message is {len(ids)} tokens with the chat template; --context {c.context} "
                                  f"leaves no room for an answer; raise --context")
            start = time.perf_counter()
            new, stopped = answer(ids, room)
            reply = tokenizer.decode(new, skip_special_tokens=True)
            turn = Turn(text, reply, ids, list(new), stopped, time.perf_counter() - start)
            turns.append(turn)
            history += [*ask, {"role": "assistant", "content": reply}]
            if on_turn:
                on_turn(turn)
    finally:
        answer.close()
    return ChatResult(model=target.path, backend=target.backend, turns=turns)
