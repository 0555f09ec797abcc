"""torchvision, imported only where it is needed, with one clear sentence when it cannot run beside torch.

A CPU-only machine often gets a CPU torch and, from another index, a CUDA
torchvision (or the reverse); importing it then fails deep inside with
"operator torchvision::nms does not exist". fxeq's library needs no
torchvision; the command line (image decoding, the demo) and the report's
version record do.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["TorchvisionError", "torchvision"]

_INSTALL = (
    "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu "
    "(both from one index; drop --index-url for CUDA builds)"
)


class TorchvisionError(ImportError):
    """torchvision is missing, or was built for another torch than the one installed."""


def torchvision(submodule: str = "") -> ModuleType:
    """``torchvision`` (or ``torchvision.<submodule>``), or :class:`TorchvisionError` saying how to fix the install.

    Example:
        >>> torchvision("io").__name__
        'torchvision.io'
    """
    name = "torchvision" + (f".{submodule}" if submodule else "")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if isinstance(e, TorchvisionError):
            raise
        problem = "is not installed" if e.name == "torchvision" else f"failed to import ({e})"
        raise TorchvisionError(f"torchvision {problem}; fxeq needs it to read images and to build the demo "
                               f"model. Install it with the torch you have (torch {torch.__version__}): "
                               f"{_INSTALL}") from e
    except RuntimeError as e:  # e.g. "operator torchvision::nms does not exist"
        raise TorchvisionError(
            f"torchvision cannot run beside torch {torch.__version__}: it was built for another torch "
            f"({str(e).strip().splitlines()[0]}). Install the two together from one index: {_INSTALL}"
        ) from e
