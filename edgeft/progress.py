"""Progress bars for long work (training, perplexity windows, conversion, copying), on stderr so --json stays
clean.

On a terminal, a live bar. Anywhere else (`edgeft train ... > log 2>&1`, CI, a job scheduler) a bar could only
draw its final state, so the log would stay silent until the end: there a bar prints plain lines instead, one
every `every` items (by default about one per tenth of the work), also whenever PLAIN_INTERVAL_S passed since
the last line while work goes on, and one at the end.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# No markup: descriptions and notes hold file names and ledger text, which may contain "[...]" (a user's
# "[/bold]" would be a MarkupError). Colour is given as a style.
console = Console(stderr=True, markup=False)
PLAIN_INTERVAL_S = 30.0  # a log line at least this often while work goes on, however slow each item is
PLAIN_LINES = 10  # lines per bar by default, when the total is known


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """The log-file form of a bar: `update` prints a line when one is due, `close` prints the last state."""

    def __init__(self, description: str, total: int | None, every: int | None, unit: str,
                 write: Callable[[str], None], start: int = 0):
        self.description, self.total, self.every, self.unit, self.write = description, total, every, unit, write
        self.started = time.monotonic()
        self.first = start  # the count the work starts from (a resumed training run starts past zero)
        self.done = start
        self.info = ""
        self.printed: int | None = None  # the count of the last line printed
        self.printed_at = self.started

    def _every(self) -> int:
        if self.every:
            return self.every
        return max(1, math.ceil(self.total / PLAIN_LINES)) if self.total else 1

    def update(self, done: int, total: int | None = None, info: str = "") -> None:
        self.total = total or self.total
        self.done, self.info = done, info
        if done == self.first:
            return  # nothing done yet worth a line
        now = time.monotonic()
        due = done - (self.first if self.printed is None else self.printed) >= self._every()
        if due or done == self.total or now - self.printed_at >= PLAIN_INTERVAL_S:
            self._line(now)

    def close(self) -> None:
        if self.done != self.first and self.printed != self.done:
            self._line(time.monotonic())

    def line(self, now: float) -> str:
        elapsed = now - self.started
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        parts = [f"{self.description}: {self.unit + ' ' if self.unit else ''}{count}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.info:
            parts.append(self.info)
        parts.append(f"elapsed {_clock(elapsed)}")
        moved = self.done - self.first
        if self.total and moved > 0 and self.done < self.total:
            parts.append(f"eta {_clock(elapsed / moved * (self.total - self.done))}")
        return "  ".join(parts)

    def _line(self, now: float) -> None:
        self.write(self.line(now))
        self.printed, self.printed_at = self.done, now


def _write_plain(text: str) -> None:
    # console.file is the stderr of the moment (a test runner swaps it); rich would wrap long lines at 80 columns.
    print(text, file=console.file, flush=True)


@contextmanager
def bar(description: str, total: int | None = None, enabled: bool = True, every: int | None = None,
        unit: str = "", start: int = 0) -> Iterator[Callable[..., None]]:
    """Yield update(done, total=None, info=""); info is shown after the bar (loss, tokens/s...). `every`,
    `unit` and `start` (the count already done: a resumed run) shape the plain lines printed when stderr is
    not a terminal ("train: step 3/60 ..." every 3 steps, the ETA from the rate since `start`).
    Not enabled, or in a launched job's processes other than the first (RANK, as accelerate and torchrun
    set it): update does nothing."""
    if not enabled or os.environ.get("RANK", "0") != "0":
        yield lambda *args, **kwargs: None
        return
    if not console.is_terminal:
        plain = PlainProgress(description, total, every, unit, _write_plain, start)
        try:
            yield plain.update
        finally:
            plain.close()
        return
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False), console=console,
                  transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def update(done: int, new_total: int | None = None, info: str = "") -> None:
            progress.update(task, completed=done, total=new_total or total, info=info)

        yield update


@contextmanager
def activity(description: str, every: float = PLAIN_INTERVAL_S) -> Iterator[None]:
    """A wait with nothing to count (a board command under qemu, a quantization, an ONNX export): on a terminal
    rich's spinner; anywhere else a line when it starts, one every `every` seconds while it lasts, and one when it
    ends, so that a log is never silent for minutes (the emulated smoke once printed nothing for 13)."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    if console.is_terminal:
        with console.status(description):
            yield
        return
    import threading

    started, stop = time.monotonic(), threading.Event()
    _write_plain(f"{description} ...")

    def heartbeat() -> None:
        while not stop.wait(every):
            _write_plain(f"{description}  elapsed {_clock(time.monotonic() - started)}")

    beat = threading.Thread(target=heartbeat, name="edgeft-activity", daemon=True)
    beat.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        beat.join()
        _write_plain(f"{description}: {'done' if ok else 'stopped'} in {_clock(time.monotonic() - started)}")
