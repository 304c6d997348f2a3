"""The chain's steps as data: for each section of a pipeline, the config it is read into, the function that
runs it, and the ledger entries it writes. `edgeft run` (pipeline.py) runs them in this order, `--from`
checks a skipped step by its ledger names, and compare runs each method's chain through the runner.

Functions are named, not imported: a step's module imports torch when it runs, and the CLI reads this
table for --help. Export formats are the same kind of table (export/config.py FORMATS).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import load_config
from .devices.smoke import SmokeConfig
from .export.config import FORMATS, load_export_config
from .merge import MergeConfig
from .run import MERGE, MERGE_CHOICE, SMOKE, TRAIN
from .train import TrainConfig


@dataclass(frozen=True)
class Step:
    name: str  # the pipeline section (and the CLI command)
    config: Callable[[dict], object]  # a section's settings (the run folder filled in) -> the step's config
    function: str  # "module:function" that runs a config
    ledger: tuple[str, ...]  # the entries it writes (run.py's names)
    from_run: tuple[str, ...] = ("run",)  # settings the chain sets to its run folder
    many: bool = False  # the section is a list, one config each (export: one per format)

    def settings(self, section: dict, run: Path) -> dict:
        return {**section, **{key: str(run) for key in self.from_run}}

    def __call__(self, config):
        module, function = self.function.split(":")
        return getattr(importlib.import_module(module), function)(config)


def _export_config(settings: dict):
    # The chain owns its run folder: a re-run (--from export) replaces what a killed run left.
    return load_export_config(None, {"overwrite": True, **settings})


CHAIN = (
    Step("train", lambda s: load_config(TrainConfig, None, s), "edgeft.train:train", (TRAIN,)),
    Step("merge", lambda s: load_config(MergeConfig, None, s), "edgeft.merge:merge", (MERGE, MERGE_CHOICE),
         from_run=("adapter", "run")),
    Step("export", _export_config, "edgeft.export:export",
         tuple(name for f in FORMATS.values() for name in f.ledger), many=True),
    Step("smoke", lambda s: load_config(SmokeConfig, None, s), "edgeft.devices.smoke:smoke", (SMOKE,)),
)
STEPS = {s.name: s for s in CHAIN}
