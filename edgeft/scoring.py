"""Scoring token ids with any backend: one definition of perplexity, and one of a comparison.

The token ids are cut into windows of `window` tokens starting every `stride` tokens. Within a window the
model sees only that window, and a token is scored at most once: in the first window that covers it with
context before it. With stride == window (the default) this is plain disjoint chunks, as llama.cpp's
perplexity tool and the usual HF recipe do: the first token of each chunk has no context and is not scored
(8192 ids in windows of 512 score 16 x 511 tokens). With stride < window every token but the very first is
scored.

BOS follows the model: when its tokenizer adds a BOS to every text it encodes (Gemma, Llama 3, Llama 2; see
`model_bos`), every window starts with that BOS, as llama.cpp's llama-perplexity starts every chunk and as every
real prompt starts. The BOS takes one of the window's positions and is context only: a window holds BOS and
window - 1 ids, and its first id is scored with BOS as its context (with stride == window every id is scored:
8192 ids in windows of 512 make 17 windows). A tokenizer that adds none (the default model, SmolLM2) gets the
plan above unchanged. Scoring a BOS model without its BOS measures something else: 2,044 held-out tokens of one
base model gave 37.63 without BOS and 14.88 with it. Each result records the convention (`bos`), and the ledger
marks rows scored under another one as not comparable.

The task (the fine-tune's held-out answers, see task.py) is scored the same way: each held-out example is
one piece, and only its answer tokens are scored, with the prompt as context.

A backend supplies `logits_fn(piece_ids) -> [len(piece_ids), vocab]` float logits; `score_pieces` does the
rest, so torch, llama.cpp, onnxruntime and the board differ only in the logits they produce. `compare_pieces`
scores two backends piece by piece on the same ids and adds KL divergence and top-1 agreement; `Comparison`
is how every step records "this model vs its reference" in the ledger.

`TokenDifference` compares two backends token by token when both kept their per-token NLLs (the board
and the host): the perplexity ratio is exp(mean difference), and the spread of the differences says how
much of that ratio a sample of this many tokens can show by chance (its standard error).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
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


def windows(n_tokens: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, bos: bool = False
            ) -> list[Window]:
    """The plan over the ids (begin/end index the ids, without the BOS). With `bos` each window's BOS takes one
    of its `window` positions, so it spans window - 1 ids, and its first id has context (the BOS)."""
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window (got window={window}, stride={stride})")
    span = window - 1 if bos else window
    step = min(stride, span)
    lead = 0 if bos else 1  # ids at a window's start that have no context there
    out: list[Window] = []
    scored_until = lead  # without BOS, token 0 has no context
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + span, n_tokens)
        if end > scored_until:
            out.append(Window(begin, end, max(scored_until, begin + lead)))
            scored_until = end
        begin += step
    return out


def text_pieces(ids: Sequence[int], window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
                bos: int | None = None) -> list[Piece]:
    """The windows as pieces: `bos` (an id, or None for a model whose tokenizer adds none) starts each."""
    ids = list(ids)
    head = [] if bos is None else [bos]
    return [Piece(head + ids[w.begin:w.end], tuple(range(w.score_from - w.begin + len(head),
                                                         w.end - w.begin + len(head))))
            for w in windows(len(ids), window, stride, bos is not None)]


def llama_perplexity_pieces(ids: Sequence[int], n_ctx: int, bos: int | None) -> list[Piece]:
    """The chunking of llama.cpp's `llama-perplexity` (tools/perplexity, `perplexity()`), to hold our scoring
    against that tool's figure: it tokenizes the text with BOS in front (when the vocabulary adds one), cuts
    n_tokens // n_ctx chunks of n_ctx tokens, overwrites each chunk's first token with BOS (when added), and
    scores only the second half of each chunk: the tokens after position n_ctx // 2. `ids` are the text's ids
    without the BOS, as edgeft stores them."""
    tokens = ([] if bos is None else [bos]) + list(ids)
    first = n_ctx // 2
    pieces = []
    for start in range(0, len(tokens) // n_ctx * n_ctx, n_ctx):
        chunk = tokens[start:start + n_ctx]
        if bos is not None:
            chunk[0] = bos
        pieces.append(Piece(chunk, tuple(range(first + 1, n_ctx))))
    return pieces


def model_bos(tokenizer) -> int | None:
    """The BOS id the model's HF tokenizer puts in front of every text it encodes (its post-processor or
    add_bos_token: Gemma, Llama 2/3), or None when it adds none (SmolLM2, Qwen). This, not whether a BOS token
    exists, decides: SmolLM2 names <|im_start|> its BOS and never adds it. Our GGUFs carry the same answer as
    llama.cpp's add_bos_token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    added = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if added[:1] == [bos] and plain[:1] != [bos] else None


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
    # The convention: whether each window started with the model's BOS (see the module docstring). Ledger
    # entries written before edgeft scored with BOS have no such key: they were scored without one.
    bos: bool = False
    # Per scored token, in order (score(..., per_token=True), or the board's own): the NLL and the top-1 id.
    token_nll: list[float] | None = field(default=None, repr=False)
    token_top1: list[int] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("token_nll", "token_top1")}

    def entry(self, model: str, text: str) -> dict:
        """The ledger form: the result, what was scored and on which text."""
        return {**self.to_json(), "model": model, "text": text}

    @classmethod
    def from_entry(cls, entry: dict) -> "PerplexityResult":
        """Back from a ledger entry's perplexity (reused measurements)."""
        return cls(ppl=entry["ppl"], nll_sum=entry.get("nll_sum", math.log(entry["ppl"]) * entry["tokens"]),
                   tokens=entry["tokens"], windows=entry.get("windows", 0), window=entry.get("window", 0),
                   stride=entry.get("stride", 0), seconds=entry.get("seconds", 0.0), backend=entry.get("backend", ""),
                   bos=bool(entry.get("bos", False)))


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


# Rows of logits turned into float64 at a time. Whole windows would cost 5 float64 copies of 512 x vocab
# (2.6 GB with a 128K vocabulary, more than a 1B model's own scoring needs); each row's result is the same.
ROWS = 16


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) for each row, computed in float64 so backends agree to the last printed digit."""
    out = np.empty(len(targets))
    for i in range(0, len(targets), ROWS):
        x = logits[i:i + ROWS].astype(np.float64)
        peak = x.max(axis=-1, keepdims=True)
        picked = x[np.arange(len(x)), targets[i:i + ROWS]]
        np.exp(np.subtract(x, peak, out=x), out=x)
        out[i:i + ROWS] = picked - (np.log(x.sum(axis=-1)) + peak[:, 0])
    return out


def _rows_and_targets(piece: Piece, logits) -> tuple[np.ndarray, np.ndarray]:
    at = np.asarray(piece.targets, dtype=np.int64)
    return np.asarray(logits)[at - 1], np.asarray(piece.ids)[at]


def score_pieces(pieces: list[Piece], logits_fn: Callable[[list[int]], np.ndarray], *, backend: str = "torch",
                 window: int = 0, stride: int = 0, progress: Callable[[int, int], None] | None = None,
                 per_token: bool = False, bos: bool = False) -> PerplexityResult:
    """Perplexity over every piece's scored positions. `window`/`stride`/`bos` only describe the plan (0 for
    task pieces, one per held-out example). `per_token` keeps each scored token's NLL and top-1 id."""
    start = time.perf_counter()
    nll = 0.0
    count = 0
    token_nll: list[float] = []
    token_top1: list[int] = []
    for i, piece in enumerate(pieces):
        rows, targets = _rows_and_targets(piece, logits_fn(piece.ids))
        lp = token_logprobs(rows, targets)
        nll -= float(lp.sum())
        count += len(targets)
        if per_token:
            token_nll += (-lp).tolist()
            token_top1 += rows.argmax(-1).tolist()
        if progress:
            progress(i + 1, len(pieces))
    return PerplexityResult(ppl=math.exp(nll / count), nll_sum=nll, tokens=count, windows=len(pieces),
                            window=window or max((len(p.ids) for p in pieces), default=0), stride=stride,
                            seconds=round(time.perf_counter() - start, 3), backend=backend, bos=bos,
                            token_nll=token_nll if per_token else None, token_top1=token_top1 if per_token else None)


def score(ids: Sequence[int], logits_fn: Callable[[list[int]], np.ndarray], *, window: int = DEFAULT_WINDOW,
          stride: int = DEFAULT_STRIDE, backend: str = "torch", progress: Callable[[int, int], None] | None = None,
          per_token: bool = False, bos: int | None = None) -> PerplexityResult:
    """Perplexity of held-out text ids in the window plan above; `bos`: the model's BOS id (model_bos), which
    starts every window, or None."""
    return score_pieces(text_pieces(ids, window, stride, bos), logits_fn, backend=backend, window=window,
                        stride=stride, progress=progress, per_token=per_token, bos=bos is not None)


@dataclass
class TokenDifference:
    """Per-token NLL differences d_i = measured - reference of two backends on the same ids and contexts.

    exp(mean d) is the perplexity ratio. The d_i of two correct builds are rounding noise of mean ~0 (the
    default model's Q4_K_M, emulated Pi 5 vs x86: mean +0.0001 nats, sd 0.10 nats over 1,022 tokens), so
    the mean of n of them is off by about sd / sqrt(n) by chance alone (0.9% of perplexity at n = 128).
    `excess` is the smallest |perplexity change| the data supports at `z` standard errors: a gate on it
    fails a healthy build only with probability Phi(-z) even at its limit, and still fails a broken one,
    whose change is far beyond its standard error."""

    n: int
    mean: float  # nats per token
    sd: float
    z: float
    top1_agreement: float | None

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.inf

    @property
    def change(self) -> float:
        """The measured relative perplexity change (+0.05 = 5% higher)."""
        return math.exp(self.mean) - 1

    @property
    def bounds(self) -> tuple[float, float]:
        """The relative perplexity change at mean -/+ z standard errors."""
        return math.exp(self.mean - self.z * self.se) - 1, math.exp(self.mean + self.z * self.se) - 1

    @property
    def excess(self) -> float:
        """The smallest |relative perplexity change| within those bounds (0 when they include no change;
        NaN when the measurement is not a number)."""
        if not math.isfinite(self.mean) or not math.isfinite(self.sd):
            return math.nan
        beyond = max(0.0, abs(self.mean) - self.z * self.se)
        return math.exp(beyond) - 1

    def to_json(self) -> dict:
        lo, hi = self.bounds
        return {"tokens": self.n, "mean_nll_diff": self.mean, "sd_nll_diff": self.sd, "se_nll_diff": self.se,
                "z": self.z, "change": self.change, "change_low": lo, "change_high": hi, "excess": self.excess,
                "top1_agreement": self.top1_agreement}


def token_difference(measured: PerplexityResult, reference: PerplexityResult, z: float) -> TokenDifference:
    """Both results must have kept their per-token NLLs over the same scored tokens."""
    if measured.token_nll is None or reference.token_nll is None or len(measured.token_nll) != len(reference.token_nll):
        raise ValueError("token_difference needs the per-token NLLs of both results, over the same tokens")
    d = np.asarray(measured.token_nll, dtype=np.float64) - np.asarray(reference.token_nll, dtype=np.float64)
    top1 = None
    if measured.token_top1 is not None and reference.token_top1 is not None:
        top1 = float(np.mean(np.asarray(measured.token_top1) == np.asarray(reference.token_top1)))
    return TokenDifference(n=len(d), mean=float(d.mean()), sd=float(d.std(ddof=1)) if len(d) > 1 else math.inf, z=z,
                           top1_agreement=top1)


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
                   backends: tuple[str, str] = ("", ""), window: int = 0, stride: int = 0, bos: bool = False
                   ) -> Comparison:
    """Perplexity of two models on the same pieces, mean KL(reference || other) and top-1 agreement.
    Each model is anything with `.logits(piece_ids)`. Piece by piece: at most one piece of logits per model
    is held, never all of them."""
    start = time.perf_counter()
    nll_ref = nll = kl = 0.0
    top1 = count = 0
    for i, piece in enumerate(pieces):
        ref, targets = _rows_and_targets(piece, reference.logits(piece.ids))
        got, _ = _rows_and_targets(piece, other.logits(piece.ids))
        picked, kl_rows = np.empty((2, len(targets))), np.empty(len(targets))
        for r in range(0, len(targets), ROWS):  # a block of rows in float64 at a time (see ROWS)
            ref_lp, got_lp = (_log_softmax(x[r:r + ROWS].astype(np.float64)) for x in (ref, got))
            at, want = np.arange(len(ref_lp)), targets[r:r + ROWS]
            picked[:, r:r + ROWS] = ref_lp[at, want], got_lp[at, want]
            kl_rows[r:r + ROWS] = (np.exp(ref_lp) * (ref_lp - got_lp)).sum(axis=-1)
        nll_ref -= float(picked[0].sum())
        nll -= float(picked[1].sum())
        kl += float(kl_rows.sum())
        top1 += int((got.argmax(-1) == ref.argmax(-1)).sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(pieces))
    seconds = round(time.perf_counter() - start, 3)
    window = window or max((len(p.ids) for p in pieces), default=0)

    def result(total: float, backend: str) -> PerplexityResult:
        return PerplexityResult(ppl=math.exp(total / count), nll_sum=total, tokens=count, windows=len(pieces),
                                window=window, stride=stride, seconds=seconds, backend=backend, bos=bos)

    return Comparison(measured=result(nll, backends[1]), reference=result(nll_ref, backends[0]),
                      kl_mean=kl / count, top1_agreement=top1 / count)


def compare(reference, other, ids: Sequence[int], window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
            progress: Callable[[int, int], None] | None = None, backends: tuple[str, str] = ("", ""),
            bos: int | None = None) -> Comparison:
    """`compare_pieces` on held-out text ids in the window plan above (`bos` as in `score`)."""
    return compare_pieces(reference, other, text_pieces(ids, window, stride, bos), progress, backends, window, stride,
                          bos is not None)


def measure(model, ids: Sequence[int], window: int, stride: int, label: str, bos: int | None = None
            ) -> PerplexityResult:
    """Perplexity of a loaded torch model on `ids` (`bos` as in `score`), with a progress bar."""
    from .progress import bar

    with bar(f"perplexity {label}") as update:
        return score(ids, torch_logits_fn(model), window=window, stride=stride, backend="torch", progress=update,
                     bos=bos)

