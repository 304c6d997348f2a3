"""One writer per artifact of a run: a second `train` into a run whose adapter another is writing (or a second
merge, or an export of the same file) is refused in one line instead of overwriting the first's work unseen.

Each artifact has a lock file RUN/.locks/NAME.lock held (flock, through filelock) for as long as the command
writes it; the operating system drops it when the process ends, however it ends, so a crash leaves no stale lock.
"""

from __future__ import annotations

import os
import re
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import EdgeftError, cannot_write
from .run import LOCKS_DIR


@contextmanager
def writing(run_dir: Path, artifact: str, command: str) -> Iterator[None]:
    """Hold the lock of `artifact` (a name within the run: "adapter", "merged", a GGUF's file name) or refuse."""
    from filelock import FileLock, Timeout

    folder = Path(run_dir) / LOCKS_DIR
    name = re.sub(r"[^\w.-]", "_", artifact)
    holder = folder / f"{name}.pid"
    lock = FileLock(folder / f"{name}.lock", timeout=0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        who = holder.read_text().strip() if holder.is_file() else "another process"
        raise EdgeftError(f"{run_dir}: {artifact} is being written by {who}; wait for it to finish, or {command} "
                          f"into another --run") from None
    except OSError as e:
        raise (cannot_write(e, run_dir) or e) from None
    try:
        holder.write_text(f"edgeft {command} (pid {os.getpid()})\n")
        yield
    finally:
        lock.release()


def writing_files(held: ExitStack, run_dir: Path, paths: Iterable[Path], command: str) -> None:
    """Hold the lock of every file or folder in `paths` (named by its place in the run, or its full path when it
    is written elsewhere with --out) until `held` closes; refuse if another command holds one of them."""
    run_dir = Path(run_dir)
    for path in paths:
        path = Path(path)
        try:
            name = str(path.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            name = str(path.resolve())
        held.enter_context(writing(run_dir, name, command))
