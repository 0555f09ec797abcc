"""Scale equalization inside a Hugging Face ``Trainer`` run (``pip install 'fxeq[hf]'``).

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
    {'train_runtime': ...}
    >>> [c.weight for s in equalize.report.search.sites for c in s.convs]
    ['fuse.weight']
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:
    raise ImportError(
        "fxeq.integrations.transformers needs Hugging Face transformers (and accelerate, for its Trainer); "
        "install them with: pip install 'fxeq[hf]'"
    ) from e

from ..calibration import InputFn
from ..capturing import Frontend
from ..modes import Mode
from ..report import Report
from . import REPORT_NAME, _check_options, _equalize, _plain, _write_json

__all__ = ["ScaleEqualizationCallback"]

_logger = logging.getLogger(__name__)

# Weight files the Trainer writes into a checkpoint folder; the report goes beside each as
# "<file>.fxeq.json", where `fxeq convert` looks before refusing to convert a checkpoint twice.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ScaleEqualizationCallback(TrainerCallback):
    """Equalize the model's fusion sites before the first optimizer step of ``Trainer.train()``.

    At ``on_train_begin`` the callback runs ``fxeq.transform(model, batches,
    inplace=True)`` on the first ``num_batches`` batches of the Trainer's train
    dataloader. The rewrite is in place, so the optimizer the Trainer already
    built holds the equalized parameters. The report is logged (logger
    ``fxeq.integrations``, level INFO), kept at :attr:`report`, and written
    atomically to ``<output_dir>/model.fxeq.json`` by the main process; every
    checkpoint saved afterwards gets a copy beside its weights
    (``checkpoint-N/model.safetensors.fxeq.json``).

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
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        all_concats: also equalize concatenations without upsampled inputs.
            Default: False.
        report_name: the report's file name in ``args.output_dir``.
            Default: ``"model.fxeq.json"``.

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
        frontend: Frontend = "auto",
        all_concats: bool = False,
        report_name: str = REPORT_NAME,
    ) -> None:
        _check_options(num_batches, mode, keep_norm)
        self.num_batches = num_batches
        self.calib_loader = calib_loader
        self.input_fn = input_fn
        self.mode: Mode = mode
        self.keep_norm = keep_norm
        self.frontend: Frontend = frontend
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
        path = Path(args.output_dir or ".") / self.report_name
        report = _equalize(
            model, loader, resumed_at=state.global_step, num_batches=self.num_batches, input_fn=self.input_fn,
            mode=self.mode, keep_norm=self.keep_norm, frontend=self.frontend, all_concats=self.all_concats,
            progress=None if state.is_world_process_zero and not args.disable_tqdm else False,
        )
        if report is None:
            if state.global_step > 0 and path.exists():
                with contextlib.suppress(OSError, ValueError):  # then checkpoints get no copy, training goes on
                    self._saved = json.loads(path.read_text())
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
        self._saved = _plain(report)
        if state.is_world_process_zero:
            _write_json(self._saved, path)
            _logger.info("fxeq: wrote %s", path)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Put the report beside the weights of the checkpoint just saved."""
        if self._saved is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        for name in _WEIGHT_FILES:
            if (folder / name).exists():
                _write_json(self._saved, folder / f"{name}.fxeq.json")


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
