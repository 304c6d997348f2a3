"""The held-out text every step is scored on, and its token ids.

The default text is the CPython documentation shipped in `pydoc_data.topics`: real English that nobody
here wrote and no demo dataset touches. The text is tokenized ONCE with the model's HF tokenizer and the
ids are stored with the run (eval_tokens.json); every backend then scores exactly those ids, so
perplexities from torch, llama.cpp and onnxruntime are comparable digit for digit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .atomic import write_json
from .errors import EdgeftError
from .inputs import read_json, token_ids
from .models import edgeft_home
from .run import Run
from .scoring import DEFAULT_STRIDE, DEFAULT_WINDOW, model_bos

DEFAULT_TEXT = "pydoc"
CHECKS = ("full", "quick")
# --checks quick scores the first quarter of the run's ids: for iterating, a perplexity on ~2k tokens moves
# with a broken step as surely as on 8k, at a quarter of the time; the gates' limits are unchanged.
QUICK_SHARE = 4
DEFAULT_BUDGET = 8192


@dataclass
class HeldOutOptions:
    """The settings of the held-out text, shared by every step that scores it. A run keeps the ids of its
    first step (eval_tokens.json); later steps score exactly those, whatever text/budget they are given."""

    text: str = field(default=DEFAULT_TEXT, metadata={
        "help": "held-out text for perplexity: a UTF-8 file, or 'pydoc' for the CPython docs"})
    eval_budget: int = field(default=DEFAULT_BUDGET, metadata={"help": "tokens of held-out text to score"})
    window: int = field(default=DEFAULT_WINDOW, metadata={"help": "perplexity window (tokens)"})
    stride: int = field(default=DEFAULT_STRIDE, metadata={"help": "perplexity stride (tokens between windows)"})
    checks: str = field(default="full", metadata={
        "help": "full|quick: quick scores the first quarter of the held-out ids and answers no held-out prompts "
                "(for iterating; recorded in the entry, marked by `show`)"})

    def check_heldout(self) -> None:
        """Refuse bad settings before any model is loaded."""
        if self.checks not in CHECKS:
            raise EdgeftError(f"--checks {self.checks}: use full or quick")
        check_windows(self.eval_budget, self.window, self.stride)
        if self.text not in ("", DEFAULT_TEXT):
            read_text(self.text)

    def heldout_tokens(self, tokenizer, run_dir: Path | None) -> "EvalTokens":
        """The run's ids as this step scores them: all, or with --checks quick their first quarter (the run
        keeps all of them for the steps that check in full)."""
        tokens = eval_tokens(tokenizer, self.text, self.eval_budget, run_dir)
        if self.checks == "quick":
            return replace(tokens, ids=tokens.ids[:max(2, len(tokens.ids) // QUICK_SHARE)])
        return tokens

    def checked(self, answers: str):
        """This config as its checks run: with --checks quick the setting `answers` (how many held-out prompts
        are answered greedily: the slowest check) is 0, and the entry's config says so."""
        return replace(self, **{answers: 0}) if self.checks == "quick" else self


def check_windows(budget: int, window: int, stride: int) -> None:
    if budget < 2:
        raise EdgeftError(f"--eval-budget {budget}: must be at least 2 tokens")
    if window < 2:
        raise EdgeftError(f"--window {window}: must be at least 2 tokens")
    if not 1 <= stride <= window:
        raise EdgeftError(f"--stride {stride}: must be between 1 and --window ({window})")


@dataclass
class EvalTokens:
    ids: list[int]
    source: str  # "pydoc_data.topics (Python 3.11.7)" or the file path
    text_sha256: str
    tokenizer_sha256: str
    budget: int
    # The BOS id that starts every window (scoring.model_bos: the tokenizer adds it to every text), or None.
    # The ids themselves never hold it. A file written before edgeft scored with BOS has no "bos" key.
    bos: int | None = None

    def to_json(self) -> dict:
        return {"source": self.source, "text_sha256": self.text_sha256, "tokenizer_sha256": self.tokenizer_sha256,
                "budget": self.budget, "n_tokens": len(self.ids), "bos": self.bos, "ids": self.ids}

    @classmethod
    def from_json(cls, d: dict) -> "EvalTokens":
        return cls(ids=list(d["ids"]), source=d["source"], text_sha256=d["text_sha256"],
                   tokenizer_sha256=d["tokenizer_sha256"], budget=d["budget"], bos=d.get("bos"))

    @classmethod
    def read(cls, path: Path) -> "EvalTokens":
        """A run's (or the cache's) stored ids, checked: every backend will index its vocabulary with them."""
        fix = "restore it, or use a new --run (the cache: delete the file)"
        d = read_json(path, fix)
        if not token_ids(d.get("ids"), at_least=2):
            raise EdgeftError(f"{path}: 'ids' must be a list of at least 2 token ids; {fix}")
        if not all(isinstance(d.get(k), str) for k in ("source", "text_sha256", "tokenizer_sha256")) or \
                type(d.get("budget")) is not int:
            raise EdgeftError(f"{path}: not an edgeft eval-token file (source, hashes, budget); {fix}")
        if d.get("bos") is not None and not token_ids([d["bos"]]):
            raise EdgeftError(f"{path}: 'bos' must be a token id or null; {fix}")
        return cls.from_json(d)


def read_text(text: str | None) -> tuple[str, str]:
    """Return (text, source description). None or "pydoc" means the CPython docs."""
    if text in (None, "", DEFAULT_TEXT):
        import platform

        import pydoc_data.topics as topics

        # Sorted keys: dict order is an implementation detail; the joined text must not depend on it.
        body = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))
        return body, f"pydoc_data.topics (Python {platform.python_version()})"
    path = Path(text)
    if not path.is_file():
        raise EdgeftError(f"--text {text}: no such file; pass a UTF-8 text file or omit --text for the CPython docs")
    try:
        body = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgeftError(f"--text {text}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not body.strip():
        raise EdgeftError(f"--text {text}: the file is empty; give a text of at least a few hundred words")
    return body, str(path)


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what decides tokenization: the fast tokenizer's full JSON (vocab, merges, normalizer,
    pre-tokenizer, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_budget(tokenizer, text: str, budget: int) -> list[int]:
    """The first `budget` token ids of `text`, with no BOS/special tokens added (windows are raw ids).
    Tokenizing all of the pydoc text takes seconds; a prefix of ~8 characters per wanted token is plenty
    (English averages ~4), grown if a text tokenizes unusually densely."""
    chars = budget * 8
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > budget or chars >= len(text):
            return ids[:budget]
        chars *= 2


def eval_tokens(tokenizer, text: str | None, budget: int, run_dir: Path | None = None) -> EvalTokens:
    """The run's token ids: read from the run if it already has them (every step of a run scores the
    same ids), else from the cache in $EDGEFT_HOME/tokens, else tokenized now and cached. Its `bos` is the
    tokenizer's (model_bos), written into the run's file, which a run from before BOS-aware scoring lacks."""
    tok_sha = tokenizer_sha256(tokenizer)
    bos = model_bos(tokenizer)
    ids_file = Run(run_dir).ids if run_dir is not None else None
    if ids_file is not None and ids_file.is_file():
        stored = EvalTokens.read(ids_file)
        beyond = max(stored.ids)
        if beyond >= len(tokenizer):  # an IndexError in torch, "llama_decode returned -1" in llama.cpp
            raise EdgeftError(f"{ids_file}: token id {beyond} is past the tokenizer's {len(tokenizer)} ids; the file "
                              f"was edited or is another model's: restore it, or use a new --run")
        if stored.tokenizer_sha256 != tok_sha:
            raise EdgeftError(f"{ids_file}: this run's eval tokens were made with another tokenizer; "
                              f"use a new --run folder for a model with a different tokenizer")
        if stored.bos != bos:  # a run from before: its file has no "bos" (None), and only a BOS model changes
            stored = replace(stored, bos=bos)
            write_json(ids_file, stored.to_json())
            if bos is not None:
                from .progress import console

                console.print(f"note: {run_dir}'s earlier perplexities were scored without the model's BOS; from "
                              f"now on every window starts with it (BOS id {bos}), as llama.cpp scores and prompts "
                              f"the model; `show` marks the older rows as not comparable", style="yellow",
                              markup=False, highlight=False, soft_wrap=True)
        # The default budget is what a step has when it is not given one, so only another number was asked for.
        if budget != stored.budget and budget != DEFAULT_BUDGET:
            from .progress import console

            console.print(f"note: --eval-budget {budget} is not used: this run scores the {len(stored.ids)} ids it "
                          f"stored first ({ids_file}, budget {stored.budget}); use a new --run for "
                          f"another budget", style="yellow", markup=False, highlight=False, soft_wrap=True)
        return stored
    body, source = read_text(text)
    text_sha = hashlib.sha256(body.encode()).hexdigest()
    key = hashlib.sha256(f"{tok_sha}:{text_sha}:{budget}".encode()).hexdigest()[:24]
    cache = edgeft_home() / "tokens" / f"{key}.json"
    if cache.is_file():
        result = replace(EvalTokens.read(cache), bos=bos)
    else:
        ids = tokenize_budget(tokenizer, body, budget)
        if len(ids) < 2:
            raise EdgeftError(f"--text {source}: gives {len(ids)} token(s); perplexity needs at least 2")
        result = EvalTokens(ids=ids, source=source, text_sha256=text_sha, tokenizer_sha256=tok_sha, budget=budget,
                            bos=bos)
        write_json(cache, result.to_json())
    if ids_file is not None:
        write_json(ids_file, result.to_json())
    return result
