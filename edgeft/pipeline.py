"""`edgeft run PIPELINE.yaml`: train → merge → export → smoke in one run folder, one ledger.

A pipeline file is data: one section per step holding that step's config keys (the same keys as the step's
flags). A step that fails its gate stops the chain (exit 3) naming the step. `--from STEP` skips the
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

from .config import load_config, read_config_file
from .errors import EdgeftError, GateFailed
from .ledger import artifact
from .run import (EXPORT_GGUF, EXPORT_GGUF_CHOICE, EXPORT_GGUF_LORA, EXPORT_ONNX, MERGE, MERGE_CHOICE, SMOKE,
                  TRAIN, Run)

STEPS = ("train", "merge", "export", "smoke")
# The ledger entries each section writes (a skipped section's last ok one is checked).
_LEDGER_STEPS = {"train": (TRAIN,), "merge": (MERGE, MERGE_CHOICE),
                 "export": (EXPORT_GGUF, EXPORT_GGUF_CHOICE, EXPORT_GGUF_LORA, EXPORT_ONNX), "smoke": (SMOKE,)}


def example_pipeline() -> Path:
    return Path(__file__).parent / "data" / "demo_pipeline.yaml"


def load_pipeline(path: str | Path) -> dict:
    spec = read_config_file(example_pipeline() if str(path) == "demo" else path)
    unknown = [k for k in spec if k not in (*STEPS, "run")]
    if unknown:
        raise EdgeftError(f"{path}: unknown section '{unknown[0]}'; sections: run, {', '.join(STEPS)}")
    if isinstance(spec.get("export"), dict):
        spec["export"] = [spec["export"]]
    return spec


def _check_done(run: Run, step: str) -> None:
    """A skipped step must have an ok ledger entry whose outputs still have their recorded sha256."""
    entry = run.last(*_LEDGER_STEPS[step])
    if entry is None:
        raise EdgeftError(f"--from: the run {run.path} has no completed '{step}' step; start from an earlier step")
    for out in entry.get("outputs", []):
        path = run.path / out["path"]
        if ":" in out["path"] or not path.exists():  # remote files (deploy) are checked by deploy itself
            continue
        if artifact(path, run.path)["sha256"] != out["sha256"]:
            raise EdgeftError(f"--from: {path} changed since the '{step}' step recorded it (sha256 differs); "
                              f"run from '{step}' again")


def run_pipeline(spec: dict, run_dir: str = "", from_step: str = "") -> Run:
    from .export import export, load_export_config
    from .merge import MergeConfig, merge
    from .devices.smoke import SmokeConfig, smoke
    from .train import TrainConfig, train

    run_path = run_dir or spec.get("run") or "runs/pipeline"
    run = Run(run_path)
    if from_step and from_step not in STEPS:
        raise EdgeftError(f"--from {from_step}: use one of {', '.join(STEPS)}")
    start = STEPS.index(from_step) if from_step else 0
    for step in STEPS[:start]:
        if step in spec:
            _check_done(run, step)
    for step in STEPS[start:]:
        if step not in spec:
            continue
        section = spec[step] or {}
        try:
            if step == "train":
                train(load_config(TrainConfig, None, {**section, "run": str(run.path)}))
            elif step == "merge":
                merge(load_config(MergeConfig, None, {**section, "adapter": str(run.path), "run": str(run.path)}))
            elif step == "export":
                for settings in section:
                    # The chain owns its run folder: a re-run (--from export) replaces what a killed run left.
                    export(load_export_config(None, {"overwrite": True, **settings, "run": str(run.path)}))
            elif step == "smoke":
                smoke(load_config(SmokeConfig, None, {**section, "run": str(run.path)}))
        except GateFailed as e:
            raise GateFailed(f"step '{step}' failed its gate: {e}") from None
    return run
