"""The outputs of ``fxeq convert`` and ``fxeq apply``: checked before any work, written as a unit.

* :func:`check_output` and :func:`check_output_folder` refuse, before any
  work, an output that would overwrite the input (links resolved) or an
  existing file without ``--force``, and :func:`check_not_converted` an
  input that fxeq already equalized (see :func:`fxeq.report.converted_report`,
  and a Lightning checkpoint holding fxeq's callback state).
* A converted checkpoint and its report are written as a unit
  (:func:`save_converted`): both to temporary files, then the report placed,
  then the checkpoint, so that there is never a converted checkpoint without
  its report; a ``save_pretrained`` folder is built beside its destination
  with the report inside and renamed into place (:func:`save_converted_folder`).
  Placement is :mod:`fxeq.files`'s: atomic, exclusive unless ``--force``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..files import place, place_folder, restore, sha256, staged
from ..report import FOLDER_REPORT, converted_report, report_path, write_report
from .hf import PRETRAINED_CONFIG, is_pretrained_folder

__all__ = [
    "OUTPUT_SUFFIXES", "check_not_converted", "check_output", "check_output_folder", "digest", "save_converted",
    "save_converted_folder", "save_state_dict",
]

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")


def digest(path: str | Path) -> str:
    """A checkpoint's SHA-256 as reports record it: a file's bytes; a folder's top-level files but its report."""
    return sha256(path, exclude=(FOLDER_REPORT,))


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
    _check_parent(path)
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
    _check_parent(path)
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
                f"{path} holds files but neither {PRETRAINED_CONFIG} nor {FOLDER_REPORT}: even with --force, fxeq "
                "replaces only folders that save_pretrained or fxeq wrote, or empty ones; choose another output"
            )
    return path


def check_not_converted(path: str | Path, embedded: Mapping[str, Any] | None = None) -> None:
    """Refuse to equalize a checkpoint that fxeq already equalized.

    A model rebuilt from a state_dict carries no trace of fxeq, but the report
    does: beside a converted file, inside a converted or trained folder (see
    :func:`fxeq.report.converted_report`), or inside a Lightning checkpoint
    (``embedded``, from :func:`fxeq.cli.checkpoints.read_checkpoint`).
    Equalizing again would measure the same statistics and divide the fusing
    weights a second time.

    Raises:
        ValueError: naming the checkpoint and where its report is.
    """
    report = converted_report(path)
    if report is not None:
        where = "in" if Path(path).resolve().is_dir() else "beside"
        raise ValueError(
            f"{path} was already equalized by fxeq ({report} lies {where} it); equalizing it again would divide "
            "the fusing convs' weights twice. Convert the original checkpoint instead (or delete that report if "
            "it does not belong to this checkpoint)."
        )
    if embedded is not None:
        raise ValueError(
            f"{path} was already equalized by fxeq: it holds the report of fxeq's ScaleEqualization callback "
            "(a Lightning checkpoint saved after the callback equalized the model); equalizing it again would "
            "divide the fusing convs' weights twice. Use it as it is, or convert the checkpoint the run started "
            "from."
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
    with staged(path) as tmp:
        _write_state_dict(state, tmp, path.suffix)
        place(tmp, path, replace=True)


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
    with staged(path) as tmp, staged(report_file) as report_tmp:
        _write_state_dict(state, tmp, path.suffix)
        record = {**report, "output": {"path": str(path.resolve()), "sha256": digest(tmp)}}
        write_report(record, report_tmp)
        previous = report_file.read_bytes() if report_file.is_file() else None
        with _appeared():
            place(report_tmp, report_file, replace=force)
        try:
            with _appeared():
                place(tmp, path, replace=force)
        except BaseException:  # Ctrl-C and SIGTERM too: no report may stay without its checkpoint
            restore(report_file, previous)
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
    with staged(path) as tmp:
        tmp.mkdir()
        save(tmp)
        for file in map(Path, copy):
            shutil.copyfile(file, tmp / file.name)
        record = {**report, "output": {"path": str(path.resolve()), "sha256": digest(tmp)}}
        write_report(record, tmp)  # a folder: the report goes inside, as FOLDER_REPORT
        with _appeared():
            place_folder(tmp, path, replace=force)
    return path / FOLDER_REPORT


@contextlib.contextmanager
def _appeared() -> Iterator[None]:
    """A name another run took while fxeq was writing: say how to go on."""
    try:
        yield
    except FileExistsError as e:
        raise FileExistsError(f"{e}; choose another output, or pass --force to replace it") from e


def _write_state_dict(state: Mapping[str, torch.Tensor], file: Path, suffix: str) -> None:
    """safetensors or torch.save by ``suffix``; safetensors refuses shared storage, so it gets contiguous copies.

    torch.save is given an open file, not the (temporary) path: from a path it names the archive's root
    folder after the file, so the same tensors would give other bytes under another name.
    """
    if suffix == ".safetensors":
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    else:
        with open(file, "wb") as f:
            torch.save(dict(state), f)


def _check_suffix(path: Path) -> None:
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"-o {path}: cannot tell the output format from {path.name!r}; end the output path with "
            f"{' or '.join(OUTPUT_SUFFIXES)}"
        )


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"-o {path}: the folder {path.parent} does not exist; create it first, or write "
                                "into an existing folder")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once links are resolved, or hard links to one file."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def _paths(given: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(given)] if isinstance(given, (str, os.PathLike)) else [Path(p) for p in given]


