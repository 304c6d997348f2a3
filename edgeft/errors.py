"""The two ways a step ends badly on purpose. Anything else escaping a step is a bug and keeps its traceback
(except a place that cannot be written: `cannot_write`)."""

import errno
import os


class EdgeftError(Exception):
    """Bad input the user can fix. The CLI prints it as one line (name the file/field and the fix), exit 2."""

    exit_code = 2


class GateFailed(EdgeftError):
    """A step ran but its result failed a quality gate (e.g. perplexity rose too much). Exit 3."""

    exit_code = 3


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): library errors can
    span pages, a one-line error needs their headline."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# What the user fixes by writing elsewhere (or freeing space), not a bug: a read-only mount, a folder not
# theirs, a full disk or quota.
CANNOT_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def cannot_write(e: OSError, where: str | os.PathLike | None = None) -> EdgeftError | None:
    """The one-line error for an OSError that says a place cannot be written (None for other errors)."""
    if e.errno not in CANNOT_WRITE:
        return None
    where = where or e.filename or "the output folder"
    fix = ("free space there or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "give a folder you can write")
    return EdgeftError(f"{where}: cannot write ({os.strerror(e.errno).lower()}); {fix} (--run, --out); "
                       f"nothing half-written was kept")
