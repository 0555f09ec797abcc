"""Scale equalization inside a Lightning ``Trainer.fit`` run (``pip install -e '.[lightning]'``).

:class:`ScaleEqualization` equalizes the LightningModule (or one of its
submodules) at ``on_train_start``: after the strategy has built the optimizers
and wrapped the model (DDP), after a resumed checkpoint has been restored,
and before the first optimizer step. It calibrates on the first
``num_batches`` batches of the trainer's own train dataloader
(``trainer.train_dataloader``: the datamodule's, the module's or the one
passed to ``fit``, with Lightning's ``DistributedSampler`` under DDP), so each
rank calibrates on its own shard and the merged statistics give every rank
the same weights.

Why not ``on_fit_start``: Lightning builds the train dataloader only after
that hook, and restores a resumed run's global step after it too, so there
the loader would be neither sharded nor the one training uses.

Example:
    >>> import tempfile
    >>> import torch, torch.nn.functional as F
    >>> import lightning.pytorch as pl
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> class Seg(pl.LightningModule):  # two branches, one upsampled, fused by a conv
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.fuse = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)
    ...         return self.fuse(torch.cat([self.a(x), b], 1))
    ...     def training_step(self, batch, batch_idx):
    ...         return F.cross_entropy(self(batch[0]), batch[1])
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8, 8, 8)))
    >>> equalize = ScaleEqualization(num_batches=2)
    >>> trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False,
    ...                      default_root_dir=tempfile.mkdtemp(), callbacks=[equalize])
    >>> trainer.fit(Seg(), DataLoader(data, batch_size=4))  # doctest: +ELLIPSIS
    fxeq: equalized 1 fusion site in ... s before the first optimizer step (mode init); largest/smallest input std ...
    >>> [c.weight for s in equalize.report.search.sites for c in s.convs]
    ['fuse.weight']
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .._model import resolve_owner
from ..batches import InputFn
from ..capturing import FrontendChoice
from ..errors import CaptureError
from ..modes import Mode
from ..report import FOLDER_REPORT, Report, write_report
from ..rewrite import mark_folded
from . import (
    _check_options, _equalize, _print_line, _requires, left_alone, lightning_checkpoint_report, scalars, summary,
)

with _requires(__name__, "Lightning (lightning.pytorch)", "lightning"):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

__all__ = ["ScaleEqualization", "mark_if_equalized"]

_logger = logging.getLogger(__name__)

_SHARDED = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)


class ScaleEqualization(pl.Callback):
    """Equalize the model's fusion sites before the first optimizer step of ``Trainer.fit``.

    At ``on_train_start`` the callback runs ``fxeq.transform(module, batches,
    inplace=True)`` on the first ``num_batches`` batches of
    ``trainer.train_dataloader``. The rewrite is in place, so the optimizers
    the strategy already built hold the equalized parameters. Global rank 0
    prints one summary line. The report is kept at :attr:`report`, stored in
    every checkpoint (the callback's state, which ``fxeq convert`` reads to
    refuse equalizing such a checkpoint again) and written atomically by
    global rank 0 to ``fxeq.json`` in the checkpoint folder (the
    ``ModelCheckpoint``'s ``dirpath``, else ``trainer.default_root_dir``).
    Each site's input std ratio and input stds go to every logger of the
    trainer (``logger.log_metrics``, at step 0: CSV, TensorBoard, W&B...), as
    ``fxeq/<fusing conv>/std_max_over_min`` and ``.../input_<i>_std``.

    Nothing is done when training resumes from a checkpoint (global step
    above 0, or a checkpoint holding this callback's report) or when fxeq
    already equalized the model (``fit`` called twice, or a module whose
    ``on_load_checkpoint`` calls :func:`mark_if_equalized`); a log line says
    so. A module that ``load_from_checkpoint`` built from an equalized
    checkpoint carries no other trace: fxeq cannot tell it from a fresh one
    and equalizes it again, with a warning where an earlier run's report
    lies where this run's goes.

    Args:
        num_batches: calibrate on at most this many batches per pass; None for
            a whole epoch. Default: 32.
        calib_loader: calibrate on these batches instead of the trainer's
            train dataloader. Default: None.
        input_fn: maps a batch to the model's input; by default a tuple batch
            gives its first element and a dict batch the keyword arguments
            ``forward`` takes, minus ``labels``/``target``.
        submodule: equalize ``pl_module.get_submodule(submodule)`` (e.g.
            ``"net"``) instead of the LightningModule itself, when its
            ``forward`` is not the network's. Default: None.
        mode: ``"init"`` (the paper), ``"reparam"`` or ``"explicit"``; see
            :mod:`fxeq.modes`. Default: ``"init"``.
        keep_norm: with ``"init"``, keep per-output-channel weight norms where
            a batch norm follows. Default: False.
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        all_concats: also equalize concatenations without upsampled inputs.
            Default: False.
        report_path: where to write the JSON report. Default: None
            (``fxeq.json`` in the checkpoint folder).

    Attributes:
        report: the :class:`~fxeq.report.Report` of this run, or None when
            nothing was done.

    Raises:
        ValueError: (when built) bad ``num_batches``, ``mode`` or ``keep_norm``;
            (at ``on_train_start``) DeepSpeed, FSDP or model-parallel training,
            an unknown ``submodule``, or several train dataloaders.
    """

    def __init__(
        self,
        num_batches: int | None = 32,
        *,
        calib_loader: Iterable[Any] | None = None,
        input_fn: InputFn | None = None,
        submodule: str | None = None,
        mode: Mode = "init",
        keep_norm: bool = False,
        frontend: FrontendChoice = "auto",
        all_concats: bool = False,
        report_path: str | Path | None = None,
    ) -> None:
        _check_options(num_batches, mode, keep_norm)
        self.num_batches = num_batches
        self.calib_loader = calib_loader
        self.input_fn = input_fn
        self.submodule = submodule
        self.mode: Mode = mode
        self.keep_norm = keep_norm
        self.frontend: FrontendChoice = frontend
        self.all_concats = all_concats
        self.report_path = report_path
        self.report: Report | None = None
        self._saved: dict[str, Any] | None = None  # the report as written, kept in checkpoints
        self._restored = False  # whether _saved came from the checkpoint being resumed

    # ------------------------------------------------------------------
    # Hooks
    # ------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Equalize the module on the first batches of the train dataloader (see the class docstring)."""
        _refuse_sharded_training(trainer.strategy)
        model = self._model(pl_module)
        loader = self.calib_loader if self.calib_loader is not None else _train_loader(trainer)
        resumed_at = trainer.global_step
        restored, self._restored = self._restored, False
        if restored and resumed_at == 0:
            left_alone("fxeq: the checkpoint being resumed records fxeq's report; not equalizing again.",
                       trainer.is_global_zero)
            return
        path = self._report_file(trainer)
        try:
            report = _equalize(
                model, loader, resumed_at=resumed_at, num_batches=self.num_batches, input_fn=self.input_fn,
                mode=self.mode, keep_norm=self.keep_norm, frontend=self.frontend, all_concats=self.all_concats,
                progress=None if trainer.is_global_zero else False,
                doubt=_earlier_report(path) if trainer.is_global_zero else None, main=trainer.is_global_zero,
            )
        except CaptureError as e:
            if self.submodule is not None:
                raise
            raise CaptureError(
                f"{e}\nScaleEqualization captures {type(pl_module).__name__}.forward on a training batch. If the "
                "segmentation network is a submodule whose forward differs, pass its name: "
                "ScaleEqualization(submodule='net'); to map batches to its input, pass input_fn.",
                stage=e.stage, failures=e.failures,
            ) from e
        if report is None:
            return
        self.report = report
        report.extra["trainer"] = {
            "framework": "lightning", "global_step": trainer.global_step, "num_batches": self.num_batches,
            "world_size": trainer.world_size, "submodule": self.submodule,
        }
        self._saved = report.to_dict()
        values = scalars(report)
        for logger in getattr(trainer, "loggers", ()):  # CSV, TensorBoard, W&B...: rank zero only, by Lightning's rule
            logger.log_metrics(values, step=trainer.global_step)
        if trainer.is_global_zero:
            if path is not None:
                write_report(self._saved, path)
            where = path if path is not None else (
                f"in the checkpoints only (callback state {self.state_key!r}): the checkpoint folder "
                f"{self._checkpoint_folder(trainer)} is not a local path")
            _print_line(summary(report, where))

    def state_dict(self) -> dict[str, Any]:
        """The report, saved in every checkpoint (so that a resumed run is not equalized again)."""
        return {} if self._saved is None else {"report": self._saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the report of the run being resumed."""
        self._saved = state_dict.get("report")
        self._restored = self._saved is not None

    # ------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError as e:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(
                f"ScaleEqualization(submodule={self.submodule!r}): {type(pl_module).__name__} has no such "
                f"submodule; expected a module path such as one of {children}."
            ) from e

    def _report_file(self, trainer: pl.Trainer) -> Path | None:
        if self.report_path is not None:
            return Path(self.report_path)
        folder = self._checkpoint_folder(trainer)
        return None if "://" in folder else Path(folder) / FOLDER_REPORT

    @staticmethod
    def _checkpoint_folder(trainer: pl.Trainer) -> str:
        return str(getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir)


def mark_if_equalized(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Mark ``module`` as equalized if ``checkpoint`` holds :class:`ScaleEqualization`'s report.

    Call it from your LightningModule's ``on_load_checkpoint``. A module that
    ``load_from_checkpoint`` rebuilt from an equalized checkpoint carries no
    trace of fxeq in its weights, so a later ``fit`` without ``ckpt_path``
    would equalize it again; but Lightning first passes the whole checkpoint,
    callback states included, to the module's ``on_load_checkpoint``. This
    function finds the callback's report there and marks the fusing convs it
    names as fxeq marks the convs it equalizes: the callback then leaves the
    module alone, and ``fxeq.transform`` refuses it, as for a model equalized
    in this process.

    Args:
        module: the LightningModule being loaded (where the callback had
            ``submodule=``, the report's names are looked up in that
            submodule of it).
        checkpoint: the checkpoint dict ``on_load_checkpoint`` receives.

    Returns:
        Whether the checkpoint holds the report (and the module was marked).

    Raises:
        ValueError: the module has no conv at a path the report names.

    Example:
        >>> import torch, fxeq
        >>> from fxeq._examples import Fuse  # x ── a ──┐;  x ── pool ── b ── interpolate ──┴─ cat ── fuse
        >>> x = torch.randn(2, 3, 8, 8)
        >>> checkpoint = {"callbacks": {"ScaleEqualization": {"report": fxeq.find(Fuse(), x).to_dict()}}}
        >>> net = Fuse()
        >>> mark_if_equalized(net, checkpoint)   # in Seg.on_load_checkpoint: mark_if_equalized(self, checkpoint)
        True
        >>> fxeq.transform(net, [x])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxeq.errors.AlreadyEqualizedError: conv fuse was already equalized by fxeq ...
    """
    found = lightning_checkpoint_report(checkpoint)
    if found is None:
        return False
    report = Report.from_dict(found)
    trainer = report.extra.get("trainer")
    submodule = trainer.get("submodule") if isinstance(trainer, Mapping) else None
    prefix = f"{submodule}." if submodule else ""
    weights = {prefix + conv.weight: site.name for site in report.search.sites for conv in site.convs}
    missing = [prefix + conv.module for site in report.search.sites for conv in site.convs
               if resolve_owner(module, prefix + conv.weight)[0] is None]
    if missing:
        raise ValueError(
            f"the checkpoint holds fxeq's report for fusing convs that {type(module).__name__} lacks: "
            f"{', '.join(missing)}; expected the module the checkpoint was saved from. Call "
            "mark_if_equalized(self, checkpoint) from that LightningModule's on_load_checkpoint."
        )
    mark_folded([module], weights)
    return True


def _train_loader(trainer: pl.Trainer) -> Iterable[Any]:
    loader: Iterable[Any] | None = trainer.train_dataloader
    if loader is None:
        raise ValueError(
            "ScaleEqualization found no train dataloader on the trainer at on_train_start; expected Trainer.fit "
            "to have built it. Pass the batches yourself: ScaleEqualization(calib_loader=...)."
        )
    if isinstance(loader, (Mapping, list, tuple)):
        raise ValueError(
            f"ScaleEqualization found {len(loader)} train dataloaders; it calibrates on one. Pass the one "
            "that feeds the segmentation network: ScaleEqualization(calib_loader=...)."
        )
    return loader


def _earlier_report(path: Path | None) -> str | None:
    """A warning when the report file of an earlier equalization lies where this run's goes."""
    if path is None or not path.is_file():
        return None
    return (
        f"fxeq: {path} holds the report of an earlier equalization, and fxeq cannot tell from the weights alone "
        "whether this module's were already equalized: a module that load_from_checkpoint built from an "
        "equalized checkpoint carries no mark. Equalizing it now and replacing that report. If its weights "
        "come from such a checkpoint, resume that run with trainer.fit(..., ckpt_path=...) instead, or call "
        "fxeq.integrations.lightning.mark_if_equalized(self, checkpoint) in the module's on_load_checkpoint."
    )


def _refuse_sharded_training(strategy: object) -> None:
    """DeepSpeed, FSDP and model parallelism keep copies or shards of the weights: an in-place rewrite is lost."""
    if isinstance(strategy, _SHARDED):
        raise ValueError(
            f"ScaleEqualization does not support {type(strategy).__name__}: the optimizer holds its own copy or "
            "shards of the weights, so rewriting the module's parameters at on_train_start would be lost or "
            "fail. Equalize before Trainer.fit instead: fxeq.transform(model, loader, inplace=True) with the "
            "same batches on every rank (or `fxeq convert` a checkpoint)."
        )
