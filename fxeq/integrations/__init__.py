"""Equalize where training happens: callbacks for the Hugging Face Trainer and Lightning.

The paper applies the equalizer once, after the decoder's initialization and
before the first optimizer step. These callbacks do exactly that inside a
training framework, on the trainer's own training batches::

    trainer.train() / trainer.fit()
      ├── model, optimizer, DDP wrapper created
      ├── on_train_begin / on_train_start ── fxeq.transform(model, first batches, inplace=True)
      │                                      statistics → the framework's loggers, at step 0
      │                                      report → output folder, fxeq.json (atomic)
      │                                      one summary line on the console
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
equalized is left as it is, with a log line saying why. Weights loaded without
a trace of fxeq (a Hub id, ``load_from_checkpoint``) cannot be told from fresh
ones: they are equalized, with a warning where there is reason to suspect
that they already were. Calibration leaves no trace in the run: the global
random state is restored, so the training batches come in the same order as
without the callback.

This package imports neither ``transformers`` nor ``lightning``: only its two
modules do, when imported.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from .._model import unwrap
from .._text import plural
from ..batches import InputFn, check_arguments
from ..capturing import FrontendChoice
from ..errors import AlreadyEqualizedError
from ..modes import Mode, check_mode
from ..pipeline import transform
from ..report import Report
from ..rewrite import check_not_equalized

__all__ = ["left_alone", "lightning_checkpoint_report", "scalars", "summary"]

_logger = logging.getLogger(__name__)

_LIGHTNING_STATE = "ScaleEqualization"
"""The Lightning callback's state key in a checkpoint's ``"callbacks"`` (its class name)."""


@contextlib.contextmanager
def _requires(module: str, framework: str, extra: str) -> Iterator[None]:
    """Turn the ImportError of an optional training framework into one that names the extra to install."""
    try:
        yield
    except ImportError as e:
        raise ImportError(f"{module} needs {framework}; install it with: pip install -e '.[{extra}]'") from e


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
    doubt: str | None = None,
    main: bool = True,
) -> Report | None:
    """Equalize ``model`` in place on the first batches of ``loader``; None when it must be left alone.

    ``doubt`` is a warning logged when the model is about to be equalized: a
    reason to suspect, which fxeq cannot confirm, that its weights already
    were. ``main``: this is the process that speaks (rank 0); when the model
    is left alone, it prints why, in one line. Every rank must call this with
    the same ``resumed_at`` and an equally equalized model, since calibration
    merges statistics across ranks.
    """
    if resumed_at > 0:
        left_alone(f"fxeq: training resumes at step {resumed_at}, so the weights come from a checkpoint: they were "
                   "equalized before step 0 of the original run, if at all; not equalizing again.", main)
        return None
    try:
        check_not_equalized(unwrap(model))
    except AlreadyEqualizedError as e:
        left_alone(f"fxeq: not equalizing again: {e}", main)
        return None
    if doubt is not None:
        _logger.warning("%s", doubt)
    with torch.random.fork_rng(devices=[]):
        deployed = transform(
            model, _FirstBatches(loader, num_batches), inplace=True, num_batches=num_batches, input_fn=input_fn,
            mode=mode, keep_norm=keep_norm, frontend=frontend, all_concats=all_concats, progress=progress,
        )
    report = cast(Report, deployed.fxeq_report)
    # The console gets one summary line (see summary()); the whole table is in the report file.
    _logger.debug("fxeq: equalized the model before the first optimizer step\n%s", report.table())
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
        name = f"fxeq/{_site_label(site.convs[0].module)}"
        ratio = report.disequilibrium(site)
        if ratio is not None:
            values[f"{name}/std_max_over_min"] = ratio
        for inp in site.inputs:
            stat = report.stats.get((site.name, inp.index))
            if stat is not None:
                values[f"{name}/input_{inp.index}_std"] = stat.std
    return values


def summary(report: Report, where: str | os.PathLike[str] | None) -> str:
    """The one line a callback prints: how many sites, how long, the largest std ratio divided out, the report.

    Example:
        >>> from fxeq.observe import InputStats
        >>> from fxeq.report import CalibrationSummary
        >>> from fxeq.sites import FusingConv, Site, SiteInput, SiteSearch
        >>> site = Site("cat", (SiteInput(0, "a", (0, 1), "a"), SiteInput(1, "b", (1, 2), "b")),
        ...             (FusingConv("c", "head.fuse", "head.fuse.weight", None, 1, False, False),))
        >>> stats = {("cat", 0): InputStats(0.0, 0.5, 8, 2), ("cat", 1): InputStats(0.0, 0.25, 8, 2)}
        >>> report = Report(SiteSearch((site,), ()), "fx", stats, calibration=CalibrationSummary(1, 2, 0.31))
        >>> summary(report, "run/fxeq.json")
        'fxeq: equalized 1 fusion site in 0.3 s before the first optimizer step (mode init); largest/smallest input \
std before: 2.00 (head.fuse); report: run/fxeq.json'
        >>> summary(Report(SiteSearch((), ()), "fx"), None)
        'fxeq: found no fusion site; the model is trained as it is'
    """
    sites = report.search.sites
    if not sites:
        return "fxeq: found no fusion site; the model is trained as it is"
    took = f" in {report.calibration.seconds:.1f} s" if report.calibration is not None else ""
    ratios = [(r, _site_label(s.convs[0].module)) for s in sites if (r := report.disequilibrium(s)) is not None]
    largest = max(ratios, default=None)
    worst = f"; largest/smallest input std before: {largest[0]:.2f} ({largest[1]})" if largest is not None else ""
    at = f"; report: {where}" if where is not None else ""
    return (f"fxeq: equalized {plural(len(sites), 'fusion site')}{took} before the first optimizer step "
            f"(mode {report.mode}){worst}{at}")


def left_alone(line: str, main: bool = True) -> None:
    """Say, in one line on the console (rank 0) and in the log, why the callback leaves the model alone."""
    _logger.info("%s", line)
    if main:
        _print_line(line)


def _print_line(line: str) -> None:
    """Print the callback's one line above any progress bar (the trainer's own is already drawn)."""
    tqdm.write(line)
    sys.stdout.flush()


def lightning_checkpoint_report(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """fxeq's report, if a loaded Lightning checkpoint holds it (the ``ScaleEqualization`` callback's state).

    The callback stores its report in every checkpoint saved after it
    equalized the model; that is how such a checkpoint says it was equalized.

    Example:
        >>> lightning_checkpoint_report({"callbacks": {"ScaleEqualization": {"report": {"sites": []}}}})
        {'sites': []}
        >>> lightning_checkpoint_report({"state_dict": {}}) is None
        True
    """
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for key, state in callbacks.items():
        report = state.get("report") if isinstance(state, Mapping) else None
        if str(key).startswith(_LIGHTNING_STATE) and isinstance(report, Mapping) and isinstance(report.get("sites"),
                                                                                                 list):
            return dict(report)
    return None


def _site_label(module: str | None) -> str:
    return module or "model"
