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

__all__ = ["TorchvisionError", "install_command", "torchvision"]

_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def install_command() -> str:
    """The command that installs torchvision with the torch installed here, both from PyTorch's CPU wheel index.

    torch keeps its version (without the local label such as ``+cu130``);
    pip picks the torchvision built for it. Both are uninstalled first:
    pip would otherwise keep builds whose version already matches.

    Example:
        >>> install_command().startswith("pip uninstall -y torch torchvision && pip install torch==")
        True
    """
    version = torch.__version__.split("+")[0]
    return f"pip uninstall -y torch torchvision && pip install torch=={version} torchvision --index-url {_CPU_INDEX}"


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
        problem = "is not installed" if e.name == "torchvision" else f"failed to import ({_first_line(e)})"
        raise TorchvisionError(
            f"torchvision {problem}; fxeq needs it to read images and to build the demo model. Install it for the "
            f"torch you have (torch {torch.__version__}), on a CPU: {install_command()} ({_for_cuda()})"
        ) from e
    except RuntimeError as e:  # e.g. "operator torchvision::nms does not exist"
        raise TorchvisionError(
            f"torchvision cannot run beside torch {torch.__version__}: it was built for another torch "
            f"({_first_line(e)}). Install the two together from one index, on a CPU: {install_command()} "
            f"({_for_cuda()})"
        ) from e


def _for_cuda() -> str:
    """How the command changes for a CUDA build: the index of torch's CUDA version (cu130 for CUDA 13.0)."""
    cuda = torch.version.cuda
    index = f"cu{cuda.replace('.', '')[:3]}" if cuda else "the cuXYZ of your CUDA version, e.g. cu126"
    return f"for a CUDA build, replace cpu in the index with {index}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
