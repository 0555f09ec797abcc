"""Scale equalization inside a Hugging Face ``Trainer`` run (``pip install -e '.[hf]'``).

:class:`ScaleEqualizationCallback` equalizes the model at ``on_train_begin``:
after the Trainer has built the optimizer and wrapped the model (DDP), before
the first optimizer step. It calibrates on the first ``num_batches`` batches of
the Trainer's own train dataloader (dict batches; ``labels`` are left out),
which the Trainer passes to every callback as ``train_dataloader``. Under DDP
that loader is sharded, so each rank calibrates on its own shard and the
merged statistics give every rank the same weights.

Example:
    >>> import tempfile
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> from transformers import Trainer, TrainingArguments
    >>> class Net(nn.Module):  # two branches, one upsampled, fused by a conv
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.fuse = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)
    ...     def forward(self, pixel_values, labels=None):
    ...         b = F.interpolate(self.b(F.avg_pool2d(pixel_values, 2)), scale_factor=2.0)
    ...         logits = self.fuse(torch.cat([self.a(pixel_values), b], 1))
    ...         return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels)}
    >>> data = [{"pixel_values": torch.randn(3, 8, 8), "labels": torch.randint(0, 2, (8, 8))} for _ in range(8)]
    >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=4,
    ...                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    >>> equalize = ScaleEqualizationCallback(num_batches=2)
    >>> _ = Trainer(model=Net(), args=args, train_dataset=data, callbacks=[equalize]).train()  # doctest: +ELLIPSIS
    {'fxeq/fuse/std_max_over_min': ..., 'fxeq/fuse/input_0_std': ..., 'fxeq/fuse/input_1_std': ...}
    fxeq: equalized 1 fusion site before the first optimizer step (mode init; input std max/min divided out: fuse ...
    {'train_runtime': ...}
    >>> [c.weight for s in equalize.report.search.sites for c in s.convs]
    ['fuse.weight']
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler
except ImportError as e:
    raise ImportError(
        "fxeq.integrations.transformers needs Hugging Face transformers (and accelerate, for its Trainer); "
        "install them with: pip install -e '.[hf]'"
    ) from e

from ..batches import InputFn
from ..capturing import FrontendChoice
from ..modes import Mode
from ..report import Report
from ..report import FOLDER_REPORT, converted_report, write_report
from . import _check_options, _equalize, scalars, summary

__all__ = ["ScaleEqualizationCallback"]

_logger = logging.getLogger(__name__)



class ScaleEqualizationCallback(TrainerCallback):
    """Equalize the model's fusion sites before the first optimizer step of ``Trainer.train()``.

    At ``on_train_begin`` the callback runs ``fxeq.transform(model, batches,
    inplace=True)`` on the first ``num_batches`` batches of the Trainer's train
    dataloader. The rewrite is in place, so the optimizer the Trainer already
    built holds the equalized parameters. The main process prints one summary
    line, and the report is kept at :attr:`report` and written atomically to
    ``<output_dir>/fxeq.json``; every checkpoint saved afterwards gets a copy
    (``checkpoint-N/fxeq.json``), which marks it as equalized: ``fxeq
    convert``, ``fxeq.transform`` on a model loaded from it and this callback
    then refuse to equalize it again. Each site's input std ratio and input stds
    go to the Trainer's log (``fxeq/<fusing conv>/...``, at step 0) like any
    logged value: TensorBoard, W&B and the other reporting integrations show
    them, and ``trainer_state.json`` keeps them.

    Nothing is done when training resumes from a checkpoint (its weights were
    equalized, if at all, before step 0 of the original run) or when fxeq
    already equalized the model (``train()`` called twice); a log line says so.

    Args:
        num_batches: calibrate on at most this many batches per pass; None for
            a whole epoch. Default: 32.
        calib_loader: calibrate on these batches instead of the Trainer's
            train dataloader (e.g. a DataLoader over a calibration subset;
            under DDP, each rank's shard). Default: None.
        input_fn: maps a batch to the model's input; by default a dict batch
            gives the keyword arguments ``forward`` takes, minus ``labels``.
        mode: ``"init"`` (the paper), ``"reparam"`` or ``"explicit"``; see
            :mod:`fxeq.modes`. Default: ``"init"``.
        keep_norm: with ``"init"``, keep per-output-channel weight norms where
            a batch norm follows. Default: False.
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"concrete"``. Default: ``"auto"``.
        all_concats: also equalize concatenations without upsampled inputs.
            Default: False.
        report_name: the report's file name in ``args.output_dir``.
            Default: ``"fxeq.json"``.

    Attributes:
        report: the :class:`~fxeq.report.Report` of this run, or None when
            nothing was done.

    Raises:
        ValueError: (when built) bad ``num_batches``, ``mode`` or ``keep_norm``;
            (at ``on_train_begin``) DeepSpeed or FSDP training, or no dataloader.
    """

    def __init__(
        self,
        num_batches: int | None = 32,
        *,
        calib_loader: Iterable[Any] | None = None,
        input_fn: InputFn | None = None,
        mode: Mode = "init",
        keep_norm: bool = False,
        frontend: FrontendChoice = "auto",
        all_concats: bool = False,
        report_name: str = FOLDER_REPORT,
    ) -> None:
        _check_options(num_batches, mode, keep_norm)
        self.num_batches = num_batches
        self.calib_loader = calib_loader
        self.input_fn = input_fn
        self.mode: Mode = mode
        self.keep_norm = keep_norm
        self.frontend: FrontendChoice = frontend
        self.all_concats = all_concats
        self.report_name = report_name
        self.report: Report | None = None
        self._saved: dict[str, Any] | None = None  # the report as written, copied into checkpoints

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        train_dataloader: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Equalize ``model`` on the first batches of ``train_dataloader`` (see the class docstring)."""
        _refuse_sharded_training(args)
        if model is None:
            raise ValueError(
                "ScaleEqualizationCallback.on_train_begin got no model; it must run inside Trainer.train()"
            )
        loader = self.calib_loader if self.calib_loader is not None else train_dataloader
        if loader is None:
            raise ValueError(
                "ScaleEqualizationCallback got no train_dataloader from the Trainer; expected the Trainer to pass "
                "it to every callback event. Pass the batches yourself: "
                "ScaleEqualizationCallback(calib_loader=trainer.get_train_dataloader())."
            )
        output_dir = Path(args.output_dir or ".")
        path = output_dir / self.report_name
        report = _equalize(
            model, loader, resumed_at=state.global_step, num_batches=self.num_batches, input_fn=self.input_fn,
            mode=self.mode, keep_norm=self.keep_norm, frontend=self.frontend, all_concats=self.all_concats,
            progress=None if state.is_world_process_zero and not args.disable_tqdm else False,
        )
        if report is None:
            earlier = path if path.exists() else converted_report(output_dir) if output_dir.is_dir() else None
            if state.global_step > 0 and earlier is not None:
                with contextlib.suppress(OSError, ValueError):  # then checkpoints get no copy, training goes on
                    self._saved = json.loads(earlier.read_text())
            elif state.global_step > 0 and state.is_world_process_zero:
                _logger.warning(
                    "fxeq: resuming at step %d but %s does not exist: the run being resumed may not have been "
                    "equalized. fxeq does not equalize in the middle of training.", state.global_step, path,
                )
            return
        self.report = report
        report.extra["trainer"] = {
            "framework": "transformers", "global_step": state.global_step, "num_batches": self.num_batches,
            "world_size": args.world_size,
        }
        self._saved = report.to_dict()
        values = scalars(report)
        state.log_history.append({**values, "step": state.global_step})  # trainer_state.json keeps them
        _dispatch_log(args, state, values)
        if state.is_world_process_zero:
            write_report(self._saved, path)
            print(summary(report, path), flush=True)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Nothing: the scalars were logged at on_train_begin (this callback's own on_log event included)."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Put the report into the checkpoint folder just saved (as ``fxeq.json``, which marks it as equalized)."""
        if self._saved is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_report(self._saved, folder / FOLDER_REPORT)


def _dispatch_log(args: TrainingArguments, state: TrainerState, values: dict[str, float]) -> None:
    """Send ``values`` to every callback's ``on_log``, as ``Trainer.log`` does: TensorBoard, W&B, MLflow... see them.

    A callback gets no reference to its Trainer, so the Trainer's callback
    handler is found on the call stack (it is calling this callback's
    ``on_train_begin``). Without one (the callback called by hand), the values
    are only in ``state.log_history``.
    """
    frame = inspect.currentframe()
    handler = None
    while frame is not None and handler is None:
        candidate = frame.f_locals.get("self")
        handler = candidate if isinstance(candidate, CallbackHandler) else None
        frame = frame.f_back
    del frame
    if handler is None:
        _logger.info("fxeq: no Trainer callback handler found; the statistics are in state.log_history only")
        return
    handler.on_log(args, state, TrainerControl(), logs=dict(values))


def _refuse_sharded_training(args: TrainingArguments) -> None:
    """DeepSpeed and FSDP keep their own copies or shards of the weights: an in-place rewrite would be lost."""
    engine = "DeepSpeed" if getattr(args, "deepspeed", None) else "FSDP" if getattr(args, "fsdp", None) else None
    if engine is None:
        return
    raise ValueError(
        f"ScaleEqualizationCallback does not support {engine} training: the optimizer holds its own copy or "
        "shards of the weights, so rewriting the model's parameters at on_train_begin would be lost or fail. "
        "Equalize before building the Trainer instead: fxeq.transform(model, loader, inplace=True) with the "
        "same batches on every rank (or `fxeq convert` a checkpoint)."
    )
