"""`edgeft run PIPELINE.yaml`: train → merge → export → smoke in one run folder, one ledger.

A pipeline file is data: one section per step holding that step's config keys (the same keys as the step's
flags); the steps, their order and their ledger entries are steps.py's table. A step that fails its gate stops the chain (exit 3) naming the step. `--from STEP` skips the
steps before STEP, but only after checking that their recorded artifacts are still on disk with the sha256
the ledger holds, so a resumed chain never builds on a file that changed.

    run: runs/demo
    train: {data: demo, max_steps: 15}
    merge: {}
    export: [{format: gguf, quant: [f16, q8_0, q4_k_m]}]
    smoke: {device: rpi5, emulate: true, quant: q4_k_m}
"""

from __future__ import annotations

from pathlib import Path

from .config import read_config_file
from .errors import EdgeftError, GateFailed
from .ledger import artifact
from .run import Run
from .steps import CHAIN, STEPS, Step


def example_pipeline() -> Path:
    return Path(__file__).parent / "data" / "demo_pipeline.yaml"


def load_pipeline(path: str | Path) -> dict:
    spec = read_config_file(example_pipeline() if str(path) == "demo" else path)
    unknown = [k for k in spec if k not in (*STEPS, "run")]
    if unknown:
        raise EdgeftError(f"{path}: unknown section '{unknown[0]}'; sections: run, {', '.join(STEPS)}")
    for name, section in spec.items():  # a section is settings; export may be a list of them (one per format)
        if name == "run":
            if not isinstance(section, str):
                raise EdgeftError(f"{path}: 'run' is {type(section).__name__}; give the run folder as text")
            continue
        sections = section if name == "export" and isinstance(section, list) else [section]
        if section is None or not all(isinstance(s, dict) for s in sections):
            raise EdgeftError(f"{path}: section '{name}' is {'empty' if section is None else type(section).__name__}; "
                              f"give its settings as a mapping (e.g. {name}: {{max_steps: 30}})"
                              + (", or a list of them for export" if name == "export" else ""))
    if isinstance(spec.get("export"), dict):
        spec["export"] = [spec["export"]]
    return spec


def _check_done(run: Run, step: Step) -> None:
    """A skipped step must have an ok ledger entry whose outputs still have their recorded sha256."""
    entry = run.last(*step.ledger)
    if entry is None:
        raise EdgeftError(f"--from: the run {run.path} has no completed '{step.name}' step; start from an earlier step")
    for out in entry.get("outputs", []):
        if isinstance(out, dict) and ":" in str(out.get("path")):  # remote files (deploy): deploy checks them
            continue
        path = run.recorded_path(out, f"--from: the '{step.name}' step")
        if not path.exists():
            continue
        if artifact(path, run.path)["sha256"] != out["sha256"]:
            raise EdgeftError(f"--from: {path} changed since the '{step.name}' step recorded it (sha256 differs); "
                              f"run from '{step.name}' again")


def run_pipeline(spec: dict, run_dir: str = "", from_step: str = "") -> Run:
    run_path = run_dir or spec.get("run") or "runs/pipeline"
    run = Run(run_path)
    if from_step and from_step not in STEPS:
        raise EdgeftError(f"--from {from_step}: use one of {', '.join(STEPS)}")
    start = list(STEPS).index(from_step) if from_step else 0
    for step in CHAIN[:start]:
        if step.name in spec:
            _check_done(run, step)
    for step in CHAIN[start:]:
        if step.name not in spec:
            continue
        section = spec[step.name] or ({} if not step.many else [])
        try:
            for settings in section if step.many else [section]:
                step(step.config(step.settings(settings, run.path)))
        except GateFailed as e:
            raise GateFailed(f"step '{step.name}' failed its gate: {e}") from None
    return run
