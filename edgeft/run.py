"""The run folder as one object: its layout, the names of its steps, its ledger's queries, and the one writer
of ledger entries.

    RUN/manifest.json        the ledger (ledger.py: reading it validated, artifacts, versions, memory)
    RUN/eval_tokens.json     the held-out text's ids every step scores (heldout.py)
    RUN/task_tokens.json     the task set: the held-out answers' ids (task.py)
    RUN/train_config.json    how the adapter was trained
    RUN/adapter/             the trained adapter;  RUN/checkpoints/  its resumable checkpoints
    RUN/merged/              the merged model
    RUN/gguf/, RUN/onnx/     the exports, one folder per format

Steps of one run may run side by side (`export --format gguf` and `--format onnx` at once): an append is a
read-modify-replace of the manifest under an exclusive lock on RUN/.manifest.json.lock (filelock). Readers
need no lock: the manifest is replaced atomically.

No other module spells these names or walks the steps list by hand: it asks a `Run` (tests/test_run_owner.py
greps for both). Every entry, a step's, a comparison's or a fleet's, is written through `Run.record`, so each
has its wall time, peak RSS and the library versions.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import __version__
from .atomic import NON_FINITE, finite, sha256_file, write_json
from .errors import EdgeftError, cannot_write
from .inputs import check_gguf
from .ledger import current_rss_mb, now, peak_gpu_mb, read_manifest, read_peak_rss_mb, reset_peak_memory, versions

# ------------------------------------------------------------------------------------------------ layout
MANIFEST = "manifest.json"
LOCK = ".manifest.json.lock"
TOKENS_FILE = "eval_tokens.json"
TASK_FILE = "task_tokens.json"
TRAIN_CONFIG = "train_config.json"  # the run's record of how its adapter was trained
ADAPTER_DIR = "adapter"
CHECKPOINTS = "checkpoints"
LOCKS_DIR = ".locks"  # locks.writing: one writer per artifact
MERGED_DIR = "merged"
COMPARE_PLOT = "compare.png"  # `edgeft compare`: beside the methods' own run folders (RUN/METHOD/)
REPORT_PAGE, REPORT_FIGURE = "report.html", "report.png"
EXPORT_DIRS = {"gguf": "gguf", "onnx": "onnx"}  # per export format
LOCK_TIMEOUT_S = 600  # another step's append takes milliseconds; minutes mean a stuck process

# ------------------------------------------------------------------------------------------------ step names
EVAL = "eval"
TRAIN = "train"
MERGE = "merge"
MERGE_CHOICE = "merge-choice"  # --into auto: which base the adapter was merged into, and why
EXPORT_GGUF = "export-gguf"
EXPORT_GGUF_CHOICE = "export-gguf-choice"  # --quant auto
EXPORT_GGUF_LORA = "export-gguf-lora"  # --adapter-only
EXPORT_ONNX = "export-onnx"
DEPLOY = "deploy"
SMOKE = "smoke"
COMPARE = "compare"
FLEET_PREFIX = "fleet-"
ROLLOUT = "rollout"  # deploy --hosts --waves: the whole rollout, every board's row
ROLLOUT_WAVE = "rollout-wave"  # one wave: its boards deployed and checked through their servers
ROLLOUT_SWITCH = "rollout-switch"  # a failed wave's boards switched back to their previous version, checked
ROLLBACK = "rollback"  # deploy --rollback: boards switched back by hand, checked


def fleet_step(step: str) -> str:
    """The fleet entry of `step` (deploy or smoke on many boards)."""
    return FLEET_PREFIX + step


def export_step(fmt: str) -> str:
    return {"gguf": EXPORT_GGUF, "onnx": EXPORT_ONNX}[fmt]


def default_run_dir(step: str) -> Path:
    """Where a step writes when no --run is given: runs/STEP-TIMESTAMP."""
    return Path("runs") / f"{step}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def last_entry(steps: list[dict], *names: str, status: str | None = "ok",
               where: Callable[[dict], bool] | None = None) -> dict | None:
    """The latest entry of one of `names` (any step when none) with `status` (any when None) for which
    `where` holds: the one scan of a steps list (a manifest already read, or Run.last)."""
    for entry in reversed(steps):
        if ((not names or entry["step"] in names) and (status is None or entry["status"] == status)
                and (where is None or where(entry))):
            return entry
    return None


# Entries being recorded in this process, each with the highest peak RSS that a step recorded inside it
# reported: every step resets the process's peak (VmHWM) when it starts, so a step that runs others
# (compare, a fleet) would otherwise see only the peak since the last of them began.
_OPEN: list[list[float]] = []
_OPEN_LOCK = threading.Lock()


class Run:
    """A run folder. Steps of one chain share it (and its eval token ids)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -------------------------------------------------------------------------------------------- layout
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def ids(self) -> Path:
        """The held-out text's token ids (heldout.EvalTokens)."""
        return self.path / TOKENS_FILE

    @property
    def task_set(self) -> Path:
        return self.path / TASK_FILE

    @property
    def train_config(self) -> Path:
        return self.path / TRAIN_CONFIG

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def merged(self) -> Path:
        return self.path / MERGED_DIR

    def export_dir(self, fmt: str) -> Path:
        return self.path / EXPORT_DIRS[fmt]

    def method_run(self, method: str) -> Run:
        """`edgeft compare`: the run of one PEFT method inside the comparison's folder."""
        return Run(self.path / method)

    @property
    def compare_plot(self) -> Path:
        return self.path / COMPARE_PLOT

    @property
    def report_files(self) -> tuple[Path, Path]:
        """`edgeft report`: the page and the figure."""
        return self.path / REPORT_PAGE, self.path / REPORT_FIGURE

    def is_run(self) -> bool:
        """Whether the folder holds a ledger (a run folder, not just a folder)."""
        return self.manifest_path.is_file()

    def contains(self, path: Path) -> bool:
        return Path(path).resolve().is_relative_to(self.path.resolve())

    def recorded_path(self, out: dict, what: str) -> Path:
        """A path the ledger names (an entry's output) as a file or folder inside this run. A ledger is data like
        any file handed over: '../..', an absolute path or a link out of the run, a device or a FIFO would have
        edgeft read (and hash: /dev/zero never ends) what the run does not hold."""
        raw = out.get("path") if isinstance(out, dict) else None
        fix = f"the ledger {self.manifest_path} is damaged or was edited; run that step again"
        if not isinstance(raw, str) or not raw:
            raise EdgeftError(f"{what}: an output without a path; {fix}")
        path = self.path / raw
        if not self.contains(path):
            raise EdgeftError(f"{what}: the ledger names {raw!r}, outside the run folder {self.path}; {fix}")
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise EdgeftError(f"{what}: {path} is not a regular file or folder; {fix}")
        return path

    # -------------------------------------------------------------------------------------------- queries
    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"edgeft_version": __version__, "created": now(), "steps": []}
        return read_manifest(self.manifest_path)

    def steps(self) -> list[dict]:
        return self.manifest()["steps"]

    def last(self, *names: str, status: str | None = "ok", where: Callable[[dict], bool] | None = None
             ) -> dict | None:
        """The latest entry of one of `names` with `status` (None: any) for which `where` holds."""
        return last_entry(self.steps(), *names, status=status, where=where)

    def gguf_exports(self) -> list[dict]:
        """The ledger's GGUF exports, with what deploy and smoke read from them (a quant name, the scoring
        windows) of the right kind: a run folder can come from anywhere."""
        def usable(e: dict) -> bool:
            config = e.get("config") or {}
            return (e["step"] == EXPORT_GGUF and bool(e["outputs"]) and e["outputs"][0]["path"].endswith(".gguf")
                    and isinstance(e["inputs"].get("quant"), str)
                    and all(type(config.get(k)) is int and config[k] > 0 for k in ("window", "stride")))

        return [e for e in self.steps() if usable(e)]

    def chosen_gguf(self, quant: str) -> tuple[Path, dict]:
        """The GGUF to ship and its export entry: --quant's, else export's auto choice, else the smallest that
        passed its gate; checked against the ledger's sha256."""
        entries = self.gguf_exports()
        if not entries:
            raise EdgeftError(f"{self.path}: no exported GGUF in this run; run `edgeft export --format gguf --run "
                              f"{self.path}`")
        if quant:
            match = [e for e in entries if e["inputs"]["quant"] == quant.lower()]
            if not match:
                have = sorted({e["inputs"]["quant"] for e in entries})
                raise EdgeftError(f"--quant {quant}: no such GGUF in {self.path} (have: {', '.join(have)})")
            entry = match[-1]
        else:
            choice = self.last(EXPORT_GGUF_CHOICE)
            chosen = last_entry(entries, status=None, where=lambda e: bool(choice) and e["inputs"]["quant"] ==
                                choice["metrics"].get("chosen"))
            passed = [e for e in entries if e["status"] == "ok"]
            if chosen:
                entry = chosen
            elif passed:
                entry = min(passed, key=lambda e: e["outputs"][0]["bytes"])
            else:
                raise EdgeftError(f"{self.path}: no GGUF passed its gate; pass --quant to ship one anyway")
        path = self.recorded_path(entry["outputs"][0], f"{self.manifest_path}: the GGUF it names")
        if not path.is_file() or sha256_file(path) != entry["outputs"][0]["sha256"]:
            raise EdgeftError(f"{path}: missing or changed since export (sha256 differs from the ledger); export again")
        # The digest says it is the file the ledger recorded, not that it is whole: a ledger can be edited along
        # with a truncated file, and a tensor past the end crashes llama.cpp on the board.
        check_gguf(path, "--quant" if quant else "")
        return path, entry

    def export_source(self, entry: dict) -> Path:
        """The HF folder an export entry's artifact came from (its tokenizer and config): the run's merged
        model, else the folder the entry names."""
        if self.merged.is_dir():
            return self.merged
        source = entry["inputs"].get("source")
        if not isinstance(source, str) or not Path(source, "config.json").is_file():
            raise EdgeftError(f"{self.path}: the model {entry['outputs'][0]['path']} was exported from is gone "
                              f"({source}); export again")
        return Path(source)

    def lora_export(self, quant: str) -> tuple[Path, Path, dict]:
        """(base GGUF in `quant`, LoRA GGUF, the export entry) from the run's last `export --adapter-only`,
        checked against the ledger's sha256."""
        entry = self.last(EXPORT_GGUF_LORA, where=lambda e: isinstance(
            (e["metrics"].get("served_bases") or {}).get(quant), dict))
        if entry is None:
            raise EdgeftError(f"{self.path}: no adapter GGUF with a {quant.upper()} base; run `edgeft export "
                              f"--adapter {self.path} --adapter-only --quant {quant}`")
        by_name = {Path(o["path"]).name: o for o in entry["outputs"]}
        want = entry["metrics"]["served_bases"][quant]["path"]
        lora = next((o for n, o in by_name.items() if n.endswith("-LoRA-F16.gguf")), None)
        if want not in by_name or lora is None:
            raise EdgeftError(f"{self.manifest_path}: its adapter export names files it does not list; export again")
        paths = []
        for o in (by_name[want], lora):
            path = self.recorded_path(o, f"{self.manifest_path}: the adapter export")
            if not path.is_file() or sha256_file(path) != o["sha256"]:
                raise EdgeftError(f"{path}: missing or changed since export (sha256 differs from the ledger); export "
                                  f"again")
            paths.append(path)
        return paths[0], paths[1], entry

    # -------------------------------------------------------------------------------------------- writing
    def check_writable(self) -> None:
        """The run folder exists (made if need be) and a file can be created in it; else one line naming it.
        A probe, not os.access: root passes access() on a folder it cannot write (a read-only mount)."""
        probe = self.path / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise (cannot_write(e, self.path) or e) from None

    def _append(self, entry: dict) -> None:
        """Add `entry` to the manifest. Non-finite numbers in it become null, listed under the entry's
        "non_finite" (the caller's dict is updated in place, so what it prints matches the ledger)."""
        from filelock import FileLock, Timeout

        clean, notes = finite(entry)
        if notes:
            clean[NON_FINITE] = {**(clean.get(NON_FINITE) or {}), **notes}
        entry.clear()
        entry.update(clean)
        self.check_writable()
        try:
            with FileLock(self.path / LOCK, timeout=LOCK_TIMEOUT_S):
                manifest = self.manifest()
                manifest["steps"].append(entry)
                manifest["updated"] = now()
                write_json(self.manifest_path, manifest)
        except OSError as e:
            raise (cannot_write(e, self.path) or e) from None
        except Timeout:
            raise EdgeftError(f"{self.path / LOCK}: held by another process for {LOCK_TIMEOUT_S} s; if no edgeft "
                              f"step is running on {self.path}, that process is stuck: stop it") from None
        except OSError as e:
            raise (cannot_write(e, self.path) or e) from None

    @contextmanager
    def record(self, name: str, config: dict, inputs: dict, also: list[Run] = (), also_inputs: dict | None = None
               ) -> Iterator[dict]:
        """Time a step and append its ledger entry, also when it fails. The body fills in the entry's outputs,
        perplexity, metrics; raising marks it failed with the reason, and so does setting its status to
        "failed" (a comparison or a fleet whose parts failed, which the caller raises after showing them).
        Each run of `also` (the other runs a deploy served, a fleet's runs) gets a copy, its inputs updated
        with `also_inputs`, unless the body raised."""
        self.check_writable()  # before the step's work, not after an hour of it
        entry: dict = {"step": name, "status": "running", "started": now(), "inputs": inputs, "outputs": [],
                       "perplexity": None, "metrics": {}, "config": config, "versions": versions()}
        reset_peak_memory()
        entry["rss_at_start_mb"] = current_rss_mb()  # peak minus this is what the step itself added
        inner = [0.0]
        with _OPEN_LOCK:
            _OPEN.append(inner)
        start = time.perf_counter()
        raised = True
        try:
            yield entry
            raised = False
            if entry["status"] == "running":
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
            with _OPEN_LOCK:
                # By identity: concurrent steps (a fleet's boards) hold equal cells, and remove() goes by equality.
                del _OPEN[next(i for i, cell in enumerate(_OPEN) if cell is inner)]
                entry["peak_rss_mb"] = max(read_peak_rss_mb(), inner[0])
                for other in _OPEN:
                    other[0] = max(other[0], entry["peak_rss_mb"])
            gpu = peak_gpu_mb()
            if gpu is not None:
                entry["peak_gpu_mb"] = gpu
            self._append(entry)
            for run in () if raised else also:
                run._append({**entry, "inputs": {**entry["inputs"], **(also_inputs or {})}})


# ------------------------------------------------------------------------------------------------ what to serve
@dataclass
class Served:
    """What one deploy puts on a board: one model, or one base with several adapter runs."""
    runs: list[Run]
    model: Path  # the fused GGUF, or the base GGUF the adapters apply to
    loras: list[Path]  # one per run in adapter mode, else []
    quant: str
    source: Path  # the HF folder (tokenizer, config.json)

    @property
    def adapter_mode(self) -> bool:
        return bool(self.loras)


def what_to_serve(run: str, adapters: list[str], quant: str) -> Served:
    """The runs of a deploy (or a smoke of one), checked: one run ships its GGUF; several (or --adapters) ship
    one base and a LoRA GGUF per run, and must share that base byte for byte."""
    names = ([run] if run else []) + [a for a in adapters if a != run]
    runs = []
    for name in names:
        r = Run(name)
        if not r.is_run():
            raise EdgeftError(f"{name}: not a run folder (no {MANIFEST})")
        runs.append(r)
    if not runs:
        raise EdgeftError("which run? pass --run RUN (or --adapters RUN,RUN)")
    gguf, entry = runs[0].chosen_gguf(quant)
    q = entry["inputs"]["quant"]
    if not adapters:
        return Served(runs, gguf, [], q, runs[0].export_source(entry))
    if len({r.path.resolve().name for r in runs}) != len(runs):
        raise EdgeftError(f"--adapters: two runs share a folder name ({', '.join(r.path.name for r in runs)}); each "
                          f"run's ids live in a folder named after it on the board")
    exported = [r.lora_export(q) for r in runs]
    # lora_export checked each base against its ledger digest: comparing those digests compares the files.
    digests = {next(o["sha256"] for o in e["outputs"] if Path(o["path"]).name == base.name)
               for base, _, e in exported}
    if len(digests) != 1:
        raise EdgeftError(f"--adapters: {runs[0].path.name} and the other runs were not exported from the same base "
                          f"(their {q.upper()} base GGUFs differ); serve adapters of one base together")
    for _, lora, _ in exported:
        check_gguf(lora, "adapter")
    return Served(runs, exported[0][0], [lora for _, lora, _ in exported], q, runs[0].export_source(entry))
