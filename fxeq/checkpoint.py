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
* Writing goes to a temporary file in the destination folder, then is
  placed in one step: ``os.replace`` where replacing is allowed, else a hard
  link that fails if the name was taken meanwhile. Readers see the old file
  or the complete new one, never a partial one. SIGTERM, like Ctrl-C, raises
  while a temporary file exists, so that it is removed.
* A converted checkpoint and its report are written as a unit
  (:func:`save_converted`): the report first, then the checkpoint, so that
  there is never a converted checkpoint without its report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import safetensors.torch
import torch
from torch import nn

__all__ = [
    "OUTPUT_SUFFIXES", "check_not_converted", "check_output", "converted_report", "load_into", "load_state_dict",
    "report_path", "save_converted", "save_state_dict", "sha256", "unwrap_state_dict",
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
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a folder; expected a checkpoint file: a state_dict saved as .pt/.pth "
            "(torch.save) or .safetensors"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the path of a state_dict saved as .pt/.pth "
            "(torch.save) or .safetensors"
        )
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:
            raise ValueError(
                f"{path} is not a readable safetensors checkpoint ({_load_error(e)}); expected a file written "
                "by safetensors.torch.save_file. Is it complete (not cut short by a download or a copy)?"
            ) from e
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
        if trust_pickle and isinstance(e, (ImportError, AttributeError)):
            raise ValueError(
                f"could not unpickle {path} ({_load_error(e)}): the classes it holds must be importable. Run "
                "fxeq from the folder that holds their module, or install the package that defines them."
            ) from e
        advice = "" if trust_pickle else (
            " If it holds pickled Python objects and you trust where it comes from, --trust-pickle "
            "(trust_pickle=True) reads those too; unpickling runs code that the file names."
        )
        raise ValueError(
            f"{path} is not a readable PyTorch or safetensors checkpoint ({_load_error(e)}); expected a "
            f"state_dict written by torch.save, or a .safetensors file.{advice}"
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
        # torch's message is a header line, then one line per mismatch, each ending in a period
        lines = str(e).splitlines()
        mismatches = "; ".join(line.strip().rstrip(".") for line in lines[1:] or lines)
        raise ValueError(
            f"the checkpoint does not fit {type(model).__name__}: {mismatches}. Check --model-kwargs "
            "(e.g. the number of classes)."
        ) from e
    return state


def check_output(path: str | Path, *, source: str | Path, force: bool = False) -> Path:
    """Validate an output checkpoint path before any work is done.

    Args:
        path: the output; its suffix picks the format (:data:`OUTPUT_SUFFIXES`).
        source: the input checkpoint, which is never overwritten: neither by
            ``path`` nor by its report, links resolved.
        force: allow replacing an existing output and its report. Default: False.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: unknown suffix, or ``path`` or its report is the input.
        IsADirectoryError: ``path`` or its report is a folder.
        FileExistsError: the output or its report exists and ``force`` is False.
        FileNotFoundError: the output's folder does not exist.

    Example:
        >>> str(check_output("converted.safetensors", source="model.pt"))
        'converted.safetensors'
    """
    path, source = Path(path), Path(source)
    _check_suffix(path)
    for written, what in ((path, "the output"), (report_path(path), "the output's report")):
        if _same_file(written, source):
            raise ValueError(
                f"{what} {written} is the input checkpoint {source}; fxeq never overwrites its input, even "
                "with --force. Write to a new file, e.g. with .fxeq before the suffix."
            )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the output folder {path.parent} does not exist; create it first")
    for existing in (path, report_path(path)):
        if existing.is_dir():
            raise IsADirectoryError(
                f"{existing} is a folder, where fxeq would write a file (even with --force, it replaces "
                "files only); choose another output, or move that folder away"
            )
        if os.path.lexists(existing) and not force:
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


def converted_report(checkpoint: str | Path) -> Path | None:
    """The report beside a checkpoint that ``fxeq convert`` wrote, or None for any other checkpoint.

    Links are resolved first: a link to a converted checkpoint is a converted checkpoint.

    Example:
        >>> converted_report("model.pt") is None
        True
    """
    report = report_path(Path(checkpoint).resolve())
    return report if report.exists() else None


def check_not_converted(path: str | Path) -> None:
    """Refuse to convert a checkpoint that ``fxeq convert`` wrote.

    A model rebuilt from a state_dict carries no trace of fxeq, but the report
    written beside a converted checkpoint does (see :func:`converted_report`):
    converting again would measure the same statistics and divide the fusing
    weights a second time.

    Raises:
        ValueError: ``path``, or the file it links to, has a report beside it.
    """
    report = converted_report(path)
    if report is not None:
        raise ValueError(
            f"{path} was written by fxeq convert ({report} lies beside it); converting it again would "
            "divide the fusing convs' weights twice. Convert the original checkpoint instead (or delete "
            "that report if it does not belong to this file)."
        )


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state_dict atomically, as safetensors or torch.save by the path's suffix, replacing ``path``.

    Raises:
        ValueError: the suffix is not one of :data:`OUTPUT_SUFFIXES`.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_state_dict({"w": torch.ones(2)}, Path(d) / "w.safetensors")
        ...     sorted(p.name for p in Path(d).iterdir())
        ['w.safetensors']
    """
    path = Path(path)
    _check_suffix(path)
    with _staged(path) as tmp:
        _write_state_dict(state, tmp, path.suffix)
        _place(tmp, path, replace=True)


def save_converted(
    state: Mapping[str, torch.Tensor], path: str | Path, report: Mapping[str, Any], *, force: bool = False
) -> Path:
    """Write a converted state_dict and its JSON report beside it, as a unit.

    Both are written to temporary files first; the report records the
    checkpoint's path and SHA-256 under ``"output"``. Then the report is
    placed, then the checkpoint, each in one step, so that there is never a
    converted checkpoint without its report. If placing the checkpoint fails
    (or is interrupted), the report is put back as it was. Without ``force``,
    neither file replaces one that appeared after :func:`check_output` (a
    concurrent run): that raises, and the other run's files are left alone.

    Args:
        state: the converted state_dict.
        path: the checkpoint to write; the report goes to :func:`report_path`.
        report: the report, as a JSON-serializable mapping.
        force: replace existing files. Default: False.

    Returns:
        The report's path.

    Raises:
        ValueError: the suffix is not one of :data:`OUTPUT_SUFFIXES`.
        FileExistsError: ``force`` is False and the checkpoint or its report exists.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_converted({"w": torch.ones(2)}, Path(d) / "w.pt", {"sites": []})
        ...     sorted(p.name for p in Path(d).iterdir())
        ['w.pt', 'w.pt.fxeq.json']
    """
    path = Path(path)
    _check_suffix(path)
    report_file = report_path(path)
    with _staged(path) as tmp, _staged(report_file) as report_tmp:
        _write_state_dict(state, tmp, path.suffix)
        record = {**report, "output": {"path": str(path.resolve()), "sha256": sha256(tmp)}}
        report_tmp.write_text(json.dumps(record, indent=2) + "\n")
        previous = report_file.read_bytes() if report_file.is_file() else None
        _place(report_tmp, report_file, replace=force)
        try:
            _place(tmp, path, replace=force)
        except BaseException:  # Ctrl-C and SIGTERM too: no report may stay without its checkpoint
            _restore(report_file, previous)
            raise
    return report_file


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, removed when the block ends: done, failed or stopped.

    While it exists, SIGTERM raises ``SystemExit`` (as Ctrl-C raises
    ``KeyboardInterrupt``) so that the removal runs, unless the program
    handles SIGTERM itself; only the main thread can install a handler.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with _staged(Path(d) / "a.txt") as tmp:
        ...         _ = tmp.write_text("draft")
        ...     sorted(Path(d).iterdir())
        []
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    main_thread = threading.current_thread() is threading.main_thread()
    catch = main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if catch:
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)  # the status a shell reports for a process the signal killed


def _place(tmp: Path, path: Path, *, replace: bool) -> None:
    """Move a finished temporary file onto ``path`` in one step; unless ``replace``, only if ``path`` is free.

    The file is synced to disk first and given a new file's permissions
    (safetensors writes owner-only files). Without ``replace``, a hard link
    claims the name atomically (it fails if the name exists); where links
    are not supported, an exclusively created placeholder does.

    Raises:
        FileExistsError: ``replace`` is False and ``path`` exists.
    """
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    if replace:
        os.replace(tmp, path)
        return
    try:
        _claim(tmp, path)
    except FileExistsError as e:
        raise FileExistsError(
            f"{path} appeared while fxeq was writing (another fxeq convert to the same output?) and was left "
            "as it is; choose another output, or pass --force to replace it"
        ) from e


def _claim(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` if no file has that name, atomically; else raise FileExistsError."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network file systems): a placeholder claims the name
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        try:
            os.replace(tmp, path)
        except BaseException:
            path.unlink()
            raise
    else:
        tmp.unlink()


def _restore(path: Path, previous: bytes | None) -> None:
    """Put back a small file as it was: its earlier bytes, or no file."""
    if previous is None:
        path.unlink(missing_ok=True)
        return
    with _staged(path) as tmp:
        tmp.write_bytes(previous)
        _place(tmp, path, replace=True)


def _write_state_dict(state: Mapping[str, torch.Tensor], file: Path, suffix: str) -> None:
    """safetensors or torch.save by ``suffix``; safetensors refuses shared storage, so it gets contiguous copies."""
    if suffix == ".safetensors":
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    else:
        torch.save(dict(state), file)


def _check_suffix(path: Path) -> None:
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"cannot tell the output format from {path.name!r}; end the output path with "
            f"{' or '.join(OUTPUT_SUFFIXES)}"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once links are resolved, or hard links to one file."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


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


def _load_error(error: Exception) -> str:
    """The first line of a loader's error, without torch's advice to turn weights_only off."""
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the cause, after torch's advice
    lines = (unpickler.group(1) if unpickler else text).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _first(keys: Any) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return (shown + (", ..." if len(keys) > _SHOWN_KEYS else "")) or "none"
