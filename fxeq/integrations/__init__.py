"""Equalize where training happens: callbacks for the Hugging Face Trainer and Lightning.

The paper applies the equalizer once, after the decoder's initialization and
before the first optimizer step. These callbacks do exactly that inside a
training framework, on the trainer's own training batches::

    trainer.train() / trainer.fit()
      ├── model, optimizer, DDP wrapper created
      ├── on_train_begin / on_train_start ── fxeq.transform(model, first batches, inplace=True)
      │                                      report → output folder (JSON, atomic)
      └── step 0 ...                         (the optimizer holds the same, rewritten parameters)

* :class:`fxeq.integrations.transformers.ScaleEqualizationCallback`, for
  ``transformers.Trainer`` (``pip install -e '.[hf]'``);
* :class:`fxeq.integrations.lightning.ScaleEqualization`, for
  ``lightning.pytorch.Trainer`` (``pip install -e '.[lightning]'``).

Both rewrite the model's parameters in place, so the optimizer, which was
created before, keeps its parameter objects. Under DDP every rank calibrates
on its own shard of the data and the statistics are merged across ranks
(:func:`fxeq.calibration.merge_across_ranks`), so every rank writes bitwise
the same weights. A resumed run (global step above 0) or a model fxeq already
equalized is left as it is, with a log line saying why. Calibration leaves no
trace in the run: the global random state is restored, so the training batches
come in the same order as without the callback.

This package imports neither ``transformers`` nor ``lightning``: only its two
modules do, when imported.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .._model import unwrap
from .._text import plural
from ..batches import InputFn, check_arguments
from ..capturing import FrontendChoice
from ..errors import AlreadyEqualizedError
from ..modes import Mode, check_mode
from ..pipeline import transform
from ..report import Report
from ..rewrite import check_not_equalized

__all__: list[str] = []

_logger = logging.getLogger(__name__)



class _FirstBatches:
    """The first ``count`` batches of a loader, the same ones on every pass.

    A shuffling loader draws its order from the global random state when it
    is iterated; restoring that state before each pass makes the passes of
    chained sites see the same batches, and the trainer's own epoch is not
    reordered (the caller restores the state afterwards).
    """

    def __init__(self, loader: Iterable[Any], count: int | None) -> None:
        self.loader = loader
        self.count = count
        self._state = torch.random.get_rng_state()

    def __iter__(self) -> Iterator[Any]:
        # A generator: the state is restored when the pass starts, not when its iterator is made.
        torch.random.set_rng_state(self._state)
        yield from itertools.islice(self.loader, self.count)

    def __len__(self) -> int:
        if not isinstance(self.loader, Sized):
            raise TypeError(f"{type(self.loader).__name__} has no len()")
        length = len(self.loader)
        return length if self.count is None else min(length, self.count)


def _check_options(num_batches: int | None, mode: str, keep_norm: bool) -> None:
    """Refuse bad callback arguments when the callback is built, not at the start of training."""
    check_arguments(num_batches=num_batches)
    check_mode(mode, keep_norm)


def _equalize(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    resumed_at: int,
    num_batches: int | None,
    input_fn: InputFn | None,
    mode: Mode,
    keep_norm: bool,
    frontend: FrontendChoice,
    all_concats: bool,
    progress: bool | None,
) -> Report | None:
    """Equalize ``model`` in place on the first batches of ``loader``; None when it must be left alone.

    Every rank must call this with the same ``resumed_at`` and an equally
    equalized model, since calibration merges statistics across ranks.
    """
    if resumed_at > 0:
        _logger.info(
            "fxeq: training resumes at step %d, so the weights come from a checkpoint: they were equalized "
            "before step 0 of the original run, if at all; not equalizing again.", resumed_at,
        )
        return None
    try:
        check_not_equalized(unwrap(model))
    except AlreadyEqualizedError as e:
        _logger.info("fxeq: not equalizing again: %s", e)
        return None
    with torch.random.fork_rng(devices=[]):
        deployed = transform(
            model, _FirstBatches(loader, num_batches), inplace=True, num_batches=num_batches, input_fn=input_fn,
            mode=mode, keep_norm=keep_norm, frontend=frontend, all_concats=all_concats, progress=progress,
        )
    report = cast(Report, deployed.fxeq_report)
    _logger.info("fxeq: equalized the model before the first optimizer step\n%s", report.table())
    return report


def scalars(report: Report) -> dict[str, float]:
    """The statistics a training logger shows: per fusing conv, its inputs' std ratio and each input's std.

    Keys are ``fxeq/<fusing conv>/std_max_over_min`` and ``fxeq/<fusing conv>/input_<i>_std`` (the first fusing
    conv of each site names it).

    Example:
        >>> from fxeq.observe import InputStats
        >>> from fxeq.sites import FusingConv, Site, SiteInput, SiteSearch
        >>> site = Site("cat", (SiteInput(0, "a", (0, 1), "a"), SiteInput(1, "b", (1, 2), "b")),
        ...             (FusingConv("c", "head.fuse", "head.fuse.weight", None, 1, False, False),))
        >>> stats = {("cat", 0): InputStats(0.0, 0.5, 8, 2), ("cat", 1): InputStats(0.0, 0.25, 8, 2)}
        >>> scalars(Report(SiteSearch((site,), ()), "fx", stats))
        {'fxeq/head.fuse/std_max_over_min': 2.0, 'fxeq/head.fuse/input_0_std': 0.5, 'fxeq/head.fuse/input_1_std': 0.25}
    """
    values: dict[str, float] = {}
    for site in report.search.sites:
        name = f"fxeq/{site.convs[0].module or 'model'}"
        ratio = report.disequilibrium(site)
        if ratio is not None:
            values[f"{name}/std_max_over_min"] = ratio
        for inp in site.inputs:
            stat = report.stats.get((site.name, inp.index))
            if stat is not None:
                values[f"{name}/input_{inp.index}_std"] = stat.std
    return values


def summary(report: Report, path: Path | None) -> str:
    """One line for the training log: what was equalized, the ratios divided out, and where the report is.

    Example:
        >>> from fxeq.sites import SiteSearch
        >>> summary(Report(SiteSearch((), ()), "fx"), None)
        'fxeq: found no fusion site; the model is trained as it is'
    """
    if not report.search.sites:
        return "fxeq: found no fusion site; the model is trained as it is"
    ratios = ", ".join(f"{s.convs[0].module} {r:.2f}" for s in report.search.sites
                       if (r := report.disequilibrium(s)) is not None)
    where = f"; report: {path}" if path is not None else ""
    return (f"fxeq: equalized {plural(len(report.search.sites), 'fusion site')} before the first optimizer step "
            f"(mode {report.mode}; input std max/min divided out: {ratios}){where}")
