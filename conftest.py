"""Collect the integrations' doctests only where their optional frameworks are installed."""

from __future__ import annotations

import importlib.util


def _installed(*names: str) -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except (ImportError, ValueError):  # a module set to None in sys.modules
        return False


collect_ignore = [
    path
    for path, names in (
        ("fxeq/integrations/transformers.py", ("transformers", "accelerate")),
        ("fxeq/integrations/lightning.py", ("lightning",)),
    )
    if not _installed(*names)
]
