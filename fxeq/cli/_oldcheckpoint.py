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

Hugging Face ``save_pretrained`` folders (``config.json`` and the weights,
often a ``preprocessor_config.json``) are checkpoints too. They are read with
``from_pretrained(folder, local_files_only=True)`` (:func:`load_pretrained`,
which needs the optional ``transformers``: ``pip install 'fxeq[hf]'``) and
written by :func:`save_converted_folder`: into a temporary folder beside the
output, with the report inside it as ``fxeq.json``, then renamed into place
in one step. A folder with ``fxeq.json`` counts as converted, as a file with
a report beside it does.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, NoReturn

import safetensors.torch
import torch
from torch import nn

__all__ = [
    "FOLDER_REPORT", "OUTPUT_SUFFIXES", "PREPROCESSOR_CONFIG", "check_not_converted", "check_output",
    "check_output_folder", "converted_report", "is_pretrained_folder", "load_image_processor", "load_into",
    "load_pretrained", "load_state_dict", "report_path", "save_converted", "save_converted_folder",
    "save_pretrained", "save_state_dict", "sha256", "unwrap_state_dict",
]

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")
FOLDER_REPORT = "fxeq.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_PRETRAINED_CONFIG = "config.json"
_HF_EXTRA = "pip install 'fxeq[hf]'"
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
            f"checkpoint {path} is a folder without {_PRETRAINED_CONFIG}, so not a Hugging Face save_pretrained "
            "folder either; expected a checkpoint file: a state_dict saved as .pt/.pth (torch.save) or "
            ".safetensors, or a folder written by save_pretrained"
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


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by Hugging Face ``save_pretrained`` (it holds ``config.json``).

    Example:
        >>> is_pretrained_folder("model.pt")
        False
    """
    return Path(path, _PRETRAINED_CONFIG).is_file()


def load_pretrained(folder: str | Path, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Build the model in a ``save_pretrained`` folder with its weights, from local files only.

    Every weight must fit: ``from_pretrained`` initializes missing weights at
    random and drops unexpected ones with a warning; here either is an error,
    as a checkpoint file's keys must fit its model exactly.

    Args:
        folder: the folder.
        model_class: a class with ``from_pretrained``. Default:
            ``transformers.AutoModelForSemanticSegmentation``, which picks the
            class from ``config.json``.
        kwargs: more keyword arguments for ``from_pretrained``.

    Returns:
        The model, in eval mode (as ``from_pretrained`` returns it).

    Raises:
        ValueError: transformers is not installed, the folder cannot be
            loaded with that class, or its weights do not fit it.
        TypeError: ``model_class`` has no ``from_pretrained``.
    """
    folder = Path(folder)
    transformers = _transformers(folder)
    cls = model_class if model_class is not None else transformers.AutoModelForSemanticSegmentation
    name = getattr(cls, "__name__", type(cls).__name__)
    if not callable(getattr(cls, "from_pretrained", None)):
        raise TypeError(
            f"{name} has no from_pretrained method, so it cannot load the save_pretrained folder {folder}; name a "
            "transformers model class such as transformers:SegformerForSemanticSegmentation"
        )
    try:
        with _quiet(transformers):
            model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as e:  # whatever from_pretrained raises is about the folder, the class or the kwargs
        raise ValueError(
            f"could not load {folder} with {name}.from_pretrained ({_load_error(e)}); expected a folder written "
            "by save_pretrained for a model of that class. Name the model's class with --model if config.json "
            "does not map to a segmentation model."
        ) from e
    unfit = [
        f"{what}: {len(keys)} ({_first(sorted(map(str, keys)))})"
        for what, keys in (("missing keys", info.get("missing_keys") or ()),
                           ("unexpected keys", info.get("unexpected_keys") or ()),
                           ("keys of another shape", info.get("mismatched_keys") or ()))
        if keys
    ]
    if unfit:
        raise ValueError(
            f"the weights in {folder} do not fit {type(model).__name__}: {'; '.join(unfit)}. from_pretrained would "
            "initialize the missing ones at random. Check that config.json describes the model the weights were "
            "saved from, or name its class with --model."
        )
    return model


def save_pretrained(model: Any, folder: str | Path) -> None:
    """``model.save_pretrained(folder)``, without transformers' progress bars."""
    with _quiet(_transformers(Path(folder))):
        model.save_pretrained(folder)


def load_image_processor(folder: str | Path) -> Any | None:
    """The image processor of a ``save_pretrained`` folder, or None if it has no ``preprocessor_config.json``.

    Raises:
        ValueError: transformers is not installed, or the file cannot be read.
    """
    folder = Path(folder)
    if not (folder / PREPROCESSOR_CONFIG).is_file():
        return None
    transformers = _transformers(folder)
    try:
        with _quiet(transformers):
            return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # whatever from_pretrained raises is about the file
        raise ValueError(
            f"could not read the image processor in {folder / PREPROCESSOR_CONFIG} ({_load_error(e)}); expected "
            "a file written by an image processor's save_pretrained"
        ) from e


def check_output(
    path: str | Path, *, source: str | Path | Sequence[str | Path], force: bool = False
) -> Path:
    """Validate an output checkpoint path before any work is done.

    Args:
        path: the output; its suffix picks the format (:data:`OUTPUT_SUFFIXES`).
        source: the input checkpoint (or several input files), which is never
            overwritten: neither by ``path`` nor by its report, links resolved.
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
    path = Path(path)
    _check_suffix(path)
    for written, what in ((path, "the output"), (report_path(path), "the output's report")):
        for i, given in enumerate(_paths(source)):
            if _same_file(written, given):
                raise ValueError(
                    f"{what} {written} is the input {'checkpoint ' if i == 0 else ''}{given}; "
                    "fxeq never overwrites its input, even with --force. Write to a new file, e.g. with .fxeq "
                    "before the suffix."
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


def check_output_folder(
    path: str | Path, *, source: str | Path | Sequence[str | Path], force: bool = False
) -> Path:
    """Validate an output ``save_pretrained`` folder before any work is done.

    Args:
        path: the folder to write (with the report inside, as :data:`FOLDER_REPORT`).
        source: the input folder (or several inputs). ``path`` may be neither
            an input nor a folder holding one, links resolved: replacing it
            would delete that input.
        force: allow replacing an existing folder, if ``save_pretrained`` or
            fxeq wrote it (it holds ``config.json`` or the report) or it is
            empty; never any other folder. Default: False.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: ``path`` ends in a checkpoint file's suffix, is or holds an
            input, or is a folder that ``force`` may not replace.
        NotADirectoryError: a file is in the way.
        FileExistsError: the folder exists and ``force`` is False.
        FileNotFoundError: the folder it would be in does not exist.

    Example:
        >>> str(check_output_folder("segformer-fxeq", source="segformer"))
        'segformer-fxeq'
    """
    path = Path(path)
    if path.suffix in OUTPUT_SUFFIXES:
        raise ValueError(
            f"the input is a Hugging Face save_pretrained folder, so the output is one too, and {path} ends in "
            f"{path.suffix}; pass a folder path without it, e.g. {path.with_suffix('')}-fxeq"
        )
    for given in _paths(source):
        if path.resolve() == given.resolve() or path.resolve() in given.resolve().parents:
            raise ValueError(
                f"the output {path} is the input {given} or holds it; fxeq never overwrites its input, even with "
                "--force. Write to a new folder."
            )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the output folder {path.parent} does not exist; create it first")
    if os.path.lexists(path):
        if not path.is_dir():
            raise NotADirectoryError(
                f"{path} exists and is not a folder, where fxeq would write a save_pretrained folder (even with "
                "--force, it replaces folders only); choose another output, or move it away"
            )
        if not force:
            raise FileExistsError(f"{path} exists; pass --force to replace it, or choose another output")
        if any(path.iterdir()) and not (is_pretrained_folder(path) or (path / FOLDER_REPORT).is_file()):
            raise ValueError(
                f"{path} holds files but neither {_PRETRAINED_CONFIG} nor {FOLDER_REPORT}: even with --force, fxeq "
                "replaces only folders that save_pretrained or fxeq wrote, or empty ones; choose another output"
            )
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
    """The report of a checkpoint that fxeq wrote, or None for any other checkpoint.

    For a file, the report lies beside it (:func:`report_path`); for a
    ``save_pretrained`` folder, inside it (:data:`FOLDER_REPORT`). Links are
    resolved first: a link to a converted checkpoint is a converted checkpoint.

    Example:
        >>> converted_report("model.pt") is None
        True
    """
    path = Path(checkpoint).resolve()
    report = path / FOLDER_REPORT if path.is_dir() else report_path(path)
    return report if report.exists() else None


def check_not_converted(path: str | Path) -> None:
    """Refuse to convert a checkpoint that ``fxeq convert`` wrote.

    A model rebuilt from a state_dict carries no trace of fxeq, but the report
    written beside a converted checkpoint does (see :func:`converted_report`):
    converting again would measure the same statistics and divide the fusing
    weights a second time.

    Raises:
        ValueError: ``path``, or the file it links to, has a report beside it
            (a folder: inside it).
    """
    report = converted_report(path)
    if report is not None:
        raise ValueError(
            f"{path} was written by fxeq convert ({report} lies {'in' if report.name == FOLDER_REPORT else 'beside'}"
            " it); converting it again would "
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


def save_converted_folder(
    save: Callable[[Path], object],
    path: str | Path,
    report: Mapping[str, Any],
    *,
    force: bool = False,
    copy: Sequence[str | Path] = (),
) -> Path:
    """Write a converted ``save_pretrained`` folder with its JSON report inside, as a unit.

    ``save`` (e.g. ``model.save_pretrained``) writes into a new temporary
    folder beside ``path``; the files in ``copy`` are copied in, then the
    report, which records the folder's path and SHA-256 (:func:`sha256`) under
    ``"output"``, as :data:`FOLDER_REPORT`. The folder is then renamed to
    ``path`` in one step, so that readers see no folder or a complete one.
    Without ``force`` an empty placeholder claims the name first (it fails if
    the name is taken) and the rename replaces it, so a folder that appeared
    after :func:`check_output_folder` is left alone. With ``force`` an
    existing folder is moved aside, replaced, then deleted.

    Args:
        save: writes the model into the folder it is given.
        path: the folder to write.
        report: the report, as a JSON-serializable mapping.
        force: replace an existing folder (checked by :func:`check_output_folder`). Default: False.
        copy: files to copy into the folder, such as the input's
            ``preprocessor_config.json``. Default: none.

    Returns:
        The report's path.

    Raises:
        FileExistsError: ``force`` is False and ``path`` exists.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_converted_folder(lambda f: (f / "config.json").write_text("{}"), Path(d) / "out", {})
        ...     sorted(p.name for p in (Path(d) / "out").iterdir())
        ['config.json', 'fxeq.json']
    """
    path = Path(path)
    with _staged(path) as tmp:
        tmp.mkdir()
        save(tmp)
        for file in map(Path, copy):
            shutil.copyfile(file, tmp / file.name)
        record = {**report, "output": {"path": str(path.resolve()), "sha256": sha256(tmp)}}
        (tmp / FOLDER_REPORT).write_text(json.dumps(record, indent=2) + "\n")
        _place_folder(tmp, path, replace=force)
    return path / FOLDER_REPORT


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex; for a folder, of its manifest.

    A folder's manifest has one line ``"<SHA-256>  <name>\\n"`` per file at its
    top level but :data:`FOLDER_REPORT`, sorted by name: it identifies a
    ``save_pretrained`` folder's config and weights, and equals the digest
    that :func:`save_converted_folder` records before it adds the report.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name != FOLDER_REPORT)
        manifest = "".join(f"{sha256(f)}  {f.name}\n" for f in files)
        return hashlib.sha256(manifest.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, removed when the block ends: done, failed or stopped (a file or folder).

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
        _remove(tmp)
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
    _finish(tmp)
    if replace:
        os.replace(tmp, path)
        return
    try:
        _claim(tmp, path)
    except FileExistsError as e:
        raise FileExistsError(_appeared(path)) from e


def _appeared(path: Path) -> str:
    return (
        f"{path} appeared while fxeq was writing (another fxeq convert to the same output?) and was left as it "
        "is; choose another output, or pass --force to replace it"
    )


def _place_folder(tmp: Path, path: Path, *, replace: bool) -> None:
    """Rename a finished temporary folder to ``path``; unless ``replace``, only if ``path`` is free.

    Its files are synced and given a new file's permissions first. Without
    ``replace``, or when nothing has the name, an empty folder claims it
    (``mkdir`` fails if the name is taken) and ``rename`` replaces that in one
    step (it fails if anything was written into it meanwhile). With
    ``replace``, the existing folder is moved aside, the new one put in its
    place, then the old one deleted; if the second step fails, the old one
    is put back.

    Raises:
        FileExistsError: ``replace`` is False and ``path`` exists.
    """
    for file in tmp.iterdir():
        if file.is_file():
            _finish(file)
    if not (replace and os.path.lexists(path)):
        try:
            os.mkdir(path)
        except FileExistsError as e:
            raise FileExistsError(_appeared(path)) from e
        try:
            os.rename(tmp, path)
        except BaseException as e:  # Ctrl-C and SIGTERM too: no placeholder may stay
            with contextlib.suppress(OSError):
                os.rmdir(path)  # the placeholder, while it is empty
            if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(_appeared(path)) from e  # something was written into the placeholder
            raise
        return
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


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


def _finish(file: Path) -> None:
    """Sync a written file to disk and give it a new file's permissions (safetensors writes owner-only files)."""
    with open(file, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(file, 0o666 & ~_umask())


def _remove(path: Path) -> None:
    """Delete a file, link or folder (with what it holds), if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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


def _paths(given: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(given)] if isinstance(given, (str, os.PathLike)) else [Path(p) for p in given]


def _transformers(folder: Path) -> ModuleType:
    """transformers, or an error naming the extra that installs it."""
    try:
        import transformers  # noqa: PLC0415 - optional: only save_pretrained folders need it
    except ImportError as e:
        raise ValueError(
            f"{folder} is a Hugging Face save_pretrained folder (it holds {_PRETRAINED_CONFIG}); reading it needs "
            f"the transformers package, which is not installed. Install fxeq's Hugging Face extra: {_HF_EXTRA}"
        ) from e
    return transformers


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """transformers without its progress bars and warnings: fxeq reports what matters itself."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
