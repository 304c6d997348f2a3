"""The manifest's entries: the perplexity ledger that is the product's spine (the run folder that holds it,
and the one writer of its entries, are run.py's).

Every step appends one entry to RUN/manifest.json: what went in, what came out (path, bytes, sha256),
the perplexity of its result on the run's token ids, wall time, peak RSS, library versions and the exact
config. A failed step is recorded too, with its reason, so the ledger shows where quality was lost.

Steps of one run may run side by side (`export --format gguf` and `--format onnx` at once): an append is a
read-modify-replace of the manifest under an exclusive lock on RUN/.manifest.json.lock (filelock: flock on
Linux and macOS, LockFileEx on Windows; where neither works, e.g. some network filesystems, it falls back
to a lock file that exists only while held). Readers need no lock: the manifest is replaced atomically.

A manifest is also input (runs are copied, edited, damaged): it is read through one validated reader that
refuses anything but an edgeft ledger with a one-line error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path

from . import __version__
from .atomic import sha256_file
from .errors import EdgeftError
from .inputs import read_json

_FIX = "restore it from a copy or use a new --run"

# The ledger's schema: every field a reader of the manifest uses (show, report, the pipeline, deploy), with the
# JSON types it may hold; the ledger is data like any file handed over, so a crafted or damaged one is one line
# naming the field, never a TypeError in a table. A tuple lists the types (None: may be absent or null); a dict is
# an object (absent or null allowed) checked field by field; [spec] a list whose items are checked; {"*": spec} an
# object whose every value is checked. Fields not named are not read by anything that needs their type.
NUM = (int, float, None)
TEXT = (str, None)
_MEASURED = {"ppl": NUM, "tokens": (int, None), "model": TEXT, "bos": (bool, None), "nll_sum": NUM,
             "windows": (int, None), "backend": TEXT, "text": TEXT}
_TASK = {"ppl": NUM, "ppl_change": NUM, "exact_match": NUM, "items": (int, None), "note": TEXT,
         "reference": {"ppl": NUM, "exact_match": NUM}}
_FLEET_ROW = {"board": TEXT, "device": TEXT, "model": TEXT, "tokens_per_s": NUM, "ppl_change": NUM,
              "passed": (bool, None), "skipped": (bool, None), "error": TEXT}
_METHOD_ROW = {"method": TEXT, "trainable_params": (int, None), "adapter_mb": NUM, "train_seconds": NUM,
               "peak_ram_mb": NUM, "forgetting": NUM, "error": TEXT, "merged": {"ppl": NUM, "exact_match": NUM},
               "quants": {"*": {"ppl": NUM, "exact_match": NUM, "status": TEXT}}}
ENTRY_SCHEMA = {
    "step": (str,), "status": (str,), "started": TEXT, "inputs": {"*": (str, int, float, bool, list, dict, None)},
    "outputs": [{"path": (str,), "bytes": (int,), "sha256": (str,)}],
    "perplexity": _MEASURED, "reference": _MEASURED, "task": _TASK,
    "metrics": {"kl_mean": NUM, "top1_agreement": NUM, "ppl_rise": NUM, "loss_curve": [NUM],
                "tensor_types": {"*": (int,)}, "bench": {"tg_tokens_per_s": (int, float), "pp_tokens_per_s": NUM},
                "decode_bound_tokens_per_s": NUM, "boards": [_FLEET_ROW], "rows": [_METHOD_ROW],
                "served_answers": {"exact_match": NUM, "host_exact_match": NUM, "identical_to_host": (int, None),
                                   "items": (int, None), "decode_tokens_per_s": NUM},
                "switching": {"switch_cost_ms": NUM}, "memory": {"ratio": NUM}},
    "config": {"*": (str, int, float, bool, list, dict, None)}, "versions": {"*": TEXT},
    "gate": {"metric": TEXT, "value": NUM, "max": NUM}, "gates": [{"metric": TEXT, "value": NUM, "max": NUM}],
    "reason": TEXT, "note": TEXT, "wall_s": NUM, "peak_rss_mb": NUM, "rss_at_start_mb": NUM,
}
STATUSES = ("ok", "failed", "running", "skipped")


def check_schema(value, spec, where: str) -> None:
    """`value` against one schema spec (see ENTRY_SCHEMA); the error names the field's path."""
    def bad(shown):
        return EdgeftError(f"{where} is {shown}, not what an edgeft ledger holds there; {_FIX}")

    if isinstance(spec, tuple):
        if value is None and None in spec:
            return
        types = tuple(t for t in spec if t is not None)
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise bad(json.dumps(value)[:40])
        if isinstance(value, float) and not math.isfinite(value):  # a ledger writes null for these
            raise bad(value)
        return
    if isinstance(spec, list):
        if value is None:
            return
        if not isinstance(value, list):
            raise bad(f"a {type(value).__name__}")
        for i, item in enumerate(value):
            check_schema(item, spec[0], f"{where}[{i}]")
        return
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad(json.dumps(value)[:40])
    for key, sub in spec.items():
        if key == "*":
            for k, v in value.items():
                check_schema(v, sub, f"{where}.{k}")
        else:
            check_schema(value.get(key), sub, f"{where}.{key}")


_STACK = ["torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf", "llama_cpp_python",
          "onnxruntime", "safetensors", "tokenizers"]


def versions() -> dict:
    out = {"edgeft": __version__, "python": platform.python_version()}
    for name in _STACK:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def artifact(path: Path, run_dir: Path | None = None) -> dict:
    """Describe a file or folder: path (relative to the run when inside it), bytes, sha256. A folder's
    sha256 hashes its files' names and hashes in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(path).as_posix().encode())
            h.update(sha256_file(f).encode())
        size, digest = sum(f.stat().st_size for f in files), h.hexdigest()
    else:
        size, digest = path.stat().st_size, sha256_file(path)
    shown = path
    if run_dir is not None:
        try:
            shown = path.resolve().relative_to(Path(run_dir).resolve())
        except ValueError:
            pass
    return {"path": str(shown), "bytes": size, "sha256": digest}


def read_peak_rss_mb() -> float:
    """Peak resident memory since the last reset, in MiB (children included: the llama.cpp tools run as
    subprocesses)."""
    own = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024
    except OSError:
        pass
    if own is None:  # not Linux: ru_maxrss is the process lifetime peak (KiB on Linux, bytes on macOS)
        scale = 1 if platform.system() == "Darwin" else 1024
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(max(own, children), 1)


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def reset_peak_memory() -> None:
    """Start a step's peak: RSS and, where this process uses CUDA, GPU memory."""
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each step reports its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if _cuda():
        sys.modules["torch"].cuda.reset_peak_memory_stats()


def peak_gpu_mb() -> float | None:
    """The GPU memory peak since the last reset (None where this process uses no CUDA)."""
    return round(sys.modules["torch"].cuda.max_memory_allocated() / 2**20, 1) if _cuda() else None


def _cuda() -> bool:
    """Whether this process uses CUDA, asked of torch only if something already imported it: a step that never
    imports torch (deploy, smoke) allocated no GPU memory, and the ledger stays importable without torch. A step
    that imports torch during its body has a peak since that import, which is its own."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


def read_manifest(path: Path) -> dict:
    """A manifest checked as a ledger: an object with a list of step entries, each with the fields the
    ledger's readers use holding the types they expect."""
    manifest = read_json(path, _FIX)
    steps = manifest.get("steps")
    if not isinstance(steps, list):
        raise EdgeftError(f"{path}: has no 'steps' list, so it is not an edgeft ledger; {_FIX}")
    for i, entry in enumerate(steps):
        where = f"{path}: steps[{i}]"
        if not isinstance(entry, dict):
            raise EdgeftError(f"{where} is not an object; {_FIX}")
        for key, kind in (("step", str), ("status", str), ("inputs", dict), ("outputs", list), ("metrics", dict)):
            if not isinstance(entry.get(key), kind):
                raise EdgeftError(f"{where}.{key} is missing or not a {kind.__name__}; {_FIX}")
        check_schema(entry, ENTRY_SCHEMA, where)
        if entry["status"] not in STATUSES:
            raise EdgeftError(f"{where}.status is {json.dumps(entry['status'])[:40]}, not one of "
                              f"{', '.join(STATUSES)}; {_FIX}")
    return manifest


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
