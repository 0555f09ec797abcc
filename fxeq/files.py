"""Files that are never seen half-written: atomic placement, for the command line and the training callbacks.

Everything fxeq writes (a converted checkpoint, a ``save_pretrained`` folder,
a JSON report) goes to a temporary file or folder beside its destination and
is then placed in one step:

* ``os.replace`` where replacing is allowed;
* otherwise a hard link, which fails if the name was taken meanwhile (a
  concurrent run), so that two writers racing for one name cannot both win;
  a folder claims its name with ``mkdir`` and is renamed onto it.

Readers see the old file or the complete new one, never a partial one. While
a temporary file exists, SIGTERM raises (as Ctrl-C does) so that it is
removed. A full disk is reported as such (:class:`DiskFullError`), naming the
folder, instead of the cryptic errors serializers give.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

__all__ = [
    "DiskFullError", "place", "place_folder", "remove", "restore", "sha256", "staged", "umask", "write_json",
]

_FULL = 1 << 20  # free bytes under which a failed write is put down to a full disk


class DiskFullError(OSError):
    """The disk that a file was being written to has no space left; nothing was placed."""


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, removed when the block ends: done, failed or stopped (a file or folder).

    While it exists, SIGTERM raises ``SystemExit`` (as Ctrl-C raises
    ``KeyboardInterrupt``) so that the removal runs, unless the program
    handles SIGTERM itself; only the main thread can install a handler. An
    error that means the disk is full becomes :class:`DiskFullError`.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with staged(Path(d) / "a.txt") as tmp:
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
    except Exception as e:
        if _disk_full(e, path.parent):
            full = DiskFullError(f"no space left on the disk of {path.resolve().parent} while writing {path.name}; "
                                 "nothing was written there. Free some space, or write to another disk")
            full.errno = errno.ENOSPC
            raise full from e
        raise
    finally:
        remove(tmp)
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def place(tmp: Path, path: Path, *, replace: bool) -> None:
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


def place_folder(tmp: Path, path: Path, *, replace: bool) -> None:
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
    remove(old)


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str], *, replace: bool = True) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (:func:`staged`, then :func:`place`).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     print(write_json({"a": 1}, Path(d) / "r.json").read_text().strip())
        {
          "a": 1
        }
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        place(tmp, path, replace=replace)
    return path


def restore(path: Path, previous: bytes | None) -> None:
    """Put back a small file as it was: its earlier bytes, or no file."""
    if previous is None:
        path.unlink(missing_ok=True)
        return
    with staged(path) as tmp:
        tmp.write_bytes(previous)
        place(tmp, path, replace=True)


def remove(path: Path) -> None:
    """Delete a file, link or folder (with what it holds), if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def sha256(path: str | Path, *, exclude: Sequence[str] = ()) -> str:
    """The SHA-256 of a file's bytes, in hex; for a folder, of its manifest.

    A folder's manifest has one line ``"<SHA-256>  <name>\\n"`` per file at its
    top level, sorted by name, leaving out the names in ``exclude`` (a
    report written into the folder after the digest was taken).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / "a").write_bytes(b"")
        ...     sha256(Path(d) / "a")[:12]
        'e3b0c44298fc'
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name not in exclude)
        manifest = "".join(f"{sha256(f)}  {f.name}\n" for f in files)
        return hashlib.sha256(manifest.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)  # the status a shell reports for a process the signal killed


def _appeared(path: Path) -> str:
    return (
        f"{path} appeared while fxeq was writing (another run writing to the same output?) and was left as it is"
    )


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
    os.chmod(file, 0o666 & ~umask())


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write means that the disk is full.

    An OSError (or one the error was raised from) says so with
    ``errno.ENOSPC``; ``torch.save`` and safetensors report it in words of
    their own ("unexpected pos", "file write failed"), so a write that fails
    while the folder's disk has less than 1 MiB free counts too.
    """
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < _FULL:
            return True
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
