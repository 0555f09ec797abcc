"""Find: locate multi-level fusion sites in a captured graph.

A *site* is a channel concatenation whose output reaches one or more convs
(directly or through ops that neither change values' scale nor normalize:
identity, dropout, casts) and at least one of whose inputs comes from an
upsampling op (directly or through elementwise ops such as activations)::

    branch_0 ──────────────────────┐
    branch_1 ── interpolate ── relu ┼── cat(dim=1) ── dropout ── conv
    branch_2 ── interpolate ────────┘

Finding sites never mutates the graph. The result is plain data
(:class:`SiteSearch`): every site with its inputs' channel slices and its
fusing convs' parameter names, and every channel concatenation that was
skipped with the reason why. The op tables below hold the module, functional
and aten forms of each op; adding an op is one line.
"""

from __future__ import annotations

import logging
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["FusingConv", "Site", "SiteInput", "SiteSearch", "Skipped", "find_sites"]

_logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Op tables: each maps an op, in one of its forms, to a category.
# ---------------------------------------------------------------------------

_UPSAMPLE, _CAT, _CONV, _TCONV, _NORM, _IDENTITY, _ELEMENTWISE, _SCALAR = (
    "upsample", "cat", "conv", "transposed conv", "norm", "identity", "elementwise", "scalar"
)

_FUNCTIONS: dict[object, str] = {
    F.interpolate: _UPSAMPLE, F.upsample: _UPSAMPLE,
    F.upsample_bilinear: _UPSAMPLE, F.upsample_nearest: _UPSAMPLE,
    torch.cat: _CAT, torch.concat: _CAT, torch.concatenate: _CAT,
    F.conv1d: _CONV, F.conv2d: _CONV, F.conv3d: _CONV,
    torch.conv1d: _CONV, torch.conv2d: _CONV, torch.conv3d: _CONV,
    F.conv_transpose1d: _TCONV, F.conv_transpose2d: _TCONV, F.conv_transpose3d: _TCONV,
    F.batch_norm: _NORM, F.instance_norm: _NORM, F.group_norm: _NORM, F.layer_norm: _NORM,
    F.local_response_norm: _NORM, F.rms_norm: _NORM, F.normalize: _NORM,
    F.dropout: _IDENTITY, F.dropout1d: _IDENTITY, F.dropout2d: _IDENTITY, F.dropout3d: _IDENTITY,
    F.alpha_dropout: _IDENTITY, F.feature_alpha_dropout: _IDENTITY,
    F.relu: _ELEMENTWISE, F.relu6: _ELEMENTWISE, F.gelu: _ELEMENTWISE, F.silu: _ELEMENTWISE,
    F.leaky_relu: _ELEMENTWISE, F.hardswish: _ELEMENTWISE, F.hardsigmoid: _ELEMENTWISE,
    F.hardtanh: _ELEMENTWISE, F.elu: _ELEMENTWISE, F.selu: _ELEMENTWISE, F.mish: _ELEMENTWISE,
    F.softplus: _ELEMENTWISE, F.sigmoid: _ELEMENTWISE, F.tanh: _ELEMENTWISE,
    torch.relu: _ELEMENTWISE, torch.sigmoid: _ELEMENTWISE, torch.tanh: _ELEMENTWISE,
    operator.mul: _SCALAR, operator.add: _SCALAR, operator.sub: _SCALAR, operator.truediv: _SCALAR,
    torch.mul: _SCALAR, torch.add: _SCALAR,
}

# isinstance checks, first match wins (transposed convs subclass _ConvNd too).
_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Upsample, _UPSAMPLE),
    (nn.modules.conv._ConvTransposeNd, _TCONV),
    (nn.modules.conv._ConvNd, _CONV),
    (nn.modules.batchnorm._NormBase, _NORM),
    (nn.GroupNorm, _NORM), (nn.LayerNorm, _NORM), (nn.LocalResponseNorm, _NORM), (nn.RMSNorm, _NORM),
    (nn.Identity, _IDENTITY), (nn.modules.dropout._DropoutNd, _IDENTITY),
    (nn.ReLU, _ELEMENTWISE), (nn.ReLU6, _ELEMENTWISE), (nn.LeakyReLU, _ELEMENTWISE),
    (nn.GELU, _ELEMENTWISE), (nn.SiLU, _ELEMENTWISE), (nn.Hardswish, _ELEMENTWISE),
    (nn.Hardsigmoid, _ELEMENTWISE), (nn.Hardtanh, _ELEMENTWISE), (nn.Sigmoid, _ELEMENTWISE),
    (nn.Tanh, _ELEMENTWISE), (nn.ELU, _ELEMENTWISE), (nn.SELU, _ELEMENTWISE),
    (nn.CELU, _ELEMENTWISE), (nn.Mish, _ELEMENTWISE), (nn.Softplus, _ELEMENTWISE),
)

_METHODS: dict[str, str] = {
    "contiguous": _IDENTITY, "to": _IDENTITY, "float": _IDENTITY, "half": _IDENTITY,
    "bfloat16": _IDENTITY, "double": _IDENTITY, "type": _IDENTITY, "clone": _IDENTITY,
    "detach": _IDENTITY,
    "relu": _ELEMENTWISE, "relu_": _ELEMENTWISE, "sigmoid": _ELEMENTWISE, "tanh": _ELEMENTWISE,
    "mul": _SCALAR, "add": _SCALAR, "sub": _SCALAR, "div": _SCALAR,
}

# aten ops by overload-packet name (what torch.export produces).
_ATEN: dict[str, str] = {
    **dict.fromkeys((
        "upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "upsample_linear1d",
        "upsample_trilinear3d", "upsample_nearest1d", "upsample_nearest3d",
        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    ), _UPSAMPLE),
    **dict.fromkeys(("cat", "concat", "concatenate"), _CAT),
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "_convolution"), _CONV),
    **dict.fromkeys(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), _TCONV),
    **dict.fromkeys((
        "batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional", "native_batch_norm", "cudnn_batch_norm",
        "instance_norm", "group_norm", "native_group_norm", "layer_norm", "native_layer_norm",
        "rms_norm", "_fused_rms_norm",
    ), _NORM),
    **dict.fromkeys((
        "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "clone",
        "contiguous", "_to_copy", "to", "alias", "detach", "_assert_tensor_metadata",
    ), _IDENTITY),
    **dict.fromkeys((
        "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "leaky_relu", "leaky_relu_",
        "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_",
        "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu", "selu_", "mish", "mish_",
        "softplus",
    ), _ELEMENTWISE),
    **dict.fromkeys(("mul", "add", "sub", "div", "mul_", "add_", "sub_", "div_"), _SCALAR),
}

# Positional index of (weight, bias, stride, padding, dilation, groups) in functional/aten convs.
_CONV_ARGS = {"weight": 1, "bias": 2, "padding": 4, "groups": 6}
_CONVOLUTION_ARGS = {"weight": 1, "bias": 2, "padding": 4, "transposed": 6, "groups": 8}


def _aten_name(target: object) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return None


def _category(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op category of ``node`` (one of the table values), or None."""
    category: str | None = None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        category = next((c for cls, c in _MODULES if isinstance(module, cls)), None)
    elif node.op == "call_method":
        category = _METHODS.get(str(node.target))
    elif node.op == "call_function":
        aten = _aten_name(node.target)
        category = _ATEN.get(aten) if aten is not None else _FUNCTIONS.get(node.target)
        if aten in ("convolution", "_convolution") and _arg(node, _CONVOLUTION_ARGS["transposed"]):
            category = _TCONV
    if category == _SCALAR:
        # x * 2.0 keeps relative scales between branches; x * y does not.
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        category = _ELEMENTWISE if len(tensors) == 1 else None
    return category


def _is_cat(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _category(gm, node) == _CAT


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return _category(gm, node) == _NORM


def _arg(node: fx.Node, index: int, name: str | None = None, default: object = None) -> object:
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human name for a node: its module path, or op and weight owner.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1)))
        >>> describe(gm, list(gm.graph.nodes)[1])
        '0 (Conv2d)'
    """
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        name = _aten_name(node.target) or str(getattr(node.target, "__name__", node.target))
        weight = _arg(node, 1)
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return f"{name} {str(weight.target).rsplit('.', 1)[0]}"
        return name
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op} {node.target}"


# ---------------------------------------------------------------------------
# Plain-data results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteInput:
    """One input edge of a fusion concatenation.

    Attributes:
        index: position in the concatenation's input list.
        node: name of the node feeding the concatenation.
        channels: the ``[start, stop)`` channel slice it occupies.
        producer: the op that produced it, behind any upsample and elementwise ops.
        upsample: upsample mode (``"bilinear"``, ``"nearest"``, ...) or None.
        scale: spatial upsampling factor per dimension on the example batch, or None.
    """

    index: int
    node: str
    channels: tuple[int, int]
    producer: str
    upsample: str | None = None
    scale: tuple[float, ...] | None = None


@dataclass(frozen=True)
class FusingConv:
    """A conv that reads a fusion concatenation.

    Attributes:
        node: name of the conv node.
        weight: qualified name of its weight parameter.
        bias: qualified name of its bias parameter, or None.
        groups: conv groups.
        padded: whether it reads zero padding (the mean fold is inexact at borders).
        followed_by_norm: whether normalization layers alone read its output.
        batch_norm: module path of the batch norm (with running statistics)
            that alone reads its output, if any: ``{batch_norm}.running_mean``
            names its buffer in the model and in the captured graph.
    """

    node: str
    weight: str
    bias: str | None
    groups: int
    padded: bool
    followed_by_norm: bool
    batch_norm: str | None = None


@dataclass(frozen=True)
class Site:
    """A fusion site: a concatenation, its inputs and its fusing convs.

    Attributes:
        name: name of the concatenation node.
        inputs: the non-empty inputs, in concatenation order.
        convs: the convs that read the concatenation.
        depends_on: sites whose fusing convs feed this site's inputs with no
            normalization in between (calibrate those first).
        notes: remarks for the report.
    """

    name: str
    inputs: tuple[SiteInput, ...]
    convs: tuple[FusingConv, ...]
    depends_on: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        """Channels of the concatenation (the convs' input channels)."""
        return max(i.channels[1] for i in self.inputs)


@dataclass(frozen=True)
class Skipped:
    """A channel concatenation that is not a site, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class SiteSearch:
    """What :func:`find_sites` found.

    Attributes:
        sites: fusion sites, in graph order.
        skipped: channel concatenations that are not sites, with reasons.
    """

    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...]
    _by_name: dict[str, Site] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {s.name: s for s in self.sites})

    def site(self, name: str) -> Site:
        """The site whose concatenation node is ``name``."""
        return self._by_name[name]

    def generations(self) -> list[tuple[Site, ...]]:
        """Sites grouped so that each group depends only on earlier groups.

        Each group needs one calibration pass, after the groups before it
        have been folded.
        """
        graph = nx.DiGraph()
        graph.add_nodes_from(s.name for s in self.sites)
        graph.add_edges_from((d, s.name) for s in self.sites for d in s.depends_on)
        order = {s.name: k for k, s in enumerate(self.sites)}
        return [
            tuple(self._by_name[n] for n in sorted(gen, key=order.__getitem__))
            for gen in nx.topological_generations(graph)
        ]


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------


def find_sites(gm: fx.GraphModule, *, all_concats: bool = False) -> SiteSearch:
    """Find fusion sites in a captured graph; the graph is not changed.

    Args:
        gm: a graph from :func:`fxeq.capture.capture` (its nodes carry
            ``meta["tensor_meta"]``).
        all_concats: also treat channel concatenations with no upsampled
            input as sites (FCN-style ``concat_input`` heads). Default: False.

    Returns:
        A :class:`SiteSearch`.

    Example:
        >>> from fxeq.capture import capture
        >>> class Fuse(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(6, 2, 1)
        ...     def forward(self, a, b):
        ...         b = F.interpolate(b, scale_factor=2.0, mode="bilinear")
        ...         return self.conv(torch.cat([a, b], dim=1))
        >>> x = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4))
        >>> found = find_sites(capture(Fuse(), x).module)
        >>> site = found.sites[0]
        >>> [(i.channels, i.upsample, i.scale) for i in site.inputs]
        [((0, 3), None, None), ((3, 6), 'bilinear', (2.0, 2.0))]
        >>> site.convs[0].weight, site.convs[0].bias
        ('conv.weight', 'conv.bias')
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"find_sites expects a torch.fx.GraphModule, got {type(gm).__name__}")
    uses = _parameter_uses(gm)
    sites: list[Site] = []
    skipped: list[Skipped] = []
    for node in gm.graph.nodes:
        if not _is_cat(gm, node):
            continue
        result = _site_at(gm, node, uses, all_concats)
        if isinstance(result, Site):
            sites.append(result)
        elif result is not None:
            _logger.debug("fxeq skips %s: %s", result.node, result.reason)
            skipped.append(result)
    return SiteSearch(tuple(_with_dependencies(gm, sites)), tuple(skipped))


def _site_at(
    gm: fx.GraphModule, cat: fx.Node, uses: Counter[str], all_concats: bool
) -> Site | Skipped | None:
    tensors = _arg(cat, 0, "tensors")
    dim = _arg(cat, 1, "dim", 0)
    shape = _shape(cat)
    if shape is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return Skipped(cat.name, "its shape or channel axis is unknown (no shape metadata)")
    if len(shape) < 2 or dim % len(shape) != 1:
        _logger.debug("fxeq: %s concatenates on dim %s, not channels", cat.name, dim)
        return None
    inputs: list[SiteInput] = []
    start = 0
    for index, tensor in enumerate(tensors):
        in_shape = _shape(tensor)
        if in_shape is None:
            return Skipped(cat.name, f"input {index} has no shape metadata")
        width = in_shape[1]
        if width > 0:
            inputs.append(_site_input(gm, tensor, index, (start, start + width)))
        start += width

    convs, elsewhere = _fusing_conv_nodes(gm, cat)
    if not convs:
        norms = [d for d in elsewhere if d.startswith("normalization")]
        if norms:
            return Skipped(cat.name, f"it reaches a conv only through {norms[0]}; "
                           "the normalization already equalizes its inputs")
        return Skipped(cat.name, "it does not feed a conv (it feeds: "
                       + (", ".join(elsewhere) or "the output") + ")")
    if not all_concats and not any(i.upsample for i in inputs):
        return Skipped(cat.name, "no input comes from an upsampling op; pass all_concats=True "
                       "to include concatenations of same-resolution features")
    fusing: list[FusingConv] = []
    for conv in convs:
        found = _fusing_conv(gm, conv, start, uses)
        if isinstance(found, str):
            return Skipped(cat.name, f"its conv {describe(gm, conv)} {found}")
        fusing.append(found)
    notes = [f"the concatenation also feeds {d}, which is left as it is" for d in elsewhere]
    return Site(cat.name, tuple(inputs), tuple(fusing), notes=tuple(notes))


def _site_input(gm: fx.GraphModule, node: fx.Node, index: int, channels: tuple[int, int]) -> SiteInput:
    """Walk back through elementwise ops to an upsample, and to the producer behind it."""
    upsample: fx.Node | None = None
    source = node
    while isinstance(source, fx.Node):
        category = _category(gm, source)
        if category not in (_UPSAMPLE, _ELEMENTWISE, _IDENTITY):
            break
        if category == _UPSAMPLE and upsample is None:
            upsample = source
        parent = source.args[0] if source.args else None
        if not isinstance(parent, fx.Node):
            break
        source = parent
    mode = scale = None
    if upsample is not None:
        mode = _upsample_mode(gm, upsample)
        before, after = _shape(upsample.args[0]), _shape(upsample)
        if before is not None and after is not None:
            scale = tuple(a / b for a, b in zip(after[2:], before[2:], strict=True) if b)
    return SiteInput(index, node.name, channels, describe(gm, source), mode, scale)


def _upsample_mode(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return str(gm.get_submodule(str(node.target)).mode)
    aten = _aten_name(node.target)
    if aten is not None:
        return re.sub(r"\dd(_aa)?$", "", aten.lstrip("_").removeprefix("upsample_"))
    if node.target is F.upsample_bilinear:
        return "bilinear"
    if node.target is F.upsample_nearest:
        return "nearest"
    return str(_arg(node, 2, "mode", "nearest"))


def _fusing_conv_nodes(gm: fx.GraphModule, cat: fx.Node) -> tuple[list[fx.Node], list[str]]:
    """Convs reading ``cat`` through identity-like ops, and descriptions of other readers."""
    convs: list[fx.Node] = []
    elsewhere: list[str] = []
    frontier = [cat]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            category = _category(gm, user)
            if category == _IDENTITY:
                frontier.append(user)
            elif category == _CONV and _arg(user, 0, "input") is value:
                convs.append(user)
            elif category == _NORM:
                elsewhere.append(f"normalization {describe(gm, user)}")
            else:
                elsewhere.append(describe(gm, user))
    return convs, elsewhere


def _parameter_uses(gm: fx.GraphModule) -> Counter[str]:
    """How many graph nodes read each parameter, by qualified name."""
    uses: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for name, _ in gm.get_submodule(str(node.target)).named_parameters(prefix=str(node.target)):
                uses[name] += 1
        elif node.op == "get_attr":
            uses[str(node.target)] += len(node.users)
    return uses


def _get_parameter(gm: fx.GraphModule, arg: object) -> str | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            gm.get_parameter(str(arg.target))
        except AttributeError:
            return None
        return str(arg.target)
    return None


def _fusing_conv(gm: fx.GraphModule, conv: fx.Node, channels: int, uses: Counter[str]) -> FusingConv | str:
    """Describe a fusing conv, or say why it cannot be rescaled."""
    weight: str | None
    bias: str | None
    padding: object
    if conv.op == "call_module":
        module = cast(nn.modules.conv._ConvNd, gm.get_submodule(str(conv.target)))
        weight = f"{conv.target}.weight"
        bias = f"{conv.target}.bias" if module.bias is not None else None
        groups, padding, padding_mode = module.groups, module.padding, module.padding_mode
    else:
        table = _CONVOLUTION_ARGS if _aten_name(conv.target) in ("convolution", "_convolution") else _CONV_ARGS
        weight = _get_parameter(gm, _arg(conv, table["weight"], "weight"))
        bias_arg = _arg(conv, table["bias"], "bias")
        bias = _get_parameter(gm, bias_arg)
        if weight is None or (bias_arg is not None and bias is None):
            return "takes its weight or bias from a computed tensor, not a parameter"
        groups = cast(int, _arg(conv, table["groups"], "groups", 1))
        padding, padding_mode = _arg(conv, table["padding"], "padding", 0), "zeros"
    shape = gm.get_parameter(weight).shape
    if shape[1] * groups != channels:
        return f"expects {shape[1] * groups} input channels, but the concatenation has {channels}"
    for name in (weight, bias):
        if name is not None and uses[name] > 1:
            return f"shares parameter {name} with another op; rescaling it would change that op too"
    padded = padding_mode == "zeros" and (
        padding == "same" or any(int(cast(int, p)) != 0 for p in _as_tuple(padding))
    )
    readers = _readers(gm, conv)
    followed = bool(readers) and all(_is_norm(gm, r) for r in readers)
    batch_norm = _batch_norm_path(gm, readers[0]) if len(readers) == 1 else None
    return FusingConv(conv.name, weight, bias, groups, padded, followed, batch_norm)


def _as_tuple(padding: object) -> tuple[object, ...]:
    if isinstance(padding, (list, tuple)):
        return tuple(padding)
    return () if padding in ("valid", None) else (padding,)


def _readers(gm: fx.GraphModule, conv: fx.Node) -> list[fx.Node]:
    """The nodes that read a conv's output, looking through identity-like ops."""
    readers: list[fx.Node] = []
    frontier = [conv]
    while frontier:
        for user in frontier.pop().users:
            (frontier if _category(gm, user) == _IDENTITY else readers).append(user)
    return readers


def _batch_norm_path(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Module path of a batch norm node's running statistics, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        tracked = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
        return str(node.target) if tracked else None
    if _aten_name(node.target) in ("batch_norm", "_native_batch_norm_legit_no_training"):
        running_mean = _arg(node, 3)
        if isinstance(running_mean, fx.Node) and running_mean.op == "get_attr":
            path, _, name = str(running_mean.target).rpartition(".")
            return path if name == "running_mean" else None
    return None


def _with_dependencies(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """Record, per site, which other sites' fusing convs reach its inputs unnormalized."""
    owner = {conv.node: site.name for site in sites for conv in site.convs}
    if len(sites) < 2:
        return sites
    nodes = {n.name: n for n in gm.graph.nodes}
    result = []
    for site in sites:
        found: set[str] = set()
        seen: set[fx.Node] = set()
        frontier = [nodes[i.node] for i in site.inputs]
        while frontier:
            node = frontier.pop()
            if node in seen or _is_norm(gm, node):
                continue
            seen.add(node)
            if node.name in owner and owner[node.name] != site.name:
                found.add(owner[node.name])
            frontier.extend(node.all_input_nodes)
        ordered = tuple(s.name for s in sites if s.name in found)
        result.append(Site(site.name, site.inputs, site.convs, ordered, site.notes))
    return result
