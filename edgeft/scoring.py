"""Scoring token ids with any backend: one definition of perplexity, and one of a comparison.

The token ids are cut into windows of `window` tokens starting every `stride` tokens. Within a window the
model sees only that window, and a token is scored at most once: in the first window that covers it with
context before it. With stride == window (the default) this is plain disjoint chunks, as llama.cpp's
perplexity tool and the usual HF recipe do: the first token of each chunk has no context and is not scored
(8192 ids in windows of 512 score 16 x 511 tokens). With stride < window every token but the very first is
scored. No BOS is inserted: the backends see exactly the stored ids.

The task (the fine-tune's held-out answers, see task.py) is scored the same way: each held-out example is
one piece, and only its answer tokens are scored, with the prompt as context.

A backend supplies `logits_fn(piece_ids) -> [len(piece_ids), vocab]` float logits; `score_pieces` does the
rest, so torch, llama.cpp, onnxruntime and the board differ only in the logits they produce. `compare_pieces`
scores two backends piece by piece on the same ids and adds KL divergence and top-1 agreement; `Comparison`
is how every step records "this model vs its reference" in the ledger.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 512


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    score_from: int  # absolute index of the first token scored in this window (> begin)


@dataclass(frozen=True)
class Piece:
    """Ids a backend sees at once (from an empty cache), and the positions in them that are scored: the
    token at position t is predicted by the logits at t - 1."""

    ids: list[int]
    targets: tuple[int, ...]


def windows(n_tokens: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> list[Window]:
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window (got window={window}, stride={stride})")
    out: list[Window] = []
    scored_until = 1  # token 0 has no context
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        if end > scored_until:
            out.append(Window(begin, end, max(scored_until, begin + 1)))
            scored_until = end
        begin += stride
    return out


def text_pieces(ids: Sequence[int], window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> list[Piece]:
    ids = list(ids)
    return [Piece(ids[w.begin:w.end], tuple(range(w.score_from - w.begin, w.end - w.begin)))
            for w in windows(len(ids), window, stride)]


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens: int
    windows: int
    window: int
    stride: int
    seconds: float
    backend: str

    def to_json(self) -> dict:
        return asdict(self)

    def entry(self, model: str, text: str) -> dict:
        """The ledger form: the result, what was scored and on which text."""
        return {**self.to_json(), "model": model, "text": text}

    @classmethod
    def from_entry(cls, entry: dict) -> "PerplexityResult":
        """Back from a ledger entry's perplexity (reused measurements)."""
        return cls(ppl=entry["ppl"], nll_sum=entry.get("nll_sum", math.log(entry["ppl"]) * entry["tokens"]),
                   tokens=entry["tokens"], windows=entry.get("windows", 0), window=entry.get("window", 0),
                   stride=entry.get("stride", 0), seconds=entry.get("seconds", 0.0), backend=entry.get("backend", ""))


@dataclass
class Comparison:
    """A model's perplexity next to its reference's on the same ids (and, from `compare`, window by window:
    mean KL divergence from the reference and top-1 agreement with it)."""

    measured: PerplexityResult
    reference: PerplexityResult
    kl_mean: float | None = None
    top1_agreement: float | None = None

    @property
    def change(self) -> float:
        """Relative perplexity change vs the reference (+0.05 = 5% higher)."""
        return self.measured.ppl / self.reference.ppl - 1

    def record(self, entry: dict, model: str, reference_model: str, reference_label: str, text: str,
               **reference_extra) -> None:
        """Write the comparison into a ledger entry: perplexity, reference, and KL/top-1 when known."""
        entry["perplexity"] = self.measured.entry(model, text)
        entry["reference"] = {**self.reference.entry(reference_model, text), "label": reference_label,
                              **reference_extra}
        if self.kl_mean is not None:
            entry["metrics"].update({"kl_mean": self.kl_mean, "top1_agreement": self.top1_agreement})


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row, computed in float64 so backends agree to the last printed digit."""
    logits = logits.astype(np.float64, copy=False)
    peak = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return logits[np.arange(len(targets)), targets] - logz


def _rows_and_targets(piece: Piece, logits) -> tuple[np.ndarray, np.ndarray]:
    at = np.asarray(piece.targets, dtype=np.int64)
    return np.asarray(logits)[at - 1], np.asarray(piece.ids)[at]


def score_pieces(pieces: list[Piece], logits_fn: Callable[[list[int]], np.ndarray], *, backend: str = "torch",
                 window: int = 0, stride: int = 0, progress: Callable[[int, int], None] | None = None
                 ) -> PerplexityResult:
    """Perplexity over every piece's scored positions. `window`/`stride` only describe the plan (0 for
    task pieces, one per held-out example)."""
    start = time.perf_counter()
    nll = 0.0
    count = 0
    for i, piece in enumerate(pieces):
        rows, targets = _rows_and_targets(piece, logits_fn(piece.ids))
        nll -= float(token_logprobs(rows, targets).sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(pieces))
    return PerplexityResult(ppl=math.exp(nll / count), nll_sum=nll, tokens=count, windows=len(pieces),
                            window=window or max((len(p.ids) for p in pieces), default=0), stride=stride,
                            seconds=round(time.perf_counter() - start, 3), backend=backend)


def score(ids: Sequence[int], logits_fn: Callable[[list[int]], np.ndarray], *, window: int = DEFAULT_WINDOW,
          stride: int = DEFAULT_STRIDE, backend: str = "torch", progress: Callable[[int, int], None] | None = None
          ) -> PerplexityResult:
    """Perplexity of held-out text ids in the window plan above."""
    return score_pieces(text_pieces(ids, window, stride), logits_fn, backend=backend, window=window, stride=stride,
                        progress=progress)


def torch_logits_fn(model) -> Callable[[list[int]], np.ndarray]:
    """Logits from a transformers causal LM (any device, any dtype), returned as float32 numpy."""
    import torch

    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits_fn(window_ids: list[int]) -> np.ndarray:
        input_ids = torch.tensor([window_ids], device=device)
        out = model(input_ids=input_ids, use_cache=False)
        return out.logits[0].float().cpu().numpy()

    return logits_fn


def _log_softmax(x: np.ndarray) -> np.ndarray:
    peak = x.max(-1, keepdims=True)
    return x - (np.log(np.exp(x - peak).sum(-1, keepdims=True)) + peak)


def compare_pieces(reference, other, pieces: list[Piece], progress: Callable[[int, int], None] | None = None,
                   backends: tuple[str, str] = ("", ""), window: int = 0, stride: int = 0) -> Comparison:
    """Perplexity of two models on the same pieces, mean KL(reference || other) and top-1 agreement.
    Each model is anything with `.logits(piece_ids)`. Piece by piece: at most one piece of logits per model
    is held, never all of them."""
    start = time.perf_counter()
    nll_ref = nll = kl = 0.0
    top1 = count = 0
    for i, piece in enumerate(pieces):
        ref, targets = _rows_and_targets(piece, reference.logits(piece.ids))
        got, _ = _rows_and_targets(piece, other.logits(piece.ids))
        ref_lp, got_lp = _log_softmax(ref.astype(np.float64)), _log_softmax(got.astype(np.float64))
        at = np.arange(len(targets))
        nll_ref -= float(ref_lp[at, targets].sum())
        nll -= float(got_lp[at, targets].sum())
        kl += float((np.exp(ref_lp) * (ref_lp - got_lp)).sum())
        top1 += int((got.argmax(-1) == ref.argmax(-1)).sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(pieces))
    seconds = round(time.perf_counter() - start, 3)
    window = window or max((len(p.ids) for p in pieces), default=0)

    def result(total: float, backend: str) -> PerplexityResult:
        return PerplexityResult(ppl=math.exp(total / count), nll_sum=total, tokens=count, windows=len(pieces),
                                window=window, stride=stride, seconds=seconds, backend=backend)

    return Comparison(measured=result(nll, backends[1]), reference=result(nll_ref, backends[0]),
                      kl_mean=kl / count, top1_agreement=top1 / count)


def compare(reference, other, ids: Sequence[int], window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
            progress: Callable[[int, int], None] | None = None, backends: tuple[str, str] = ("", "")
            ) -> Comparison:
    """`compare_pieces` on held-out text ids in the window plan above."""
    return compare_pieces(reference, other, text_pieces(ids, window, stride), progress, backends, window, stride)


def measure(model, ids: Sequence[int], window: int, stride: int, label: str) -> PerplexityResult:
    """Perplexity of a loaded torch model on `ids`, with a progress bar."""
    from .progress import bar

    with bar(f"perplexity {label}") as update:
        return score(ids, torch_logits_fn(model), window=window, stride=stride, backend="torch", progress=update)
