"""`export --format gguf --quant auto --budget SIZE`: one llama.cpp type per tensor, chosen for this model on this
run's data so that the GGUF fits SIZE and loses the least; the file is written by llama.cpp's own quantizer
(`llama_model_quantize` with per-tensor overrides, what llama-quantize's --tensor-type does), so stock
llama.cpp, llama-server, Ollama and the board build load it with no edgeft code.

How the recipe is chosen (every number measured on this model with this run's data, no fixed table):
  1. error: a fixed, even sample of every quantizable tensor's rows is quantized by ggml's own row quantizer
     (the function llama_model_quantize calls) into every candidate type, with the importance matrix from the
     training rows, and its squared error weighted per column by that matrix is kept: what the layer's output
     loses on the training activations, per type.
  2. sensitivity: the error of a tensor is not what the model loses at its output; that depends on where it
     sits. A probe quantizes one part of the model to q4_0 (every other tensor at q8_0) and measures the mean
     KL vs the unquantized GGUF on the first held-out ids plus, weighted so that the two count alike, on the
     task's answers. Probes cover each layer, each kind of projection across the layers (attn_q ... ffn_down),
     and the embeddings/output head; a scale
     per layer times a scale per kind is fitted to them (alternating least squares), which turns each
     tensor's error into predicted KL.
  3. allocation: the predicted loss of a recipe is the q8_0 baseline's KL plus the sum of each tensor's scaled
     error change; the recipe with the least predicted loss within the budget's bytes is found by upgrading,
     bytes-cheapest gain first, along each tensor's lower convex hull of (bytes, loss): the Lagrangian
     solution of this separable knapsack.
The ledger entry of the mixed GGUF carries the recipe (every tensor's type), the budget, the probes, the
predicted and the measured loss, and the stock recipes it is compared with.
"""

from __future__ import annotations

import heapq
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeftError
from ..llamacpp import FILE_TYPE_OF, LlamaCpp, QUANT_TYPES, quantize, quantize_rows, row_bytes

# Every type here is a stock llama.cpp type the CPU backends (x86, ARM NEON) run. Block-32 types fit any row
# that is a multiple of 32; the k-quants need rows that are a multiple of 256 (llama.cpp would otherwise store
# a fallback type, which the allocation must not pretend to have chosen).
BLOCK32_TYPES = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")
K_TYPES = ("q3_k", "q4_k", "q5_k", "q6_k")
PROBE_TYPE, BASE_TYPE = "q4_0", "q8_0"
ALIGN = 32  # GGUF's default tensor data alignment
SAMPLE_ROWS = 64
PROBE_TOKENS = 512
PROBE_TASK_ITEMS = 10
# Kinds of tensors llama.cpp never quantizes even when 2-D (router, position tables); left as they are.
_KEEP = ("norm", "pos_embd", "token_types", "ffn_gate_inp", "_b.weight", "rope")
BUDGET_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """--budget as given: bytes, bits per weight, a stock recipe's size ('q4_k_m'), or 'device' (the board's
    usable RAM minus the KV cache for --context and the runtime)."""
    spec: str
    kind: str  # "bytes" | "bpw" | "stock" | "device"
    value: float | str


def parse_budget(spec: str) -> Budget:
    s = spec.strip().lower().replace(" ", "")
    if s == "device":
        return Budget(spec, "device", "device")
    if s in QUANT_TYPES:
        return Budget(spec, "stock", s)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bpw|[kmg]i?b|b)?", s)
    if not m or float(m.group(1)) <= 0:
        raise EdgeftError(f"--budget {spec}: give a size (bytes, or with kB/MB/GB/KiB/MiB/GiB), bits per weight "
                          f"('4.5bpw'), a stock recipe's size ({', '.join(QUANT_TYPES)}) or 'device'")
    number, unit = float(m.group(1)), m.group(2) or "b"
    if unit == "bpw":
        if not 1.5 <= number <= 16:
            raise EdgeftError(f"--budget {spec}: bits per weight must be between 1.5 and 16")
        return Budget(spec, "bpw", number)
    return Budget(spec, "bytes", number * BUDGET_UNITS[unit])


@dataclass
class Tensor:
    name: str
    rows: int
    cols: int  # values per row (ggml's ne[0])
    ref_bytes: int
    layer: str  # "blk.7", or the tensor's own name outside the blocks
    kind: str  # "attn_q", "ffn_down", ... ("" outside the blocks)
    types: list[str]
    bytes: dict[str, int] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def quantizable(reader) -> tuple[list[Tensor], str]:
    """The tensors the recipe decides (2-D weights with rows a multiple of 32, as llama.cpp quantizes them), and
    the reference's own type (the top choice: no loss)."""
    ref_types = {t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) >= 2}
    ref_type = "f16" if "f16" in ref_types else sorted(ref_types)[0]
    out = []
    for t in reader.tensors:
        if len(t.shape) != 2 or not t.name.endswith(".weight") or any(k in t.name for k in _KEEP):
            continue
        cols, rows = int(t.shape[0]), int(t.shape[1])
        if cols % 32:
            continue
        m = re.match(r"(blk\.\d+)\.(\w+?)\.weight$", t.name)
        layer, kind = (m.group(1), m.group(2)) if m else (t.name.removesuffix(".weight"), "")
        types = [*BLOCK32_TYPES, *(K_TYPES if cols % 256 == 0 else ()), ref_type]
        out.append(Tensor(t.name, rows, cols, int(t.n_bytes), layer, kind, list(dict.fromkeys(types))))
    return out, ref_type


def measure_errors(reader, tensors: list[Tensor], imatrix: dict | None, progress=None) -> None:
    """Each tensor's importance-weighted squared error per candidate type, on an even sample of its rows,
    scaled to all rows (rows are quantized independently, so the sample's error estimates the tensor's)."""
    from gguf import quants

    by_name = {t.name: t for t in reader.tensors}
    for i, tensor in enumerate(tensors):
        src = by_name[tensor.name]
        pick = np.unique(np.linspace(0, tensor.rows - 1, min(tensor.rows, SAMPLE_ROWS)).astype(np.int64))
        rows = quants.dequantize(np.asarray(src.data[pick]), src.tensor_type).reshape(len(pick), tensor.cols)
        rows = rows.astype(np.float32)
        weights = (imatrix or {}).get(tensor.name)
        weights = None if weights is None or np.size(weights) != tensor.cols else np.asarray(weights, np.float32)
        w = weights if weights is not None else np.ones(tensor.cols, np.float32)
        for t in tensor.types:
            tensor.bytes[t] = tensor.ref_bytes if t == tensor.types[-1] else tensor.rows * row_bytes(t, tensor.cols)
            if t == tensor.types[-1]:
                tensor.error[t] = 0.0
                continue
            back = quantize_rows(t, rows, weights)
            tensor.error[t] = float((((rows - back) ** 2) * w).sum(dtype=np.float64) * tensor.rows / len(pick))
        if progress:
            progress(i + 1, len(tensors))


class ProbeReference:
    """The unquantized model's log-probabilities at the probe's scored positions, computed once, kept as
    float32 (512 positions × a 128k vocabulary is 262 MB so, twice that in float64); KL is summed in float64 over
    blocks of CHUNK positions, so no full-size float64 temporary is made (at the 1B shape those temporaries were
    what lifted the --budget export's peak above the stock export's)."""

    CHUNK = 64

    def __init__(self, ref, pieces):
        self.pieces = pieces
        self.rows = []
        for piece in pieces:
            at = np.asarray(piece.targets, dtype=np.int64) - 1
            logits = ref.logits(piece.ids)
            self.rows.append(np.concatenate([_log_softmax(logits[at[i:i + self.CHUNK]]).astype(np.float32)
                                             for i in range(0, len(at), self.CHUNK)]))

    def kl(self, model, split: int) -> tuple[float, float]:
        """Mean KL(reference || model) over the first `split` pieces (text) and over the rest (task answers)."""
        sums, counts = [0.0, 0.0], [0, 0]
        for i, (piece, ref_lp) in enumerate(zip(self.pieces, self.rows)):
            at = np.asarray(piece.targets, dtype=np.int64) - 1
            logits = model.logits(piece.ids)
            k = int(i >= split)
            for j in range(0, len(at), self.CHUNK):
                got = _log_softmax(logits[at[j:j + self.CHUNK]])
                mine = ref_lp[j:j + self.CHUNK].astype(np.float64)
                sums[k] += float((np.exp(mine) * (mine - got)).sum())
            counts[k] += len(at)
        return sums[0] / max(counts[0], 1), (sums[1] / counts[1] if counts[1] else 0.0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    peak = x.max(-1, keepdims=True)
    return x - (np.log(np.exp(x - peak).sum(-1, keepdims=True)) + peak)


@dataclass
class Probe:
    name: str  # "blk.3" (a layer), "attn_v" (a kind across layers), "token_embd", "base" (all at q8_0)
    tensors: list[str]
    kl: float = 0.0
    task_kl: float = 0.0
    seconds: float = 0.0
    task_weight: float = 1.0

    @property
    def loss(self) -> float:
        return self.kl + self.task_weight * self.task_kl


def task_weight(probes: list[Probe]) -> float:
    """How much a unit of task-answer KL counts against a unit of held-out KL: the ratio of what the probes
    raised each by, so that the task (what the user fine-tuned for) weighs as much as the general text. Task
    answers are near-certain, so their KL is about ten times smaller than the text's for the same damage; with
    a weight of 1 the allocation all but ignored them (on the demo fine-tune: held-out KL 0.14x Q4_K_M's, task
    KL 6.5x)."""
    base = probes[0]
    text = sum(max(p.kl - base.kl, 0.0) for p in probes[1:])
    task = sum(max(p.task_kl - base.task_kl, 0.0) for p in probes[1:])
    return text / task if text > 0 and task > 0 else 1.0


def weigh_task(probes: list[Probe]) -> float:
    """Set every probe's task weight (task_weight) before the scales are fitted to their losses; returns it."""
    weight = task_weight(probes)
    for p in probes:
        p.task_weight = weight
    return weight


def probe_pieces(tokens, task, window: int, stride: int) -> tuple[list, int]:
    """What every probe is scored on: the first PROBE_TOKENS held-out ids in the run's window plan, then the
    first PROBE_TASK_ITEMS task answers; and how many pieces are text."""
    from ..scoring import text_pieces

    pieces = text_pieces(tokens.ids[:PROBE_TOKENS], window, stride, tokens.bos)
    split = len(pieces)
    if task is not None:
        pieces += task.pieces(PROBE_TASK_ITEMS)
    return pieces, split


MAX_LAYER_PROBES = 16


def layer_of(tensor: Tensor, blocks: int) -> str:
    """The layer probe a tensor belongs to: its block, or a run of neighbouring blocks in a deep model (at most
    MAX_LAYER_PROBES layer probes: each probe costs a file and a forward pass)."""
    m = re.fullmatch(r"blk\.(\d+)", tensor.layer)
    if not m or blocks <= MAX_LAYER_PROBES:
        return tensor.layer
    span = -(-blocks // MAX_LAYER_PROBES)
    first = int(m.group(1)) // span * span
    return f"blk.{first}-{min(first + span, blocks) - 1}"


def probes_for(tensors: list[Tensor]) -> list[Probe]:
    blocks = len({t.layer for t in tensors if t.kind})
    for t in tensors:
        t.layer = layer_of(t, blocks)
    layers: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    for t in tensors:
        layers.setdefault(t.layer, []).append(t.name)
        if t.kind:
            kinds.setdefault(t.kind, []).append(t.name)
    return [Probe("base", []), *(Probe(k, v) for k, v in layers.items()), *(Probe(k, v) for k, v in kinds.items())]


def run_probes(ref_path: Path, ref: LlamaCpp, tensors: list[Tensor], probes: list[Probe], pieces, split: int,
               work: Path, threads: int | None, imatrix: dict | None, progress=None) -> None:
    """The base probe (every tensor at BASE_TYPE) is written from the reference; each other probe from the base,
    its own tensors requantized to PROBE_TYPE and the rest copied (a q8_0 tensor requantized to q4_0 differs
    from one quantized from F16 by far less than q4_0's own error; copying makes a probe file cheap). Each is
    scored against the unquantized reference on the probe pieces; one probe file at a time."""
    reference = ProbeReference(ref, pieces)
    base = work / "base.gguf"
    for i, probe in enumerate(probes):
        start = time.perf_counter()
        if i == 0:
            quantize(ref_path, base, BASE_TYPE, threads, imatrix=imatrix, types={t.name: BASE_TYPE for t in tensors})
            path = base
        else:
            path = work / f"probe-{i}.gguf"
            types = {t.name: BASE_TYPE for t in tensors} | {name: PROBE_TYPE for name in probe.tensors}
            quantize(base, path, BASE_TYPE, threads, imatrix=imatrix, requantize=True, types=types)
        model = LlamaCpp(path, n_ctx=ref.n_ctx, threads=threads, trusted=True)
        probe.kl, probe.task_kl = reference.kl(model, split)
        model.close()
        if i:
            path.unlink()
        probe.seconds = round(time.perf_counter() - start, 2)
        if progress:
            progress(i + 1, len(probes))


def fit_scales(tensors: list[Tensor], probes: list[Probe], iterations: int = 50, low: str = PROBE_TYPE,
               high: str = BASE_TYPE) -> dict[str, float]:
    """Scale per tensor (KL per unit of weighted error) = layer scale × kind scale, fitted so that each probe's
    measured KL rise equals the sum of its tensors' scaled error rise (`high` -> `low`: q8_0 -> q4_0). Outside
    the blocks (the embeddings, an untied output head) a tensor is its own layer with kind scale 1."""
    base = probes[0].loss
    rise = {p.name: max(p.loss - base, 1e-9) for p in probes[1:]}
    delta = {t.name: max(t.error[low] - t.error[high], 1e-30) for t in tensors}
    layer = {t.layer: 1.0 for t in tensors}
    kind = {t.kind: 1.0 for t in tensors if t.kind}
    for _ in range(iterations):
        for name in layer:
            members = [t for t in tensors if t.layer == name]
            layer[name] = rise[name] / sum(kind.get(t.kind, 1.0) * delta[t.name] for t in members)
        for name in kind:
            members = [t for t in tensors if t.kind == name]
            kind[name] = rise[name] / sum(layer[t.layer] * delta[t.name] for t in members)
        # the kinds' product with the layers is what counts: keep the kinds' geometric mean at 1
        if kind:
            g = math.exp(sum(math.log(v) for v in kind.values()) / len(kind))
            kind = {k: v / g for k, v in kind.items()}
    return {t.name: layer[t.layer] * kind.get(t.kind, 1.0) for t in tensors}


def allocate(tensors: list[Tensor], scales: dict[str, float], tensor_bytes: int) -> dict[str, str]:
    """The type per tensor with the least predicted loss whose padded bytes sum to at most `tensor_bytes`: start
    at each tensor's cheapest type, then take upgrades along each tensor's lower convex hull of (bytes, loss)
    by loss saved per byte, skipping one that no longer fits while a smaller one may."""
    hulls = {}
    for t in tensors:
        pts = sorted(((_pad(t.bytes[ty]), scales[t.name] * t.error[ty], ty) for ty in t.types), key=lambda p: (p[0], p[1]))
        hull: list[tuple[int, float, str]] = []
        for p in pts:
            if hull and p[1] >= hull[-1][1]:
                continue  # more bytes for no less loss
            while len(hull) >= 2:
                (b0, l0, _), (b1, l1, _) = hull[-2], hull[-1]
                # drop the middle point when it lies on or above the segment from hull[-2] to p
                if (l0 - l1) * (p[0] - b0) <= (l0 - p[1]) * (b1 - b0):
                    hull.pop()
                else:
                    break
            hull.append(p)
        hulls[t.name] = hull
    at = {name: 0 for name in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > tensor_bytes:
        raise EdgeftError(f"--budget: even the smallest types ({'/'.join(BLOCK32_TYPES[:1] + K_TYPES[:1])}) need "
                          f"{used / 2**20:.1f} MiB of tensors, more than the budget leaves "
                          f"({max(tensor_bytes, 0) / 2**20:.1f} MiB); give a larger --budget")
    heap = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain = (h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0])
            heapq.heappush(heap, (-gain, name, i))

    for name in hulls:
        push(name)
    while heap:
        _, name, i = heapq.heappop(heap)
        h = hulls[name]
        extra = h[i + 1][0] - h[i][0]
        if used + extra > tensor_bytes:
            continue  # this step does not fit; its later steps are dearer still, so the tensor stops here
        used += extra
        at[name] = i + 1
        push(name)
    return {name: hulls[name][i][2] for name, i in at.items()}


def predicted(tensors: list[Tensor], scales: dict[str, float], recipe: dict[str, str], base_loss: float,
              base_type: str = BASE_TYPE) -> float:
    """The recipe's predicted loss (probe units: held-out KL + weight × task-answer KL): the all-`base_type`
    probe's, plus each tensor's scaled error change from `base_type`."""
    return base_loss + sum(scales[t.name] * (t.error[recipe[t.name]] - t.error[base_type]) for t in tensors)


def fixed_bytes(file_bytes: int, tensors: list[Tensor]) -> int:
    """What the recipe does not change: header, vocabulary, norms (the reference file less its quantizable
    tensors)."""
    return file_bytes - sum(_pad(t.ref_bytes) for t in tensors)


@dataclass
class Recipe:
    types: dict[str, str]
    predicted_loss: float
    predicted_bytes: int
    metrics: dict
    tensors: list[Tensor]
    scales: dict[str, float]
    fixed: int
    base_loss: float

    def bulk_type(self) -> str:
        """The quantized type holding most of the recipe's bytes: the one the header's file type names."""
        held: dict[str, int] = {}
        for t in self.tensors:
            ty = self.types[t.name]
            if ty in FILE_TYPE_OF:
                held[ty] = held.get(ty, 0) + t.bytes[ty]
        return max(held, key=held.get) if held else BASE_TYPE

    def refit(self, budget_bytes: int) -> "Recipe":
        """The allocation again for another whole-file budget (the written file came out larger than
        predicted), from the same measurements."""
        types = allocate(self.tensors, self.scales, budget_bytes - self.fixed)
        return Recipe(types, predicted(self.tensors, self.scales, types, self.base_loss),
                      self.fixed + sum(_pad(t.bytes[types[t.name]]) for t in self.tensors), self.metrics,
                      self.tensors, self.scales, self.fixed, self.base_loss)


def choose(ref_path: Path, ref: LlamaCpp, budget_bytes: int, tokens, task, window: int, stride: int,
           threads: int | None, imatrix: dict | None, work: Path, progress_bar) -> Recipe:
    """Steps 1-3 above for a budget in bytes (the whole file); returns the recipe and what decided it."""
    from gguf import GGUFReader

    start = time.perf_counter()
    reader = GGUFReader(ref_path)
    tensors, ref_type = quantizable(reader)
    if not tensors:
        raise EdgeftError(f"{ref_path.name}: no tensor llama.cpp can quantize per block of 32 values")
    with progress_bar(f"quantization error of {len(tensors)} tensors × {len(BLOCK32_TYPES) + len(K_TYPES)} types") as update:
        measure_errors(reader, tensors, imatrix, update)
    del reader
    errors_s = time.perf_counter() - start
    pieces, split = probe_pieces(tokens, task, window, stride)
    probes = probes_for(tensors)
    with tempfile.TemporaryDirectory(dir=work, prefix=".probes-") as tmp, \
            progress_bar(f"sensitivity: {len(probes)} probes ({PROBE_TYPE} in one part, {BASE_TYPE} elsewhere)") as update:
        run_probes(ref_path, ref, tensors, probes, pieces, split, Path(tmp), threads, imatrix, update)
    weight = weigh_task(probes)
    scales = fit_scales(tensors, probes)
    fixed = fixed_bytes(ref_path.stat().st_size, tensors)
    metrics = {
        "reference_type": ref_type,
        "candidate_types": [*BLOCK32_TYPES, *K_TYPES, ref_type],
        "k_types_need_rows_of": 256,
        "tensors_without_k_types": sum(1 for t in tensors if t.cols % 256),
        "sample_rows": SAMPLE_ROWS,
        "imatrix_tensors": sum(1 for t in tensors if imatrix and t.name in imatrix),
        "probe": {"type": PROBE_TYPE, "others": BASE_TYPE, "held_out_ids": min(PROBE_TOKENS, len(tokens.ids)),
                  "task_items": len(pieces) - split, "task_weight": float(f"{weight:.4g}"),
                  "loss": "mean KL vs the unquantized GGUF on the held-out ids + task_weight × mean KL on the task "
                  "answers",
                  "results": [{"part": p.name, "tensors": len(p.tensors), "kl": float(f"{p.kl:.4g}"),
                               "task_kl": float(f"{p.task_kl:.4g}"), "seconds": p.seconds} for p in probes]},
        "scales": {t.name: float(f"{scales[t.name]:.4g}") for t in tensors},
        "seconds": {"errors": round(errors_s, 1), "total": round(time.perf_counter() - start, 1)},
    }
    return Recipe({}, 0.0, 0, metrics, tensors, scales, fixed, probes[0].loss).refit(budget_bytes)

