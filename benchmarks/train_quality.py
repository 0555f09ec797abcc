"""Training quality: does scale equalization change what a segmentation model learns?

fxeq is the same function at step 0 in every mode, but not the same under
gradient descent (see DESIGN.md, "Fold vs explicit under training"): the fold
(``init``) rescales the gradient of each weight slice by the input's sigma and,
with a batch norm after the fusing conv, lowers SGD's effective learning rate.
This harness trains the same initial weights once per mode and compares the
held-out mIoU, paired per seed:

* ``none``: no fxeq at all.
* ``init``: the paper's auxiliary initializer, folded into the weights.
* ``init_keep_norm``: the fold, then each output channel's weight norm restored.
* ``reparam``: ``W = W_raw * (1 / sigma)`` as a torch parametrization.
* ``explicit``: ``(x - mu) / sigma`` as a forward pre-hook on each fusing conv.

Two protocols:

* ``scratch``: the whole model starts from random weights and trains on task B.
* ``finetune`` (the paper's, in miniature): an encoder pretrained on task A
  (the whole model trained on A, the encoder kept), or the encoder weights in
  ``--encoder-weights``, paired with a fresh decoder, then fine-tuned on task B.

Within a seed every mode starts from one model (built once, deep-copied per
optimizer and mode) and sees the same batches. fxeq is applied after the
decoder's own initialization and before training, calibrated on the first
training batches of task B. ``reparam`` and ``explicit`` models are finalized
(``fxeq.finalize``) before evaluation, and the largest change of the
evaluation logits that finalizing caused is recorded. The gradient RMS of each
fusing conv's input slices at step 0 is recorded as well (for ``reparam``, the
gradient of ``parametrizations.weight.original``).

Data: a synthetic multi-scale segmentation task generated in torch on the run's
device, deterministic per seed on a given device: weighted Voronoi regions of
very different sizes, each filled with an oriented sinusoid grating whose
orientation and period (4, 8 or 16 pixels) identify its class, with a random
colour, phase, contrast and pixel noise. Tasks A and B assign different
textures to their classes. ``--images DIR --masks DIR`` trains and evaluates
on your own data instead (task B).

Run ``python benchmarks/train_quality.py --help`` for the options and runtimes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import fxeq
from fxeq.checkpoint import load_state_dict
from fxeq.modes import Mode
from fxeq.report import Report

from _common import DEFAULT_RESULTS, defaults, fusing_conv_modules, markdown_table, start

__all__ = ["FolderSource", "SyntheticSource", "SyntheticTask", "build_model", "main", "mean_iou", "parse_lr", "train"]

MODES = ("none", "init", "init_keep_norm", "reparam", "explicit")
OPTIMIZERS = ("sgd", "adamw")
PROTOCOLS = ("scratch", "finetune")
# mode -> (fxeq mode, keep_norm); "none" applies no fxeq.
_FXEQ_MODES: dict[str, tuple[Mode, bool]] = {
    "init": ("init", False),
    "init_keep_norm": ("init", True),
    "reparam": ("reparam", False),
    "explicit": ("explicit", False),
}
_DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}
_IGNORE = -1
_EVAL_SEED = 2**40  # held-out set: one fixed stream, never a training seed
_TASK_A, _TASK_B = 0, 1
_TASK_A_CLASSES = 6  # task A's classes when task B is the user's data

_FULL: dict[str, Any] = {
    "archs": ["UPerNet", "PSPNet"], "encoders": ["resnet18"], "optimizers": list(OPTIMIZERS),
    "modes": list(MODES), "seeds": [0, 1, 2], "iters": 400, "pretrain_iters": 400, "batch": 8, "size": 128,
    "eval_images": 128, "calib_batches": 4, "protocol": "both", "threads": None,
}
_QUICK: dict[str, Any] = {
    "archs": ["PSPNet"], "encoders": ["resnet18"], "optimizers": ["sgd"],
    "modes": ["none", "init", "reparam"], "seeds": [0], "iters": 20, "pretrain_iters": 10, "batch": 4, "size": 64,
    "eval_images": 16, "calib_batches": 2, "protocol": "both", "threads": 1,
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor]

# The texture bank: (orientation in degrees, period in pixels), three scales.
_TEXTURES: tuple[tuple[float, float], ...] = tuple(
    (angle, period) for period in (4.0, 8.0, 16.0) for angle in (0.0, 45.0, 90.0, 135.0)
)


class Source(Protocol):
    """Where a run's images and masks come from."""

    classes: int

    def train_batch(self, seed: int, step: int, batch: int) -> Batch:
        """The training batch of ``step`` in the stream of ``seed``."""

    def eval_batches(self, batch: int) -> list[Batch]:
        """The held-out set, in batches."""


def _stream_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


@dataclass(frozen=True)
class SyntheticTask:
    """A synthetic segmentation task: weighted Voronoi regions of oriented gratings.

    Args:
        task: which class-to-texture assignment (0 for task A, 1 for task B...).
        classes: number of classes, at most 12 (the texture bank's size).
        size: image height and width.
        max_regions: most Voronoi regions per image (at least 2 are drawn).
        noise: std of the Gaussian pixel noise, relative to a grating's amplitude.

    Example:
        >>> images, masks = SyntheticTask(task=1, classes=6, size=32).sample(2, seed=0)
        >>> images.shape, masks.shape, masks.dtype, int(masks.max()) < 6
        (torch.Size([2, 3, 32, 32]), torch.Size([2, 32, 32]), torch.int64, True)
    """

    task: int
    classes: int
    size: int
    max_regions: int = 12
    noise: float = 0.5

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(_TEXTURES):
            raise ValueError(f"a synthetic task has 2 to {len(_TEXTURES)} classes, got {self.classes}")

    def textures(self) -> torch.Tensor:
        """Per class, ``(orientation in radians, period in pixels)``: the task's assignment."""
        order = torch.randperm(len(_TEXTURES), generator=torch.Generator().manual_seed(7919 * (self.task + 1)))
        table = torch.tensor([_TEXTURES[int(i)] for i in order[: self.classes]], dtype=torch.float64)
        return torch.stack([torch.deg2rad(table[:, 0]), table[:, 1]], dim=1).float()

    def sample(self, count: int, seed: int, device: torch.device | str = "cpu") -> Batch:
        """``count`` images ``(N, 3, H, W)``, each standardized, and their masks ``(N, H, W)``."""
        device = torch.device(device)
        g = torch.Generator(device).manual_seed(seed)
        n, s, p = count, self.size, self.max_regions

        def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
            return low + (high - low) * torch.rand(*shape, generator=g, device=device)

        # Multiplicatively weighted Voronoi cells: region sizes vary by an order of magnitude.
        centres = uniform(n, p, 2, high=float(s))
        weights = uniform(n, p, low=-1.0, high=1.0).exp()
        used = torch.arange(p, device=device) < torch.randint(2, p + 1, (n, 1), generator=g, device=device)
        ys, xs = torch.meshgrid(torch.arange(s, device=device, dtype=torch.float32),
                                torch.arange(s, device=device, dtype=torch.float32), indexing="ij")
        dist = ((xs - centres[..., 0, None, None]) ** 2 + (ys - centres[..., 1, None, None]) ** 2)
        dist = (dist / weights[..., None, None] ** 2).masked_fill(~used[..., None, None], math.inf)
        region = dist.argmin(dim=1).flatten(1)  # (n, s*s)

        labels = torch.randint(0, self.classes, (n, p), generator=g, device=device)
        texture = self.textures().to(device)[labels]  # (n, p, 2)
        angle = texture[..., 0] + torch.deg2rad(torch.tensor(5.0, device=device)) * uniform(n, p, low=-1.0)
        period = texture[..., 1] * uniform(n, p, low=0.9, high=1.1)
        phase = uniform(n, p, high=2 * math.pi)
        amplitude = uniform(n, p, low=0.5, high=1.5)
        colour = uniform(n, p, 3, low=0.2, high=1.0)

        def per_pixel(values: torch.Tensor) -> torch.Tensor:
            return values.gather(1, region).view(n, s, s)

        theta = per_pixel(angle)
        along = xs * theta.cos() + ys * theta.sin()
        grating = per_pixel(amplitude) * torch.sin(2 * math.pi * along / per_pixel(period) + per_pixel(phase))
        tint = torch.stack([per_pixel(colour[..., c]) for c in range(3)], dim=1)
        images = tint * grating[:, None] + self.noise * torch.randn(n, 3, s, s, generator=g, device=device)
        images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / images.std(dim=(1, 2, 3), keepdim=True)
        return images, per_pixel(labels)


class SyntheticSource:
    """Training stream and held-out set of a :class:`SyntheticTask` on a device."""

    def __init__(self, task: SyntheticTask, device: torch.device, eval_images: int) -> None:
        self.task = task
        self.classes = task.classes
        self.device = device
        self.eval_images = eval_images

    def train_batch(self, seed: int, step: int, batch: int) -> Batch:
        return self.task.sample(batch, _stream_seed(seed, step), self.device)

    def eval_batches(self, batch: int) -> list[Batch]:
        images, masks = self.task.sample(self.eval_images, _EVAL_SEED, self.device)
        return list(zip(images.split(batch), masks.split(batch)))


class FolderSource:
    """A user's images and PNG class-id masks, resized, standardized and split.

    Images and masks are matched by file stem; masks hold class ids, and any
    id outside ``[0, classes)`` (255, say) is ignored by the loss and the mIoU.
    The last ``val_fraction`` of the sorted stems is the held-out set.
    """

    def __init__(self, images: Path, masks: Path, *, size: int, classes: int, val_fraction: float,
                 device: torch.device) -> None:
        from PIL import Image

        mask_files = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() == ".png"}
        pairs = [(p, mask_files[p.stem]) for p in sorted(images.iterdir()) if p.stem in mask_files]
        if len(pairs) < 2:
            raise ValueError(f"found {len(pairs)} image/mask pairs in {images} and {masks}; need at least 2 "
                             "images whose stems match a PNG mask (img001.jpg <-> img001.png)")
        image_list, mask_list = [], []
        for image_path, mask_path in pairs:
            rgb = Image.open(image_path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            ids = Image.open(mask_path).resize((size, size), Image.Resampling.NEAREST)
            image_list.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3))
            mask_list.append(torch.frombuffer(bytearray(ids.tobytes()), dtype=torch.uint8).view(size, size))
        x = torch.stack(image_list).permute(0, 3, 1, 2).float().to(device)
        y = torch.stack(mask_list).long().to(device)
        y = y.masked_fill(y >= classes, _IGNORE)
        held_out = max(1, round(len(pairs) * val_fraction))
        train_x, self.eval_x = x[:-held_out], x[-held_out:]
        self.train_y, self.eval_y = y[:-held_out], y[-held_out:]
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.train_x, self.eval_x = (train_x - mean) / std, (self.eval_x - mean) / std
        self.classes = classes
        self.device = device

    def train_batch(self, seed: int, step: int, batch: int) -> Batch:
        g = torch.Generator(self.device).manual_seed(_stream_seed(seed, step))
        index = torch.randint(0, len(self.train_x), (batch,), generator=g, device=self.device)
        return self.train_x[index], self.train_y[index]

    def eval_batches(self, batch: int) -> list[Batch]:
        return list(zip(self.eval_x.split(batch), self.eval_y.split(batch)))


# ---------------------------------------------------------------------------
# Models, training and evaluation
# ---------------------------------------------------------------------------


def build_model(arch: str, encoder: str, classes: int, seed: int, device: torch.device | str,
                kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """An smp model with random weights drawn after ``torch.manual_seed(seed)``; never downloads weights.

    Args:
        kwargs: further constructor arguments (``decoder_channels``...). Default: none.
    """
    import segmentation_models_pytorch as smp

    constructor = getattr(smp, arch, None)
    if not isinstance(constructor, type) or not issubclass(constructor, nn.Module):
        raise ValueError(f"unknown smp architecture {arch!r}; use a class name such as UPerNet, PSPNet, Unet")
    torch.manual_seed(seed)
    return constructor(encoder_name=encoder, encoder_weights=None, classes=classes, **(kwargs or {})).to(device)


def _optimizer(name: str, params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=_WEIGHT_DECAY[name])
    return torch.optim.AdamW(params, lr=lr, weight_decay=_WEIGHT_DECAY[name])


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
        loss = F.cross_entropy(model(images), masks, ignore_index=_IGNORE)
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
        valid = masks != _IGNORE
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
    convs = {conv.weight.rsplit(".", 1)[0]: conv for site in report.search.sites for conv in site.convs}
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
    if mode in _FXEQ_MODES:
        fxeq_mode, keep_norm = _FXEQ_MODES[mode]
        calibration = [setting.source.train_batch(seed, step, args.batch)[0] for step in range(args.calib_batches)]
        deployed = fxeq.transform(model, calibration, inplace=True, mode=fxeq_mode, keep_norm=keep_norm)
        report: Report = deployed.fxeq_report
        record["disequilibrium"] = {site.name: report.disequilibrium(site) for site in report.search.sites}
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
    """Finalize in place; how far the evaluation logits, predictions and mIoU moved."""
    notes = fxeq.finalize(model)
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
    task_a = SyntheticSource(SyntheticTask(_TASK_A, args.synthetic_classes, args.size), torch.device(args.device),
                             args.eval_images)
    model = build_model(arch, encoder, task_a.classes, seed, args.device, args.model_kwargs)
    begin = time.perf_counter()
    trained = train(model, task_a, optimizer="adamw", lr=_DEFAULT_LR["adamw"], iters=args.pretrain_iters,
                    batch=args.batch, seed=seed)
    miou, _ = mean_iou(_logits(model, task_a.eval_batches(args.batch)), task_a.eval_batches(args.batch),
                       task_a.classes)
    record = {"arch": arch, "encoder": encoder, "seed": seed, "iters": args.pretrain_iters, "optimizer": "adamw",
              "lr": _DEFAULT_LR["adamw"], "final_loss": trained.losses[-1][1], "task_a_miou": miou,
              "train_s": round(time.perf_counter() - begin, 2)}
    return copy.deepcopy(model.get_submodule("encoder").state_dict()), record


def _load_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """An encoder state_dict, or the ``encoder.`` entries of a whole model's (.pt or .safetensors, wrappers too)."""
    state = load_state_dict(path)
    if any(key.startswith("encoder.") for key in state):
        return {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
    return state


def run_all(setting: Setting, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                   dict[str, Any]]:
    """Every protocol x architecture x encoder x seed x optimizer x mode."""
    args = setting.args
    runs: list[dict[str, Any]] = []
    pretraining: list[dict[str, Any]] = []
    sites: dict[str, Any] = {}
    user_encoder = _load_encoder_weights(args.encoder_weights) if args.encoder_weights else None
    classes = setting.source.classes
    for arch in args.archs:
        for encoder in args.encoders:
            probe = build_model(arch, encoder, classes, 0, args.device, args.model_kwargs)
            found = fxeq.find(probe, setting.source.train_batch(0, 0, args.batch)[0])
            slices = fusion_slices(found)
            sites[f"{arch}/{encoder}"] = {"fusing_convs": slices, "sites": len(found.search.sites)}
            for seed in args.seeds:
                for protocol in args.protocols:
                    base = build_model(arch, encoder, classes, seed, args.device, args.model_kwargs)
                    if protocol == "finetune":
                        state = user_encoder
                        if state is None:
                            state, pretrain = pretrained_encoder(arch, encoder, seed, setting)
                            pretraining.append(pretrain)
                            log(f"pretrained {arch}/{encoder} seed {seed} on task A: "
                                f"mIoU {pretrain['task_a_miou']:.1f}")
                        base.get_submodule("encoder").load_state_dict(state)
                    for optimizer in args.optimizers:
                        for mode in args.modes:
                            record = run_mode(base, mode, optimizer, seed, setting, slices)
                            record.update(protocol=protocol, arch=arch, encoder=encoder)
                            runs.append(record)
                            log(f"{protocol:8} {arch}/{encoder} {optimizer:5} {mode:14} seed {seed}: "
                                f"mIoU {record['miou']:.2f} ({record['train_s']:.0f} s)")
    return runs, pretraining, sites


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


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text + (f" ± {std:.2f}" if std is not None else "")


def _config_tables(summary: Sequence[dict[str, Any]], modes: Sequence[str]) -> list[str]:
    sections = []
    for protocol in dict.fromkeys(e["protocol"] for e in summary):
        rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for e in summary:
            if e["protocol"] == protocol:
                rows.setdefault((f"{e['arch']}/{e['encoder']}", e["optimizer"]), {})[e["mode"]] = e
        miou_rows = [[model, opt, *(_pm(m[k]["miou_mean"], m[k]["miou_std"]) if k in m else "-" for k in modes)]
                     for (model, opt), m in rows.items()]
        others = [k for k in modes if k != "none"]
        diff_rows = [[model, opt, *(_pm(m[k].get("diff_vs_none_mean"), m[k].get("diff_vs_none_std"), signed=True)
                                    if k in m else "-" for k in others)]
                     for (model, opt), m in rows.items()]
        sections.append(f"## {protocol}: mIoU (%) on the held-out set, mean ± std over seeds\n\n"
                        + markdown_table(["model", "optimizer", *modes], miou_rows))
        if "none" in modes and others:
            sections.append(f"## {protocol}: paired difference to `none` (mIoU points), mean ± std over seeds\n\n"
                            + markdown_table(["model", "optimizer", *others], diff_rows))
    return sections


def _not_helped(summary: Sequence[dict[str, Any]]) -> str:
    worse = [e for e in summary if e.get("diff_vs_none_mean") is not None and e["diff_vs_none_mean"] <= 0]
    if not worse:
        return "Every equalized config scored above `none` on average over its seeds."
    lines = [f"- {e['protocol']} {e['arch']}/{e['encoder']} {e['optimizer']} {e['mode']}: "
             f"{_pm(e['diff_vs_none_mean'], e['diff_vs_none_std'], signed=True)}" for e in worse]
    return "Configs whose mean paired difference to `none` is zero or negative:\n\n" + "\n".join(lines)


def _grad_tables(runs: Sequence[dict[str, Any]], modes: Sequence[str]) -> str:
    groups: dict[tuple[str, str, str], dict[str, list[list[float]]]] = {}
    for run in runs:
        for conv, rms in run["grad_rms_step0"].items():
            key = (run["protocol"], f"{run['arch']}/{run['encoder']}", conv)
            groups.setdefault(key, {}).setdefault(run["mode"], []).append(rms)
    parts = [("## Step-0 gradient RMS per input slice of each fusing conv\n\n"
              "Mean over seeds (and optimizers: the step-0 gradient does not depend on them). For `reparam` the "
              "gradient of `parametrizations.weight.original`, otherwise of the conv weight; one number per "
              "concatenation input, in input order.")]
    for (protocol, model, conv), by_mode in groups.items():
        rows = [[mode, " ".join(f"{statistics.fmean(col):.2g}" for col in zip(*by_mode[mode]))]
                for mode in modes if mode in by_mode]
        parts.append(f"{protocol}, {model}, `{conv}`:\n\n" + markdown_table(["mode", "slice RMS"], rows))
    return "\n\n".join(parts)


def _finalize_table(summary: Sequence[dict[str, Any]]) -> str:
    rows = [[e["protocol"], f"{e['arch']}/{e['encoder']}", e["optimizer"], e["mode"],
             f"{e['finalize_max_abs_logit_diff']:.2e}", f"{100 * e['finalize_changed_predictions']:.3f}",
             f"{e['miou_before_finalize_mean']:.2f}", f"{e['miou_mean']:.2f}"]
            for e in summary if "finalize_max_abs_logit_diff" in e]
    if not rows:
        return ""
    return ("## fxeq.finalize: change of the evaluation output (eval mode)\n\n"
            "Largest logit change and share of changed predictions: worst seed; mIoU: mean over seeds. "
            "`explicit` pads the standardized input with zeros, the finalized conv the raw input, so a "
            "padded fusing conv differs at the borders; `reparam` involves no mean. The mIoU tables above "
            "are measured after finalize.\n\n"
            + markdown_table(["protocol", "model", "optimizer", "mode", "max abs logit diff",
                              "% predictions changed", "mIoU before", "mIoU after"], rows))


def _settings_text(args: argparse.Namespace, lr: Mapping[str, float], pretraining: Sequence[dict[str, Any]],
                   data: str) -> str:
    lines = [
        "## Settings",
        "",
        f"- data: {data}",
        f"- models: smp {', '.join(args.models)}, encoder_weights=None"
        + (f", {', '.join(f'{k}={v!r}' for k, v in args.model_kwargs.items())}" if args.model_kwargs else ""),
        (f"- {args.iters} iterations, batch {args.batch}, size {args.size}, cross-entropy, train-mode batch norm, "
         "poly learning-rate schedule (power 0.9)"),
        "- optimizers: " + ", ".join(f"{o} lr {lr[o]:g} weight decay {_WEIGHT_DECAY[o]:g}"
                                     + (" momentum 0.9" if o == "sgd" else "") for o in args.optimizers),
        f"- fxeq calibration: the first {args.calib_batches} training batches of the run's seed",
        "- held-out set: " + (f"{args.eval_images} synthetic images (one fixed seed)" if args.images is None
                              else f"the last {args.val_fraction:g} of the files by name"),
    ]
    if "finetune" in args.protocols:
        if args.encoder_weights:
            lines.append(f"- finetune: encoder weights from `{args.encoder_weights}`")
        else:
            task_a = ", ".join(f"{p['arch']}/{p['encoder']} seed {p['seed']}: {p['task_a_miou']:.1f}"
                               for p in pretraining)
            lines.append(f"- finetune: encoder pretrained on synthetic task A for {args.pretrain_iters} iterations "
                         f"(AdamW lr {_DEFAULT_LR['adamw']:g}), fresh decoder; task-A mIoU after pretraining: "
                         f"{task_a}")
    return "\n".join(lines)


def markdown_sections(args: argparse.Namespace, lr: Mapping[str, float], runs: Sequence[dict[str, Any]],
                      summary: Sequence[dict[str, Any]], pretraining: Sequence[dict[str, Any]],
                      data: str) -> list[str]:
    """The markdown report: settings, mIoU and paired-difference tables, gradients, finalize check."""
    sections = [_settings_text(args, lr, pretraining, data), *_config_tables(summary, args.modes)]
    if "none" in args.modes:
        sections.append("## Where equalization did not help\n\n" + _not_helped(summary))
    sections += [_grad_tables(runs, args.modes), _finalize_table(summary)]
    return [s for s in sections if s]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    return parse


def _choices(values: Sequence[str], allowed: Sequence[str], option: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")


def parse_lr(text: str | None, optimizers: Sequence[str]) -> dict[str, float]:
    """``"0.02"`` for every optimizer or ``"sgd=0.02,adamw=5e-4"``; unnamed ones keep their default.

    Example:
        >>> parse_lr("sgd=0.02", ["sgd", "adamw"])
        {'sgd': 0.02, 'adamw': 0.001}
    """
    lr = {name: _DEFAULT_LR[name] for name in optimizers}
    if not text:
        return lr
    if "=" not in text:
        return dict.fromkeys(optimizers, float(text))
    for item in text.split(","):
        name, _, value = item.partition("=")
        _choices([name.strip()], OPTIMIZERS, "--lr")
        lr[name.strip()] = float(value)
    return lr


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; ``None`` defaults are filled from the full or ``--quick`` settings."""
    full, quick = _FULL, _QUICK
    paragraphs = (
        (f"runtime: the defaults train 2 architectures x 3 seeds x 2 protocols x 2 optimizers x 5 modes for "
         f"{full['iters']} iterations each (plus {full['pretrain_iters']}-iteration pretraining per architecture "
         "and seed) and calibrate 96 models; estimated at 10 to 15 minutes on one H100 (not measured there)."),
        ("--quick (PSPNet/resnet18, the fastest smp model with an upsampled fusion; SGD, size 64, batch 4, "
         "20 iterations, 1 seed, modes none/init/reparam, both protocols, 1 CPU thread) takes 15 to 25 s on a "
         "2-core CPU."),
        ("a CPU-sized UPerNet run (17 minutes on 2 cores): python benchmarks/train_quality.py --archs UPerNet "
         "--model-kwargs '{\"decoder_channels\": 64}' --seeds 0,1 --iters 100 --pretrain-iters 100 --batch 4 "
         "--size 64 --eval-images 64 --threads 1"),
    )
    epilog = "\n\n".join(textwrap.fill(text, 100, break_on_hyphens=False) for text in paragraphs)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def option(name: str, kind: Callable[[str], Any], text: str) -> None:
        key = name.removeprefix("--").replace("-", "_")
        show = ",".join(map(str, full[key])) if isinstance(full[key], list) else full[key]
        shown_quick = ",".join(map(str, quick[key])) if isinstance(quick[key], list) else quick[key]
        p.add_argument(name, type=kind, default=None, help=f"{text} (default: {show}; --quick: {shown_quick})")

    p.add_argument("--quick", action="store_true", help="a smoke test of about a minute on a CPU (see below)")
    option("--archs", _csv(str), "comma-separated smp architectures")
    option("--encoders", _csv(str), "comma-separated smp encoders (random init unless --encoder-weights)")
    option("--optimizers", _csv(str), f"comma-separated, from {', '.join(OPTIMIZERS)}")
    option("--modes", _csv(str), f"comma-separated, from {', '.join(MODES)}")
    option("--seeds", _csv(int), "comma-separated seeds (weights, batches and dropout)")
    option("--protocol", str, "scratch, finetune or both")
    option("--iters", int, "training iterations per run")
    option("--pretrain-iters", int, "iterations of task-A pretraining for the finetune protocol")
    option("--batch", int, "batch size (at least 2: calibration needs train-mode batch statistics)")
    option("--size", int, "image size")
    option("--eval-images", int, "images in the synthetic held-out set")
    option("--calib-batches", int, "fxeq calibration batches")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON of further smp constructor arguments, e.g. \'{"decoder_channels": 64}\' '
                   "(default: {})")
    p.add_argument("--lr", default=None,
                   help="learning rate: one value for all optimizers, or sgd=...,adamw=... "
                   f"(default: sgd={_DEFAULT_LR['sgd']:g}, adamw={_DEFAULT_LR['adamw']:g})")
    p.add_argument("--classes", type=int, default=6,
                   help="classes of the synthetic tasks (2 to 12), or of --images/--masks (default: 6)")
    p.add_argument("--images", type=Path, default=None, help="folder of your images (task B instead of synthetic)")
    p.add_argument("--masks", type=Path, default=None,
                   help="folder of PNG masks with class ids, stems matching --images; ids >= --classes are ignored")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="with --images: held-out fraction, the last files by name (default: 0.2)")
    p.add_argument("--encoder-weights", type=Path, default=None,
                   help="finetune protocol: a state_dict for model.encoder, or a whole model's (its 'encoder.' entries), "
                   "used instead of pretraining on task A; needs a single --encoders value")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                   help="folder for the JSON and markdown results (default: benchmarks/results/)")
    p.add_argument("--tag", default="", help="suffix of the result file names (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; --quick: 1, robust when other processes "
                   "compete for the cores)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options, filling the defaults."""
    p = build_parser()
    args = p.parse_args(argv)
    defaults(args, _FULL, _QUICK)
    _choices(args.optimizers, OPTIMIZERS, "--optimizers")
    _choices(args.modes, MODES, "--modes")
    _choices([args.protocol], (*PROTOCOLS, "both"), "--protocol")
    args.protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    if args.batch < 2:
        p.error("--batch must be at least 2: fxeq calibrates with train-mode batch statistics")
    if (args.images is None) != (args.masks is None):
        p.error("--images and --masks go together")
    if args.encoder_weights and len(args.encoders) != 1:
        p.error("--encoder-weights fits one encoder; pass a single --encoders value")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.synthetic_classes = args.classes if args.images is None else _TASK_A_CLASSES
    args.models = [f"{arch}/{encoder}" for arch in args.archs for encoder in args.encoders]
    return args



def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    run = start("train_quality", args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lr = parse_lr(args.lr, args.optimizers)
    if args.images is None:
        source: Source = SyntheticSource(SyntheticTask(_TASK_B, args.classes, args.size), device,
                                         args.eval_images)
        data = (f"synthetic task B, {args.classes} classes (texture orientation x period), {args.eval_images} "
                "held-out images")
    else:
        source = FolderSource(args.images, args.masks, size=args.size, classes=args.classes,
                              val_fraction=args.val_fraction, device=device)
        data = f"{args.images} with masks {args.masks}, {args.classes} classes, resized to {args.size}"
    setting = Setting(source, source.eval_batches(args.batch), lr, args)
    runs, pretraining, sites = run_all(setting, log=lambda text: print(text, file=sys.stderr, flush=True))
    summary = summarize(runs)
    data_record = {"data": data, "lr": lr, "weight_decay": {o: _WEIGHT_DECAY[o] for o in args.optimizers},
                   "sites": sites, "pretraining": pretraining, "summary": summary, "runs": runs}
    run.write(data_record, markdown_sections(args, lr, runs, summary, pretraining, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
