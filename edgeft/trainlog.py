"""What training logs besides its progress line: RUN/train_log.csv on every run, and TensorBoard event files in
RUN/tensorboard/ with `--report-to tensorboard` (the convention trainers use).

The CSV gets one row per optimizer step, each written with a single write() to a file opened O_APPEND, so a
crash (kill -9, a second Ctrl-C, out of memory) leaves whole lines; at worst a power loss cuts the last one,
which the next start drops. A resumed run continues the file from its checkpoint's step: the rows of later
steps (trained again now) are dropped first, so every step has exactly one row. TensorBoard's own mechanism
does the same for its events (purge_step: readers discard what an earlier session wrote from that step on).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .atomic import atomic_file
from .errors import EdgeftError

CSV_FILE = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ("step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "heldout_ppl", "heldout_rise", "task_ppl")
EVAL_COLUMNS = COLUMNS[6:]  # filled on the steps --eval-every evaluates, empty on the others
REPORT_TO = ("none", "tensorboard")


def check_report_to(targets: list[str]) -> None:
    """Refuse an unknown --report-to, or tensorboard without its package, before any model is loaded."""
    bad = [t for t in targets if t not in REPORT_TO]
    if bad:
        raise EdgeftError(f"--report-to {bad[0]}: use {' or '.join(REPORT_TO[::-1])}")
    if "tensorboard" in targets and importlib.util.find_spec("tensorboard") is None:
        raise EdgeftError("--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard)")


def rows_until(path: Path, step: int) -> list[str]:
    """The whole rows of an earlier log for steps up to `step`, without the header."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    # lines[-1] is "" after the final newline, or a row cut by a crash: never kept.
    rows = [line for line in lines[1:-1] if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= step]
    # a log written before the evaluation columns existed: its rows get them empty
    return [row + "," * (len(COLUMNS) - 1 - row.count(",")) for row in rows]


class TrainLog:
    """The run's training metrics, one `log` call per optimizer step (main process only)."""

    def __init__(self, run_dir: Path, start_step: int, report_to: list[str]):
        self.path = Path(run_dir) / CSV_FILE
        rows = rows_until(self.path, start_step) if start_step else []  # a fresh run starts a fresh log
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in [",".join(COLUMNS), *rows]), encoding="utf-8")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._tensorboard = None
        if not start_step:
            # A fresh training replaces the adapter: curves of an earlier one in this run would belong to nothing.
            shutil.rmtree(Path(run_dir) / TENSORBOARD_DIR, ignore_errors=True)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers drop what an interrupted session logged for the steps trained again (the
            # first one logged now is start_step + 1).
            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR),
                                              purge_step=start_step + 1)

    def log(self, step: int, loss: float, lr: float, tokens: int, seconds: float,
            evaluation: dict | None = None) -> None:
        """`tokens` and `seconds`: all trained so far (a resumed run counts its earlier part too); `evaluation`:
        train --eval-every's figures at this step (heldout_ppl, heldout_rise, task_ppl)."""
        tokens_per_s = tokens / seconds if seconds else 0.0
        looked = ["" if (evaluation or {}).get(k) is None else f"{evaluation[k]:.6g}" for k in EVAL_COLUMNS]
        os.write(self._fd, (f"{step},{loss:.6g},{lr:.6g},{tokens},{tokens_per_s:.1f},{seconds:.3f},"
                            + ",".join(looked) + "\n").encode())
        if self._tensorboard is not None:
            scalars = [("train/loss", loss), ("train/learning_rate", lr), ("train/tokens_per_s", tokens_per_s),
                       ("train/tokens", tokens)]
            scalars += [(f"eval/{k}", evaluation[k]) for k in EVAL_COLUMNS if (evaluation or {}).get(k) is not None]
            for tag, value in scalars:
                self._tensorboard.add_scalar(tag, value, step)

    def close(self) -> None:
        os.close(self._fd)
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
