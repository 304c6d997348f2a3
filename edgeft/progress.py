"""Progress bars for long work (perplexity windows, conversion, copying), on stderr so --json stays clean."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def bar(description: str, total: int | None = None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield update(done, total=None, info=""); info is shown after the bar (loss, tokens/s...).
    Not enabled (the other processes of a data-parallel run): update does nothing."""
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                  transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def update(done: int, new_total: int | None = None, info: str = "") -> None:
            progress.update(task, completed=done, total=new_total or total, info=info)

        yield update
