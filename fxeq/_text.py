"""Words for messages: counts with their nouns in agreement."""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and the noun in agreement; ``nouns`` for irregular plurals.

    Example:
        >>> plural(1, "site"), plural(2, "batch", "batches")
        ('1 site', '2 batches')
    """
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
