"""The smallest model with a fusion site, for the docstrings' runnable examples.

A leaf module: it imports nothing of fxeq, so any module's example can use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Fuse"]


class Fuse(nn.Module):
    """Two branches, one upsampled, fused by a conv::

        x ──────── a ───────────────────────┐
        x ── pool ── b ── interpolate(x2) ──┴─ cat ── fuse

    Example:
        >>> Fuse()(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 2, 8, 8])
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fuse = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)
        return self.fuse(torch.cat([self.a(x), b], 1))
