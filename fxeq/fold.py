"""The fold: the arithmetic that puts the scale equalizer into a fusing conv's weights.

The equalizer standardizes each concatenation input i with scalars mu_i and
sigma_i. Because a conv reads the concatenation, it folds into that conv::

    before:  cat(x_1..x_K) ── (x - mu) / sigma ── conv(W, b)
    after:   cat(x_1..x_K) ── conv(W', b')       (the original graph)

    W'[:, slice_i] = W[:, slice_i] / sigma_i
    b'             = b - sum_i sum_kernel(W'[:, slice_i]) * mu_i

The scale part is exact, for grouped and depthwise convs too, and for
transposed convs, whose weight holds the input channels on dim 0 instead
of dim 1. The mean part is exact wherever the conv does not read zero
padding; a transposed conv with a stride above 1 gives each output phase its
own kernel taps, so its mean has no single bias and is not folded. A conv
without a bias gets none (that would change state_dict keys), so its mean is
not folded either.

All arithmetic is float64 and the result is cast back to each parameter's
dtype. Nothing here writes a parameter: :mod:`fxeq.rewrite` does, once
everything is computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .errors import CalibrationError, FxEqError
from .sites import FusingConv, Site

__all__ = ["fold", "fold_site", "folds_mean", "keep_norms", "mean_term", "per_weight_column", "site_vectors"]

_CONSTANT = 1e-5  # std / |mean| below which an input is constant up to float rounding


def per_weight_column(values: torch.Tensor, shape: torch.Size, groups: int, transposed: bool = False) -> torch.Tensor:
    """Spread per-input-channel values over a conv weight's layout, ready to broadcast.

    A conv weight is ``(out, in / groups, *kernel)``: input channel c sits in
    group ``c // per_group`` at column ``c % per_group``, and output channel o
    reads only its own group's columns. A transposed conv's weight is
    ``(in, out / groups, *kernel)``: input channel c is row c.

    Example:
        >>> per_weight_column(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.Size([4, 2, 3, 3]), 2).flatten().tolist()
        [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
        >>> per_weight_column(torch.tensor([1.0, 2.0]), torch.Size([2, 3, 2, 2]), 1, transposed=True).shape
        torch.Size([2, 1, 1, 1])
    """
    kernel = (1,) * (len(shape) - 2)
    if transposed:
        if shape[0] != values.numel():
            raise ValueError(f"transposed-conv weight {tuple(shape)} reads {shape[0]} channels, "
                             f"but mean/std have {values.numel()}")
        return values.reshape(shape[0], 1, *kernel)
    out_channels, per_group = shape[:2]
    if per_group * groups != values.numel():
        raise ValueError(
            f"weight {tuple(shape)} with groups={groups} reads {per_group * groups} channels, "
            f"but mean/std have {values.numel()}"
        )
    spread = values.reshape(groups, per_group).repeat_interleave(out_channels // groups, dim=0)
    return spread.reshape(out_channels, per_group, *kernel)


def mean_term(weight: torch.Tensor, mean: torch.Tensor, groups: int, transposed: bool = False) -> torch.Tensor:
    """Per output channel, what subtracting ``mean`` from the input takes off ``conv(x, weight)``.

    float64, ``sum_c sum_kernel(weight[:, c]) * mean[c]``; exact where no zero
    padding is read (for a transposed conv: with stride 1).

    Example:
        >>> mean_term(torch.ones(1, 2, 3, 3), torch.tensor([1.0, 2.0]), 1).tolist()
        [27.0]
    """
    summed = weight.double().flatten(2).sum(-1)
    if transposed:  # (in, out / groups): input channels of group g feed that group's outputs
        per_in = summed.shape[0] // groups
        by_group = summed.reshape(groups, per_in, -1)
        return torch.einsum("gio,gi->go", by_group, mean.double().reshape(groups, per_in)).flatten()
    return (summed * per_weight_column(mean.double(), weight.shape, groups).flatten(1)).sum(1)


def folds_mean(conv: FusingConv) -> bool:
    """Whether the mean can go into this conv: it has a bias, and is not a strided transposed conv."""
    return conv.bias is not None and not (conv.transposed and any(s != 1 for s in conv.stride))


def fold(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    groups: int = 1,
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold per-input-channel standardization into a conv's weight and bias.

    Args:
        weight: conv weight, ``(out, in / groups, *kernel)``; transposed:
            ``(in, out / groups, *kernel)``.
        bias: conv bias ``(out,)`` or None (then the mean is not folded).
        mean: per-input-channel mean to subtract, ``(in,)``.
        std: per-input-channel std to divide by, ``(in,)``.
        groups: conv groups. Default: 1.
        transposed: whether it is a transposed conv's weight. Default: False.

    Returns:
        ``(new_weight, new_bias)`` in the parameters' dtypes; ``conv(x, W', b')``
        equals ``conv((x - mean) / std, W, b)`` wherever no zero padding is read.

    Example:
        >>> w, b = torch.ones(1, 2, 1, 1), torch.zeros(1)
        >>> w2, b2 = fold(w, b, torch.tensor([1.0, 0.0]), torch.tensor([2.0, 4.0]))
        >>> w2.flatten().tolist(), b2.tolist()
        ([0.5, 0.25], [-0.5])
    """
    if mean.shape != std.shape:
        raise ValueError(f"mean has shape {tuple(mean.shape)} but std has {tuple(std.shape)}")
    new_weight = weight.double() * per_weight_column(1.0 / std.double(), weight.shape, groups, transposed)
    if bias is None:
        return new_weight.to(weight.dtype), None
    new_bias = bias.double() - mean_term(new_weight, mean, groups, transposed)
    return new_weight.to(weight.dtype), new_bias.to(bias.dtype)


def keep_norms(
    original: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rescale each folded output channel back to its original weight norm (a conv's dim 0).

    Exact after a batch norm in training mode (per-channel scale invariance),
    with the bias scaled alike.

    Example:
        >>> w, b = keep_norms(torch.ones(1, 2, 1, 1), torch.tensor([[[[3.0]], [[4.0]]]]), torch.ones(1))
        >>> [round(v, 4) for v in w.flatten().tolist()], round(b.item(), 4)
        ([0.8485, 1.1314], 0.2828)
    """
    dims = tuple(range(1, weight.dim()))
    norm = torch.linalg.vector_norm
    factor = norm(original.double(), dim=dims) / norm(weight.double(), dim=dims).clamp_min(1e-300)
    new_weight = (weight.double() * factor.view(-1, *(1,) * len(dims))).to(weight.dtype)
    new_bias = None if bias is None else (bias.double() * factor).to(bias.dtype)
    return new_weight, new_bias


def fold_site(
    site: Site,
    mean: Mapping[int, float],
    std: Mapping[int, float],
    parameters: Mapping[str, torch.Tensor],
    *,
    min_std: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """New tensors for every fusing-conv parameter of one site.

    Args:
        site: the site.
        mean: per input index, the observed mean.
        std: per input index, the observed std.
        parameters: current tensors by parameter name (at least the site's).
        min_std: smallest std accepted. Default: 1e-6.

    Returns:
        New tensor per parameter name: each weight, and each bias the mean
        folds into (:func:`folds_mean`).

    Raises:
        CalibrationError: a statistic is not finite, or a std is below
            ``min_std`` or below 1e-5 x |mean| (a constant input up to rounding).
        FxEqError: the folded weights overflow their dtype. Nothing is modified.
    """
    constant = ("Check that this branch is not constant (e.g. all-zero after ReLU, or a 1x1 pooled map normalized "
                "over a batch of one sample: use batches of at least 2)")
    for inp in site.inputs:
        m, s = mean[inp.index], std[inp.index]
        if not (math.isfinite(m) and math.isfinite(s)):
            found, fix = "expected a finite mean and std", "Check the calibration data for NaN/Inf"
        elif s <= _CONSTANT * abs(m):
            found = f"expected a std above {_CONSTANT:g} x |mean| (anything smaller is a constant input up to rounding)"
            fix = constant
        elif s < min_std:
            found = f"expected a std of at least min_std={min_std:g}"
            fix = f"{constant}; if features this small are genuine, pass a smaller min_std"
        else:
            continue
        raise CalibrationError(
            f"site {site.name!r} (conv {site.convs[0].module}), input {inp.index} "
            f"(node {inp.node!r}, channels {inp.channels[0]}:{inp.channels[1]}, from {inp.producer}): "
            f"{found}, found mean={m:.6g}, std={s:.6g}. Dividing by it would blow the conv's weights up. "
            f"{fix}; nothing was modified."
        )
    mean_vec, std_vec = site_vectors(site, mean, std, device=parameters[site.convs[0].weight].device)
    new: dict[str, torch.Tensor] = {}
    for conv in site.convs:
        weight, bias = fold(
            parameters[conv.weight], parameters[conv.bias] if folds_mean(conv) and conv.bias else None,
            mean_vec, std_vec, conv.groups, conv.transposed,
        )
        new[conv.weight] = weight
        if conv.bias is not None and bias is not None:
            new[conv.bias] = bias
    for name, tensor in new.items():
        if not torch.isfinite(tensor).all():
            raise FxEqError(
                f"site {site.name!r}: folding into {name} overflows {tensor.dtype} "
                f"(std as small as {min(std.values()):.3g}). Calibrate the model in a wider dtype (e.g. "
                "model.float()), then cast it back; nothing was modified."
            )
    return new


def site_vectors(
    site: Site, mean: Mapping[int, float], std: Mapping[int, float], *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 mean and std vectors of a site's concatenation.

    Channels of left-out (empty) inputs cannot occur; any channel not covered
    keeps mean 0 and std 1.

    Example:
        >>> from fxeq.sites import SiteInput
        >>> site = Site("cat", (SiteInput(0, "a", (0, 1), "a"), SiteInput(1, "b", (1, 3), "b")), ())
        >>> [v.tolist() for v in site_vectors(site, {0: 1.0, 1: 0.0}, {0: 2.0, 1: 3.0})]
        [[1.0, 0.0, 0.0], [2.0, 3.0, 3.0]]
    """
    mean_vec = torch.zeros(site.channels, dtype=torch.float64, device=device)
    std_vec = torch.ones(site.channels, dtype=torch.float64, device=device)
    for inp in site.inputs:
        mean_vec[inp.channels[0]:inp.channels[1]] = mean[inp.index]
        std_vec[inp.channels[0]:inp.channels[1]] = std[inp.index]
    return mean_vec, std_vec
