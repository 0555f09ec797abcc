"""Checkpoints for the command line: read state_dicts safely, write them atomically.

``fxeq convert`` reads a checkpoint, rewrites the fusing convs' weights and
writes a checkpoint for the same model class. The rules here keep that safe:

* Reading never runs code from the file: ``.safetensors`` files hold only
  tensors, and other files are read with ``torch.load(weights_only=True)``.
  A pickled object (a whole ``nn.Module``) is refused unless the caller
  trusts the file, because unpickling runs code the file names.
* Training frameworks wrap state_dicts: Lightning and mmengine under
  ``"state_dict"``, others under ``"model"``; DDP and Lightning prefix every
  key (``module.``, ``model.``). :func:`unwrap_state_dict` and
  :func:`load_into` undo both, so the output has the model class's keys.
* Writing goes to a temporary file in the destination folder, then
  ``os.replace``: readers see the old file or the complete new one, never a
  partial one, and an interrupted run leaves no truncated checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

__all__ = [
    "OUTPUT_SUFFIXES", "check_not_converted", "check_output", "load_into", "load_state_dict", "report_path",
    "save_state_dict", "sha256", "unwrap_state_dict", "write_json",
]

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")
_WRAPPER_KEYS = ("state_dict", "model")
_SHOWN_KEYS = 5


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
        f"keys {_first(obj)}, and the value at {odd!r} is of type {type(obj[odd]).__name__}, not a tensor. "
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
            Default: False.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read, or holds pickled objects and
            ``trust_pickle`` is False.
        TypeError: the file holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of a state_dict saved as .pt/.pth "
            "(torch.save) or .safetensors"
        )
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(f"could not read {path} as safetensors ({type(e).__name__}: {e})") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise ValueError(
                f"refused to load {path}: it holds a pickled Python object ({refused.group(1)}), for "
                "instance a whole nn.Module, and unpickling runs code that the file names. If you trust "
                "where the file comes from, pass --trust-pickle (trust_pickle=True); better, save "
                "model.state_dict() instead."
            ) from e
        raise ValueError(
            f"could not read {path} as a torch checkpoint ({type(e).__name__}: {e}); "
            "expected a file written by torch.save, or a .safetensors file"
        ) from e
    try:
        return unwrap_state_dict(loaded)
    except TypeError as e:
        raise TypeError(f"{path}: {e}") from e


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
            f"({_first(missing)}); unexpected keys: {len(unexpected)} ({_first(unexpected)}). Check that --model "
            "and --model-kwargs build the architecture the checkpoint was trained with (encoder, number "
            "of classes, auxiliary heads)."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"the checkpoint does not fit {type(model).__name__}: {e}. Check --model-kwargs "
            "(e.g. the number of classes)."
        ) from e
    return state


def check_output(path: str | Path, *, source: str | Path, force: bool = False) -> Path:
    """Validate an output checkpoint path before any work is done.

    Args:
        path: the output; its suffix picks the format (:data:`OUTPUT_SUFFIXES`).
        source: the input checkpoint, which is never overwritten.
        force: allow replacing an existing output and its report. Default: False.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: unknown suffix, or ``path`` is the input.
        FileExistsError: the output or its report exists and ``force`` is False.
        FileNotFoundError: the output's folder does not exist.

    Example:
        >>> str(check_output("converted.safetensors", source="model.pt"))
        'converted.safetensors'
    """
    path, source = Path(path), Path(source)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"cannot tell the output format from {path.name!r}; end the output path with "
            f"{' or '.join(OUTPUT_SUFFIXES)}"
        )
    if path.resolve() == source.resolve() or (path.exists() and source.exists() and path.samefile(source)):
        raise ValueError(
            f"the output {path} is the input checkpoint; fxeq never overwrites its input, even with "
            "--force. Write to a new file, e.g. with .fxeq before the suffix."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the output folder {path.parent} does not exist; create it first")
    for existing in (path, report_path(path)):
        if existing.exists() and not force:
            raise FileExistsError(f"{existing} exists; pass --force to replace it, or choose another output")
    return path


def report_path(checkpoint: str | Path) -> Path:
    """Where the JSON report of a converted checkpoint goes: beside it, ``.fxeq.json`` appended.

    Example:
        >>> report_path("out/model.safetensors").name
        'model.safetensors.fxeq.json'
    """
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".fxeq.json")


def check_not_converted(path: str | Path) -> None:
    """Refuse to convert a checkpoint that ``fxeq convert`` wrote.

    A model rebuilt from a state_dict carries no trace of fxeq, but the report
    written beside a converted checkpoint does: converting again would measure
    the same statistics and divide the fusing weights a second time.

    Raises:
        ValueError: ``path`` has a report beside it (see :func:`report_path`).
    """
    report = report_path(path)
    if report.exists():
        raise ValueError(
            f"{path} was written by fxeq convert ({report.name} lies beside it); converting it again would "
            "divide the fusing convs' weights twice. Convert the original checkpoint instead (or delete "
            "that report if it does not belong to this file)."
        )


@contextlib.contextmanager
def _atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto ``path`` when the block succeeds.

    The temporary file is in the same folder, so ``os.replace`` is atomic; it
    is synced to disk first and given a new file's permissions (safetensors
    writes owner-only files). If the block raises, it is removed.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with _atomic_path(Path(d) / "a.txt") as tmp:
        ...         _ = tmp.write_text("done")
        ...     sorted(p.name for p in Path(d).iterdir())
        ['a.txt']
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state_dict atomically, as safetensors or torch.save by the path's suffix.

    safetensors refuses tensors that share storage, so each tensor is written
    as a contiguous CPU copy.

    Raises:
        ValueError: the suffix is not one of :data:`OUTPUT_SUFFIXES`.
    """
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"cannot tell the output format from {path.name!r}; use {' or '.join(OUTPUT_SUFFIXES)}")
    with _atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(dict(state), tmp)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


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


def _first(keys: Any) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return (shown + (", ..." if len(keys) > _SHOWN_KEYS else "")) or "none"
