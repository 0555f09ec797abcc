"""Calibrate: run batches through the calibration graph and collect statistics.

By default, and as the paper measures them:

* batch normalization uses batch statistics (training behaviour) and leaves
  its running statistics untouched (see :mod:`fxeq.observe`);
* dropout is off; everything runs under ``torch.no_grad`` on the model's device;
* the whole loader is used unless ``num_batches`` is given;
* sites whose inputs depend on other sites' fused convs (with no normalization
  in between) are calibrated in later passes, after the sites they depend on
  have been folded, one pass per level of the site-dependency graph.

Statistics stay on the device in float64 during a pass. When
``torch.distributed`` is initialized, each pass's statistics are merged across
ranks (the count/mean/M2 merge is associative), so every rank folds the same
numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .errors import CalibrationError
from .observe import ScaleObserver

__all__ = ["EMPTY_LOADER", "InputFn", "InputStats", "batch_inputs", "merge_across_ranks", "run_pass"]

InputFn = Callable[[Any], "torch.Tensor | tuple[torch.Tensor, ...]"]

EMPTY_LOADER = (
    "the calibration loader yielded no batches; expected at least one batch of inputs. "
    "Pass a non-empty DataLoader (or list of tensors), and num_batches >= 1 if you set it."
)


@dataclass(frozen=True)
class InputStats:
    """Global statistics of one concatenation input over the calibration data.

    Attributes:
        mean: mean over all of N, C, H, W and all batches.
        std: population standard deviation over the same.
        count: number of elements seen.
        samples: number of samples (batch items) seen.
    """

    mean: float
    std: float
    count: int
    samples: int

    @classmethod
    def of(cls, observer: ScaleObserver) -> InputStats:
        """Read an observer (one host synchronization)."""
        mean, std = torch.stack([observer.mean, observer.std()]).tolist()
        return cls(mean=mean, std=std, count=observer.count, samples=observer.samples)


def batch_inputs(
    batch: Any,
    input_fn: InputFn | None = None,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs in one calibration batch.

    A batch is a Tensor, or a tuple or list whose first element is the input
    (``(image, mask)`` as most loaders yield). Anything else needs ``input_fn``,
    which maps a batch to a Tensor or a tuple of Tensors. Floating tensors are
    moved to ``device`` and cast to ``dtype``.

    Example:
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> batch_inputs((x, torch.zeros(2, 4, 4)))[0] is x
        True
        >>> batch_inputs({"image": x}, lambda b: b["image"])[0].shape
        torch.Size([2, 3, 4, 4])
    """
    if input_fn is not None:
        value = input_fn(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        value = batch[0]
    else:
        value = batch
    inputs = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        found = ", ".join(type(t).__name__ for t in inputs) or "nothing"
        raise TypeError(
            f"a calibration batch must be a Tensor or a tuple/list whose first element is the input; "
            f"found {type(batch).__name__} giving {found}. Pass input_fn=lambda batch: ... that returns "
            "the model's input tensor(s), e.g. input_fn=lambda b: b['image']."
        )
    return tuple(
        t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=True)
        for t in inputs
    )


def run_pass(
    module: torch.nn.Module,
    loader: Iterable[Any],
    *,
    input_fn: InputFn | None = None,
    num_batches: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "fxeq calibration",
) -> int:
    """Run ``module`` over the loader's batches without gradients.

    Returns:
        The number of batches run.

    Raises:
        CalibrationError: the loader is empty, or a batch fails; the message
            names the batch and, for batch-norm errors on single samples, the fix.
    """
    total: int | None = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    seen = 0
    with torch.no_grad(), tqdm(total=total, desc=desc, disable=not progress, unit="batch") as bar:
        for batch in itertools.islice(loader, num_batches):
            inputs = batch_inputs(batch, input_fn, device=device, dtype=dtype)
            try:
                module(*inputs)
            except Exception as e:
                raise CalibrationError(_batch_failure(seen, inputs, e)) from e
            seen += 1
            bar.update(1)
    if seen == 0:
        raise CalibrationError(EMPTY_LOADER)
    return seen


def _batch_failure(index: int, inputs: Sequence[torch.Tensor], e: Exception) -> str:
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    text = f"calibration batch {index} (input shapes {shapes}) failed: {type(e).__name__}: {e}"
    if "Expected more than 1 value per channel" in str(e):
        text += (
            "\nCalibration runs batch normalization with batch statistics (as in training), which "
            "needs at least 2 samples per batch where a feature map is 1x1 (e.g. ASPP image pooling). "
            "Use a batch size of at least 2."
        )
    return text


def merge_across_ranks(observers: Sequence[ScaleObserver]) -> None:
    """Replace each observer's statistics with those of all ranks together.

    Does nothing unless ``torch.distributed`` is initialized with more than one
    rank. One ``all_gather`` carries every observer's (count, samples, mean, M2);
    the merge is associative, so every rank ends with the same numbers.
    """
    if not observers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    device = observers[0].mean.device
    local = torch.stack([
        torch.stack([torch.tensor(float(o.count), dtype=torch.float64, device=device),
                     torch.tensor(float(o.samples), dtype=torch.float64, device=device), o.mean, o.m2])
        for o in observers
    ])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    parts = torch.stack(gathered).cpu()
    for k, observer in enumerate(observers):
        observer.reset()
        for count, samples, mean, m2 in parts[:, k].tolist():
            observer.merge(int(count), torch.tensor(mean, dtype=torch.float64, device=device),
                           torch.tensor(m2, dtype=torch.float64, device=device))
            observer.samples += int(samples)
