"""Calibrate: measure every site input in the user's eager model, and fold site by site.

fxeq calibrates the model itself, not a graph: a graph is only needed to
*find* the sites. :class:`~fxeq.observe.SiteObservers` hooks each fusing conv
module and observes the slices of the tensor it actually receives, so user
hooks, buffers, dynamic shapes and the normalization semantics behave as in
the user's own training. Semantics, as the paper measures them:

* normalization layers (batch norm and tracked instance norm) normalize with
  the statistics of each batch, as in training;
* every other module is in eval mode, so dropout and stochastic depth
  (timm / Hugging Face ``DropPath``, which draw masks whenever ``training``
  is true) are off;
* no gradients; floating inputs go to the model's device and dtype;
* every buffer (running statistics, a user's counters) and every training
  flag is restored afterwards: calibration leaves no trace in the model.

**Chained sites, one at a time.** A site downstream of another site's fusing
conv sees a different input once the upstream conv is folded, even through
a batch norm: normalization fixes each channel's mean and variance, not the
distribution's shape that the ReLU and upsampling after it see (one-pass
statistics left smp UPerNet's fusion inputs at up to 1.09x of each other;
``benchmarks/variance.py``). So sites are
measured in topological generations of the site-dependency graph, one pass
over the data per generation, each with every upstream fold in place. The
folded tensors are swapped in with :func:`torch.func.functional_call`; the
model's own parameters are written only after everything has succeeded
(:mod:`fxeq.rewrite`). ``one_pass=True`` is the shortcut: every site in one
pass on the unfolded model, exact for sites that depend on no other site and
approximate downstream. Each forward stops at the last fusing conv it needs.

**The data.** A loader is read so that every batch counts once per pass:
the first batch, which :func:`fxeq.transform` also uses to capture the
model, is not lost with a one-shot iterator. Several passes need a loader
that can be iterated again (a list, a DataLoader); a one-shot one is refused
before any work when more than one pass is needed.

Statistics stay on the device in float64, with no host synchronization per
batch. When ``torch.distributed`` is initialized, each pass's statistics are
merged across ranks (the count/mean/M2 merge is associative), so every rank
folds the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .capturing import Inputs, preserved_state
from .errors import CalibrationError
from .observe import ScaleObserver, SiteObservers
from .rewrite import fold_site
from .sites import SiteSearch

__all__ = [
    "Calibration", "CalibrationData", "InputFn", "InputStats", "batch_inputs", "calibrate_sites",
    "calibration_mode", "check_arguments", "merge_across_ranks", "model_device_and_dtype",
]

InputFn = Callable[[Any], Any]
"""Maps a batch to the model's input: a Tensor, a tuple (positional) or a dict (keyword arguments)."""

_TARGET_KEYS = frozenset({"labels", "label", "target", "targets"})

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


@dataclass(frozen=True)
class Calibration:
    """What a calibration run measured and computed.

    Attributes:
        stats: per (site name, input index), the statistics folded into the convs.
        parameters: per parameter name, the folded tensor (not yet written).
        passes: passes over the data.
        batches: batches run, over all passes.
        seconds: wall time of all passes.
        one_pass: whether the one-pass shortcut was used (downstream sites approximate).
        pass_seconds: wall time of each pass.
    """

    stats: dict[tuple[str, int], InputStats]
    parameters: dict[str, torch.Tensor]
    passes: int
    batches: int
    seconds: float
    one_pass: bool = False
    pass_seconds: tuple[float, ...] = ()


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the model's first floating parameter (None, None without one)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return None, None


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


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

    def epoch(self, number: int, total: int) -> Iterator[Any]:
        """The batches of pass ``number`` (1-based) of ``total``."""
        if number == 1 and (self._head or self._iterator is not None):
            head, self._head = self._head, []
            return itertools.chain(head, self._iterator or iter(()))
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


# ---------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode except normalization layers, which use batch statistics; all state restored on exit.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3))
        >>> with calibration_mode(net):
        ...     [m.training for m in net]
        [False, True]
        >>> net.training, net[1].num_batches_tracked.item()
        (True, 0)
    """
    with preserved_state(model):
        model.eval()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.train()
        yield model


def calibrate_sites(
    model: nn.Module,
    search: SiteSearch,
    data: CalibrationData,
    *,
    num_batches: int | None = None,
    input_fn: InputFn | None = None,
    progress: bool | None = None,
    min_std: float = 1e-6,
    one_pass: bool = False,
) -> Calibration:
    """Measure every site of ``search`` in ``model`` and compute the folded parameters.

    Args:
        model: the eager model the sites were found in (nothing is written to it).
        search: the sites.
        data: the calibration batches.
        num_batches: at most this many batches per pass. Default: all.
        input_fn: see :func:`batch_inputs`.
        progress: a progress bar; None shows one when stderr is a terminal.
        min_std: smallest accepted input std. Default: 1e-6.
        one_pass: the single-pass shortcut (see the module docstring). Default: False.

    Returns:
        A :class:`Calibration`.

    Raises:
        CalibrationError: empty or one-shot loader, a failing batch, a conv
            that never ran, or statistics that cannot be folded.
    """
    check_arguments(num_batches=num_batches, min_std=min_std)
    generations = [search.sites] if one_pass else search.generations()
    data.check_passes(len(generations))
    device, dtype = model_device_and_dtype(model)
    current = {
        name: model.get_parameter(name).detach()
        for site in search.sites for conv in site.convs for name in (conv.weight, conv.bias) if name is not None
    }
    folded: dict[str, torch.Tensor] = {}
    stats: dict[tuple[str, int], InputStats] = {}
    batches, start, pass_seconds = 0, time.perf_counter(), []
    with calibration_mode(model), torch.no_grad():
        for number, generation in enumerate(generations, 1):
            forward = functools.partial(_forward_with, model, dict(folded)) if folded else model
            pass_start = time.perf_counter()
            with SiteObservers(model, generation) as observers:
                seen = _run_pass(
                    forward, observers, data.epoch(number, len(generations)), model=model, input_fn=input_fn,
                    num_batches=num_batches, device=device, dtype=dtype, progress=progress,
                    number=number, total=len(generations),
                )
            merge_across_ranks(list(observers.observers.values()))  # every rank joins, even one without data
            pass_seconds.append(time.perf_counter() - pass_start)
            if seen == 0 and not any(o.count for o in observers.observers.values()):
                raise CalibrationError(EMPTY_LOADER if number == 1 else (
                    f"the calibration loader yielded no batches on pass {number} of {len(generations)}, after "
                    "batches on pass 1: it was exhausted by the first pass. Chained sites need one pass per "
                    "generation; pass a list of batches or a re-iterable DataLoader, or one_pass=True."
                ))
            batches += seen
            for site in generation:
                site_stats = {i.index: InputStats.of(observers.observers[site.name, i.index]) for i in site.inputs}
                if any(s.count == 0 for s in site_stats.values()):
                    raise CalibrationError(
                        f"site {site.name!r}: its conv {site.convs[0].module} never ran during calibration "
                        f"pass {number}, so nothing was measured; expected every batch to reach it. Check that the "
                        "calibration batches take the same path through the model as the capture batch."
                    )
                stats.update({(site.name, k): v for k, v in site_stats.items()})
                new = fold_site(site, {k: v.mean for k, v in site_stats.items()},
                                {k: v.std for k, v in site_stats.items()}, current, min_std=min_std)
                current.update(new)
                folded.update(new)
    return Calibration(stats, folded, len(generations), batches, time.perf_counter() - start, one_pass,
                       tuple(pass_seconds))


def _forward_with(model: nn.Module, parameters: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` computed with some parameters swapped for other tensors."""
    return torch.func.functional_call(model, parameters, args, kwargs, strict=False)


def _run_pass(
    forward: Callable[..., Any],
    observers: SiteObservers,
    loader: Iterable[Any],
    *,
    model: nn.Module,
    input_fn: InputFn | None,
    num_batches: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    progress: bool | None,
    number: int,
    total: int,
) -> int:
    """Run the batches of pass ``number`` of ``total``; return how many ran (0 is for the caller to judge:
    under torch.distributed another rank may have had the data)."""
    length: int | None = None
    with contextlib.suppress(TypeError):
        length = len(loader)  # type: ignore[arg-type]
    if num_batches is not None:
        length = num_batches if length is None else min(length, num_batches)
    desc = "fxeq calibration" + (f" {number}/{total}" if total > 1 else "")
    seen = 0
    with tqdm(total=length, desc=desc, disable=None if progress is None else not progress, unit="batch") as bar:
        for batch in itertools.islice(loader, num_batches):
            args, kwargs = batch_inputs(batch, input_fn, model=model, device=device, dtype=dtype)
            try:
                observers.run(forward, args, kwargs)
            except CalibrationError:
                raise
            except Exception as e:
                raise CalibrationError(_batch_failure(seen, args, kwargs, e)) from e
            seen += 1
            bar.update(1)
    return seen


def _batch_failure(index: int, args: Sequence[Any], kwargs: Mapping[str, Any], e: Exception) -> str:
    shapes = ", ".join(
        f"{k}{'=' if k else ''}{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
        for k, v in [*(("", a) for a in args), *kwargs.items()]
    )
    text = f"calibration batch {index} (inputs {shapes}) failed: {type(e).__name__}: {e}"
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
