"""The held-out text every step is scored on, and its token ids.

The default text is the CPython documentation shipped in `pydoc_data.topics`: real English that nobody
here wrote and no demo dataset touches. The text is tokenized ONCE with the model's HF tokenizer and the
ids are stored with the run (eval_tokens.json); every backend then scores exactly those ids, so
perplexities from torch, llama.cpp and onnxruntime are comparable digit for digit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_json
from .errors import EdgeftError
from .models import edgeft_home

DEFAULT_TEXT = "pydoc"
TOKENS_FILE = "eval_tokens.json"


@dataclass
class EvalTokens:
    ids: list[int]
    source: str  # "pydoc_data.topics (Python 3.11.7)" or the file path
    text_sha256: str
    tokenizer_sha256: str
    budget: int

    def to_json(self) -> dict:
        return {"source": self.source, "text_sha256": self.text_sha256, "tokenizer_sha256": self.tokenizer_sha256,
                "budget": self.budget, "n_tokens": len(self.ids), "ids": self.ids}

    @classmethod
    def from_json(cls, d: dict) -> "EvalTokens":
        return cls(ids=list(d["ids"]), source=d["source"], text_sha256=d["text_sha256"],
                   tokenizer_sha256=d["tokenizer_sha256"], budget=d["budget"])


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
    same ids), else from the cache in $EDGEFT_HOME/tokens, else tokenized now and cached."""
    tok_sha = tokenizer_sha256(tokenizer)
    if run_dir is not None and (run_dir / TOKENS_FILE).is_file():
        stored = EvalTokens.from_json(json.loads((run_dir / TOKENS_FILE).read_text()))
        if stored.tokenizer_sha256 != tok_sha:
            raise EdgeftError(f"{run_dir / TOKENS_FILE}: this run's eval tokens were made with another tokenizer; "
                              f"use a new --run folder for a model with a different tokenizer")
        return stored
    body, source = read_text(text)
    text_sha = hashlib.sha256(body.encode()).hexdigest()
    key = hashlib.sha256(f"{tok_sha}:{text_sha}:{budget}".encode()).hexdigest()[:24]
    cache = edgeft_home() / "tokens" / f"{key}.json"
    if cache.is_file():
        result = EvalTokens.from_json(json.loads(cache.read_text()))
    else:
        ids = tokenize_budget(tokenizer, body, budget)
        if len(ids) < 2:
            raise EdgeftError(f"--text {source}: gives {len(ids)} token(s); perplexity needs at least 2")
        result = EvalTokens(ids=ids, source=source, text_sha256=text_sha, tokenizer_sha256=tok_sha, budget=budget)
        write_json(cache, result.to_json())
    if run_dir is not None:
        write_json(run_dir / TOKENS_FILE, result.to_json())
    return result
