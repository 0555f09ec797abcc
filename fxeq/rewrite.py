"""Rewrite: fold the scale equalizer into the fusing convs' weights.

The equalizer standardizes each concatenation input i with scalars mu_i and
sigma_i. Because a conv reads the concatenation, it folds into that conv::

    before:  cat(x_1..x_K) ── (x - mu) / sigma ── conv(W, b)
    after:   cat(x_1..x_K) ── conv(W', b')       (the original graph)

    W'[:, slice_i] = W[:, slice_i] / sigma_i
    b'             = b - sum_i sum_kernel(W'[:, slice_i]) * mu_i

The scale part is exact, for grouped and depthwise convs too. The mean part is
exact wherever the conv does not read zero padding. A conv without a bias
gets none (that would change state_dict keys), so its mean is not folded.

All arithmetic is float64 and the result is cast back to each parameter's
dtype. Writing is transactional: :func:`write_parameters` validates every new
tensor before it changes any parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import AlreadyEqualizedError, CalibrationError, FxEqError
from .sites import Site

__all__ = [
    "check_not_equalized", "copy_into", "fold", "fold_site", "mark_folded", "mean_term", "per_weight_column",
    "resolve_owner", "resolve_parameters", "site_vectors", "write_parameters",
]

_MARK = "_fxeq_folded"
_CONSTANT = 1e-5  # std / |mean| below which an input is constant up to float rounding


def fold(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold per-input-channel standardization into a conv's weight and bias.

    Args:
        weight: conv weight, ``(out, in / groups, *kernel)``.
        bias: conv bias ``(out,)`` or None (then the mean is not folded).
        mean: per-input-channel mean to subtract, ``(in,)``.
        std: per-input-channel std to divide by, ``(in,)``.
        groups: conv groups. Default: 1.

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
    new_weight = weight.double() * per_weight_column(1.0 / std.double(), weight.shape, groups)
    if bias is None:
        return new_weight.to(weight.dtype), None
    new_bias = bias.double() - mean_term(new_weight, mean, groups)
    return new_weight.to(weight.dtype), new_bias.to(bias.dtype)


def per_weight_column(values: torch.Tensor, shape: torch.Size, groups: int) -> torch.Tensor:
    """Spread per-input-channel values over a conv weight's ``(out, in / groups, 1, ...)`` layout.

    Input channel c sits in group ``c // per_group`` at column ``c % per_group``,
    and output channel o reads only its own group's columns.

    Example:
        >>> per_weight_column(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.Size([4, 2, 3, 3]), 2).flatten().tolist()
        [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
    """
    out_channels, per_group = shape[:2]
    if per_group * groups != values.numel():
        raise ValueError(
            f"weight {tuple(shape)} with groups={groups} reads {per_group * groups} channels, "
            f"but mean/std have {values.numel()}"
        )
    spread = values.reshape(groups, per_group).repeat_interleave(out_channels // groups, dim=0)
    return spread.reshape(out_channels, per_group, *(1,) * (len(shape) - 2))


def mean_term(weight: torch.Tensor, mean: torch.Tensor, groups: int) -> torch.Tensor:
    """Per output channel, what subtracting ``mean`` from the input takes off ``conv(x, weight)``.

    float64, ``sum_c sum_kernel(weight[:, c]) * mean[c]``; exact where no zero padding is read.
    """
    summed = weight.double().flatten(2).sum(-1)
    return (summed * per_weight_column(mean.double(), weight.shape, groups).flatten(1)).sum(1)


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
        New tensor per parameter name (weights, and biases where present).

    Raises:
        CalibrationError: a statistic is not finite, or a std is below
            ``min_std`` or below 1e-5 x |mean| (a constant input up to rounding).
        FxEqError: the folded weights overflow their dtype. Nothing is modified.
    """
    for inp in site.inputs:
        m, s = mean[inp.index], std[inp.index]
        if not (math.isfinite(m) and math.isfinite(s)):
            found = "expected a finite mean and std"
        elif s < min_std or s <= _CONSTANT * abs(m):
            found = (f"expected a std of at least {min_std:g} and above {_CONSTANT:g} x |mean| (anything smaller is "
                     "a constant input up to rounding)")
        else:
            continue
        raise CalibrationError(
            f"site {site.name!r} (conv {site.convs[0].module}), input {inp.index} "
            f"(node {inp.node!r}, channels {inp.channels[0]}:{inp.channels[1]}, from {inp.producer}): "
            f"{found}, found mean={m:.6g}, std={s:.6g}. Dividing by it would blow the conv's weights up. "
            "Check the calibration data for NaN/Inf, that this branch is not constant (e.g. all-zero after "
            "ReLU, or a 1x1 pooled map normalized over a batch of one sample: use batches of at least 2), "
            "or raise min_std; nothing was modified."
        )
    mean_vec, std_vec = site_vectors(site, mean, std, device=parameters[site.convs[0].weight].device)
    new: dict[str, torch.Tensor] = {}
    for conv in site.convs:
        weight, bias = fold(
            parameters[conv.weight], parameters[conv.bias] if conv.bias else None, mean_vec, std_vec, conv.groups
        )
        new[conv.weight] = weight
        if conv.bias is not None and bias is not None:
            new[conv.bias] = bias
    for name, tensor in new.items():
        if not torch.isfinite(tensor).all():
            raise FxEqError(
                f"site {site.name!r}: folding into {name} overflows {tensor.dtype} "
                f"(std as small as {min(std.values()):.3g}). Calibrate in a wider dtype or raise min_std; "
                "nothing was modified."
            )
    return new


def site_vectors(
    site: Site, mean: Mapping[int, float], std: Mapping[int, float], *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 mean and std vectors of a site's concatenation.

    Channels of left-out (empty) inputs cannot occur; any channel not covered
    keeps mean 0 and std 1.
    """
    mean_vec = torch.zeros(site.channels, dtype=torch.float64, device=device)
    std_vec = torch.ones(site.channels, dtype=torch.float64, device=device)
    for inp in site.inputs:
        mean_vec[inp.channels[0]:inp.channels[1]] = mean[inp.index]
        std_vec[inp.channels[0]:inp.channels[1]] = std[inp.index]
    return mean_vec, std_vec


def check_not_equalized(model: nn.Module) -> None:
    """Refuse a model any conv of which fxeq already equalized, in any mode.

    The fold leaves the concatenation's inputs as they were, so a second run
    would measure the same statistics and divide the weights again. The mark
    (set by :func:`mark_folded`) lives on the conv modules and survives
    ``copy.deepcopy``, "reparam" parametrizations and :func:`fxeq.finalize`.

    Raises:
        AlreadyEqualizedError: naming the conv.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(2, 1, 1))
        >>> mark_folded([net], {"0.weight": "cat"})
        >>> check_not_equalized(net)
        Traceback (most recent call last):
        ...
        fxeq.errors.AlreadyEqualizedError: conv 0 was already equalized by fxeq (site 'cat'); equalizing again \
would divide its weight twice. Use the model as it is, or start again from the original checkpoint.
    """
    for path, module in model.named_modules():
        marks = module.__dict__.get(_MARK)
        if marks:
            site = next(iter(marks.values()))
            raise AlreadyEqualizedError(
                f"conv {path or type(module).__name__} was already equalized by fxeq (site {site!r}); "
                "equalizing again would divide its weight twice. Use the model as it is, or start again "
                "from the original checkpoint."
            )


def resolve_parameters(
    modules: Iterable[nn.Module], new: Mapping[str, torch.Tensor]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Match new tensors to the named parameters of each module, validating every one.

    A module that does not hold a name is skipped. Parameters shared between
    modules appear once.

    Raises:
        FxEqError: a parameter's shape differs from its new tensor's.
    """
    targets: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for module in modules:
        for name, tensor in new.items():
            owner, local = resolve_owner(module, name)
            param = getattr(owner, local, None) if owner is not None else None
            if not isinstance(param, nn.Parameter):
                continue
            if param.shape != tensor.shape:
                raise FxEqError(f"parameter {name} has shape {tuple(param.shape)}, expected {tuple(tensor.shape)}")
            targets[id(param)] = (param, tensor)
    return list(targets.values())


def write_parameters(modules: Iterable[nn.Module], new: Mapping[str, torch.Tensor]) -> None:
    """Copy new tensors into the named parameters of each module, all validated first.

    Args:
        modules: the modules whose parameters are rewritten.
        new: new tensor per qualified parameter name.

    Raises:
        FxEqError: a parameter's shape differs from its new tensor's (nothing is written).
    """
    copy_into(resolve_parameters(modules, new))


def copy_into(pairs: Iterable[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Write each tensor into its parameter (see :func:`resolve_parameters`)."""
    with torch.no_grad():
        for param, tensor in pairs:
            param.copy_(tensor)


def mark_folded(modules: Iterable[nn.Module], weight_sites: Mapping[str, str]) -> None:
    """Record on each weight's owning module that fxeq equalized it (see :func:`check_not_folded`)."""
    for module in modules:
        for name, site in weight_sites.items():
            owner, local = resolve_owner(module, name)
            if owner is not None:
                owner.__dict__.setdefault(_MARK, {})[local] = site


def resolve_owner(module: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The submodule holding a qualified attribute name, and the local name (None if absent)."""
    prefix, _, local = name.rpartition(".")
    try:
        return (module.get_submodule(prefix) if prefix else module), local
    except AttributeError:
        return None, local
