"""train_quality data: a synthetic multi-scale segmentation task, or a user's folders.

The synthetic task is generated in torch on the run's device, deterministic
per seed on a given device: weighted Voronoi regions of very different sizes,
each filled with an oriented sinusoid grating whose orientation and period
(4, 8 or 16 pixels) identify its class, with a random colour, phase, contrast
and pixel noise. Tasks A and B assign different textures to their classes.
:class:`FolderSource` reads a user's images and PNG class-id masks instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

__all__ = [
    "EVAL_SEED", "IGNORE", "TASK_A", "TASK_A_CLASSES", "TASK_B", "Batch", "FolderSource", "Source",
    "SyntheticSource", "SyntheticTask", "stream_seed",
]

IGNORE = -1
"""Mask value that the loss and the mIoU ignore."""
EVAL_SEED = 2**40  # held-out set: one fixed stream, never a training seed
TASK_A, TASK_B = 0, 1
TASK_A_CLASSES = 6  # task A's classes when task B is the user's data

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


def stream_seed(seed: int, step: int) -> int:
    """The generator seed of training batch ``step`` in the stream of ``seed``."""
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
        return self.task.sample(batch, stream_seed(seed, step), self.device)

    def eval_batches(self, batch: int) -> list[Batch]:
        images, masks = self.task.sample(self.eval_images, EVAL_SEED, self.device)
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
        y = y.masked_fill(y >= classes, IGNORE)
        held_out = max(1, round(len(pairs) * val_fraction))
        train_x, self.eval_x = x[:-held_out], x[-held_out:]
        self.train_y, self.eval_y = y[:-held_out], y[-held_out:]
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.train_x, self.eval_x = (train_x - mean) / std, (self.eval_x - mean) / std
        self.classes = classes
        self.device = device

    def train_batch(self, seed: int, step: int, batch: int) -> Batch:
        g = torch.Generator(self.device).manual_seed(stream_seed(seed, step))
        index = torch.randint(0, len(self.train_x), (batch,), generator=g, device=self.device)
        return self.train_x[index], self.train_y[index]

    def eval_batches(self, batch: int) -> list[Batch]:
        return list(zip(self.eval_x.split(batch), self.eval_y.split(batch)))
