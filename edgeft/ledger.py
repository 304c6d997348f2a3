"""The run folder and its manifest: the perplexity ledger that is the product's spine.

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
import os
import platform
import resource
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from . import __version__
from .atomic import NON_FINITE, finite, sha256_file, write_json
from .errors import EdgeftError
from .inputs import read_json

MANIFEST = "manifest.json"
LOCK = ".manifest.json.lock"
LOCK_TIMEOUT_S = 600  # another step's append takes milliseconds; minutes mean a stuck process
_FIX = "restore it from a copy or use a new --run"
# The fields the ledger's readers use, and the JSON types each may hold (None: may be absent or null).
_ENTRY_FIELDS = {"step": (str,), "status": (str,), "inputs": (dict,), "outputs": (list,), "metrics": (dict,),
                 "perplexity": (dict, None), "reference": (dict, None),
                 "config": (dict, None), "gate": (dict, None), "reason": (str, None), "note": (str, None),
                 "wall_s": (int, float, None), "peak_rss_mb": (int, float, None)}
_MEASURED_FIELDS = {"ppl": (int, float, None), "tokens": (int, None), "model": (str, None)}
_OUTPUT_FIELDS = {"path": (str,), "bytes": (int,), "sha256": (str,)}
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


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each step reports its own peak.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def default_run_dir(step: str) -> Path:
    """Where a step writes when no --run is given: runs/STEP-TIMESTAMP."""
    return Path("runs") / f"{step}-{dt.datetime.now():%Y%m%d-%H%M%S}"


class Run:
    """A run folder. Steps of one chain share it (and its eval token ids)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"edgeft_version": __version__, "created": _now(), "steps": []}
        return read_manifest(self.manifest_path)

    def steps(self) -> list[dict]:
        return self.manifest()["steps"]

    def last(self, step: str, status: str = "ok") -> dict | None:
        for entry in reversed(self.steps()):
            if entry["step"] == step and entry["status"] == status:
                return entry
        return None

    def append(self, entry: dict) -> None:
        """Add `entry` to the manifest. Non-finite numbers in it become null, listed under the entry's
        "non_finite" (the caller's dict is updated in place, so what it prints matches the ledger)."""
        from filelock import FileLock, Timeout

        clean, notes = finite(entry)
        if notes:
            clean[NON_FINITE] = {**(clean.get(NON_FINITE) or {}), **notes}
        entry.clear()
        entry.update(clean)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(self.path / LOCK, timeout=LOCK_TIMEOUT_S):
                manifest = self.manifest()
                manifest["steps"].append(entry)
                manifest["updated"] = _now()
                write_json(self.manifest_path, manifest)
        except Timeout:
            raise EdgeftError(f"{self.path / LOCK}: held by another process for {LOCK_TIMEOUT_S} s; if no edgeft "
                              f"step is running on {self.path}, that process is stuck: stop it") from None

    @contextmanager
    def step(self, name: str, config: dict, inputs: dict) -> Iterator[dict]:
        """Time a step and append its ledger entry, also when it fails. The body fills in the entry's
        outputs, perplexity, metrics; raising GateFailed marks it failed with that reason."""
        import torch

        self.path.mkdir(parents=True, exist_ok=True)
        entry: dict = {"step": name, "status": "running", "started": _now(), "inputs": inputs, "outputs": [],
                       "perplexity": None, "metrics": {}, "config": config, "versions": versions()}
        _reset_peak_rss()
        entry["rss_at_start_mb"] = current_rss_mb()  # peak minus this is what the step itself added
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield entry
            entry["status"] = "ok"
        except BaseException as e:
            entry["status"] = "failed"
            if isinstance(e, EdgeftError):
                entry["reason"] = str(e)
            elif isinstance(e, KeyboardInterrupt):
                entry["reason"] = "interrupted"
            else:
                entry["reason"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc(limit=8)
            raise
        finally:
            entry["wall_s"] = round(time.perf_counter() - start, 2)
            entry["peak_rss_mb"] = read_peak_rss_mb()
            if torch.cuda.is_available():
                entry["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.append(entry)


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
        _check_fields(entry, _ENTRY_FIELDS, where)
        for key in ("perplexity", "reference"):
            if entry.get(key):
                _check_fields(entry[key], _MEASURED_FIELDS, f"{where}.{key}")
                if not isinstance(entry[key].get("bos", False), bool):  # the BOS convention (scoring.py)
                    raise EdgeftError(f"{where}.{key}.bos is {json.dumps(entry[key]['bos'])[:40]}, not true or "
                                      f"false; {_FIX}")

        for j, out in enumerate(entry.get("outputs") or []):
            if not isinstance(out, dict):
                raise EdgeftError(f"{where}.outputs[{j}] is not an object; {_FIX}")
            _check_fields(out, _OUTPUT_FIELDS, f"{where}.outputs[{j}]")
    return manifest


def _check_fields(obj: dict, fields: dict, where: str) -> None:
    for key, types in fields.items():
        value = obj.get(key)
        if value is None and None in types:
            continue
        if isinstance(value, bool) or not isinstance(value, tuple(t for t in types if t is not None)):
            raise EdgeftError(f"{where}.{key} is {json.dumps(value)[:40]}, not what an edgeft ledger holds there; "
                              f"{_FIX}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def ledger_rows(manifest: dict) -> list[dict]:
    """One row per measured model, in the order a person reads the chain. A step that compares against a
    reference (train: the base without the adapter) gets the reference's row first; Δ is against the
    step's reference, else against the run's first perplexity. Task columns (the fine-tune's held-out
    answers: their perplexity and the exact-answer rate) come from the entry's `task`, when the run has one.

    Each row says whether its windows started with the model's BOS (`bos`; an entry from before edgeft scored
    with BOS has no such key and was scored without). Where a run holds both (a BOS model's run continued after
    the change), the rows scored otherwise than its newest are marked `comparable: False` with a note, and Δ
    never reaches across the two: a run's first perplexity is kept per convention."""
    rows = []
    first_ppl: dict[bool, float] = {}
    for entry in manifest.get("steps", []):
        ref = entry.get("reference")
        task = entry.get("task") or {}
        measured = entry.get("perplexity") or {}
        bos = _bos(measured if measured.get("ppl") is not None else ref or {})
        # A reference already on the ledger (the F16 GGUF that every quant compares with) is not repeated.
        if ref and ref.get("ppl") is not None and not any(r["ppl"] == ref["ppl"] and r["bos"] == _bos(ref)
                                                          for r in rows):
            rows.append(_row(entry, ref, task.get("reference") or {}, status="ref", delta_to=None))
            first_ppl.setdefault(_bos(ref), ref["ppl"])
        ppl = measured.get("ppl")
        delta_to = ref["ppl"] if ref and "ppl" in ref and _bos(ref) == bos else first_ppl.get(bos)
        rows.append(_row(entry, measured, task, status=entry["status"], delta_to=delta_to))
        if ppl is not None:
            first_ppl.setdefault(bos, ppl)
    newest = next((r["bos"] for r in reversed(rows) if r["ppl"] is not None), False)
    for r in rows:
        r["comparable"] = r["ppl"] is None or r["bos"] == newest
        if not r["comparable"]:
            r["reason"] = (f"not comparable: scored {'with' if r['bos'] else 'without'} the model's BOS, the newer "
                           f"rows {'with' if newest else 'without'}" + (f"; {r['reason']}" if r["reason"] else ""))
    return rows


def _bos(measured: dict) -> bool:
    """Whether a ledger perplexity was scored with BOS windows (see scoring.py); older entries: without."""
    return bool(measured.get("bos", False))


def _row(entry: dict, measured: dict, task: dict, status: str, delta_to: float | None) -> dict:
    ppl = measured.get("ppl")
    own = status != "ref"  # sizes, times and notes belong to the step's own row
    return {
        "step": entry["step"],
        "checks": (entry.get("config") or {}).get("checks") or "full",  # quick: part of the ids, no answers
        "model": measured.get("model", ""),
        "status": status,
        "ppl": ppl,
        "bos": _bos(measured),
        "delta_pct"
: None if ppl is None or not delta_to else round(100 * (ppl / delta_to - 1), 2),
        "tokens": measured.get("tokens"),
        "task_ppl": task.get("ppl"),
        "task_delta_pct": None if task.get("ppl_change") is None or not own else round(100 * task["ppl_change"], 2),
        "exact_match": task.get("exact_match"),
        "task_items": task.get("items") if own else None,
        "bytes": (sum(o.get("bytes", 0) for o in entry.get("outputs", [])) or None) if own else None,
        "wall_s": entry.get("wall_s") if own else None,
        "peak_rss_mb": entry.get("peak_rss_mb") if own else None,
        "reason": (entry.get("reason") or entry.get("note") or task.get("note") or "") if own else "",
    }
