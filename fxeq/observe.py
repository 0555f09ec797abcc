"""Observe: build the calibration graph, with an observer on every site input.

The calibration graph is a copy of the captured graph (sharing its
parameters) with three changes, none of which touch the deployable graph::

    before:  a ──────────────┐                 after:  a ── observer_0 ──┐
             b ── upsample ──┴─ cat ─ conv              b ── upsample ── observer_1 ─┴─ cat ─ conv*

1. One :class:`ScaleObserver` per (concatenation, input index) edge, so that
   ``cat([u, u])`` observes ``u`` once per slice.
2. Batch normalization uses batch statistics and never reads or writes its
   running statistics: the fusing conv sees features as it does in training,
   and the model's buffers stay exactly as they were.
3. ``conv*``: each fusing conv reads its weight and bias from attributes of
   the calibration graph, so that chained sites can be calibrated against
   already-folded upstream weights without writing the model's parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .sites import SiteSearch, _arg, _aten_name

__all__ = ["Observed", "ScaleObserver", "insert_observers"]


class ScaleObserver(nn.Module):
    """Accumulates the global mean and variance of the tensors it sees.

    Each batch is centred on its own mean (one transient copy of the input)
    and reduced with float64 accumulators, then merged into float64 running
    ``mean`` and ``m2`` buffers with Chan's parallel formula. The element count is a
    host-side integer known from shapes, and everything else stays on the
    tensor's device: no host synchronization per batch.

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
        self.enabled = True

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.mean.zero_()
        self.m2.zero_()
        self.count = 0
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or x.numel() == 0:
            return x
        if self.mean.device != x.device:
            self.to(x.device)
        values = x.detach()
        if values.element_size() < 4:  # fp16/bf16 deviations would round
            values = values.float()
        n = values.numel()
        # Centre on the batch mean first: deviations from a nearby shift are exact
        # (Sterbenz), so a large mean cannot swamp a small variance; then sum the
        # deviations and their squares with float64 accumulators.
        shift = values.mean()
        deviation = values - shift
        s1 = deviation.sum(dtype=torch.float64)
        s2 = torch.linalg.vector_norm(deviation, dtype=torch.float64).square()
        self.merge(n, shift.double() + s1 / n, s2 - s1 * s1 / n)
        self.samples += x.shape[0] if x.dim() else 1
        return x

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


@dataclass
class Observed:
    """The calibration graph and handles into it.

    Attributes:
        module: the calibration GraphModule (shares the captured parameters).
        observers: observer per (site name, input index).
        conv_inputs: per fusing-conv weight name, the attribute names of the
            calibration graph that hold the (weight, bias) it computes with.
    """

    module: fx.GraphModule
    observers: dict[tuple[str, int], ScaleObserver] = field(default_factory=dict)
    conv_inputs: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def use_weights(self, weight_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Make the calibration graph compute a fusing conv with these tensors."""
        weight_attr, bias_attr = self.conv_inputs[weight_name]
        setattr(self.module, weight_attr, weight)
        if bias_attr is not None and bias is not None:
            setattr(self.module, bias_attr, bias)


def insert_observers(gm: fx.GraphModule, search: SiteSearch) -> Observed:
    """Build the calibration graph of ``gm`` for the sites in ``search``.

    ``gm`` itself is not modified.

    Example:
        >>> from fxeq.capture import capture
        >>> from fxeq.sites import find_sites
        >>> class Fuse(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(6, 2, 1)
        ...     def forward(self, a, b):
        ...         b = F.interpolate(b, scale_factor=2.0)
        ...         return self.conv(torch.cat([a, b], dim=1))
        >>> x = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4))
        >>> gm = capture(Fuse(), x).module
        >>> observed = insert_observers(gm, find_sites(gm))
        >>> _ = observed.module(*x)
        >>> sorted(observed.observers), observed.observers["cat", 1].count
        ([('cat', 0), ('cat', 1)], 384)
    """
    graph = copy.deepcopy(gm.graph)
    observed = Observed(fx.GraphModule(gm, graph))
    nodes = {n.name: n for n in graph.nodes}
    for site in search.sites:
        cat = nodes[site.name]
        tensors = list(_arg(cat, 0, "tensors"))  # type: ignore[call-overload]
        for inp in site.inputs:
            name = f"fxeq_observer_{len(observed.observers)}"
            observer = ScaleObserver()
            observed.module.add_submodule(name, observer)
            observed.observers[site.name, inp.index] = observer
            with graph.inserting_before(cat):
                tensors[inp.index] = graph.call_module(name, (tensors[inp.index],))
        if cat.args:
            cat.update_arg(0, tensors)
        else:
            cat.update_kwarg("tensors", tensors)
        for conv in site.convs:
            _redirect_conv_parameters(observed, gm, nodes[conv.node], conv.weight, conv.bias)
    for node in list(graph.nodes):
        _use_batch_statistics(observed.module, node)
    graph.lint()
    observed.module.recompile()
    return observed


def _redirect_conv_parameters(
    observed: Observed, gm: fx.GraphModule, conv: fx.Node, weight: str, bias: str | None
) -> None:
    graph = observed.module.graph
    k = len(observed.conv_inputs)
    weight_attr = f"fxeq_weight_{k}"
    bias_attr = f"fxeq_bias_{k}" if bias is not None else None
    observed.module.register_buffer(weight_attr, gm.get_parameter(weight).detach(), persistent=False)
    if bias is not None and bias_attr is not None:
        observed.module.register_buffer(bias_attr, gm.get_parameter(bias).detach(), persistent=False)
    observed.conv_inputs[weight] = (weight_attr, bias_attr)
    with graph.inserting_before(conv):
        w = graph.get_attr(weight_attr)
        b = graph.get_attr(bias_attr) if bias_attr is not None else None
        if conv.op == "call_module":
            module = graph.get_attr(str(conv.target))
            replacement = graph.call_function(_conv_forward, (module, conv.args[0], w, b))
            conv.replace_all_uses_with(replacement)
            graph.erase_node(conv)
            return
    conv.update_arg(1, w)
    if b is not None:
        conv.update_arg(2, b)


def _conv_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Run a conv module with the given weight and bias (its padding mode included)."""
    return module._conv_forward(x, weight, bias)  # type: ignore[operator]


def _batch_norm_with_batch_statistics(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def _native_batch_norm_with_batch_statistics(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten._native_batch_norm_legit_no_training``'s signature, computed with batch statistics."""
    empty = x.new_empty(0)
    return _batch_norm_with_batch_statistics(x, weight, bias, eps), empty, empty


def _use_batch_statistics(module: fx.GraphModule, node: fx.Node) -> None:
    """Rewrite one batch-norm node to normalize with batch statistics only."""
    graph = module.graph
    if node.op == "call_module":
        bn = module.get_submodule(str(node.target))
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight") if bn.weight is not None else None
            bias = graph.get_attr(f"{node.target}.bias") if bn.bias is not None else None
            new = graph.call_function(_batch_norm_with_batch_statistics, (node.args[0], weight, bias, bn.eps))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    elif node.op == "call_function":
        aten = _aten_name(node.target)
        if aten == "batch_norm":  # (x, weight, bias, running_mean, running_var, training, ...)
            args = list(node.args)
            args[3:6] = [None, None, True]
            node.args = tuple(args)
        elif aten == "_native_batch_norm_legit_no_training":
            node.target = _native_batch_norm_with_batch_statistics
        elif node.target is F.batch_norm:  # (x, running_mean, running_var, weight, bias, training, ...)
            kwargs = dict(zip(_F_BATCH_NORM_ARGS, node.args, strict=False)) | dict(node.kwargs)
            kwargs.update(running_mean=None, running_var=None, training=True)
            node.args, node.kwargs = (), kwargs


_F_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
