"""train_quality experiment: train one model per mode, finalize, evaluate, summarize.

Within a seed every mode starts from one model (built once, deep-copied per
optimizer and mode) and sees the same batches. fxeq is applied after the
decoder's own initialization and before training, calibrated on the first
training batches of task B. ``reparam`` and ``explicit`` models are finalized
(``fxeq.finalize``) before evaluation, and the largest change of the
evaluation logits that finalizing caused is recorded. The gradient RMS of each
fusing conv's input slices at step 0 is recorded as well (for ``reparam``, the
gradient of ``parametrizations.weight.original``), with each input's sigma.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fxeq
from fxeq.cli.checkpoints import load_state_dict
from fxeq.modes import Mode
from fxeq.report import Report

from _common import build_smp, fusing_conv_modules
from _tq_data import IGNORE, TASK_A, Batch, Source, SyntheticSource, SyntheticTask

__all__ = [
    "DEFAULT_LR", "MODES", "OPTIMIZERS", "PROTOCOLS", "WEIGHT_DECAY", "Progress", "Setting", "Trained",
    "fusion_slices",
    "mean_iou", "pretrained_encoder", "run_all", "run_mode", "summarize", "train",
]

MODES = ("none", "init", "init_keep_norm", "reparam", "explicit")
OPTIMIZERS = ("sgd", "adamw")
PROTOCOLS = ("scratch", "finetune")
# mode -> (fxeq mode, keep_norm); "none" applies no fxeq.
FXEQ_MODES: dict[str, tuple[Mode, bool]] = {
    "init": ("init", False),
    "init_keep_norm": ("init", True),
    "reparam": ("reparam", False),
    "explicit": ("explicit", False),
}
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}


# ---------------------------------------------------------------------------
# Models, training and evaluation
# ---------------------------------------------------------------------------


def _model(arch: str, encoder: str, classes: int, seed: int, args: argparse.Namespace) -> nn.Module:
    """The run's smp model (``_common.build_smp``) with ``--model-kwargs``, on the run's device."""
    return build_smp(arch, encoder, classes=classes, seed=seed, **args.model_kwargs).to(args.device)


def _optimizer(name: str, params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY[name])
    return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY[name])


@dataclass
class Trained:
    """What one training run logged: ``(step, loss)`` pairs and the step-0 gradient RMS per slice."""

    losses: list[tuple[int, float | None]]
    grad_rms: dict[str, list[float]]


def _fusing_weight_grad(model: nn.Module, conv: str) -> torch.Tensor | None:
    """The gradient of a fusing conv's trainable weight: ``W_raw`` under a parametrization."""
    module = model.get_submodule(conv)
    name = "parametrizations.weight.original" if parametrize.is_parametrized(module, "weight") else "weight"
    return module.get_parameter(name).grad


def train(model: nn.Module, source: Source, *, optimizer: str, lr: float, iters: int, batch: int, seed: int,
          slices: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> Trained:
    """Train in train mode with cross-entropy and a poly (power 0.9) learning-rate schedule.

    Args:
        slices: per fusing conv module, the input-channel slices whose
            gradient RMS to record at step 0. Default: none.
    """
    opt = _optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / iters) ** 0.9)
    log_every = max(1, iters // 20)
    logged: list[tuple[int, torch.Tensor]] = []
    grad_rms: dict[str, list[float]] = {}
    torch.manual_seed(seed)  # dropout draws the same masks in every mode
    model.train()
    for step in range(iters):
        images, masks = source.train_batch(seed, step, batch)
        loss = F.cross_entropy(model(images), masks, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0 and slices:
            grad_rms = _slice_rms(model, slices)
        opt.step()
        schedule.step()
        if step % log_every == 0 or step == iters - 1:
            logged.append((step, loss.detach()))
    return Trained([(step, _finite(float(loss))) for step, loss in logged], grad_rms)


def _slice_rms(model: nn.Module, slices: Mapping[str, Sequence[tuple[int, int]]]) -> dict[str, list[float]]:
    rms: dict[str, list[float]] = {}
    for conv, channel_slices in slices.items():
        grad = _fusing_weight_grad(model, conv)
        if grad is not None:
            rms[conv] = [float(grad[:, a:b].double().pow(2).mean().sqrt()) for a, b in channel_slices]
    return rms


@torch.no_grad()
def _logits(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    model.eval()
    return [model(images) for images, _ in batches]


def mean_iou(logits: Sequence[torch.Tensor], batches: Sequence[Batch], classes: int) -> tuple[float, float]:
    """Mean IoU over the classes that occur in targets or predictions, and pixel accuracy, in percent.

    Example:
        >>> masks = torch.tensor([[[0, 1], [1, 1]]])
        >>> logits = F.one_hot(torch.tensor([[[0, 1], [0, 1]]]), 2).permute(0, 3, 1, 2).float()
        >>> mean_iou([logits], [(torch.zeros(1), masks)], classes=2)
        (58.33333333333333, 75.0)
    """
    confusion = torch.zeros(classes * classes, dtype=torch.long, device=logits[0].device)
    for out, (_, masks) in zip(logits, batches):
        valid = masks != IGNORE
        confusion += torch.bincount(masks[valid] * classes + out.argmax(1)[valid], minlength=classes * classes)
    matrix = confusion.view(classes, classes).double()
    hits = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = hits[union > 0] / union[union > 0]
    return float(iou.mean() * 100), float(hits.sum() / matrix.sum().clamp_min(1) * 100)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """Everything a run needs besides its model."""

    source: Source
    eval_set: list[Batch]
    lr: dict[str, float]
    args: argparse.Namespace


def fusion_slices(report: Report) -> dict[str, list[tuple[int, int]]]:
    """Per fusing conv module, its input-channel slices (one per site input), for ungrouped convs."""
    convs = {conv.module: conv for site in report.search.sites for conv in site.convs}
    return {
        name: [(inp.channels[0], inp.channels[1]) for inp in site.inputs]
        for name, site in fusing_conv_modules(report).items()
        if convs[name].groups == 1
    }


def run_mode(base: nn.Module, mode: str, optimizer: str, seed: int, setting: Setting,
             slices: Mapping[str, Sequence[tuple[int, int]]]) -> dict[str, Any]:
    """Copy ``base``, apply ``mode``, train, finalize and evaluate; return the run's record."""
    args = setting.args
    model = copy.deepcopy(base)
    record: dict[str, Any] = {"mode": mode, "optimizer": optimizer, "seed": seed, "lr": setting.lr[optimizer]}
    begin = time.perf_counter()
    if mode in FXEQ_MODES:
        fxeq_mode, keep_norm = FXEQ_MODES[mode]
        calibration = [setting.source.train_batch(seed, step, args.batch)[0] for step in range(args.calib_batches)]
        deployed = fxeq.transform(model, calibration, inplace=True, mode=fxeq_mode, keep_norm=keep_norm)
        report: Report = deployed.fxeq_report
        record["disequilibrium"] = {site.name: report.disequilibrium(site) for site in report.search.sites}
        record["sigma"] = {conv: [report.stats[site.name, i.index].std for i in site.inputs]
                           for conv, site in fusing_conv_modules(report).items()}
        record["fxeq_notes"] = report.notes
    record["transform_s"] = round(time.perf_counter() - begin, 2)
    begin = time.perf_counter()
    trained = train(model, setting.source, optimizer=optimizer, lr=setting.lr[optimizer], iters=args.iters,
                    batch=args.batch, seed=seed, slices=slices)
    record["train_s"] = round(time.perf_counter() - begin, 2)
    record["losses"] = trained.losses
    record["final_loss"] = trained.losses[-1][1] if trained.losses else None
    record["grad_rms_step0"] = trained.grad_rms
    logits = _logits(model, setting.eval_set)
    if mode in ("reparam", "explicit"):
        record["finalize"] = _finalize_check(model, logits, setting)
        logits = _logits(model, setting.eval_set)
    record["miou"], record["pixel_accuracy"] = mean_iou(logits, setting.eval_set, setting.source.classes)
    return record


def _finalize_check(model: nn.Module, before: Sequence[torch.Tensor], setting: Setting) -> dict[str, Any]:
    """Finalize in place; how far the evaluation logits, predictions and mIoU moved, and finalize's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxeq.finalize(model)
    notes = [str(w.message) for w in caught]
    after = _logits(model, setting.eval_set)
    diff = max(float((a - b).abs().max()) for a, b in zip(after, before))
    changed = sum(int((a.argmax(1) != b.argmax(1)).sum()) for a, b in zip(after, before))
    pixels = sum(b.argmax(1).numel() for b in before)
    miou, _ = mean_iou(before, setting.eval_set, setting.source.classes)
    return {"max_abs_logit_diff": diff, "changed_predictions": changed / pixels, "miou_before": miou,
            "notes": notes}


def pretrained_encoder(arch: str, encoder: str, seed: int, setting: Setting) -> tuple[dict[str, torch.Tensor],
                                                                                       dict[str, Any]]:
    """The encoder state after training the whole model on synthetic task A, and a record of that run."""
    args = setting.args
    task_a = SyntheticSource(SyntheticTask(TASK_A, args.synthetic_classes, args.size), torch.device(args.device),
                             args.eval_images)
    model = _model(arch, encoder, task_a.classes, seed, args)
    begin = time.perf_counter()
    trained = train(model, task_a, optimizer="adamw", lr=DEFAULT_LR["adamw"], iters=args.pretrain_iters,
                    batch=args.batch, seed=seed)
    miou, _ = mean_iou(_logits(model, task_a.eval_batches(args.batch)), task_a.eval_batches(args.batch),
                       task_a.classes)
    record = {"arch": arch, "encoder": encoder, "seed": seed, "iters": args.pretrain_iters, "optimizer": "adamw",
              "lr": DEFAULT_LR["adamw"], "final_loss": trained.losses[-1][1], "task_a_miou": miou,
              "train_s": round(time.perf_counter() - begin, 2)}
    return copy.deepcopy(model.get_submodule("encoder").state_dict()), record


def _load_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """An encoder state_dict, or the ``encoder.`` entries of a whole model's (.pt or .safetensors, wrappers too)."""
    state = load_state_dict(path)
    if any(key.startswith("encoder.") for key in state):
        return {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
    return state


@dataclass
class Progress:
    """What :func:`run_all` has done so far: the runs' and pretrainings' records, the sites, whether a budget
    stopped it, and how many runs it planned."""

    planned: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    pretraining: list[dict[str, Any]] = field(default_factory=list)
    sites: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False


def run_all(setting: Setting, log: Callable[[str], None], *, deadline: float | None = None,
            on_run: Callable[[Progress], None] | None = None) -> Progress:
    """Every architecture x encoder x seed x protocol x optimizer x mode.

    Args:
        deadline: a ``time.monotonic()`` after which no new run (pretraining
            or training) starts; the seeds come before the protocols and
            modes, so that what finished is whole seeds where it can be. Default: none.
        on_run: called after each training run with the progress so far (to write partial results).
    """
    args = setting.args
    progress = Progress(planned=len(args.archs) * len(args.encoders) * len(args.seeds) * len(args.protocols)
                        * len(args.optimizers) * len(args.modes))
    user_encoder = _load_encoder_weights(args.encoder_weights) if args.encoder_weights else None
    classes = setting.source.classes

    def out_of_time() -> bool:
        if deadline is not None and time.monotonic() > deadline and not progress.stopped:
            progress.stopped = True
            log(f"stopped by the budget after {len(progress.runs)} of {progress.planned} runs")
        return progress.stopped

    for arch in args.archs:
        for encoder in args.encoders:
            probe = _model(arch, encoder, classes, 0, args)
            found = fxeq.find(probe, setting.source.train_batch(0, 0, args.batch)[0])
            slices = fusion_slices(found)
            progress.sites[f"{arch}/{encoder}"] = {"fusing_convs": slices, "sites": len(found.search.sites)}
            for seed in args.seeds:
                for protocol in args.protocols:
                    if out_of_time():
                        return progress
                    base = _model(arch, encoder, classes, seed, args)
                    if protocol == "finetune":
                        state = user_encoder
                        if state is None:
                            state, pretrain = pretrained_encoder(arch, encoder, seed, setting)
                            progress.pretraining.append(pretrain)
                            log(f"pretrained {arch}/{encoder} seed {seed} on task A: "
                                f"mIoU {pretrain['task_a_miou']:.1f}")
                        base.get_submodule("encoder").load_state_dict(state)
                    for optimizer in args.optimizers:
                        for mode in args.modes:
                            if out_of_time():
                                return progress
                            record = run_mode(base, mode, optimizer, seed, setting, slices)
                            record.update(protocol=protocol, arch=arch, encoder=encoder)
                            progress.runs.append(record)
                            log(f"{protocol:8} {arch}/{encoder} {optimizer:5} {mode:14} seed {seed}: "
                                f"mIoU {record['miou']:.2f} ({record['train_s']:.0f} s)")
                            if on_run is not None:
                                on_run(progress)
    return progress


# ---------------------------------------------------------------------------
# Summaries and tables
# ---------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config, mIoU mean and std over seeds and the paired per-seed difference to ``none``."""
    by_config: dict[tuple[str, ...], dict[int, dict[str, Any]]] = {}
    for run in runs:
        key = (run["protocol"], run["arch"], run["encoder"], run["optimizer"], run["mode"])
        by_config.setdefault(key, {})[run["seed"]] = run
    summary = []
    for (protocol, arch, encoder, optimizer, mode), seeds in by_config.items():
        mious = [seeds[s]["miou"] for s in sorted(seeds)]
        mean, std = _mean_std(mious)
        entry: dict[str, Any] = {"protocol": protocol, "arch": arch, "encoder": encoder, "optimizer": optimizer,
                                 "mode": mode, "seeds": sorted(seeds), "miou": mious, "miou_mean": mean,
                                 "miou_std": std}
        reference = by_config.get((protocol, arch, encoder, optimizer, "none"))
        if reference is not None and mode != "none":
            paired = [seeds[s]["miou"] - reference[s]["miou"] for s in sorted(seeds) if s in reference]
            entry["diff_vs_none"] = paired
            entry["diff_vs_none_mean"], entry["diff_vs_none_std"] = _mean_std(paired)
        finalized = [seeds[s]["finalize"] for s in seeds if "finalize" in seeds[s]]
        if finalized:
            entry["finalize_max_abs_logit_diff"] = max(f["max_abs_logit_diff"] for f in finalized)
            entry["finalize_changed_predictions"] = max(f["changed_predictions"] for f in finalized)
            entry["miou_before_finalize_mean"] = statistics.fmean(f["miou_before"] for f in finalized)
        summary.append(entry)
    return summary
