"""Find: locate multi-level fusion sites in a captured graph.

A *site* is a channel concatenation whose output reaches one or more convs
(directly or through ops that neither change values' scale nor normalize:
identity, dropout, casts) and at least one of whose inputs comes from an
upsampling op::

    branch_0 ──────────────────────┐
    branch_1 ── interpolate ── relu ┼── cat(dim=1) ── dropout ── conv
    branch_2 ── interpolate ────────┘

Finding sites never mutates the graph. The result is plain data
(:class:`SiteSearch`): every site with its inputs' channel slices and its
fusing convs' parameter names, and every channel concatenation that was
skipped with the reason why. The rules, precisely:

* **Channel concatenation.** A concatenation on dim 1 of a tensor with at
  least 4 dims (N, C, spatial...). A 3-D tensor counts only when a conv (a
  conv1d) reads the concatenation; otherwise its dim 1 is taken to be the
  token axis of a ``[batch, tokens, channels]`` tensor (a ViT's class token)
  and the concatenation is skipped as "not a channel concatenation".
  Concatenations on other axes are left out (at debug log level).
* **Nested concatenations are flattened.** A channel concatenation read only
  by other channel concatenations (UNet++'s ``cat([up, cat([a, b])])``) is no
  site of its own and is not listed as skipped: each of its inputs becomes an
  input of the outer site, with its own slice of the outer channels (see
  :attr:`SiteInput.index`), and the outer site's notes name it.
* **Comes from upsampling.** Walking back from an input through identity ops,
  elementwise ops (activations, products and sums with a scalar) and gates
  reaches an upsampling op (any mode). A *gate* is a product with a factor
  that is constant over the spatial dims: a per-sample and per-channel map
  (``[N, C, 1, 1]``, ``[N, 1, 1, 1]``, ``[C, 1, 1]``), as in squeeze-excitation
  and MAnet's ``upsample(x) * (se_hl + se_ll)``. It rescales channels but
  keeps the spatial smoothing, hence the variance loss, of the upsampling. A
  product with a map that varies over space (an attention map
  ``[N, 1, H, W]``) is not a gate: its result is a product of two features.
* **Producer.** :attr:`SiteInput.producer` names the op whose output the
  concatenation reads, looking back only through upsampling, identity ops
  and layout ops (permute, view, reshape), which move values without
  computing them: ``relu`` for Conv-BN-ReLU-upsample, the layer norm behind
  a ``permute``.
* **In-place variants** of pass-through ops (``relu_``, ``feature_dropout_``,
  ``mul_``) are the same ops.
* **Shared parameters.** A fusing conv whose weight or bias another op reads,
  or that the graph module holds under two names (tied parameters), cannot be
  rescaled alone; its site is skipped.
* **Dependencies.** A site depends on another when that site's fusing conv
  output reaches its inputs by any path, through normalization layers too:
  a batch norm fixes each channel's mean and variance but not the shape of
  the distribution, which the ReLU and upsampling after it see (measured:
  smp UPerNet's FPN fusion depends on its pyramid-pooling site).

The op tables below hold the module, functional and aten forms of each op;
adding an op is one line.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "FusingConv", "Site", "SiteInput", "SiteSearch", "Skipped", "batch_norm_module", "conv_parameters",
    "find_sites", "is_conv_module", "observation_point",
]

_logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Op tables: each maps an op, in one of its forms, to a category.
# ---------------------------------------------------------------------------

_UPSAMPLE, _CAT, _CONV, _TCONV, _NORM, _IDENTITY, _LAYOUT, _ELEMENTWISE, _SCALAR, _PRODUCT, _GATE, _PAD, _SHUFFLE, \
    _POOL = (
        "upsample", "cat", "conv", "transposed conv", "norm", "identity", "layout", "elementwise", "scalar",
        "product", "gate", "pad", "pixel shuffle", "pool",
    )

# The in-place variant of these ops (a trailing underscore: relu_, feature_dropout_, mul_) is the same op.
_PASS_THROUGH = (_IDENTITY, _LAYOUT, _ELEMENTWISE, _SCALAR, _PRODUCT)

# Walk policies: which categories each walk through the graph may cross.
_TO_UPSAMPLE = frozenset({_UPSAMPLE, _ELEMENTWISE, _IDENTITY, _GATE, _PAD})
"""Back from a concatenation input to its upsampling: ops that keep each branch's spatial smoothing."""
_TO_PRODUCER = frozenset({_UPSAMPLE, _IDENTITY, _LAYOUT, _PAD})
"""Back from a concatenation input to the op that computed its values: ops that only move values."""
_TO_CONV = frozenset({_IDENTITY, _ELEMENTWISE})
"""Forward from a concatenation to its fusing convs: ops after which fxeq still measures what the conv receives."""
_SAME_VALUES = frozenset({_IDENTITY})
"""Ops whose output holds their input's values: looked through to find a node's readers or a nested concatenation."""
_TO_LEARNED = frozenset({*_TO_UPSAMPLE, _NORM, _LAYOUT, _POOL})
"""Back from a concatenation input to a learned upsampler (a transposed conv, pixel shuffle), to name it in a skip."""

_FUNCTIONS: dict[object, str] = {
    F.interpolate: _UPSAMPLE, F.upsample: _UPSAMPLE,
    F.upsample_bilinear: _UPSAMPLE, F.upsample_nearest: _UPSAMPLE,
    torch.cat: _CAT, torch.concat: _CAT, torch.concatenate: _CAT,
    F.pad: _PAD, F.pixel_shuffle: _SHUFFLE, torch.pixel_shuffle: _SHUFFLE,
    F.avg_pool1d: _POOL, F.avg_pool2d: _POOL, F.avg_pool3d: _POOL,
    F.instance_norm: _NORM, F.group_norm: _NORM, F.layer_norm: _NORM,
    F.local_response_norm: _NORM, F.rms_norm: _NORM, F.normalize: _NORM,
    F.dropout: _IDENTITY, F.dropout1d: _IDENTITY, F.dropout2d: _IDENTITY, F.dropout3d: _IDENTITY,
    F.alpha_dropout: _IDENTITY, F.feature_alpha_dropout: _IDENTITY,
    torch.dropout: _IDENTITY, torch.feature_dropout: _IDENTITY, torch.alpha_dropout: _IDENTITY,
    torch.feature_alpha_dropout: _IDENTITY, torch.dropout_: _IDENTITY, torch.feature_dropout_: _IDENTITY,
    torch.alpha_dropout_: _IDENTITY, torch.feature_alpha_dropout_: _IDENTITY,
    torch.permute: _LAYOUT, torch.reshape: _LAYOUT, torch.flatten: _LAYOUT, torch.transpose: _LAYOUT,
    torch.squeeze: _LAYOUT, torch.unsqueeze: _LAYOUT, torch.movedim: _LAYOUT,
    F.relu: _ELEMENTWISE, F.relu6: _ELEMENTWISE, F.gelu: _ELEMENTWISE, F.silu: _ELEMENTWISE,
    F.leaky_relu: _ELEMENTWISE, F.hardswish: _ELEMENTWISE, F.hardsigmoid: _ELEMENTWISE,
    F.hardtanh: _ELEMENTWISE, F.elu: _ELEMENTWISE, F.selu: _ELEMENTWISE, F.mish: _ELEMENTWISE,
    F.softplus: _ELEMENTWISE, F.sigmoid: _ELEMENTWISE, F.tanh: _ELEMENTWISE, F.prelu: _ELEMENTWISE,
    torch.prelu: _ELEMENTWISE,
    F.relu_: _ELEMENTWISE, F.leaky_relu_: _ELEMENTWISE, F.hardtanh_: _ELEMENTWISE, F.elu_: _ELEMENTWISE,
    F.selu_: _ELEMENTWISE,
    torch.relu: _ELEMENTWISE, torch.sigmoid: _ELEMENTWISE, torch.tanh: _ELEMENTWISE,
    torch.relu_: _ELEMENTWISE, torch.sigmoid_: _ELEMENTWISE, torch.tanh_: _ELEMENTWISE,
    operator.add: _SCALAR, operator.sub: _SCALAR, operator.truediv: _SCALAR, torch.add: _SCALAR,
    operator.mul: _PRODUCT, torch.mul: _PRODUCT,
}

# isinstance checks, first match wins.
_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Upsample, _UPSAMPLE),
    (nn.modules.padding._ConstantPadNd, _PAD), (nn.modules.padding._ReplicationPadNd, _PAD),
    (nn.modules.padding._ReflectionPadNd, _PAD), (nn.modules.padding._CircularPadNd, _PAD),
    (nn.PixelShuffle, _SHUFFLE), (nn.modules.pooling._AvgPoolNd, _POOL),
    (nn.modules.instancenorm._InstanceNorm, _NORM),
    (nn.GroupNorm, _NORM), (nn.LayerNorm, _NORM), (nn.LocalResponseNorm, _NORM), (nn.RMSNorm, _NORM),
    (nn.Identity, _IDENTITY), (nn.modules.dropout._DropoutNd, _IDENTITY),
    (nn.Flatten, _LAYOUT), (nn.Unflatten, _LAYOUT),
    (nn.ReLU, _ELEMENTWISE), (nn.ReLU6, _ELEMENTWISE), (nn.LeakyReLU, _ELEMENTWISE),
    (nn.GELU, _ELEMENTWISE), (nn.SiLU, _ELEMENTWISE), (nn.Hardswish, _ELEMENTWISE),
    (nn.Hardsigmoid, _ELEMENTWISE), (nn.Hardtanh, _ELEMENTWISE), (nn.Sigmoid, _ELEMENTWISE),
    (nn.Tanh, _ELEMENTWISE), (nn.ELU, _ELEMENTWISE), (nn.SELU, _ELEMENTWISE),
    (nn.CELU, _ELEMENTWISE), (nn.Mish, _ELEMENTWISE), (nn.Softplus, _ELEMENTWISE), (nn.PReLU, _ELEMENTWISE),
)

# Tensor methods; in-place variants (relu_, mul_) are looked up without their underscore.
_METHODS: dict[str, str] = {
    "contiguous": _IDENTITY, "to": _IDENTITY, "float": _IDENTITY, "half": _IDENTITY,
    "bfloat16": _IDENTITY, "double": _IDENTITY, "type": _IDENTITY, "clone": _IDENTITY,
    "detach": _IDENTITY,
    "permute": _LAYOUT, "view": _LAYOUT, "reshape": _LAYOUT, "flatten": _LAYOUT, "unflatten": _LAYOUT,
    "transpose": _LAYOUT, "squeeze": _LAYOUT, "unsqueeze": _LAYOUT, "movedim": _LAYOUT,
    "relu": _ELEMENTWISE, "sigmoid": _ELEMENTWISE, "tanh": _ELEMENTWISE,
    "add": _SCALAR, "sub": _SCALAR, "div": _SCALAR, "mul": _PRODUCT,
}

# aten ops by overload-packet name (what torch.export produces); in-place
# variants (relu_, feature_dropout_, mul_) are looked up without their underscore.
_ATEN: dict[str, str] = {
    **dict.fromkeys((
        "upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "upsample_linear1d",
        "upsample_trilinear3d", "upsample_nearest1d", "upsample_nearest3d",
        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    ), _UPSAMPLE),
    **dict.fromkeys(("cat", "concat", "concatenate"), _CAT),
    **dict.fromkeys((
        "pad", "constant_pad_nd", "replication_pad1d", "replication_pad2d", "replication_pad3d",
        "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "_pad_circular", "_pad_enum",
    ), _PAD),
    "pixel_shuffle": _SHUFFLE,
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), _POOL),
    **dict.fromkeys((
        "instance_norm", "group_norm", "native_group_norm", "layer_norm", "native_layer_norm",
        "rms_norm", "_fused_rms_norm",
    ), _NORM),
    **dict.fromkeys((
        "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "clone",
        "contiguous", "_to_copy", "to", "alias", "detach", "_assert_tensor_metadata",
    ), _IDENTITY),
    **dict.fromkeys((
        "permute", "view", "_unsafe_view", "reshape", "flatten", "unflatten", "transpose", "squeeze",
        "unsqueeze", "movedim",
    ), _LAYOUT),
    **dict.fromkeys((
        "relu", "relu6", "gelu", "silu", "leaky_relu", "hardswish", "hardsigmoid", "hardtanh",
        "sigmoid", "tanh", "elu", "selu", "celu", "mish", "softplus", "prelu", "_prelu_kernel",
    ), _ELEMENTWISE),
    **dict.fromkeys(("add", "sub", "div"), _SCALAR),
    "mul": _PRODUCT,
}


@dataclass(frozen=True)
class _Form:
    """Where one form of an op keeps its operands.

    Attributes:
        args: each operand's argument position in a function or aten call
            (its keyword has the same name). Empty for modules, which hold
            the operands as attributes of those names.
        transposed: whether the form is a transposed conv.
    """

    args: Mapping[str, int]
    transposed: bool = False


_MODULE_FORM = _Form({})
# conv{1,2,3}d and conv_transpose{1,2,3}d (input, weight, bias, stride, padding, ..., groups, ...).
_CONV_ARGS = {"weight": 1, "bias": 2, "stride": 3, "padding": 4, "groups": 6}
# aten.convolution says in an argument whether it is transposed.
_CONVOLUTION_ARGS = {"weight": 1, "bias": 2, "stride": 3, "padding": 4, "transposed": 6, "groups": 8}

# Convs: module classes (isinstance, first match wins; transposed convs
# subclass _ConvNd too), functions and aten overload-packet names.
_CONVS: dict[object, _Form] = {
    nn.modules.conv._ConvTransposeNd: _Form({}, transposed=True),
    nn.modules.conv._ConvNd: _MODULE_FORM,
    **dict.fromkeys((
        F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, "conv1d", "conv2d", "conv3d",
    ), _Form(_CONV_ARGS)),
    **dict.fromkeys((
        F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv_transpose1d,
        torch.conv_transpose2d, torch.conv_transpose3d, "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    ), _Form(_CONV_ARGS, transposed=True)),
    **dict.fromkeys(("convolution", "_convolution"), _Form(_CONVOLUTION_ARGS)),
}

# aten.batch_norm and its lowerings (input, weight, bias, running_mean, running_var, ...).
_BATCH_NORM_ARGS = {"running_mean": 3, "running_var": 4}

# Batch norms, in the same three forms.
_BATCH_NORMS: dict[object, _Form] = {
    nn.modules.batchnorm._BatchNorm: _MODULE_FORM,
    F.batch_norm: _Form({"running_mean": 1, "running_var": 2}),
    **dict.fromkeys((
        torch.batch_norm, "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "cudnn_batch_norm",
        "miopen_batch_norm",
    ), _Form(_BATCH_NORM_ARGS)),
}


def _aten_name(target: object) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return None


def _lookup(table: Mapping[str, str], name: str) -> str | None:
    """``table[name]``, or the category of the op whose in-place variant ``name`` is."""
    category = table.get(name)
    if category is None and name.endswith("_"):
        category = table.get(name[:-1])
        category = category if category in _PASS_THROUGH else None
    return category


def _form(gm: fx.GraphModule, node: fx.Node, table: Mapping[object, _Form]) -> _Form | None:
    """The entry of a forms table (:data:`_CONVS`, :data:`_BATCH_NORMS`) for ``node``'s op, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return next((v for k, v in table.items() if isinstance(k, type) and isinstance(module, k)), None)
    if node.op == "call_function":
        aten = _aten_name(node.target)
        return table.get(aten if aten is not None else node.target)
    return None


def _category(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op category of ``node`` (one of the table values, or ``_GATE``), or None."""
    conv = _form(gm, node, _CONVS)
    if conv is not None:
        flag = conv.args.get("transposed")
        transposed = conv.transposed or (flag is not None and bool(_arg(node, flag, "transposed")))
        return _TCONV if transposed else _CONV
    if _form(gm, node, _BATCH_NORMS) is not None:
        return _NORM
    category: str | None = None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        category = next((c for cls, c in _MODULES if isinstance(module, cls)), None)
    elif node.op == "call_method":
        category = _lookup(_METHODS, str(node.target))
    elif node.op == "call_function" and node.target is operator.getitem:
        values = _arg(node, 0)  # the output of a norm that returns (output, mean, rstd), as concrete traces hold
        category = _IDENTITY if _arg(node, 1) == 0 and isinstance(values, fx.Node) and _is_norm(gm, values) \
            else None
    elif node.op == "call_function":
        aten = _aten_name(node.target)
        category = _lookup(_ATEN, aten) if aten is not None else _FUNCTIONS.get(node.target)
    if category == _PAD and _shape(node) is not None and _shape(node) == _shape(_arg(node, 0, "input")):
        category = _IDENTITY  # a zero-width pad (MONAI's UpCat when sizes already agree)
    if category in (_SCALAR, _PRODUCT):
        # x * 2.0 keeps relative scales between branches; x * y does not, unless y is a gate.
        tensors = _tensor_args(node)
        if len(tensors) == 1:
            category = _ELEMENTWISE
        elif category == _PRODUCT and _gated(node) is not None:
            category = _GATE
        else:
            category = None
    return category


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _gated(product: fx.Node) -> fx.Node | None:
    """The factor that a gate multiplies in ``product``, or None if neither factor is a gate.

    A gate is constant over the spatial dims (dims 2 and up of the product,
    broadcasting from the right); the gated factor has the product's shape.
    """
    factors = _tensor_args(product)
    out = _shape(product)
    if len(factors) != 2 or out is None or len(out) < 3:
        return None
    for value, gate in (factors, factors[::-1]):
        shape = _shape(gate)
        if _shape(value) != out or shape is None or len(shape) > len(out):
            continue
        offset = len(out) - len(shape)
        if all(size == 1 for k, size in enumerate(shape) if k + offset >= 2):
            return value
    return None


def _source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input whose values a pass-through ``node`` (upsampled, activated, gated...) carries on."""
    if _category(gm, node) == _GATE:
        return _gated(node)
    tensors = _tensor_args(node)
    return tensors[0] if tensors else None


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
    """A short human name for a node: its module path, or its op and the module it belongs to.

    For a function call, the module is its weight's owner, else the
    innermost module whose forward called it (``nn_module_stack``), if any.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
        >>> [describe(gm, n) for n in gm.graph.nodes]
        ['placeholder input', '0 (Conv2d)', '1 (ReLU)', 'output output']
    """
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        name = _aten_name(node.target) or str(getattr(node.target, "__name__", node.target))
        weight = _arg(node, 1)
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = str(stack[-1][0]) if stack else ""
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            path = str(weight.target).rpartition(".")[0]
        return f"{name} {path}" if path else name
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op} {node.target}"


# ---------------------------------------------------------------------------
# Plain-data results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteInput:
    """One input of a fusion site: a slice of its concatenated channels.

    Attributes:
        index: position in the site's flattened input list: the
            concatenation's inputs in order, with each nested concatenation
            replaced by its own inputs (zero-width inputs count, and are not
            listed). Without nesting, the position in the concatenation's
            input list. Unique within the site.
        node: name of the node feeding the (innermost) concatenation.
        channels: the ``[start, stop)`` slice it occupies in the channels
            that the fusing convs read.
        producer: the op whose output it is, behind any upsampling, identity
            and layout ops (``describe`` of that node).
        upsample: upsample mode (``"bilinear"``, ``"nearest"``, ...) or None.
        scale: spatial upsampling factor per dimension on the example batch, or None.
        padded: whether a spatial pad lies between the upsampling and the
            concatenation (the statistics include the padded border).
    """

    index: int
    node: str
    channels: tuple[int, int]
    producer: str
    upsample: str | None = None
    scale: tuple[float, ...] | None = None
    padded: bool = False


@dataclass(frozen=True)
class FusingConv:
    """A conv that reads a fusion concatenation.

    Attributes:
        node: name of the conv node.
        module: qualified path of the module owning its weight (``""`` for a
            weight of the root module).
        weight: qualified name of its weight parameter.
        bias: qualified name of its bias parameter, or None.
        groups: conv groups.
        padded: whether it reads zero padding (the mean fold is inexact at borders).
        followed_by_norm: whether normalization layers alone read its output.
        batch_norm: module path of the batch norm (with running statistics)
            that alone reads its output, if any: ``{batch_norm}.running_mean``
            names its buffer in the model and in the captured graph.
        dtype: the weight's dtype, e.g. ``"float32"`` (None: not recorded).
        transposed: whether it is a transposed conv, whose weight holds the
            input channels on dim 0.
        stride: its stride per spatial dim.
        shape: its weight's shape (None: not recorded).
    """

    node: str
    module: str
    weight: str
    bias: str | None
    groups: int
    padded: bool
    followed_by_norm: bool
    batch_norm: str | None = None
    dtype: str | None = "float32"
    transposed: bool = False
    stride: tuple[int, ...] = (1,)
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Site:
    """A fusion site: a concatenation, its inputs and its fusing convs.

    Attributes:
        name: name of the (outermost) concatenation node.
        inputs: the non-empty inputs, in channel order.
        convs: the convs that read the concatenation.
        depends_on: sites whose fusing convs' outputs reach this site's
            inputs by any path, normalization layers included (calibrate
            and fold those first), in graph order.
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
    """A concatenation that is not a site, and why.

    Attributes:
        node: name of the concatenation node.
        reason: why it is not a site.
        fix: what would make it one, where an argument can (e.g. ``"pass
            all_concats=True to equalize it"``), else ``""``.
    """

    node: str
    reason: str
    fix: str = ""

    @property
    def text(self) -> str:
        """The reason and the fix, in one sentence."""
        return f"{self.reason}; {self.fix}" if self.fix else self.reason


@dataclass(frozen=True)
class SiteSearch:
    """What :func:`find_sites` found.

    Attributes:
        sites: fusion sites, in graph order.
        skipped: concatenations that are not sites, with reasons.
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
        have been folded. A site downstream of another site's fusing conv
        is in a later group even when normalization layers lie between.

        Example:
            >>> a, b = Site("cat", (), ()), Site("cat_1", (), (), depends_on=("cat",))
            >>> [[s.name for s in g] for g in SiteSearch((a, b), ()).generations()]
            [['cat'], ['cat_1']]
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
# Parameters of convs and batch norms
# ---------------------------------------------------------------------------


def conv_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str | None]:
    """Qualified names of a conv node's weight and bias parameters (None: no bias).

    Args:
        gm: the graph module holding ``node``.
        node: a conv node, in module, functional or aten form.

    Raises:
        ValueError: ``node`` is not a conv, or takes its weight or bias from a
            computed tensor rather than a parameter.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False)))
        >>> conv_parameters(gm, list(gm.graph.nodes)[1])
        ('0.weight', None)
    """
    form = _form(gm, node, _CONVS)
    if form is None:
        raise ValueError(f"node {node.name} ({describe(gm, node)}) is not a conv")
    names = _conv_parameters(gm, node, form)
    if names is None:
        raise ValueError(f"conv {node.name} ({describe(gm, node)}) takes its weight or bias from a "
                         "computed tensor, not a parameter")
    return names


def _conv_parameters(gm: fx.GraphModule, node: fx.Node, form: _Form) -> tuple[str, str | None] | None:
    if not form.args:
        module = gm.get_submodule(str(node.target))
        if not isinstance(module._parameters.get("weight"), nn.Parameter):  # weight_norm, parametrize...
            return None  # (reading module.weight would run a parametrization, e.g. spectral norm's power step)
        return f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None
    weight = _get_parameter(gm, _arg(node, form.args["weight"], "weight"))
    bias_arg = _arg(node, form.args["bias"], "bias")
    bias = _get_parameter(gm, bias_arg)
    if weight is None or (bias_arg is not None and bias is None):
        return None
    return weight, bias


def _get_parameter(gm: fx.GraphModule, arg: object) -> str | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            gm.get_parameter(str(arg.target))
        except AttributeError:
            return None
        return str(arg.target)
    return None


def batch_norm_module(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Module path of a batch norm node with running statistics, or None for any other node.

    ``{path}.running_mean`` and ``{path}.running_var`` name its buffers, in
    the graph module and in the model it was captured from.

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        >>> [batch_norm_module(gm, n) for n in gm.graph.nodes]
        [None, None, '1', None]
    """
    form = _form(gm, node, _BATCH_NORMS)
    if form is None:
        return None
    if not form.args:
        tracked = gm.get_submodule(str(node.target)).running_mean is not None
        return str(node.target) if tracked else None
    paths = set()
    for name, index in form.args.items():
        buffer = _arg(node, index, name)
        if not isinstance(buffer, fx.Node) or buffer.op != "get_attr":
            return None
        path, _, attr = str(buffer.target).rpartition(".")
        if attr != name:
            return None
        paths.add(path)
    return paths.pop() if len(paths) == 1 else None


# ---------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------

_TOKENS = "not a channel concatenation (a 3-D [batch, tokens, channels] tensor)"
_ALL_CONCATS = "pass all_concats=True to equalize it"
_ConcatKind = Literal["channels", "tokens", "other", "unknown"]


def find_sites(gm: fx.GraphModule, *, all_concats: bool = False, model: nn.Module | None = None) -> SiteSearch:
    """Find fusion sites in a captured graph; the graph is not changed.

    Args:
        gm: a graph from :func:`fxeq.capturing.capture` (its nodes carry
            ``meta["tensor_meta"]``).
        all_concats: also treat channel concatenations with no upsampled
            input as sites (FCN-style ``concat_input`` heads). Default: False.
        model: the eager model the graph was captured from. If given, a site
            is kept only if fxeq can equalize it there too: its fusing conv
            is a conv module holding its own weight (where a pre-hook sees
            what the conv multiplies), and no parameter of it is held by
            another module object (a tie the graph may not show). Default: None.

    Returns:
        A :class:`SiteSearch`.

    Example:
        >>> from fxeq.capturing import capture
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
        >>> site.convs[0].module, site.convs[0].weight, site.convs[0].bias
        ('conv', 'conv.weight', 'conv.bias')
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"find_sites expects a torch.fx.GraphModule, got {type(gm).__name__}: capture it first "
                        "(fxeq.capture(model, example).module), or call fxeq.find(model, example)")
    # Ties are read from the eager model where there is one: an exported graph rebuilds its module tree
    # from parameter names, so one module registered under two names is two module objects there.
    ties = _tied(model) if model is not None else None
    shared = _shared_parameters(gm, ties)
    sites: list[Site] = []
    skipped: list[Skipped] = []
    for node in gm.graph.nodes:
        if not _is_cat(gm, node):
            continue
        kind = _concat_kind(gm, node)
        result: Site | Skipped | None = None
        if kind == "unknown":
            result = Skipped(node.name, "its shape or channel axis is unknown (no shape metadata)")
        elif kind == "tokens":
            result = Skipped(node.name, _TOKENS)
        elif kind == "other":
            _logger.debug("fxeq: %s concatenates on another axis than channels", node.name)
        elif outer := _flattened_into(gm, node):
            _logger.debug("fxeq: %s is flattened into %s", node.name, ", ".join(n.name for n in outer))
        else:
            result = _site_at(gm, node, shared, all_concats)
            if isinstance(result, Site) and model is not None:
                result = _eligible(model, result)
        if isinstance(result, Site):
            sites.append(result)
        elif result is not None:
            _logger.debug("fxeq skips %s: %s", result.node, result.reason)
            skipped.append(result)
    return SiteSearch(tuple(_with_dependencies(gm, sites)), tuple(skipped))


def is_conv_module(module: object, *, transposed: bool | None = None) -> bool:
    """Whether ``module`` is a torch conv module (Conv1d/2d/3d or a transposed one; only one kind if asked).

    Example:
        >>> is_conv_module(nn.ConvTranspose3d(1, 1, 2)), is_conv_module(nn.Linear(1, 1))
        (True, False)
        >>> is_conv_module(nn.ConvTranspose3d(1, 1, 2), transposed=False)
        False
    """
    form = next((v for k, v in _CONVS.items() if isinstance(k, type) and isinstance(module, k)), None)
    return form is not None and (transposed is None or form.transposed == transposed)


def observation_point(model: nn.Module, site: Site) -> nn.Module | str:
    """The conv module whose input is observed for ``site``, or why there is none.

    It is the module that owns the first fusing conv's weight, and it must be
    a conv module that holds that weight as its own ``weight`` parameter: then
    its pre-hooks see exactly the tensor the conv multiplies by the weight.

    Example:
        >>> conv = FusingConv("c", "c", "c.weight", None, 1, False, False)
        >>> site = Site("cat", (SiteInput(0, "a", (0, 3), "a"),), (conv,))
        >>> type(observation_point(nn.ModuleDict({"c": nn.Conv2d(3, 1, 1)}), site)).__name__
        'Conv2d'
    """
    conv = site.convs[0]
    try:
        module = model.get_submodule(conv.module) if conv.module else model
    except AttributeError:
        return f"the model has no module {conv.module!r} (the owner of {conv.weight})"
    if not is_conv_module(module) or conv.weight.rpartition(".")[2] != "weight":
        return (f"its conv weight {conv.weight} belongs to a {type(module).__name__}, not to a conv module "
                "(fxeq observes the input of the conv module that owns the weight)")
    return module


def _eligible(model: nn.Module, site: Site) -> Site | Skipped:
    """``site``, or why it cannot be equalized in the eager ``model`` (see :func:`find_sites`; its ties were
    checked with the graph's shared parameters)."""
    point = observation_point(model, site)
    return Skipped(site.name, point) if isinstance(point, str) else site


def _concat_kind(gm: fx.GraphModule, cat: fx.Node) -> _ConcatKind:
    """``"channels"``, ``"tokens"`` (dim 1 of 3-D, no conv reads it), ``"other"`` or ``"unknown"``."""
    tensors = _arg(cat, 0, "tensors")
    dim = _arg(cat, 1, "dim", 0)
    shape = _shape(cat)
    if shape is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return "unknown"
    if len(shape) < 3 or dim % len(shape) != 1:
        return "other"
    if len(shape) == 3 and not any(
        _category(gm, r) == _CONV or (_is_cat(gm, r) and _concat_kind(gm, r) == "channels")
        for r in _readers(gm, cat)
    ):
        return "tokens"
    return "channels"


def _flattened_into(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The readers of ``node`` if it is a channel concatenation read only by channel concatenations, else []."""
    if not _is_cat(gm, node) or _concat_kind(gm, node) != "channels":
        return []
    readers = _readers(gm, node)
    if readers and all(_is_cat(gm, r) and _concat_kind(gm, r) == "channels" for r in readers):
        return readers
    return []


def _flatten(gm: fx.GraphModule, cat: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """A concatenation's inputs with nested concatenations replaced by theirs, and those nested ones."""
    tensors: list[fx.Node] = []
    nested: list[fx.Node] = []
    for tensor in cast(list[fx.Node], _arg(cat, 0, "tensors")):
        inner: fx.Node | None = tensor
        while inner is not None and _category(gm, inner) in _SAME_VALUES:
            inner = _source(gm, inner)
        if inner is not None and _flattened_into(gm, inner):
            more, deeper = _flatten(gm, inner)
            tensors += more
            nested += [inner, *deeper]
        else:
            tensors.append(tensor)
    return tensors, nested


def _site_at(gm: fx.GraphModule, cat: fx.Node, shared: Mapping[str, tuple[str, ...]], all_concats: bool
             ) -> Site | Skipped:
    tensors, nested = _flatten(gm, cat)
    inputs: list[SiteInput] = []
    not_upsampled: list[str] = []
    start = 0
    for index, tensor in enumerate(tensors):
        in_shape = _shape(tensor)
        if in_shape is None:
            return Skipped(cat.name, f"input {index} has no shape metadata")
        width = in_shape[1]
        if width > 0:
            inputs.append(_site_input(gm, tensor, index, (start, start + width)))
            why = _not_interpolated(gm, tensor)
            if why is not None:
                not_upsampled.append(why)
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
        if not_upsampled:
            return Skipped(cat.name, not_upsampled[0], _ALL_CONCATS)
        return Skipped(cat.name, "no input comes from an upsampling op (same-resolution features)", _ALL_CONCATS)
    fusing: list[FusingConv] = []
    for conv in convs:
        found = _fusing_conv(gm, conv, start, shared)
        if isinstance(found, str):
            return Skipped(cat.name, f"its conv {describe(gm, conv)} {found}")
        fusing.append(found)
    notes = [f"nested concatenation {n.name} is flattened into this one" for n in dict.fromkeys(nested)]
    notes += [f"input {i.index} passes a spatial pad after its upsampling: its statistics include the padded "
              "border" for i in inputs if i.padded]
    notes += [f"the concatenation also feeds {d}, which is left as it is" for d in elsewhere]
    return Site(cat.name, tuple(inputs), tuple(fusing), notes=tuple(notes))


def _site_input(gm: fx.GraphModule, node: fx.Node, index: int, channels: tuple[int, int]) -> SiteInput:
    """Walk back to an upsample and to the producer of the values.

    A resize that does not enlarge (x1, or a downsample) is no upsampling:
    it does not lower the variance the paper corrects.
    """
    upsample: fx.Node | None = None
    padded = False
    source: fx.Node | None = node
    while source is not None:
        category = _category(gm, source)
        if category not in _TO_UPSAMPLE:
            break
        padded = padded or category == _PAD
        if category == _UPSAMPLE:
            upsample = source
            break
        source = _source(gm, source)
    mode = scale = None
    if upsample is not None:
        before, after = _shape(upsample.args[0]), _shape(upsample)
        if before is not None and after is not None:
            scale = tuple(a / b for a, b in zip(after[2:], before[2:], strict=True) if b)
        if scale and all(f <= 1 for f in scale):
            scale = None  # a resize to the same or a smaller size
        else:
            mode = _upsample_mode(gm, upsample)
    producer = node
    while _category(gm, producer) in _TO_PRODUCER and (parent := _source(gm, producer)):
        producer = parent
    return SiteInput(index, node.name, channels, describe(gm, producer), mode, scale,
                     padded=padded and mode is not None)


def _not_interpolated(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a concatenation input that comes from an upsampling is not an upsampled input, or None.

    Behind normalization, activations, pads and layout ops: a transposed conv
    or a pixel shuffle, or a conv whose output a reshape spreads over a larger
    map (MONAI's pixel shuffle is a reshape and a permute), is learned
    upsampling; an interpolation with a normalization after it has the scale
    that normalization sets.
    """
    size = _spatial(node)
    norm: fx.Node | None = None
    source: fx.Node | None = node
    while source is not None:
        category = _category(gm, source)
        learned = None
        if category == _TCONV:
            learned = _named(gm, source, "a transposed conv")
        elif category == _SHUFFLE:
            learned = _named(gm, source, "a pixel shuffle")
        elif category == _CONV:
            smaller = size is not None and (own := _spatial(source)) is not None and own < size
            if not smaller:
                return None
            learned = _named(gm, source, "a conv") + " and a reshape that enlarges its map (a pixel shuffle)"
        elif category == _UPSAMPLE:
            return None if norm is None else (
                f"its upsampled input is normalized after the interpolation, by {_named(gm, norm, 'a norm')}, "
                "which sets its scale")
        elif category not in _TO_LEARNED:
            return None
        if learned is not None:
            return (f"its upsampled input comes from {learned} (learned upsampling, not interpolation: not a site "
                    "by the paper's definition)")
        if category == _NORM and norm is None:
            norm = source
        source = _source(gm, source)
    return None


def _named(gm: fx.GraphModule, node: fx.Node, kind: str) -> str:
    """``node``'s op named by its module class and path (``a ConvTranspose3d at up.0``), else by ``kind``."""
    module_class, path = _module_of(gm, node)
    if module_class is not None:
        return f"a {module_class}" + (f" at {path}" if path else "")
    return f"{kind} ({describe(gm, node)})"


def _module_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str]:
    """The class name and path of the module whose forward ``node`` is (call_module), or in which it was
    recorded (``nn_module_stack``, as export and the concrete trace give it); (None, "") if unknown."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__, str(node.target)
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None, ""
    path, kind = stack[-1]
    name = str(getattr(kind, "__name__", kind)).rpartition(".")[2]
    return name or None, str(path)


def _spatial(node: fx.Node) -> int | None:
    """The number of positions in a node's map (the product of its dims after N and C)."""
    shape = _shape(node)
    return math.prod(shape[2:]) if shape is not None and len(shape) > 2 else None


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
            if category in _TO_CONV:  # fxeq measures what the conv receives
                frontier.append(user)
            elif category in (_CONV, _TCONV) and _arg(user, 0, "input") is value:
                convs.append(user)
            elif category == _NORM:
                elsewhere.append(f"normalization {describe(gm, user)}")
            else:
                elsewhere.append(describe(gm, user))
    return convs, elsewhere


def _tied(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameters held by more than one distinct module object: each of their names -> its other names.

    A module registered under two names (MONAI's DynUNet holds each up block as
    ``upsamples.N`` and inside ``skip_layers``) holds its parameters once: that
    is aliasing, not a tie, and rescaling the parameter changes nothing else.
    """
    names: dict[int, list[str]] = {}
    holders: dict[int, set[int]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        for local, parameter in module._parameters.items():
            if parameter is not None:
                names.setdefault(id(parameter), []).append(f"{path}.{local}" if path else local)
                holders.setdefault(id(parameter), set()).add(id(module))
    return {
        name: tuple(n for n in names[key] if n != name)
        for key, owners in holders.items() if len(owners) > 1 for name in names[key]
    }


def _shared_parameters(gm: fx.GraphModule, ties: Mapping[str, tuple[str, ...]] | None = None
                       ) -> dict[str, tuple[str, ...]]:
    """Parameters of a graph module that rescaling one conv would also change elsewhere: name -> other names.

    Those read by more than one op (a conv module called twice, a weight read by
    two nodes), and those tied to another module object: ``ties``, the eager
    model's (:func:`_tied`), else the graph module's own.
    """
    uses: Counter[int] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses.update(id(p) for p in gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr" and _get_parameter(gm, node) is not None:
            uses[id(gm.get_parameter(str(node.target)))] += len(node.users)
    shared = dict(ties) if ties is not None else _tied(gm)
    for name, parameter in gm.named_parameters():
        if uses[id(parameter)] > 1:
            shared.setdefault(name, ())
    return shared


def _fusing_conv(gm: fx.GraphModule, conv: fx.Node, channels: int, shared: Mapping[str, tuple[str, ...]]
                 ) -> FusingConv | str:
    """Describe a fusing conv, or say why it cannot be rescaled."""
    form = cast(_Form, _form(gm, conv, _CONVS))
    names = _conv_parameters(gm, conv, form)
    if names is None:
        return ("takes its weight or bias from a computed tensor, not a parameter (weight_norm, spectral_norm or "
                "another parametrization?): fxeq can only rescale a stored weight. Remove it first, e.g. "
                "torch.nn.utils.parametrize.remove_parametrizations(conv, 'weight'), or equalize before adding it")
    weight, bias = names
    transposed = _category(gm, conv) == _TCONV
    padding: object
    stride: object
    if not form.args:
        module = cast(nn.modules.conv._ConvNd, gm.get_submodule(str(conv.target)))
        groups, padding, padding_mode, stride = module.groups, module.padding, module.padding_mode, module.stride
    else:
        groups = cast(int, _arg(conv, form.args["groups"], "groups", 1))
        padding, padding_mode = _arg(conv, form.args["padding"], "padding", 0), "zeros"
        stride = _arg(conv, form.args["stride"], "stride", 1)
    parameter = gm.get_parameter(weight)
    shape = parameter.shape
    reads = shape[0] if transposed else shape[1] * groups
    if reads != channels:
        return f"expects {reads} input channels, but the concatenation has {channels}"
    for name in (weight, bias):
        if name is not None and name in shared:
            others = shared[name]
            if others:
                return (f"shares parameter {name} with {', '.join(others)} (tied parameters); "
                        "rescaling it would change those too")
            return f"shares parameter {name} with another op; rescaling it would change that op too"
    padded = padding_mode == "zeros" and (
        padding == "same" or any(int(cast(int, p)) != 0 for p in _as_tuple(padding))
    )
    readers = _readers(gm, conv)
    followed = bool(readers) and all(_is_norm(gm, r) for r in readers)
    batch_norm = batch_norm_module(gm, readers[0]) if len(readers) == 1 else None
    strides = tuple(int(cast(int, k)) for k in _as_tuple(stride)) or (1,)
    return FusingConv(conv.name, weight.rpartition(".")[0], weight, bias, groups, padded, followed, batch_norm,
                      str(parameter.dtype).removeprefix("torch."), transposed, strides, tuple(shape))


def _as_tuple(padding: object) -> tuple[object, ...]:
    if isinstance(padding, (list, tuple)):
        return tuple(padding)
    return () if padding in ("valid", None) else (padding,)


def _readers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s output, looking through identity ops."""
    readers: list[fx.Node] = []
    frontier = [node]
    while frontier:
        for user in frontier.pop().users:
            (frontier if _category(gm, user) in _SAME_VALUES else readers).append(user)
    return readers


def _with_dependencies(gm: fx.GraphModule, sites: list[Site]) -> list[Site]:
    """Record, per site, which other sites' fusing convs reach its inputs (by any path)."""
    if len(sites) < 2:
        return sites
    owner = {conv.node: site.name for site in sites for conv in site.convs}
    nodes = {n.name: n for n in gm.graph.nodes}
    result = []
    for site in sites:
        found: set[str] = set()
        seen: set[fx.Node] = set()
        frontier = [nodes[i.node] for i in site.inputs]
        while frontier:
            node = frontier.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.name in owner and owner[node.name] != site.name:
                found.add(owner[node.name])
            frontier.extend(node.all_input_nodes)
        ordered = tuple(s.name for s in sites if s.name in found)
        result.append(Site(site.name, site.inputs, site.convs, ordered, site.notes))
    return result
