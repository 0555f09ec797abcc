"""Words for messages: counts with their nouns in agreement, upsampling factors."""

from __future__ import annotations

__all__ = ["factor", "plural"]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and the noun in agreement; ``nouns`` for irregular plurals.

    Example:
        >>> plural(1, "site"), plural(2, "batch", "batches")
        ('1 site', '2 batches')
    """
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def factor(scale: tuple[float, ...] | None) -> str:
    """An upsampling factor per spatial dim, as the report and its picture print it ("?" if unknown).

    Example:
        >>> factor((2.0, 2.0)), factor((4.0, 2.0)), factor(None)
        ('2', '4/2', '?')
    """
    if not scale:
        return "?"
    return f"{scale[0]:.3g}" if len(set(scale)) == 1 else "/".join(f"{s:.3g}" for s in scale)
