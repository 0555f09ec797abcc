"""Observe: measure what each fusing conv actually receives, in the user's own model.

fxeq does not instrument a graph. It puts one forward pre-hook on each
site's fusing conv *module* in the eager model, after any hook the user
registered, and observes every site input as the channel slice of the
conv's input that it occupies::

    a ───────────────┐
    b ── upsample ───┴─ cat ─ [user pre-hooks] ─ [fxeq pre-hook] ─ conv
                                                  observer_0 <- x[:, 0:ca]
                                                  observer_1 <- x[:, ca:ca+cb]

So the statistics are those of the tensor the conv multiplies by its weight,
whatever the model does on the way (hooks, buffers, dynamic shapes), and
``cat([u, u])`` observes ``u`` once per slice. One :class:`ScaleObserver`
per (site, input index) keeps float64 running statistics on the device.

Once every observed conv of a pass has fired for a batch, the rest of the
forward is not needed: :class:`SiteObservers` can stop it there
(:class:`PassDone`), which saves the decoder's head and final upsampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import CalibrationError
from .sites import Site, observation_point

__all__ = [
    "InputStats", "PassDone", "ScaleObserver", "SiteObservers", "channel_moments", "merge_across_ranks",
]


_BLOCK_ELEMENTS = 1 << 20  # float32 elements centred at once by channel_moments
_NORM_ELEMENTS = 1 << 16  # longest piece of a row whose squares one float32 norm sums
_SHIFT_SAMPLE = 16  # values per row, spread over it, whose median shifts each channel


def channel_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Per channel (dim 1) of ``x``: the element count, the mean and the sum of squared deviations (M2).

    The tensor is read as rows, one per (sample, channel), each contiguous over
    the spatial positions. Every value is shifted by the median of a sample of its
    channel's values (16 per row, spread over it: near the channel's mean, so the
    shifted values are small where the mean is large; a float32 sum and sum of
    squares of the raw values gives a negative variance at mean 1e4), each row's
    shifted sum and sum of squares are reduced in float32 (along contiguous
    memory, so fast: one pass to shift, one per reduction, against the two
    passes more that per-channel reductions over the batch and spatial dims
    cost), and the rows are merged in float64, the sum of the deviations
    correcting the shift's distance from the mean. Channels are taken in
    blocks of about 4 MiB, so the transient shifted copy stays small. The
    results are float64; fp16/bf16 input is read as float32. A tensor with
    fewer than 2 dims is one channel.

    Example:
        >>> count, mean, m2 = channel_moments(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
        >>> count, mean.tolist(), [round(v, 5) for v in m2.tolist()]
        (2, [2.0, 4.0], [2.0, 2.0])
    """
    values = x.detach()
    if values.dim() < 2:
        values = values.reshape(-1, 1)
    rows = values.reshape(values.shape[0], values.shape[1], math.prod(values.shape[2:]))
    count = rows.shape[0] * rows.shape[2]
    if count == 0:  # no element in any channel: nothing to merge
        zeros = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        return 0, zeros, zeros.clone()
    # Blocks of channels bound the transient shifted copy (about 4 MiB) whatever the input's size.
    step = max(1, _BLOCK_ELEMENTS // max(count, 1))
    means, m2s = [], []
    for block in rows.split(step, dim=1):
        if block.element_size() < 4:  # fp16/bf16 deviations would round
            block = block.float()
        shift = _shift(block)
        deviation = block - shift
        s1 = deviation.sum(dim=-1).double().sum(dim=0)
        s2 = _sum_of_squares(deviation)
        means.append(shift.flatten().double() + s1 / count)
        m2s.append(s2 - s1 * s1 / count)
    return count, torch.cat(means), torch.cat(m2s)


def _sum_of_squares(deviation: torch.Tensor) -> torch.Tensor:
    """Per channel of ``[N, C, L]``, the sum of squares, in float64.

    A float32 vector norm is the fastest reduction but rounds with the row's length (1e-3 of the
    variance on a 4096x4096 map), so long rows are cut into pieces of at most 65536 values first;
    a length with no such divisor is summed square by square (slower, as exact).
    """
    length = deviation.shape[2]
    piece = length if length <= _NORM_ELEMENTS else math.gcd(length, _NORM_ELEMENTS)
    if piece < 1024:
        return deviation.square().sum(dim=-1).double().sum(dim=0)
    pieces = deviation.reshape(deviation.shape[0], deviation.shape[1], length // piece, piece)
    return torch.linalg.vector_norm(pieces, dim=-1).double().square().sum(dim=(0, 2))


def _shift(block: torch.Tensor) -> torch.Tensor:
    """A value near each channel's mean: the median of a sample spread over every row (16 positions per row,
    evenly from its first to its last, so not one column of the map), shaped ``[1, C, 1]``.

    The closer it is to the mean, the smaller the shifted values and their rounding; the median
    keeps a few outliers among the sampled positions from pulling it away.
    """
    length = block.shape[2]
    positions = torch.linspace(0, length - 1, min(_SHIFT_SAMPLE, length), device=block.device).round().long()
    sample = block.index_select(2, positions).transpose(0, 1).reshape(block.shape[1], -1)
    return sample.median(dim=1).values.view(1, -1, 1)


class ScaleObserver(nn.Module):
    """Accumulates the global mean and variance of the tensors it sees.

    Each batch is reduced per channel (:func:`channel_moments`), the channels
    are merged exactly in float64, and the result is merged into float64
    running ``mean`` and ``m2`` buffers with Chan's parallel formula. The
    element count is a host-side integer known from shapes, and everything else
    stays on the tensor's device: no host synchronization per batch.

    Example:
        >>> obs = ScaleObserver()
        >>> _ = obs(torch.full((2, 3), 1e4) + torch.tensor([1.0, -1.0, 0.0]))
        >>> _ = obs(torch.full((4,), 1e4))
        >>> obs.count, round(obs.mean.item(), 3), round(obs.std().item(), 4)
        (10, 10000.0, 0.6325)
    """

    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))
        self.count = 0
        self.samples = 0

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.mean.zero_()
        self.m2.zero_()
        self.count = 0
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            self.observe_channels(*channel_moments(x), samples=x.shape[0] if x.dim() else 1)
        return x

    def observe_channels(self, count: int, mean: torch.Tensor, m2: torch.Tensor, *, samples: int) -> None:
        """Merge channels' moments (each over ``count`` elements) as one batch of ``samples`` samples."""
        if self.mean.device != mean.device:
            self.to(mean.device)
        total = mean.mean()
        self.merge(count * mean.numel(), total, m2.sum() + count * (mean - total).square().sum())
        self.samples += samples

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge another partition's (count, mean, m2) into this one (Chan et al.)."""
        total = self.count + count
        if total == 0:
            return
        share = count / total
        delta = mean - self.mean
        self.mean += delta * share
        self.m2 += m2 + delta * delta * (self.count * share)
        self.count = total

    def std(self) -> torch.Tensor:
        """Population standard deviation of everything seen (NaN if nothing was)."""
        return (self.m2 / self.count).sqrt() if self.count else torch.full_like(self.m2, float("nan"))


@dataclass(frozen=True)
class InputStats:
    """Global statistics of one concatenation input over the calibration data.

    Attributes:
        mean: mean over all of N, C, H, W and all batches.
        std: population standard deviation over the same.
        count: number of elements seen.
        samples: number of samples (batch items) seen.
    """

    mean: float
    std: float
    count: int
    samples: int

    @classmethod
    def of(cls, observer: ScaleObserver) -> InputStats:
        """Read an observer (one host synchronization)."""
        mean, std = torch.stack([observer.mean, observer.std()]).tolist()
        return cls(mean=mean, std=std, count=observer.count, samples=observer.samples)



def merge_across_ranks(observers: Sequence[ScaleObserver], batches: int = 0) -> int:
    """Replace each observer's statistics with those of all ranks together; return all ranks' batches.

    Does nothing (and returns ``batches``) unless ``torch.distributed`` is
    initialized with more than one rank. One ``all_gather`` carries every
    observer's (count, samples, mean, M2) and this rank's batch count; the
    merge is associative, so every rank ends with the same numbers.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return batches
    device = observers[0].mean.device if observers else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    zero = torch.zeros((), dtype=torch.float64, device=device)
    local = torch.stack([
        torch.stack([zero + float(o.count), zero + float(o.samples), o.mean.to(device), o.m2.to(device)])
        for o in observers
    ] + [torch.stack([zero + float(batches), zero, zero, zero])])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    parts = torch.stack(gathered).cpu()
    for k, observer in enumerate(observers):
        observer.reset()
        for count, samples, mean, m2 in parts[:, k].tolist():
            observer.merge(int(count), torch.tensor(mean, dtype=torch.float64, device=observer.mean.device),
                           torch.tensor(m2, dtype=torch.float64, device=observer.mean.device))
            observer.samples += int(samples)
    return int(parts[:, -1, 0].sum().item())


class PassDone(BaseException):
    """Raised by :class:`SiteObservers` to end a forward once nothing more is to be observed.

    A ``BaseException``, so that a model's own ``except Exception`` does not swallow it.
    """


class SiteObservers:
    """Forward pre-hooks observing every input of some sites at their fusing convs.

    Args:
        model: the eager model whose conv modules get the hooks.
        sites: the sites to observe; :func:`observation_point` must accept each.
        stop_early: end each forward (raise :class:`PassDone`) once every
            observed conv has fired. Default: True.

    Use as a context manager: hooks are registered on entry and removed on exit.

    Example:
        >>> from fxeq.sites import FusingConv, SiteInput
        >>> net = nn.Sequential(nn.Conv2d(5, 1, 1))
        >>> inputs = (SiteInput(0, "a", (0, 2), "a"), SiteInput(1, "b", (2, 5), "b"))
        >>> site = Site("cat", inputs, (FusingConv("c", "0", "0.weight", "0.bias", 1, False, False),))
        >>> with SiteObservers(net, [site]) as observers:
        ...     observers.run(net, (torch.ones(2, 5, 4, 4),), {})
        >>> observers.observers["cat", 1].count, observers.observers["cat", 1].mean.item()
        (96, 1.0)
    """

    def __init__(self, model: nn.Module, sites: Iterable[Site], *, stop_early: bool = True) -> None:
        self.observers: dict[tuple[str, int], ScaleObserver] = {}
        self._points: dict[int, tuple[nn.Module, Site, list[tuple[slice, ScaleObserver]]]] = {}
        for site in sites:
            module = observation_point(model, site)
            if isinstance(module, str):
                raise CalibrationError(f"site {site.name!r}: {module}")
            slices = []
            for inp in site.inputs:
                observer = self.observers[site.name, inp.index] = ScaleObserver()
                slices.append((slice(*inp.channels), observer))
            self._points[id(module)] = (module, site, slices)
        self.stop_early = stop_early
        self._pending: set[int] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SiteObservers:
        for module, _, _ in self._points.values():
            self._handles.append(module.register_forward_pre_hook(self._observe))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run ``forward(*args, **kwargs)``, stopping early once every observed conv has fired."""
        self._pending = set(self._points)
        try:
            forward(*args, **kwargs)
        except PassDone:
            pass

    def _observe(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        _, site, slices = self._points[id(module)]
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != site.channels:
            found = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise CalibrationError(
                f"site {site.name!r}: its conv {site.convs[0].module} was expected to receive the "
                f"{site.channels}-channel concatenation, but received {found}. The model computes something "
                "else on this batch than on the batch it was captured with; calibrate with batches like it."
            )
        count, mean, m2 = channel_moments(x)  # one pass over the conv input for all slices
        for channels, observer in slices:
            observer.observe_channels(count, mean[channels], m2[channels], samples=x.shape[0])
        self._pending.discard(id(module))
        if self.stop_early and not self._pending:
            raise PassDone
