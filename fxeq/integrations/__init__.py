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
  ``transformers.Trainer`` (``pip install 'fxeq[hf]'``);
* :class:`fxeq.integrations.lightning.ScaleEqualization`, for
  ``lightning.pytorch.Trainer`` (``pip install 'fxeq[lightning]'``).

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

import contextlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..calibration import InputFn, check_arguments
from ..capturing import Frontend, unwrap
from ..errors import AlreadyEqualizedError
from ..modes import MODES, Mode
from ..pipeline import transform
from ..report import Report
from ..rewrite import check_not_equalized

__all__: list[str] = []

_logger = logging.getLogger(__name__)

REPORT_NAME = "model.fxeq.json"
"""The report's file name in the training output folder."""


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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if keep_norm and mode != "init":
        raise ValueError(f"keep_norm applies to mode='init' only, got mode={mode!r}")


def _equalize(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    resumed_at: int,
    num_batches: int | None,
    input_fn: InputFn | None,
    mode: Mode,
    keep_norm: bool,
    frontend: Frontend,
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


def _plain(report: Report) -> dict[str, Any]:
    """The report as plain JSON types (``torch.__version__`` is a str subclass that torch.load refuses)."""
    result: dict[str, Any] = json.loads(json.dumps(report.to_dict()))
    return result


def _write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
