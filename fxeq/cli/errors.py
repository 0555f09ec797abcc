"""How the command line speaks of failures: usage errors, and library advice in the words of its flags.

Everything the user passed that fxeq cannot use exits with code 2 and one
message naming the flag; exit 1 is left for fxeq's own bugs. Library
messages name library arguments (``all_concats=True``); :func:`for_cli`
says the same with the command line's flags (``--all-concats``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

__all__ = ["UsageError", "bad_input", "for_cli"]


class UsageError(Exception):
    """Bad usage or input: exit code 2."""


# Library arguments in messages, and the flags that say the same on the command line.
_FLAGS: tuple[tuple[str, str], ...] = (
    (r"pass all_concats=True", "pass --all-concats"),
    (r"all_concats=True", "--all-concats"),
    (r"frontend='(\w+)'", r"--frontend \1"),
    (r"raise min_std", "raise --min-std"),
    (r"min_std", "--min-std"),
    (r"num_batches >= 1 if you set it", "--num-batches of at least 1"),
    (r"use batches of at least 2", "use --batch-size 2 or more"),
    (r"Use a batch size of at least 2", "Use --batch-size 2 or more"),
)


def for_cli(message: str) -> str:
    """A library message with its arguments named as the command line's flags.

    Example:
        >>> for_cli("no input comes from an upsampling op; pass all_concats=True to include them")
        'no input comes from an upsampling op; pass --all-concats to include them'
    """
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message


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
