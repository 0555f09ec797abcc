"""Tiny named fixture models, and the explicit-equalizer oracle.

Each model's docstring draws it. Inputs are ``(N, 3, 16, 16)`` unless said.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


class TwoBranch(nn.Module):
    """Two branches at different resolutions fused by one conv::

        x ── conv_a ──────────────────────────────┐
        x ── pool ── conv_b ── relu ── upsample ──┴─ cat ── fuse(k, groups, bias)
    """

    def __init__(self, ca: int = 3, cb: int = 5, out: int = 4, *, kernel: int = 1, groups: int = 1,
                 bias: bool = True, mode: str = "bilinear", scale_b: float = 3.0) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, ca, 3, padding=1)
        self.conv_b = nn.Conv2d(3, cb, 3, padding=1)
        with torch.no_grad():
            self.conv_b.weight.mul_(scale_b)
        self.mode = mode
        self.fuse = nn.Conv2d(ca + cb, out, kernel, padding=kernel // 2, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_a(x)
        b = F.relu(self.conv_b(F.avg_pool2d(x, 4)))
        b = F.interpolate(b, size=a.shape[-2:], mode=self.mode)
        return self.fuse(torch.cat([a, b], dim=1))


class BNHead(nn.Module):
    """A Conv-BN-ReLU branch pair with dropout and a BN after the fuse::

        x ── conv ── bn ── relu ───────────────────────┐
        x ── pool ── conv ── bn ── relu ── upsample ───┴─ cat ── dropout ── fuse ── bn ── head
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.drop = nn.Dropout2d(0.5)
        self.fuse = nn.Conv2d(10, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = nn.functional.interpolate(self.b(F.avg_pool2d(x, 4)), scale_factor=4.0, mode="bilinear")
        return self.head(F.relu(self.bn(self.fuse(self.drop(torch.cat([a, b], 1))))))


class BNFuse(nn.Module):
    """A 1x1 fusing conv with a bias, read by a batch norm (the ConvModule shape)::

        x ── conv_a ───────────────────────┐
        x ── pool ── conv_b ── upsample ───┴─ cat ── fuse(1x1, bias) ── bn ── relu ── head
    """

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv_b.weight.mul_(3.0)
            self.conv_b.bias.add_(1.0)
        self.fuse = nn.Conv2d(7, 6, 1)
        self.bn = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.interpolate(self.conv_b(F.avg_pool2d(x, 4)), scale_factor=4.0, mode="bilinear")
        return self.head(F.relu(self.bn(self.fuse(torch.cat([self.conv_a(x), b], 1)))))


class ShapeBranch(TwoBranch):
    """TwoBranch whose forward checks shapes in Python (fx fails, export works)::

        if x.shape[-1] % 4: raise ...
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            raise ValueError("width must be divisible by 4")
        return super().forward(x)


class Untraceable(TwoBranch):
    """TwoBranch whose forward branches on tensor values (neither frontend)::

        if x.sum() > 0: ... else: ...
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


class Chained(nn.Module):
    """Two sites; site 1's fused conv feeds site 2 with no normalization::

        x ── c1 ──────────────────────┐
        x ── pool ── c2 ── upsample ──┴─ cat ── fuse1 ── pool ── relu ──────────────┐
        x ── pool4 ── c3 ── upsample ────────────────────────────────────────────────┴─ cat_1 ── fuse2
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 1)
        self.c2 = nn.Conv2d(3, 3, 1)
        self.c3 = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.c2.weight.mul_(4.0)
            self.c3.weight.mul_(0.3)
        self.fuse1 = nn.Conv2d(6, 4, 1)
        self.fuse2 = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.interpolate(self.c2(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
        y = self.fuse1(torch.cat([self.c1(x), b], 1))
        y = F.relu(F.avg_pool2d(y, 2))
        c = F.interpolate(self.c3(F.avg_pool2d(x, 4)), scale_factor=2.0, mode="nearest")
        return self.fuse2(torch.cat([y, c], 1))


class Negatives(nn.Module):
    """Concatenations that are not sites::

        cat(a, up(b)) ── bn ── conv          (normalized first)
        cat(a, a2)    ── conv                (no upsampled input)
        cat(a, up(b)) ── (output)            (feeds no conv)
        cat(a, a, dim=2)                     (not on channels)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 2, 1)
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.a(x)
        b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)
        normed = self.conv1(self.bn(torch.cat([a, b], 1)))
        same = self.conv2(torch.cat([a, a * 2.0], 1))
        loose = torch.cat([a, b], 1)
        tall = torch.cat([a, a], 2)
        return normed, same, loose, tall


class CatTwice(nn.Module):
    """The same upsampled tensor twice, and an empty input::

        u = up(conv(x));  cat([u, empty, u, conv_a(x)]) ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Conv2d(3, 2, 1)
        self.a = nn.Conv2d(3, 3, 1)
        self.fuse = nn.Conv2d(7, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
        empty = x[:, :0]
        return self.fuse(torch.cat([u, empty, u * 3.0, self.a(x)], 1))


class SharedFuse(nn.Module):
    """A fusing conv also used elsewhere (rescaling it would change that use)::

        cat(a, up(b)) ── fuse;   cat(up(b), a) ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.fuse = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)
        return self.fuse(torch.cat([a, b], 1)) + self.fuse(torch.cat([b, a], 1))


class NoSite(nn.Module):
    """No concatenation at all: conv ── relu ── conv."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every state_dict entry."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``model``'s state_dict has exactly these keys and values."""
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@contextlib.contextmanager
def leaves_unchanged(model: nn.Module) -> Iterator[None]:
    """Assert on leaving the block that ``model``'s state_dict is what it was on entering it (keys and values)."""
    before = state_of(model)
    yield
    assert same_state(model, before), "the model's state changed"


def batches(n: int = 3, size: int = 16, batch: int = 4, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Deterministic calibration batches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g).to(dtype) for _ in range(n)]


def explicit_equalizer(
    model: nn.Module,
    convs: Mapping[str, Iterable[tuple[tuple[int, int], float, float]]],
) -> list[torch.utils.hooks.RemovableHandle]:
    """The paper's literal module: (x - mu) / sigma per slice, before each conv.

    Args:
        model: the original model (hooks are added to it).
        convs: per conv module name, ``((start, stop), mean, std)`` per slice.

    Returns:
        The hook handles (remove them to undo).
    """
    handles = []
    for name, slices in convs.items():
        slices = list(slices)

        def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...], slices=slices) -> tuple[torch.Tensor]:
            x = args[0].clone()
            for (start, stop), mean, std in slices:
                x[:, start:stop] = (x[:, start:stop] - mean) / std
            return (x,)

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook))
    return handles


def explicit_oracle(model: nn.Module, report, data: list, *, with_mean: bool | None = None, forward=None) -> list:
    """Attach the explicit equalizer to ``model``, measuring every statistic itself: no number from fxeq.

    Only the report's structure is used (which convs fuse which channel slices). Sites are taken in graph
    order; each is measured with :func:`reference_stats` (float64 hooks, batch norms with batch statistics)
    with the equalizers of the sites before it attached, so chained sites are measured one at a time, then
    gets its own ``(x - mu) / sigma`` pre-hook. ``with_mean=None`` subtracts the mean only before convs with
    a bias, which is what the fold can express without adding parameters.

    Returns:
        The hook handles (remove them to undo).
    """
    handles = []
    for site in report.search.sites:
        slices = [inp.channels for inp in site.inputs]
        stats = reference_stats(model, site.convs[0].module, data, slices, forward=forward)
        for conv in site.convs:
            subtract = conv.bias is not None if with_mean is None else with_mean
            handles += explicit_equalizer(model, {conv.module: [
                (channels, mean if subtract else 0.0, std) for channels, (mean, std) in zip(slices, stats, strict=True)
            ]})
    return handles


def reference_stats(model: nn.Module, conv: str, data: list,
                    slices: list[tuple[int, int]], *, forward=None) -> list[tuple[float, float]]:
    """float64 mean/std of each slice of ``conv``'s input over ``data``, BN (and tracked norms) in batch-stat mode.

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``).
    """
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(conv).register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    states = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.train()
    try:
        with torch.no_grad():
            for x in data:
                forward(model, x) if forward is not None else model(x)
    finally:
        handle.remove()
        model.load_state_dict(states)
        for m, flag in flags:
            m.training = flag
    out = []
    for start, stop in slices:
        values = torch.cat([s[:, start:stop].flatten() for s in seen])
        out.append((values.mean().item(), values.std(unbiased=False).item()))
    return out


class ChainedBN(Chained):
    """Two sites separated by a batch norm, as in UPerNet (PSP bottleneck → FPN fuse)::

        x ── c1 ──────────────────────┐
        x ── pool ── c2 ── upsample ──┴─ cat ── fuse1 ── bn ── relu ── pool ── upsample ──┐
        x ── c3 ───────────────────────────────────────────────────────────────────────────┴─ cat_1 ── fuse2

    The batch norm fixes fuse1's per-channel mean and variance, but not the
    shape of its distribution, which the ReLU sees: site 2 depends on site 1.
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.c2.bias.add_(2.0)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.interpolate(self.c2(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
        y = F.relu(self.bn(self.fuse1(torch.cat([self.c1(x), b], 1))))
        y = F.interpolate(F.avg_pool2d(y, 2), scale_factor=2.0, mode="bilinear")
        return self.fuse2(torch.cat([y, self.c3(x)], 1))


class Counter(TwoBranch):
    """TwoBranch that counts its forward calls in a buffer (state fxeq must not change)::

        self.steps += 1; TwoBranch.forward(x)
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1)
        return super().forward(x)


class OneShot:
    """An iterable whose ``__iter__`` returns the same iterator every time."""

    def __init__(self, items: list) -> None:
        self._it = iter(items)

    def __iter__(self):
        return self._it


def remeasure(model: nn.Module, report, data: list[torch.Tensor]) -> dict[tuple[str, int], tuple[float, float]]:
    """Re-measure every site input that ``report`` folded, on ``model`` as it is now (see reference_stats)."""
    measured = {}
    for site in report.search.sites:
        stats = reference_stats(model, site.convs[0].module, data, [i.channels for i in site.inputs])
        measured.update({(site.name, i.index): s for i, s in zip(site.inputs, stats, strict=True)})
    return measured


def reference_fold(model: nn.Module, conv_name: str, slices: list[tuple[int, int]],
                   stats: list[tuple[float, float]]) -> None:
    """Fold (x - mu) / sigma per slice into a conv module's weight and bias, in place: loops, float64, no fxeq.

    A conv's weight is (out, in / groups, *k), a transposed conv's (in, out / groups, *k). The mean goes into
    the bias where there is one, except for a transposed conv with a stride above 1 (no single bias then).
    """
    conv = model.get_submodule(conv_name)
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    weight = conv.weight.detach().double().clone()
    groups = conv.groups
    channels = weight.shape[0] if transposed else weight.shape[1] * groups
    mean = torch.zeros(channels, dtype=torch.float64)
    std = torch.ones(channels, dtype=torch.float64)
    for (start, stop), (m, s) in zip(slices, stats, strict=True):
        mean[start:stop], std[start:stop] = m, s
    per_group = channels // groups
    out_per_group = (weight.shape[1] if transposed else weight.shape[0] // groups)
    for c in range(channels):
        g, local = divmod(c, per_group)
        if transposed:
            weight[c] /= std[c]
        else:
            weight[g * out_per_group:(g + 1) * out_per_group, local] /= std[c]
    fold_mean = conv.bias is not None and not (transposed and any(s != 1 for s in conv.stride))
    with torch.no_grad():
        if fold_mean:
            bias = conv.bias.detach().double().clone()
            summed = weight.flatten(2).sum(-1)  # per (row, column): the kernel's taps summed
            for c in range(channels):
                g, local = divmod(c, per_group)
                rows = slice(g * out_per_group, (g + 1) * out_per_group)
                bias[rows] -= (summed[c] if transposed else summed[rows, local]) * mean[c]
            conv.bias.copy_(bias.to(conv.bias.dtype))
        conv.weight.copy_(weight.to(conv.weight.dtype))


def reference_equalize(model: nn.Module, sites: list[tuple[list[str], list[tuple[int, int]]]],
                       data: list, *, forward=None) -> nn.Module:
    """The scale equalizer computed without fxeq: a copy of ``model``, each site measured and folded in turn.

    ``sites`` are (fusing conv module names, input slices), upstream sites first (graph order). Each site is
    measured (float64 hooks, batch norms with batch statistics, everything else in eval) on the copy with
    every earlier site already folded, so chained sites are measured one at a time.
    """
    import copy as _copy

    reference = _copy.deepcopy(model)
    for convs, slices in sites:
        stats = reference_stats(reference, convs[0], data, slices, forward=forward)
        for conv in convs:
            reference_fold(reference, conv, slices, stats)
    return reference
