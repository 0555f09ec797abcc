"""Scale equalization inside a Hugging Face ``Trainer`` run (``pip install -e '.[hf]'``).

:class:`ScaleEqualizationCallback` equalizes the model at ``on_train_begin``:
after the Trainer has built the optimizer and wrapped the model (DDP), before
the first optimizer step. It calibrates on the first ``num_batches`` batches of
the Trainer's own train dataloader (dict batches; ``labels`` are left out),
which the Trainer passes to every callback as ``train_dataloader``. Under DDP
that loader is sharded, so each rank calibrates on its own shard and the
merged statistics give every rank the same weights.

A Trainer passes its callbacks the model, optimizer and dataloaders, never
itself, so the callback is given the Trainer (``trainer=``, the pattern of
TRL's and W&B's own callbacks): through it, the statistics reach the other
callbacks' ``on_log`` (TensorBoard, W&B, MLflow...) as ``Trainer.log`` sends
them, except the console printers, since the callback prints one line itself::

    trainer.train()
      └── on_train_begin ── fxeq.transform(model, first batches, inplace=True)
                            ├── state.log_history  += statistics (trainer_state.json)
                            ├── callback.on_log(statistics) for each callback but the printers
                            ├── <output_dir>/fxeq.json
                            └── print("fxeq: equalized ...")      (one line)

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
    >>> trainer = Trainer(model=Net(), args=args, train_dataset=data)
    >>> trainer.add_callback(ScaleEqualizationCallback(num_batches=2, trainer=trainer))
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    fxeq: equalized 1 fusion site in ... s before the first optimizer step (mode init); largest/smallest input std ...
    {'train_runtime': ...}
    >>> sorted(trainer.state.log_history[0])
    ['fxeq/fuse/input_0_std', 'fxeq/fuse/input_1_std', 'fxeq/fuse/std_max_over_min', 'step']
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .._model import unwrap
from ..batches import InputFn
from ..capturing import FrontendChoice
from ..modes import Mode
from ..report import FOLDER_REPORT, Report, converted_report, write_report
from . import _check_options, _equalize, _print_line, _requires, scalars, summary

with _requires(__name__, "Hugging Face transformers (and accelerate, for its Trainer)", "hf"):
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

if TYPE_CHECKING:
    from transformers import Trainer

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
    then refuse to equalize it again. Each site's input std ratio and input
    stds (``fxeq/<fusing conv>/std_max_over_min``, ``.../input_<i>_std``, at
    step 0) go into ``state.log_history`` (``trainer_state.json``) and, given
    ``trainer``, to every other callback's ``on_log`` but the console printers
    (``PrinterCallback``, the progress bars): TensorBoard, W&B and the other
    reporting integrations show them.

    Nothing is done when training resumes from a checkpoint (its weights were
    equalized, if at all, before step 0 of the original run) or when fxeq
    already equalized the model (``train()`` called twice, or a model loaded
    with ``from_pretrained`` from a folder holding ``fxeq.json``); a log line
    says so. A model loaded from a Hub id, or from a relative path that does
    not resolve from the working directory, is equalized with a warning: fxeq
    cannot tell whether its weights already were.

    Args:
        num_batches: calibrate on at most this many batches per pass; None for
            a whole epoch. Default: 32.
        trainer: the ``transformers.Trainer`` that runs this callback, which
            passes its callbacks everything but itself; add the callback with
            ``trainer.add_callback(ScaleEqualizationCallback(trainer=trainer))``.
            Without it the statistics reach ``state.log_history`` only (a
            warning says so where ``args.report_to`` names integrations).
            Default: None.
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

    Attributes:
        report: the :class:`~fxeq.report.Report` of this run, or None when
            nothing was done.

    Raises:
        TypeError: (when built) ``trainer`` is not a ``transformers.Trainer``.
        ValueError: (when built) bad ``num_batches``, ``mode`` or ``keep_norm``;
            (at ``on_train_begin``) DeepSpeed or FSDP training, no dataloader,
            or a ``trainer`` that does not run this callback.
    """

    def __init__(
        self,
        num_batches: int | None = 32,
        *,
        trainer: Trainer | None = None,
        calib_loader: Iterable[Any] | None = None,
        input_fn: InputFn | None = None,
        mode: Mode = "init",
        keep_norm: bool = False,
        frontend: FrontendChoice = "auto",
        all_concats: bool = False,
    ) -> None:
        _check_options(num_batches, mode, keep_norm)
        _check_trainer(trainer)
        self.num_batches = num_batches
        self.trainer = trainer
        self.calib_loader = calib_loader
        self.input_fn = input_fn
        self.mode: Mode = mode
        self.keep_norm = keep_norm
        self.frontend: FrontendChoice = frontend
        self.all_concats = all_concats
        self.report: Report | None = None
        self._saved: dict[str, Any] | None = None  # the report as written, copied into checkpoints

    # ------------------------------------------------------------------
    # Events
    # ------------------------------------------------------------------

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
        if self.trainer is not None and not any(cb is self for cb in self.trainer.callback_handler.callbacks):
            raise ValueError(
                "ScaleEqualizationCallback(trainer=...) was given a Trainer that does not run this callback, so "
                "that Trainer's callbacks would get the statistics of another run. Give it the Trainer you add "
                "it to: trainer.add_callback(ScaleEqualizationCallback(trainer=trainer))."
            )
        output_dir = Path(args.output_dir or ".")
        path = output_dir / FOLDER_REPORT
        report = _equalize(
            model, loader, resumed_at=state.global_step, num_batches=self.num_batches, input_fn=self.input_fn,
            mode=self.mode, keep_norm=self.keep_norm, frontend=self.frontend, all_concats=self.all_concats,
            progress=None if state.is_world_process_zero and not args.disable_tqdm else False,
            doubt=_unknown_origin(model) if state.is_world_process_zero else None, main=state.is_world_process_zero,
        )
        if report is None:
            self._keep_resumed_report(state, path, output_dir)
            return
        self.report = report
        report.extra["trainer"] = {
            "framework": "transformers", "global_step": state.global_step, "num_batches": self.num_batches,
            "world_size": args.world_size,
        }
        self._saved = report.to_dict()
        self._log(args, state, control, scalars(report), {"model": model, "train_dataloader": train_dataloader,
                                                          **kwargs})
        if state.is_world_process_zero:
            write_report(self._saved, path)
            _print_line(summary(report, path))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Put the report into the checkpoint folder just saved (as ``fxeq.json``, which marks it as equalized)."""
        if self._saved is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_report(self._saved, folder / FOLDER_REPORT)

    # ------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------

    def _log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
             values: dict[str, float], event: Mapping[str, Any]) -> None:
        """Log ``values`` as ``Trainer.log`` does, minus the console printers: this callback prints one line."""
        state.log_history.append({**values, "step": state.global_step})
        if self.trainer is None:
            integrations = getattr(args, "report_to", None)
            if integrations and state.is_world_process_zero:
                _logger.warning(
                    "fxeq: ScaleEqualizationCallback was built without trainer=, so its statistics are in "
                    "state.log_history (trainer_state.json) but did not reach the reporting integrations %s. "
                    "Build it as trainer.add_callback(ScaleEqualizationCallback(trainer=trainer, ...)).",
                    list(integrations),
                )
            return
        printers = _console_printers()
        for callback in self.trainer.callback_handler.callbacks:
            if callback is not self and not isinstance(callback, printers):
                callback.on_log(args, state, control, logs=dict(values), **event)

    def _keep_resumed_report(self, state: TrainerState, path: Path, output_dir: Path) -> None:
        """On resuming, keep the original run's report for the checkpoints to come, or warn that there is none."""
        if state.global_step == 0:
            return
        earlier = path if path.exists() else converted_report(output_dir) if output_dir.is_dir() else None
        if earlier is not None:
            with contextlib.suppress(OSError, ValueError):  # then checkpoints get no copy, training goes on
                self._saved = json.loads(earlier.read_text())
        elif state.is_world_process_zero:
            _logger.warning(
                "fxeq: resuming at step %d but %s does not exist: the run being resumed may not have been "
                "equalized. fxeq does not equalize in the middle of training.", state.global_step, path,
            )


def _check_trainer(trainer: object) -> None:
    if trainer is None:
        return
    import transformers  # noqa: PLC0415 - here, since importing its Trainer imports accelerate

    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(
            f"ScaleEqualizationCallback(trainer=...) takes the transformers.Trainer that runs it; got "
            f"{type(trainer).__name__}. Build the Trainer first, then: "
            "trainer.add_callback(ScaleEqualizationCallback(trainer=trainer))."
        )


def _console_printers() -> tuple[type, ...]:
    """The callbacks that print every log to the console; the notebook one exists only where it was imported."""
    notebook = sys.modules.get("transformers.utils.notebook")
    extra = (notebook.NotebookProgressCallback,) if notebook is not None else ()
    return (PrinterCallback, ProgressCallback, *extra)


def _unknown_origin(model: nn.Module) -> str | None:
    """A warning when ``model`` was loaded with ``from_pretrained`` from somewhere fxeq cannot look for its report.

    A folder that fxeq or this callback equalized holds ``fxeq.json``, which
    :func:`fxeq.rewrite.check_not_equalized` finds through ``name_or_path``.
    A Hub id, or a relative path that does not resolve from here, leaves
    nothing to look at.
    """
    inner = unwrap(model)
    source = getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "name_or_path", None)
    if not isinstance(source, str) or not source or Path(source).is_dir():
        return None
    return (
        f"fxeq: {type(inner).__name__} was loaded from {source!r}, which is not a folder here (a Hub id, or a "
        f"relative path that does not resolve from {Path.cwd()}), so fxeq cannot tell whether these weights were "
        f"already equalized: only a local folder holding {FOLDER_REPORT} says so. Equalizing them now. If they "
        "come from a folder that fxeq or this callback equalized, their fusing convs end up divided twice: load "
        "them from that folder by a path that resolves, or train without ScaleEqualizationCallback."
    )


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
