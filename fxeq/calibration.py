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

import functools
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._model import calibration_mode, model_device_and_dtype
from .batches import EMPTY_LOADER, CalibrationData, InputFn, batch_inputs, check_arguments
from .errors import CalibrationError
from .fold import fold_site
from .observe import InputStats, SiteObservers, merge_across_ranks
from .report import CalibrationSummary
from .sites import SiteSearch

__all__ = ["Calibration", "calibrate_sites"]


@dataclass(frozen=True)
class Calibration:
    """What a calibration run measured and computed.

    Attributes:
        stats: per (site name, input index), the statistics folded into the convs.
        parameters: per parameter name, the folded tensor (not yet written).
        summary: passes, batches and time, as the report records them.
    """

    stats: dict[tuple[str, int], InputStats]
    parameters: dict[str, torch.Tensor]
    summary: CalibrationSummary


# ---------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------


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
                    num_batches=num_batches, length=data.length(), device=device, dtype=dtype, progress=progress,
                    number=number, total=len(generations),
                )
            # every rank joins, even one without data; the count becomes all ranks' batches
            seen = merge_across_ranks(list(observers.observers.values()), seen)
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
    return Calibration(stats, folded, CalibrationSummary(len(generations), batches, time.perf_counter() - start,
                                                         one_pass, tuple(pass_seconds)))


def _forward_with(model: nn.Module, parameters: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` computed with some parameters swapped for other tensors.

    ``tie_weights=False``: with a module registered under two names (MONAI's
    DynUNet), torch's tie handling restores a plain tensor in place of the
    parameter. The swapped parameters are fusing convs', which are tied to no
    other module (tied sites are skipped), so nothing needs tying.
    """
    return torch.func.functional_call(model, parameters, args, kwargs, strict=False, tie_weights=False)


def _run_pass(
    forward: Callable[..., Any],
    observers: SiteObservers,
    loader: Iterable[Any],
    *,
    model: nn.Module,
    input_fn: InputFn | None,
    num_batches: int | None,
    length: int | None,
    device: torch.device | None,
    dtype: torch.dtype | None,
    progress: bool | None,
    number: int,
    total: int,
) -> int:
    """Run the batches of pass ``number`` of ``total``; return how many ran (0 is for the caller to judge:
    under torch.distributed another rank may have had the data)."""
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
