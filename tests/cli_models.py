"""Tiny models for the command-line tests, importable as ``cli_models:NAME``.

``tests/`` is put on ``PYTHONPATH`` of each ``python -m fxeq`` subprocess, so
``--model cli_models:TinyFuse`` builds them. Inputs are ``(N, 3, 32, 32)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _branch(out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU())


class TinyFuse(nn.Module):
    """Two Conv-BN-ReLU branches at two resolutions, fused by a 3x3 conv with a bias::

        x ── a ──────────────────────────────┐
        x ── pool/4 ── b ── upsample x4 ─────┴─ cat ── fuse(3x3, bias) ── relu ── head
    """

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.a = _branch(4)
        self.b = _branch(6)
        self.fuse = nn.Conv2d(10, 8, 3, padding=1)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.interpolate(self.b(F.avg_pool2d(x, 4)), scale_factor=4.0, mode="bilinear")
        return self.head(F.relu(self.fuse(torch.cat([self.a(x), b], 1))))


class NoFuse(nn.Module):
    """No concatenation at all: a ── head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _branch(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x))
