"""Calibration batches: what a loader yields, turned into the model's inputs, every batch counted once per pass.

* :func:`batch_inputs` maps one batch (a Tensor, an ``(image, mask)`` tuple,
  a Hugging Face dict, or anything an ``input_fn`` maps) to the model's
  ``(args, kwargs)``, on the model's device and dtype;
* :class:`CalibrationData` reads a loader so that each pass sees every batch
  exactly once: the first batch, which :func:`fxeq.transform` also uses to
  capture the model, is not lost with a one-shot iterator, and a loader that
  cannot be read again is refused before any work when several passes are
  needed;
* :func:`check_arguments` validates the calibration arguments up front.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._model import Inputs
from .errors import CalibrationError

__all__ = ["EMPTY_LOADER", "CalibrationData", "InputFn", "batch_inputs", "check_arguments"]

InputFn = Callable[[Any], Any]
"""Maps a batch to the model's input: a Tensor, a tuple (positional) or a dict (keyword arguments)."""

_TARGET_KEYS = frozenset({"labels", "label", "target", "targets"})

EMPTY_LOADER = (
    "the calibration loader yielded no batches; expected at least one batch of inputs. "
    "Pass a non-empty DataLoader (or list of tensors), and num_batches >= 1 if you set it."
)




def batch_inputs(
    batch: Any,
    input_fn: InputFn | None = None,
    *,
    model: nn.Module | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Inputs:
    """The model's ``(args, kwargs)`` in one calibration batch.

    A batch is a Tensor; a tuple or list whose first element is the input
    (``(image, mask)`` as most loaders yield); or a Mapping such as a Hugging
    Face batch, which becomes keyword arguments: the keys that ``model.forward``
    accepts, minus targets (``labels``, ``label``, ``target``, ``targets``).
    ``input_fn`` maps any other batch to a Tensor, a tuple of positional
    inputs or a dict of keyword arguments. Floating tensors are moved to
    ``device`` and cast to ``dtype``.

    Raises:
        TypeError: the batch is none of these (the message shows ``input_fn``).
        CalibrationError: ``input_fn`` raised.

    Example:
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> batch_inputs((x, torch.zeros(2, 4, 4)))[0][0] is x
        True
        >>> batch_inputs({"image": x}, lambda b: b["image"])[0][0].shape
        torch.Size([2, 3, 4, 4])
        >>> class Net(nn.Module):
        ...     def forward(self, pixel_values, labels=None):
        ...         return pixel_values
        >>> args, kwargs = batch_inputs({"pixel_values": x, "labels": x}, model=Net())
        >>> args, sorted(kwargs)
        ((), ['pixel_values'])
    """
    if input_fn is not None:
        try:
            value = input_fn(batch)
        except Exception as e:
            raise CalibrationError(
                f"input_fn raised {type(e).__name__}: {e} on a calibration batch ({_describe_batch(batch)}). "
                "input_fn must map each batch the loader yields to the model's input: a Tensor, a tuple "
                "of positional inputs or a dict of keyword arguments."
            ) from e
        args, kwargs = _from_value(value, batch, keep_all=True, model=model)
    elif isinstance(batch, (tuple, list)) and batch:
        args, kwargs = _from_value(batch[0], batch, keep_all=False, model=model)
    else:
        args, kwargs = _from_value(batch, batch, keep_all=False, model=model)

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=dtype if value.is_floating_point() else None, non_blocking=True)
        return value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _from_value(value: Any, batch: Any, *, keep_all: bool, model: nn.Module | None) -> Inputs:
    if isinstance(value, torch.Tensor):
        return (value,), {}
    if isinstance(value, Mapping):
        kwargs = dict(value) if keep_all else _forward_kwargs(value, model)
        if kwargs:
            return (), kwargs
    elif isinstance(value, (tuple, list)) and keep_all and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value), {}
    raise TypeError(
        f"a calibration batch must be a Tensor, a tuple/list whose first element is the input, or a dict of "
        f"the model's keyword arguments; found {_describe_batch(batch)}. Pass input_fn=lambda batch: ... that "
        "returns the model's input: a Tensor, a tuple of Tensors or a dict, e.g. input_fn=lambda b: b['image']."
    )


def _forward_kwargs(batch: Mapping[str, Any], model: nn.Module | None) -> dict[str, Any]:
    """The entries of a dict batch that ``model.forward`` takes, targets left out."""
    keys = [k for k in batch if isinstance(k, str) and k not in _TARGET_KEYS]
    if model is None:
        return {k: batch[k] for k in keys}
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {k: batch[k] for k in keys}
    return {k: batch[k] for k in keys if k in parameters}


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)[:8]}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(type(b).__name__ for b in batch[:4]) + (", ..." if len(batch) > 4 else "")
        return f"a {type(batch).__name__} of {inner or 'nothing'}"
    return f"a {type(batch).__name__}"


class CalibrationData:
    """A calibration loader, read so that each pass sees every batch exactly once.

    Args:
        loader: re-iterable batches (a DataLoader, a list), or a one-shot
            iterable when a single pass suffices.

    Raises:
        TypeError: ``loader`` is not an iterable of batches.

    Example:
        >>> data = CalibrationData(iter([1, 2, 3]))
        >>> data.first(), list(data.epoch(1, 1))
        (1, [1, 2, 3])
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        if isinstance(loader, torch.Tensor):
            raise TypeError(
                f"calib_loader is a single Tensor of shape {tuple(loader.shape)}; iterating it would yield "
                "single samples. Pass an iterable of batches: [x] for one batch, or a DataLoader."
            )
        if not isinstance(loader, Iterable):
            raise TypeError(
                f"calib_loader must be an iterable of batches (a DataLoader, a list of tensors...), "
                f"got {type(loader).__name__}"
            )
        self.loader = loader
        self._iterator: Iterator[Any] | None = None
        self._head: list[Any] = []
        self._next: Iterator[Any] | None = None

    def first(self) -> Any:
        """The first batch (it is still counted in the first pass).

        Raises:
            CalibrationError: the loader is empty.
        """
        if not self._head:
            self._iterator = iter(self.loader)
            try:
                self._head.append(next(self._iterator))
            except StopIteration:
                raise CalibrationError(EMPTY_LOADER) from None
        return self._head[0]

    def check_passes(self, passes: int) -> None:
        """Refuse a one-shot loader before any work when it must be read ``passes`` times.

        Raises:
            CalibrationError: naming the loader and the fix.
        """
        if passes < 2 or isinstance(self.loader, DataLoader):
            return
        if self._iterator is None:
            self._iterator = iter(self.loader)
        again = iter(self.loader)
        if again is self._iterator or again is self.loader:
            raise CalibrationError(
                f"the calibration loader ({type(self.loader).__name__}) can be read only once, but this model "
                f"has chained sites that need {passes} passes over the data, one per generation (see the "
                "report's 'calibrated after'). Pass a list of batches or a DataLoader, or one_pass=True "
                "for the approximate single-pass statistics."
            )
        self._next = again

    def length(self) -> int | None:
        """The number of batches per pass, if the loader says (``len()``), else None."""
        try:
            length = len(self.loader)  # type: ignore[arg-type]
        except TypeError:  # no __len__, or a DataLoader over an IterableDataset without one
            return None
        return length if isinstance(length, int) and length > 0 else None  # 0 from a loader that yields is a guess

    def epoch(self, number: int, total: int) -> Iterator[Any]:
        """The batches of pass ``number`` (1-based) of ``total``."""
        if number == 1 and (self._head or self._iterator is not None):
            # Not `self._iterator or ...`: that asks a DataLoader's iterator for len(), which an
            # IterableDataset may not have, or may give as 0 while batches remain.
            head, self._head = self._head, []
            rest = self._iterator if self._iterator is not None else iter(())
            return itertools.chain(head, rest)
        iterator, self._next = (self._next or iter(self.loader)), None
        return iterator


def check_arguments(*, num_batches: object = None, min_std: object = 1e-6) -> None:
    """Validate calibration arguments before any work is done.

    Raises:
        ValueError: ``num_batches`` is not a whole number >= 1 (or None), or
            ``min_std`` is not a finite number > 0.

    Example:
        >>> check_arguments(num_batches=1.5)
        Traceback (most recent call last):
        ...
        ValueError: num_batches must be a whole number of at least 1, or None for all; got 1.5
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a whole number of at least 1, or None for all; got {num_batches!r}")
    if isinstance(min_std, bool) or not isinstance(min_std, (int, float)) or not math.isfinite(min_std) \
            or min_std <= 0:
        raise ValueError(f"min_std must be a finite number greater than 0, got {min_std!r}")
