"""Tiny models and helpers for the command-line tests; the models are importable as ``cli_models:NAME``.

``tests/`` is put on ``PYTHONPATH`` of each ``python -m fxeq`` subprocess, so
``--model cli_models:TinyFuse`` builds them. Inputs are ``(N, 3, 32, 32)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxeq.cli import main

TESTS = Path(__file__).parent


def _branch(out: int, in_channels: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU())


class TinyFuse(nn.Module):
    """Two Conv-BN-ReLU branches at two resolutions, fused by a 3x3 conv with a bias::

        x ── a ──────────────────────────────┐
        x ── pool/4 ── b ── upsample x4 ─────┴─ cat ── fuse(3x3, bias) ── relu ── head

    ``a_channels`` changes the first slice (and the fusing conv's input), as
    another configuration of the same architecture would; ``in_channels`` the
    input's channels (1 for grayscale, 4 for RGBA).
    """

    def __init__(self, classes: int = 2, a_channels: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.a = _branch(a_channels, in_channels)
        self.b = _branch(6, in_channels)
        self.fuse = nn.Conv2d(a_channels + 6, 8, 3, padding=1)
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


class ShapeChecked(TinyFuse):
    """TinyFuse whose forward checks the input size in Python, as smp models do: fx cannot trace it::

        if x.shape[-1] % 8: raise ValueError(...)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8:
            raise ValueError(f"Wrong input shape width={x.shape[-1]}. Expected a width divisible by 8.")
        return super().forward(x)


class SameResolution(TinyFuse):
    """TinyFuse without the upsampling: both branches at full resolution (a site only with --all-concats)::

        x ── a ──┐
        x ── b ──┴─ cat ── fuse ── relu ── head
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fuse(torch.cat([self.a(x), self.b(x)], 1))))


class Pooled(nn.Module):
    """ASPP's image pooling beside a full-resolution branch: batch norm on a 1x1 map, which needs 2 samples::

        x ── a ─────────────────────────────────────────────────────┐
        x ── global pool ── conv ── BN ── ReLU ── upsample to x ────┴─ cat ── fuse ── relu ── head
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = _branch(4)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.fuse = nn.Conv2d(10, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear")
        return self.head(F.relu(self.fuse(torch.cat([self.a(x), pooled], 1))))


# ---------------------------------------------------------------------------
# Running the command line
# ---------------------------------------------------------------------------

def subprocess_env() -> dict[str, str]:
    """The environment of a subprocess, with ``tests/`` importable for ``cli_models``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m fxeq ARGS`` in ``cwd``, with ``tests/`` importable for ``cli_models``."""
    return subprocess.run(
        [sys.executable, "-m", "fxeq", *map(str, args)], cwd=cwd, env=subprocess_env(), capture_output=True,
        text=True, timeout=300, check=False,
    )


def run_main(*args: object) -> subprocess.CompletedProcess[str]:
    """``fxeq ARGS`` in this process (paths should be absolute); for module-scoped fixtures, where capsys is not."""
    out, err = io.StringIO(), io.StringIO()
    path = list(sys.path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        sys.path[:] = path  # main() puts the current folder on it
    return subprocess.CompletedProcess(["fxeq", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_fails(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Exit code ``code``, a ``fxeq: error:`` message holding every word, and no traceback or double period."""
    assert result.returncode == code, result.stderr
    assert "fxeq: error: " in result.stderr
    message = result.stderr.split("fxeq: error: ", 1)[1]
    for word in words:
        assert word in message, result.stderr
    assert "Traceback" not in result.stderr
    assert not re.search(r"(?<!\.)\.\.(?!\.)", message), message  # ".." but not "..."
    # advice in the command line's words: flags, not the library's arguments
    assert not re.search(r"\b(inplace|all_concats|frontend|one_pass|min_std|num_batches|input_fn)=", message), message
