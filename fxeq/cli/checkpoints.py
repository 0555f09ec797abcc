"""Checkpoint files for the command line: read a state_dict safely, whatever wraps it.

* Reading never runs code from the file: ``.safetensors`` files hold only
  tensors, and other files are read with ``torch.load(weights_only=True)``.
  A pickled object (a whole ``nn.Module``) is refused unless the caller
  trusts the file, because unpickling runs code the file names. A file that
  is no checkpoint at all (an image, a text file) is called what it is.
* Training frameworks wrap state_dicts: Lightning and mmengine under
  ``"state_dict"``, others under ``"model"``; DDP and Lightning prefix every
  key (``module.``, ``model.``). :func:`unwrap_state_dict` and
  :func:`load_into` undo both, so the output has the model class's keys.
* A Lightning checkpoint written after fxeq's ``ScaleEqualization`` callback
  ran holds fxeq's report in the callback's state: :func:`read_checkpoint`
  returns it, so that such a checkpoint is never equalized twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..integrations import lightning_checkpoint_report

__all__ = ["Checkpoint", "check_file", "describe_folder", "load_error", "load_into", "load_state_dict",
           "read_checkpoint", "shown_keys", "unwrap_state_dict"]

_WRAPPER_KEYS = ("state_dict", "model")
_SHOWN_KEYS = 5
# What a file that is no checkpoint begins with, for the message that says so.
_NOT_CHECKPOINTS = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (a WebP image?)"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's state_dict, and fxeq's report if the file holds one (a Lightning callback's state)."""

    state: dict[str, torch.Tensor]
    report: dict[str, Any] | None = None


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint file's state_dict (see :func:`load_state_dict`), and the fxeq report it may hold.

    Raises:
        as :func:`load_state_dict`.
    """
    path = Path(path)
    loaded = _load(path, trust_pickle)
    try:
        state = unwrap_state_dict(loaded)
    except TypeError as e:
        raise TypeError(f"{path}: {e}") from e
    return Checkpoint(state, _fxeq_report(loaded))


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint.

    Accepts a state_dict, an ``nn.Module`` (its state_dict), or a dict holding
    either under ``"state_dict"`` (Lightning, mmengine) or ``"model"``.

    Raises:
        TypeError: no state_dict found, or it holds something other than tensors.

    Example:
        >>> sd = {"weight": torch.ones(1)}
        >>> list(unwrap_state_dict({"epoch": 3, "state_dict": sd}))
        ['weight']
        >>> list(unwrap_state_dict(nn.Linear(1, 1)))
        ['weight', 'bias']
    """
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"expected a state_dict (a mapping of names to tensors), found a {type(obj).__name__}. "
            "Save the model with torch.save(model.state_dict(), path)."
        )
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _WRAPPER_KEYS:
        if key in obj:
            return unwrap_state_dict(obj[key])
    odd = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    raise TypeError(
        f"expected a state_dict, or a dict holding one under {' or '.join(map(repr, _WRAPPER_KEYS))}; found "
        f"keys {shown_keys(obj)}, and the value at {odd!r} is of type {type(obj[odd]).__name__}, not a tensor. "
        "Save the model with torch.save(model.state_dict(), path)."
    )


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the state_dict in a checkpoint file, on the CPU.

    ``.safetensors`` files are read with safetensors; any other file with
    ``torch.load(weights_only=True)``, which reads tensors and plain
    containers only. Wrappers are removed with :func:`unwrap_state_dict`.

    Args:
        path: the checkpoint.
        trust_pickle: read pickled objects too (``weights_only=False``).
            Unpickling runs code named in the file: only for files you trust.
            The classes it names must be importable. Default: False.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        ValueError: the file cannot be read, or holds pickled objects and
            ``trust_pickle`` is False.
        TypeError: the file holds no state_dict.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "noise.pt").write_bytes(bytes(range(256)))
        ...     load_state_dict(Path(d) / "noise.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: .../noise.pt is not a readable PyTorch or safetensors checkpoint (...
    """
    return read_checkpoint(path, trust_pickle=trust_pickle).state


def _load(path: Path, trust_pickle: bool) -> object:
    """The object in a checkpoint file: a safetensors dict, or what ``torch.load`` gives."""
    check_file(path)
    kind = _not_a_checkpoint(path)
    if kind is not None:
        raise ValueError(
            f"{path} is not a checkpoint: it is {kind}. Pass a state_dict saved with torch.save (.pt/.pth) or "
            "as .safetensors, or a Hugging Face save_pretrained folder"
        )
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(
                f"{path} is not a readable safetensors checkpoint ({load_error(e)}); expected a file written "
                "by safetensors.torch.save_file. Is it complete (not cut short by a download or a copy)?"
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise ValueError(
                f"refused to load {path}: it holds a pickled Python object ({refused.group(1)}), for "
                "instance a whole nn.Module, and unpickling runs code that the file names. If you trust "
                "where the file comes from, pass --trust-pickle; better, save model.state_dict() instead."
            ) from e
        if trust_pickle and isinstance(e, (ImportError, AttributeError)):
            raise ValueError(
                f"could not unpickle {path} ({load_error(e)}): the classes it holds must be importable. Run "
                "fxeq from the folder that holds their module, or install the package that defines them."
            ) from e
        raise ValueError(
            f"{path} is not a readable PyTorch or safetensors checkpoint ({load_error(e)}); expected a "
            "state_dict written by torch.save, or a .safetensors file. Is it complete (not cut short by a "
            "download or a copy)?"
        ) from e


def check_file(path: Path) -> None:
    """Refuse a checkpoint path that does not exist, or is a folder (one without config.json: not save_pretrained's).

    Raises:
        FileNotFoundError: nothing is at ``path``.
        IsADirectoryError: ``path`` is a folder.
    """
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a folder without config.json, so not a Hugging Face save_pretrained folder "
            f"({describe_folder(path)}); expected a checkpoint file: a state_dict saved as .pt/.pth (torch.save) "
            "or .safetensors, or a folder written by save_pretrained"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of a state_dict saved as .pt/.pth (torch.save) or "
            ".safetensors, or a Hugging Face save_pretrained folder"
        )


def describe_folder(folder: Path) -> str:
    """What a folder holds, in a few words: ``it holds 12 .png files and 1 .txt file``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "a.png").write_bytes(b"")
        ...     describe_folder(Path(d))
        'it holds 1 .png file'
    """
    counts: dict[str, int] = {}
    for item in folder.iterdir():
        key = "folder" if item.is_dir() else item.suffix.lower() or "(no extension)"
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "it is empty"
    parts = [f"{n} {kind} {'file' if n == 1 else 'files'}" if kind != "folder" else
             f"{n} {'folder' if n == 1 else 'folders'}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "it holds " + " and ".join(parts[:3]) + (", ..." if len(parts) > 3 else "")


def _not_a_checkpoint(path: Path) -> str | None:
    """What a file is when it is clearly no checkpoint (an image, a text file), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for magic, kind in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            return kind
    if path.suffix == ".safetensors" or head.startswith((b"PK\x03\x04", b"\x80")):
        return None  # a zip (torch.save) or a pickle, or left to safetensors
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if all(c.isprintable() or c.isspace() for c in text):
        return "a text file" + (" (JSON)" if text.lstrip().startswith(("{", "[")) else "")
    return None


def _fxeq_report(loaded: object) -> dict[str, Any] | None:
    """fxeq's report, if a Lightning checkpoint holds it in the ScaleEqualization callback's state."""
    return lightning_checkpoint_report(loaded) if isinstance(loaded, Mapping) else None


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load ``state`` into ``model`` strictly, removing one key prefix if needed.

    When every key carries the same leading prefix (DDP's ``module.``,
    Lightning's ``model.``) and removing it gives exactly the model's keys,
    it is removed.

    Returns:
        The state as loaded, under the model's keys.

    Raises:
        ValueError: the keys or shapes do not match the model's; the message
            lists a few missing and unexpected keys.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> ddp = {f"module.{k}": v for k, v in nn.Linear(2, 1).state_dict().items()}
        >>> sorted(load_into(net, ddp))
        ['bias', 'weight']
    """
    expected = set(model.state_dict())
    state = _without_prefix(state, expected)
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fit {type(model).__name__}: missing keys: {len(missing)} "
            f"({shown_keys(missing)}); unexpected keys: {len(unexpected)} ({shown_keys(unexpected)}). Check that --model "
            "and --model-kwargs build the architecture the checkpoint was trained with (encoder, number "
            "of classes, auxiliary heads)."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # torch's message is a header line, then one line per mismatch, each ending in a period
        lines = str(e).splitlines()
        mismatches = "; ".join(line.strip().rstrip(".") for line in lines[1:] or lines)
        raise ValueError(
            f"the checkpoint does not fit {type(model).__name__}: {mismatches}. Check --model-kwargs "
            "(e.g. the number of classes)."
        ) from e
    return state


def _without_prefix(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    keys = list(state)
    if not keys or set(keys) == expected:
        return dict(state)
    parts = keys[0].split(".")
    for n in range(1, len(parts)):
        prefix = ".".join(parts[:n]) + "."
        if all(k.startswith(prefix) for k in keys) and {k[len(prefix):] for k in keys} == expected:
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_error(error: Exception) -> str:
    """The first line of a loader's error, without torch's advice to turn weights_only off."""
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the cause, after torch's advice
    lines = (unpickler.group(1) if unpickler else text).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def shown_keys(keys: Any) -> str:
    """The first few keys, for a message."""
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return (shown + (", ..." if len(keys) > _SHOWN_KEYS else "")) or "none"

