"""Hugging Face ``save_pretrained`` folders, read and written for the command line (``pip install -e '.[hf]'``).

A folder with ``config.json`` (and the weights, often a
``preprocessor_config.json``) is a checkpoint too. It is read with
``from_pretrained(folder, local_files_only=True)``, so nothing is downloaded,
and every weight must fit the class: from_pretrained's random initialization
of missing weights is an error here. transformers is imported only when a
folder is read or written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .checkpoints import load_error, shown_keys

__all__ = [
    "PREPROCESSOR_CONFIG", "PRETRAINED_CONFIG", "forget_source", "is_pretrained_folder", "load_image_processor",
    "load_pretrained", "save_pretrained",
]

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PRETRAINED_CONFIG = "config.json"
HF_EXTRA = "pip install -e '.[hf]' (in your clone of fxeq)"


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by Hugging Face ``save_pretrained`` (it holds ``config.json``).

    Example:
        >>> is_pretrained_folder("model.pt")
        False
    """
    return Path(path, PRETRAINED_CONFIG).is_file()


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
            f"could not load {folder} with {name}.from_pretrained ({load_error(e)}); expected a folder written "
            "by save_pretrained for a model of that class. Name the model's class with --model if config.json "
            "does not map to a segmentation model."
        ) from e
    unfit = [
        f"{what}: {len(keys)} ({shown_keys(sorted(map(str, keys)))})"
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


def forget_source(model: nn.Module) -> None:
    """Clear the folder ``from_pretrained`` loaded ``model`` from (``name_or_path``), for a model fxeq only measures.

    fxeq's library refuses to equalize a model loaded from a folder that
    holds fxeq's report (:func:`fxeq.rewrite.check_not_equalized`), lest it be
    equalized twice. ``fxeq inspect`` measures such a model as it is and
    writes nothing, so it clears the trail first.

    Example:
        >>> net = nn.Linear(1, 1)
        >>> net.name_or_path = "segformer-fxeq"
        >>> forget_source(net)
        >>> net.name_or_path
        ''
    """
    if isinstance(getattr(model, "name_or_path", None), str):
        model.name_or_path = ""
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "name_or_path", None), str):
        config.name_or_path = ""


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
            f"could not read the image processor in {folder / PREPROCESSOR_CONFIG} ({load_error(e)}); expected "
            "a file written by an image processor's save_pretrained"
        ) from e


def _transformers(folder: Path) -> ModuleType:
    """transformers, or an error naming the extra that installs it."""
    try:
        import transformers  # noqa: PLC0415 - optional: only save_pretrained folders need it
    except ImportError as e:
        raise ValueError(
            f"{folder} is a Hugging Face save_pretrained folder (it holds {PRETRAINED_CONFIG}); reading it needs "
            f"the transformers package, which is not installed. Install fxeq's Hugging Face extra: {HF_EXTRA}"
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
