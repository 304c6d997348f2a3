"""The two ways a step ends badly on purpose. Anything else escaping a step is a bug and keeps its traceback."""


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
