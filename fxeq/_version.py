"""The package version, in one place (setup.cfg reads it too), and the versions a report records."""

from __future__ import annotations

import platform

__version__ = "0.3.0"


def versions() -> dict[str, str]:
    """Versions of Python, torch, torchvision and fxeq, for reproducible reports.

    Example:
        >>> sorted(versions())
        ['fxeq', 'python', 'torch', 'torchvision']
    """
    import torch

    from ._torchvision import TorchvisionError, torchvision

    try:
        vision = str(torchvision().__version__)
    except TorchvisionError:
        vision = "unavailable"
    return {
        "python": platform.python_version(), "torch": str(torch.__version__), "torchvision": vision,
        "fxeq": __version__,
    }
