"""Write artifacts under a temporary name and rename them when complete.

A crash (or Ctrl-C) mid-write must never leave a file or folder that looks whole: readers only ever see
the final name after `os.replace`, which is atomic on one filesystem. Temporary names start with '.'
and end in '.tmp-PID' so they are easy to recognise and clean up: a process killed outright (SIGKILL, the
OOM killer, a power cut) runs no cleanup, so the next write of the same artifact removes the temporary
siblings of processes that no longer exist.

A full disk (or quota) while writing is bad input the user can fix, not a bug: it becomes a one-line
EdgeftError naming the file, and the temporary is removed as for any other failure.

JSON written here is strict JSON: NaN and Infinity are not JSON (other tools reject the file), so a
non-finite number becomes null and the object records where and what it was under "non_finite".
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EdgeftError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NEARLY_FULL = 1 << 20
NON_FINITE = "non_finite"  # the key listing the numbers that were not finite, as {"where": "nan"}


def _tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    import psutil  # os.kill(pid, 0) would terminate the process on Windows

    return pid == os.getpid() or psutil.pid_exists(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` whose writer process no longer exists; return them.

    atomic_dir moves the old folder aside (.NAME.old-PID) just before renaming the new one in: a writer
    killed between those two renames left the final name missing, a complete new folder and the old one.
    The new one is then put in place (it was complete: the old is only moved aside after it is)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)")
    stale = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and not _pid_alive(int(m[2])):
                stale.append((m[1], int(m[2]), p))
    removed = []
    for kind, pid, p in sorted(stale, key=lambda s: s[0] == "tmp"):  # finish the interrupted renames first
        if kind == "old" and not path.exists():
            done = path.with_name(f".{path.name}.tmp-{pid}")
            os.replace(done if done.exists() else p, path)
            if not p.exists():
                continue
        if p.exists():
            _remove(p)
            removed.append(p)
    return removed


def _is_disk_full(path: Path, e: OSError) -> bool:
    """ENOSPC and kin; or a short write that says no errno (numpy's tofile, which the gguf writer uses)
    on a filesystem with (almost) nothing left."""
    if e.errno in _DISK_FULL:
        return True
    try:
        return e.errno is None and shutil.disk_usage(path.parent).free < _NEARLY_FULL
    except OSError:
        return False


def _disk_full(path: Path, e: OSError) -> EdgeftError:
    what = os.strerror(e.errno).lower() if e.errno else "no space left on device"
    return EdgeftError(f"{path}: {what} while writing it; free space there or write elsewhere (--out/--run); "
                       f"nothing half-written was kept")


@contextmanager
def _atomic(path: Path, make, commit, discard) -> Iterator[Path]:
    """The protocol both atomic writers share: clear stale temporaries, make a fresh one, `commit` it onto
    `path` only if the block completes, turn a full disk into one line, and `discard` it otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = _tmp_sibling(path)
    make(tmp)
    try:
        yield tmp
        commit(tmp, path)
    except OSError as e:
        if _is_disk_full(path, e):
            raise _disk_full(path, e) from None
        raise
    finally:
        if tmp.exists():
            discard(tmp)


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        # os.replace cannot replace a non-empty folder: move the old one aside first.
        old = _tmp_sibling(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def _fresh_dir(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes."""
    return _atomic(Path(path), lambda tmp: None, os.replace, Path.unlink)


def atomic_dir(path: str | os.PathLike):
    """Yield a fresh temporary folder beside `path`; it replaces `path` only if the block completes."""
    return _atomic(Path(path), _fresh_dir, _replace_dir, shutil.rmtree)


def finite(obj, where: str = "") -> tuple[object, dict[str, str]]:
    """A copy of `obj` (dicts, lists, tuples, scalars) with every NaN/inf float replaced by None, and where
    each was ({"perplexity.ppl": "nan"})."""
    notes: dict[str, str] = {}

    def clean(x, at: str):
        if isinstance(x, float) and not math.isfinite(x):
            notes[at or "."] = str(x)
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{at}.{k}" if at else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{at}[{i}]") for i, v in enumerate(x)]
        return x

    return clean(obj, where), notes


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON text of `obj`; non-finite numbers become null, listed under "non_finite" when `obj` is
    an object (a list cannot say where; its nulls stand alone)."""
    clean, notes = finite(obj)
    if notes and isinstance(clean, dict):
        clean[NON_FINITE] = {**(clean.get(NON_FINITE) or {}), **notes}
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json_text(obj) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
