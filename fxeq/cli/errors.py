"""How the command line speaks of failures: usage errors, and library advice in the words of its flags.

Everything the user passed that fxeq cannot use exits with code 2 and one
message naming the flag; exit 1 is left for fxeq's own bugs. Library
messages name library arguments (``all_concats=True``); :func:`for_cli`
says the same with the command line's flags (``--all-concats``), and
:func:`one_line` keeps every message on one line.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

__all__ = ["UsageError", "bad_input", "for_cli", "one_line"]


class UsageError(Exception):
    """Bad usage or input: exit code 2."""


# Library arguments in messages, and the flags that say the same on the command line: one rule per wording.
_FLAGS: tuple[tuple[str, str], ...] = (
    (r"\ball_concats=True", "--all-concats"),
    (r"\bfrontend='(\w+)'", r"--frontend \1"),
    (r"\bmin_std=([0-9.eE+-]*[0-9])", r"--min-std \1"),
    (r"\bmin_std\b", "--min-std"),
    (r"\bnum_batches >= 1 if you set it", "--num-batches of at least 1 if you set it"),
    (r"\buse batches of at least 2", "use --batch-size 2 or more"),
    (r"\bUse a batch size of at least 2", "Use --batch-size 2 or more"),
)
_END = (".", ";", ":", ",", "!", "?")


def for_cli(message: str) -> str:
    """A library message with its arguments named as the command line's flags.

    Example:
        >>> for_cli("no input comes from an upsampling op; pass all_concats=True to equalize it")
        'no input comes from an upsampling op; pass --all-concats to equalize it'
    """
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message


def one_line(message: str, cause: BaseException | None = None) -> str:
    """A message on one line: the lines after the first of ``cause``'s text (when the message quotes it) dropped,
    the other lines joined as sentences.

    Example:
        >>> cause = RuntimeError("shapes differ\\n  at conv 3")
        >>> one_line(f"batch 0 failed: {cause}\\nUse a batch size of at least 2.", cause)
        'batch 0 failed: shapes differ. Use a batch size of at least 2.'
    """
    detail = str(cause).strip() if cause is not None else ""
    if "\n" in detail and detail in message:
        message = message.replace(detail, detail.splitlines()[0].rstrip())
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(line if i == len(lines) - 1 or line.endswith(_END) else f"{line}."
                    for i, line in enumerate(lines))


@contextlib.contextmanager
def bad_input(*errors: type[Exception]) -> Iterator[None]:
    """Report failures to read the user's files and values as usage errors (exit code 2).

    Args:
        errors: the exception types that mean bad input here. Default:
            OSError, TypeError and ValueError, raised by the checkpoint and
            image readers for files and values they cannot use.
    """
    caught = errors or (OSError, TypeError, ValueError)
    try:
        yield
    except caught as e:
        raise UsageError(for_cli(str(e))) from e
