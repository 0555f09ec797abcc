"""Training semantics: how the measured equalizer is put into a model.

Three modes, identical in the forward pass at step 0 (up to zero-padded
borders for the mean), different under gradient descent:

* ``"init"`` (default, the paper's "auxiliary initializer"): fold once,
  ``W[:, slice_i] /= sigma_i``. Zero overhead, but dL/dW' still scales with
  sigma_i, and when a batch norm follows the fold grows ``|w|``, which lowers
  SGD's effective learning rate (lr / |w|^2). ``keep_norm=True`` restores each
  output channel's weight norm (valid only where a batch norm follows).
* ``"reparam"``: ``W = W_raw * s`` with ``s = 1 / sigma`` per input channel,
  via :mod:`torch.nn.utils.parametrize`. Gradients w.r.t. ``W_raw`` equal the
  explicit equalizer's gradients w.r.t. the conv weight, at weight-sized cost,
  exactly when a batch norm follows the conv (its input gradient sums to zero,
  which cancels the mean term); otherwise they differ by ``mu / sigma`` times
  the summed output gradient. State_dict keys become
  ``<conv>.parametrizations.weight.original`` and ``<conv>.parametrizations.weight.0.scale``;
  :func:`plain_state_dict` / :func:`load_plain_state_dict` save and load the
  original keys while training.
* ``"explicit"``: the literal module, ``(x - mu) / sigma`` before each fusing
  conv, for ablations: constant nodes in a GraphModule, forward pre-hooks on a
  user's own conv modules (``inplace=True``). No state_dict key changes.
  Chained sites are calibrated with the upstream sites folded as in
  ``"init"``; where an upstream fusing conv has no bias (its mean cannot be
  folded) but ``"explicit"`` subtracts it, the downstream statistics are
  those of the ``"init"`` model.

:func:`finalize` bakes "reparam" and "explicit" into plain weights for
deployment.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, cast, get_args

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ._model import resolve_owner
from .fold import fold, mean_term, per_weight_column
from .sites import FusingConv

__all__ = [
    "MODES", "InputScale", "Mode", "ModeStrategy", "STRATEGIES", "check_mode", "finalize",
    "load_plain_state_dict", "plain_state_dict",
]

Mode = Literal["init", "reparam", "explicit"]
"""A mode's name: a key of :data:`STRATEGIES` (a test checks that the two agree)."""

_HOOK = "fxeq_standardize"
_NODES = "_fxeq_explicit_nodes"


class InputScale(nn.Module):
    """Parametrization ``W = W_raw * scale`` with a per-input-channel scale.

    ``scale`` has the weight's ``(out, in / groups, 1, ...)`` layout, so
    grouped and depthwise convs get every column's own input channel.

    Example:
        >>> conv = nn.Conv2d(2, 1, 1, bias=False)
        >>> _ = conv.weight.data.fill_(1.0)
        >>> scale = torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
        >>> _ = parametrize.register_parametrization(conv, "weight", InputScale(scale))
        >>> conv.weight.flatten().tolist(), sorted(conv.state_dict())
        ([0.5, 0.25], ['parametrizations.weight.0.scale', 'parametrizations.weight.original'])
    """

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.scale


class _Standardize(nn.Module):
    """``(x - mean) * inv_std`` on a conv module's input, as its forward pre-hook.

    It is also a submodule of that conv (``fxeq_standardize``), so ``.to()``,
    ``.cuda()`` and ``.double()`` carry its tensors along; they are
    non-persistent buffers, so state_dict keys do not change.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, mean: torch.Tensor, inv_std: torch.Tensor, conv: FusingConv, batch_norm: nn.Module | None
                 ) -> None:
        super().__init__()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)
        self.conv = conv
        object.__setattr__(self, "batch_norm", batch_norm)  # a reference, not a submodule

    def forward(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return ((args[0] - self.mean) * self.inv_std, *args[1:])


@dataclasses.dataclass(frozen=True)
class _ExplicitNodes:
    """Constant nodes inserted before a GraphModule's conv, and how to fold them."""

    node: str
    source: str
    nodes: tuple[str, str]
    attrs: tuple[str, str]
    conv: FusingConv


# ---------------------------------------------------------------------------
# Applying a mode
# ---------------------------------------------------------------------------


def _register_reparam(modules: Iterable[nn.Module], conv: FusingConv, std: torch.Tensor) -> None:
    """Parametrize the conv's weight as ``W_raw * (1 / std)`` in each module holding it."""
    done: set[int] = set()
    for root in modules:
        owner, local = resolve_owner(root, conv.weight)
        if owner is None or id(owner) in done:
            continue
        done.add(id(owner))
        weight = getattr(owner, local)
        scale = per_weight_column(1.0 / std.double(), weight.shape, conv.groups, conv.transposed).to(weight.dtype)
        parametrize.register_parametrization(owner, local, InputScale(scale))


def _register_explicit(
    gm: fx.GraphModule | None, model: nn.Module | None, conv: FusingConv, mean: torch.Tensor, std: torch.Tensor
) -> None:
    """Put ``(x - mean) / std`` before a fusing conv.

    In ``model`` (the user's module, with ``inplace=True``) as a forward
    pre-hook on the conv module; in ``gm`` as constant nodes, unless the graph
    calls that very (already hooked) module.
    """
    holder = gm if gm is not None else model
    assert holder is not None  # the rewrite passes at least one
    weight = holder.get_parameter(conv.weight)
    shape = (1, -1, *(1,) * (weight.dim() - 2))
    mean_c = mean.to(weight.dtype).reshape(shape)
    inv_c = (1.0 / std.double()).to(weight.dtype).reshape(shape)
    hooked: set[int] = set()
    if model is not None:
        owner = model.get_submodule(conv.module)
        bn = model.get_submodule(conv.batch_norm) if conv.batch_norm else None
        hook = _Standardize(mean_c, inv_c, conv, bn)
        owner.add_module(_HOOK, hook)
        owner.register_forward_pre_hook(hook)
        hooked.add(id(owner))
    if gm is None:
        return
    node = next(n for n in gm.graph.nodes if n.name == conv.node)
    if node.op == "call_module" and id(gm.get_submodule(str(node.target))) in hooked:
        return
    k = len(getattr(gm, _NODES, []))
    attrs = (f"fxeq_explicit_mean_{k}", f"fxeq_explicit_inv_std_{k}")
    gm.register_buffer(attrs[0], mean_c, persistent=False)
    gm.register_buffer(attrs[1], inv_c, persistent=False)
    source = node.args[0]
    with gm.graph.inserting_before(node):
        sub = gm.graph.call_function(torch.sub, (source, gm.graph.get_attr(attrs[0])))
        mul = gm.graph.call_function(torch.mul, (sub, gm.graph.get_attr(attrs[1])))
    node.update_arg(0, mul)
    gm.recompile()
    record = _ExplicitNodes(node.name, source.name, (sub.name, mul.name), attrs, conv)
    gm.__dict__.setdefault(_NODES, []).append(record)


Install = Callable[[fx.GraphModule | None, nn.Module | None, FusingConv, torch.Tensor, torch.Tensor], None]
"""``install(graph_module, model, conv, mean, std)``: what a mode adds to one conv in each module given."""


@dataclasses.dataclass(frozen=True)
class ModeStrategy:
    """How a mode puts one fusing conv's equalizer into the model.

    Attributes:
        writes: which folded parameters are written into the conv
            (``"weight"``, ``"bias"``); the rest is expressed by ``install``.
        install: adds what the mode adds (a parametrization, a pre-hook,
            nodes) to the captured graph module and the user's model, either of
            which may be None; or None for a mode that only writes.
        note: the caveat the report shows at each conv, or "".
        keep_norm: whether ``keep_norm=True`` applies to this mode (restoring
            each output channel's weight norm after the weight is rescaled).
    """

    writes: frozenset[str]
    install: Install | None
    note: str = ""
    keep_norm: bool = False


def _install_reparam(
    gm: fx.GraphModule | None, model: nn.Module | None, conv: FusingConv, mean: torch.Tensor, std: torch.Tensor
) -> None:
    _register_reparam([m for m in (gm, model) if m is not None], conv, std)


STRATEGIES: dict[Mode, ModeStrategy] = {
    "init": ModeStrategy(frozenset({"weight", "bias"}), None, keep_norm=True),
    "reparam": ModeStrategy(frozenset({"bias"}), _install_reparam,
                            "weight parametrized as W_raw * (1 / sigma); fxeq.finalize bakes it in"),
    "explicit": ModeStrategy(frozenset(), _register_explicit,
                             "explicit (x - mu) / sigma before this conv; fxeq.finalize bakes it into the weights"),
}
"""The modes, by name: adding a mode is one entry here (and its name in :data:`Mode`)."""

MODES: tuple[Mode, ...] = get_args(Mode)


def check_mode(mode: object, keep_norm: object = False) -> None:
    """Refuse an unknown mode, or ``keep_norm`` with a mode it does not apply to, before any work.

    Raises:
        ValueError: naming the argument and what it may be.

    Example:
        >>> check_mode("reparam", keep_norm=True)
        Traceback (most recent call last):
        ...
        ValueError: keep_norm=True applies to mode='init' only, got mode='reparam'
    """
    if mode not in STRATEGIES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, STRATEGIES))}; got {mode!r}")
    if keep_norm and not STRATEGIES[cast(Mode, mode)].keep_norm:
        allowed = " or ".join(f"mode={m!r}" for m, s in STRATEGIES.items() if s.keep_norm)
        raise ValueError(f"keep_norm=True applies to {allowed} only, got mode={mode!r}")


# ---------------------------------------------------------------------------
# Finalize and plain state_dicts
# ---------------------------------------------------------------------------


def finalize(model: nn.Module) -> nn.Module:
    """Bake "reparam" and "explicit" equalizers into plain conv weights, in place.

    Afterwards the model has its original graph and state_dict keys, and the
    same outputs in eval mode (exactly at 1x1 convs, in the interior
    otherwise). The mean goes into the conv's bias; if it has none and a
    batch norm follows, into that batch norm's ``running_mean``. Where it can
    go nowhere, a warning says so.

    Args:
        model: a model or GraphModule returned or rewritten by
            ``fxeq.transform(..., mode="reparam" | "explicit")``.

    Returns:
        ``model``, so that ``model = fxeq.finalize(model)`` reads naturally.

    Example:
        >>> conv = nn.Conv2d(2, 1, 1)
        >>> _ = parametrize.register_parametrization(conv, "weight", InputScale(torch.full((1, 2, 1, 1), 0.5)))
        >>> sorted(finalize(conv).state_dict())
        ['bias', 'weight']
    """
    notes: list[str] = []
    for name, module in model.named_modules():
        if _input_scale(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            # removing re-registers the weight last; put it back first, where the conv declared it
            weight = module._parameters.pop("weight")
            module._parameters = {"weight": weight, **module._parameters}
        hook = module._modules.get(_HOOK)
        if isinstance(hook, _Standardize):
            for key, value in list(module._forward_pre_hooks.items()):
                if value is hook:
                    del module._forward_pre_hooks[key]
            del module._modules[_HOOK]
            notes += _bake(name or "model", module.weight, module.bias, hook.batch_norm,  # type: ignore[arg-type]
                           hook.mean.flatten(), 1.0 / hook.inv_std.flatten().double(), hook.conv)
    if isinstance(model, fx.GraphModule):
        for record in model.__dict__.pop(_NODES, []):
            notes += _remove_explicit_nodes(model, record)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return model


def _remove_explicit_nodes(gm: fx.GraphModule, record: _ExplicitNodes) -> list[str]:
    nodes = {n.name: n for n in gm.graph.nodes}
    conv, sub, mul = nodes[record.node], nodes[record.nodes[0]], nodes[record.nodes[1]]
    mean, inv_std = getattr(gm, record.attrs[0]), getattr(gm, record.attrs[1])
    constants = (sub.args[1], mul.args[1])
    conv.update_arg(0, nodes[record.source])
    for node in (mul, sub, *constants):
        gm.graph.erase_node(node)
    for attr in record.attrs:
        delattr(gm, attr)
    gm.recompile()
    c = record.conv
    bn = gm.get_submodule(c.batch_norm) if c.batch_norm else None
    bias = gm.get_parameter(c.bias) if c.bias else None
    return _bake(c.module or "model", gm.get_parameter(c.weight), bias, bn, mean.flatten(),
                 1.0 / inv_std.flatten().double(), c)


def _bake(
    name: str, weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module | None,
    mean: torch.Tensor, std: torch.Tensor, conv: FusingConv,
) -> list[str]:
    """Fold the explicit equalizer into the conv's weight, and its mean wherever it can go."""
    strided = conv.transposed and any(s != 1 for s in conv.stride)
    new_weight, new_bias = fold(weight, None if strided else bias, mean, std, conv.groups, conv.transposed)
    with torch.no_grad():
        weight.copy_(new_weight)
        if strided:
            return [f"conv {name}: a transposed conv with stride {conv.stride} gives each output phase its own "
                    f"kernel taps, so the mean ({mean.abs().max().item():.3g} at most) has no single bias and was "
                    "not folded; outputs differ from the explicit equalizer by that term"]
        if bias is not None and new_bias is not None:
            bias.copy_(new_bias)
            return []
        running_mean = getattr(bn, "running_mean", None)
        if isinstance(running_mean, torch.Tensor):
            running_mean.add_(mean_term(new_weight, mean, conv.groups, conv.transposed).to(running_mean.dtype))
            return []
    return [f"conv {name}: no bias and no batch norm after it, so the mean ({mean.abs().max().item():.3g} "
            "at most) could not be folded; outputs differ from the explicit equalizer by that term"]


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with "reparam" parametrizations resolved to plain weights.

    The keys are the original model's; load it into an unparametrized model,
    or back into a parametrized one with :func:`load_plain_state_dict`.

    Example:
        >>> conv = nn.Conv2d(2, 1, 1)
        >>> _ = parametrize.register_parametrization(conv, "weight", InputScale(torch.full((1, 2, 1, 1), 0.5)))
        >>> sorted(plain_state_dict(conv))
        ['bias', 'weight']
    """
    before: dict[str, tuple[str, torch.Tensor]] = {}  # key -> the weight to list just before it
    hidden: set[str] = set()
    for prefix, module in _reparametrized(model):
        parametrized = [f"{prefix}parametrizations.weight.original", f"{prefix}parametrizations.weight.0.scale"]
        own = [f"{prefix}{n}" for n, p in module._parameters.items() if p is not None]  # conv: weight came first
        before[(own or parametrized)[0]] = (f"{prefix}weight", cast(torch.Tensor, module.weight).detach())
        hidden.update(parametrized)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in before:
            name, weight = before[key]
            state[name] = weight
        if key not in hidden:
            state[key] = value
    return state


def load_plain_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load a plain state_dict (original keys) into a "reparam" model.

    Each plain weight ``W`` becomes ``W_raw = W / scale`` with the model's
    current scale, so that the effective weight is ``W``.
    """
    converted = dict(state)
    for prefix, module in _reparametrized(model):
        key, parametrization = f"{prefix}weight", _input_scale(module)
        if key not in converted or parametrization is None:
            continue
        scale = parametrization.scale
        converted[f"{prefix}parametrizations.weight.original"] = converted.pop(key) / scale
        converted[f"{prefix}parametrizations.weight.0.scale"] = scale
    model.load_state_dict(converted, strict=strict)


def _input_scale(module: nn.Module) -> InputScale | None:
    """The module's fxeq weight parametrization, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    first = cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)["weight"])[0]
    return first if isinstance(first, InputScale) else None


def _reparametrized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{name}." if name else "", m) for name, m in model.named_modules() if _input_scale(m) is not None]
