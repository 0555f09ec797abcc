"""Capture: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule`` to find its fusion sites in.

fxeq reads graphs only to *find* sites: calibration runs the user's eager
model (:mod:`fxeq.calibration`) and the rewrite writes its parameters. Three
frontends produce graphs, one table (:data:`FRONTENDS`) describes them:

* ``"fx"``: :func:`torch.fx.symbolic_trace`. Fast and shape-generic, keeps
  ``call_module`` nodes, but fails on models whose ``forward`` branches on
  tensor shapes (every segmentation-models-pytorch decoder but Unet).
* ``"export"``: :func:`torch.export.export`. Its graph holds aten ops whose
  weights are ``get_attr`` nodes named after the original parameters, which
  it shares with the model. It is exported static by default: symbolic
  heights and widths cost minutes on a small Swin UperNet, and a symbolic batch size
  alone several times a static export on a small Swin UperNet (see
  ``benchmarks/results/capture_cost-cpu.md``). The returned module is
  therefore specialized to the example's shape, and says so clearly, with
  the fix, when it is called at another one; ``dynamic="batch"`` keeps the
  batch size symbolic and ``dynamic=True`` every size but the channels, and
  pay their cost. With ``dynamic="batch"`` a batch of one sample is repeated
  to two first, since export specializes a batch size of 1.
* ``"concrete"``: one eager forward on the example, recorded op by op
  (:func:`torch.fx.experimental.proxy_tensor.make_fx` over
  :func:`torch.func.functional_call`, real tensors). Whatever runs eagerly
  traces: data-dependent control flow is taken as it was on the example. The
  graph is therefore good for finding sites but not *deployable* (it holds
  the example's branch and sizes), so it serves only where the user's own
  model is rewritten (``inplace=True``).

``"auto"`` tries, in order, the frontends that can give what the caller
needs: a deployable graph (fx, then export), or sites only (fx, export,
then the concrete trace). Before any, the model runs once eagerly on the example, so
that a model that cannot run at all says so instead of reporting tracing
failures. Everything runs in eval mode under ``torch.no_grad``; the model's
training flags and buffers are restored afterwards. Every node's
``meta["tensor_meta"]`` then holds the shape seen on the example
(:class:`torch.fx.passes.shape_prop.ShapeProp`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from ._model import Inputs, as_inputs, checked_model, preserved_state
from .errors import CaptureError
from .report import Frontend, Report

__all__ = ["FRONTENDS", "Captured", "Dynamic", "FrontendChoice", "FxEqGraphModule", "capture"]

_logger = logging.getLogger(__name__)

FrontendChoice = Literal["auto", "fx", "export", "concrete"]
"""What a caller asks for: a frontend by name, or ``"auto"``."""

Dynamic = bool | Literal["batch"]
"""Which input sizes an export keeps symbolic: True (all but channels), "batch", or False (none)."""


class FxEqGraphModule(torch.fx.GraphModule):
    """The GraphModule fxeq captures and returns; after a rewrite, ``fxeq_report`` says what was done."""

    fxeq_report: Report | None = None


@dataclass(frozen=True)
class Captured:
    """A captured graph and how it was obtained.

    Attributes:
        module: the graph (eval-mode semantics). Its parameters are the
            captured model's own parameter objects, under the same names.
        frontend: ``"fx"``, ``"export"`` or ``"concrete"``.
        deployable: whether ``module`` computes the model on other inputs
            than the example (see :data:`FRONTENDS`).
        failures: what each frontend tried before this one said.
    """

    module: FxEqGraphModule
    frontend: Frontend
    deployable: bool
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Frontend:
    """One way to capture a graph.

    Attributes:
        trace: ``trace(model, args, kwargs, dynamic)`` → the graph.
        inputs: ``inputs(graph, model, args, kwargs)`` → the placeholders' values, in graph order.
        deployable: whether the graph computes the model on other inputs than the example.
        needs: what the model must allow, for the message when every frontend fails.
    """

    trace: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Dynamic], FxEqGraphModule]
    inputs: Callable[[torch.fx.GraphModule, nn.Module, tuple[Any, ...], dict[str, Any]], list[Any]]
    deployable: bool
    needs: str


def _trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Dynamic) -> FxEqGraphModule:
    traced = torch.fx.symbolic_trace(model)
    return FxEqGraphModule(traced, traced.graph, class_name=type(model).__name__)


def _fx_inputs(gm: torch.fx.GraphModule, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> list[Any]:
    if not kwargs:
        return list(args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return [bound.arguments[str(n.target).lstrip("*")] for n in gm.graph.nodes if n.op == "placeholder"]


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Dynamic) -> FxEqGraphModule:
    def dims(x: object) -> object:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        wanted = [d for d in range(x.dim()) if d != 1] if dynamic is True else [0] if dynamic == "batch" else []
        return {d: torch.export.Dim.AUTO for d in wanted} or None

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    dynamic_shapes = {name: pytree.tree_map(dims, value) for name, value in bound.items()}
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    unlifted = program.module()
    # ep.module() refuses .train()/.eval(); a plain GraphModule over the same graph and parameters behaves
    # like any other module. The graph is taken over, not copied: unlifted is dropped, and a deep copy of
    # a graph with a symbolic batch size copies its shape environment (a third of the export's time on
    # a small Swin UperNet).
    gm = FxEqGraphModule(unlifted, unlifted.graph, class_name=type(model).__name__)
    if dynamic is not True:
        _install_shape_guard(gm, type(model).__name__)
    return gm


def _leaves(gm: torch.fx.GraphModule, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The inputs' leaves, in order: export's and the concrete trace's placeholders."""
    return pytree.tree_leaves((args, kwargs))


def _trace_concrete(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Dynamic
                    ) -> FxEqGraphModule:
    """Record one eager forward as an aten graph whose parameters and buffers are the model's own, by name.

    The model's tensors enter the trace as placeholders (``functional_call``)
    and are then turned into ``get_attr`` nodes of a GraphModule holding the
    very same tensor objects under their qualified names, as export's graphs
    do. Each node's ``nn_module_stack`` names the modules whose forward was
    running when it was recorded.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def forward(p: dict[str, Any], b: dict[str, Any], a: tuple[Any, ...], k: dict[str, Any]) -> Any:
        return torch.func.functional_call(model, (p, b), a, k, strict=False, tie_weights=False)  # see calibration

    with _module_stack(model) as events:
        # A value read in Python (``if x.sum() > 0``) is the example's: the trace takes its branch.
        traced = make_fx(forward, tracing_mode="real", _error_on_data_dependent_ops=False)(params, buffers, args, kwargs)
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [*params, *buffers]
    for node, name in zip(placeholders, names, strict=False):
        with graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the traced module has no such attribute; the new root below will
            attr = graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    _attribute_modules(graph, events)
    root: dict[str, Any] = {**params, **buffers}
    for node in graph.nodes:  # the constants the trace made (e.g. a pooling module's kernel)
        if node.op == "get_attr" and str(node.target) not in root:
            root[str(node.target)] = getattr(traced, str(node.target))
    return FxEqGraphModule(root, graph, class_name=type(model).__name__)


FRONTENDS: dict[Frontend, _Frontend] = {
    "fx": _Frontend(_trace_fx, _fx_inputs, True, "fx needs a forward without data-dependent Python control flow"),
    "export": _Frontend(_export, _leaves, True, "torch.export needs a forward without control flow on tensor "
                        "values or ops it cannot trace (its message above says which)"),
    "concrete": _Frontend(_trace_concrete, _leaves, False,
                          "the concrete trace needs a forward whose tensor ops make_fx can record (it runs them "
                          "for real, so control flow is fine; see its message above)"),
}
"""The capture frontends, by name: adding one is one entry here (and its name in :data:`fxeq.report.Frontend`)."""

# By whether the caller needs a deployable graph. Without that need the concrete trace comes last: it costs
# about what a static export does (more on a large model, since it computes for real; capture_cost.py) and
# serves for the models that neither fx nor export captures.
_AUTO: dict[bool, tuple[Frontend, ...]] = {True: ("fx", "export"), False: ("fx", "export", "concrete")}


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any] | Inputs,
    *,
    frontend: FrontendChoice = "auto",
    dynamic: Dynamic = False,
    deployable: bool = True,
) -> Captured:
    """Capture ``model`` as a GraphModule that shares its parameters.

    Args:
        model: the model; ``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped.
        example_inputs: one batch: a Tensor, a tuple of positional inputs, a
            dict of keyword arguments, or an ``(args, kwargs)`` pair.
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"concrete"``. Default: ``"auto"``.
        dynamic: which sizes torch.export keeps symbolic: ``False`` (none:
            the returned module takes inputs of the example's shape; the
            cheapest), ``"batch"`` (any batch size; the export can cost several
            times a static one) or ``True`` (batch, height
            and width: any size, but this can cost minutes). fx graphs take
            any size anyway. Default: False.
        deployable: whether the caller needs a graph that computes the model
            on other inputs (``"auto"`` then tries fx and export only).
            Default: True.

    Returns:
        A :class:`Captured` whose ``module`` is in eval mode.

    Raises:
        ValueError: unknown ``frontend`` or ``dynamic``.
        CaptureError: the model does not run on the example (``stage ==
            "run"``), or no frontend tried could capture it (``stage ==
            "trace"``, with what each said in ``failures``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        >>> cap = capture(net, (torch.randn(2, 3, 8, 8),))
        >>> cap.frontend, [n.op for n in cap.module.graph.nodes]
        ('fx', ['placeholder', 'call_module', 'call_module', 'output'])
        >>> [n.target.__name__ for n in capture(net, torch.randn(2, 3, 8, 8), frontend="concrete").module.graph.nodes
        ...  if n.op == "call_function"]
        ['convolution.default', 'relu.default']
    """
    if frontend != "auto" and frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of 'auto', {', '.join(map(repr, FRONTENDS))}; got {frontend!r}")
    if dynamic not in (True, False, "batch"):
        raise ValueError(f"dynamic must be True, False or 'batch', got {dynamic!r}")
    model = checked_model(model)
    args, kwargs = as_inputs(example_inputs)
    tries: tuple[Frontend, ...] = _AUTO[deployable] if frontend == "auto" else (frontend,)
    failures: dict[str, str] = {}
    with preserved_state(model), torch.no_grad():
        model.eval()
        _run_eagerly(model, args, kwargs)
        for name in tries:
            entry = FRONTENDS[name]
            a, k = args, kwargs
            if name == "export" and dynamic == "batch":
                a, k = pytree.tree_map_only(torch.Tensor, _at_least_two, (args, kwargs))
            try:
                gm = entry.trace(model, a, k, dynamic)
                with contextlib.redirect_stderr(io.StringIO()):  # fx prints tracebacks it re-raises
                    ShapeProp(gm).propagate(*entry.inputs(gm, model, a, k))
            except Exception as e:  # noqa: BLE001 - every frontend failure is reported together
                _logger.debug("frontend %s failed on %s: %s", name, type(model).__name__, e)
                failures[name] = f"{type(e).__name__}: {_first_line(e)}"
                continue
            gm.eval()
            return Captured(gm, name, entry.deployable, tuple(f"{n}: {t}" for n, t in failures.items()))
    listed = "\n".join(f"  {n}: {t}" for n, t in failures.items())
    needs = "; ".join(FRONTENDS[n].needs for n in tries)
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph; tried {', '.join(tries)}:\n{listed}\n{needs}.",
        stage="trace", failures=failures,
    )


def _run_eagerly(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        model(*args, **kwargs)
    except Exception as e:
        shapes = ", ".join(_describe(v) for v in (*args, *kwargs.values()))
        hint = ""
        if any(isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() >= 3
               for v in (*args, *kwargs.values())):
            hint = (" An input is an integer tensor: image models take float tensors; convert them in the "
                    "loader or with input_fn (e.g. lambda b: b[0].float() / 255, then normalize).")
        raise CaptureError(
            f"{type(model).__name__} does not run on the example batch ({shapes}; fxeq.transform's first "
            f"calibration batch) in eval mode: "
            f"{type(e).__name__}: {_first_line(e)}. fxeq captures the model on that batch, so it must be "
            f"a valid input: check its shape, dtype and device (some models need a larger input size).{hint}",
            stage="run",
        ) from e


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


def _first_line(e: BaseException) -> str:
    """The first line of an error's message, without a closing period (the caller's sentence goes on)."""
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else "(no message)"


def _at_least_two(t: torch.Tensor) -> torch.Tensor:
    """A batch of one sample, repeated: torch.export specializes a batch size of 1."""
    return torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[tuple[int, str, str, int]]]:
    """While a concrete trace runs, per forward: (nodes recorded so far, module path, module class, +1 entering
    / -1 leaving)."""
    paths = {id(m): name for name, m in model.named_modules()}
    events: list[tuple[int, str, str, int]] = []

    def record(step: int) -> Callable[..., None]:
        def hook(module: nn.Module, *rest: Any) -> None:
            mode = get_proxy_mode()
            if mode is not None and id(module) in paths:
                kind = f"{type(module).__module__}.{type(module).__qualname__}"
                events.append((len(mode.tracer.graph.nodes), paths[id(module)], kind, step))
        return hook

    handles = [nn.modules.module.register_module_forward_pre_hook(record(1)),
               nn.modules.module.register_module_forward_hook(record(-1))]
    try:
        yield events
    finally:
        for handle in handles:
            handle.remove()


def _attribute_modules(graph: torch.fx.Graph, events: list[tuple[int, str, str, int]]) -> None:
    """Give each node the ``nn_module_stack`` export would: the modules running when it was recorded,
    as ``{path: (path, class)}``."""
    stack: list[tuple[str, str]] = []
    pending = iter(events)
    event = next(pending, None)
    for index, node in enumerate(graph.nodes):
        while event is not None and event[0] <= index:
            if event[3] > 0:
                stack.append((event[1], event[2]))
            elif stack:
                stack.pop()
            event = next(pending, None)
        if node.op == "call_function" and stack:
            node.meta["nn_module_stack"] = {path: (path, kind) for path, kind in stack if path}


class _ShapeGuard(nn.Module):
    """Refuses inputs of another size than the exported graph was specialized to, with the fix.

    The exported graph bakes static sizes into its ops (an interpolation to
    64x64 stays 64x64), so another size would fail deep inside with
    "Guard failed", or worse. It replaces export's own ``_guards_fn`` call in
    the graph (and then runs it), so it survives ``copy.deepcopy``, which
    drops forward hooks of a GraphModule.
    """

    def __init__(self, model: str, names: list[str], shapes: list[tuple[int | None, ...] | None],
                 original: nn.Module | None) -> None:
        super().__init__()
        self.model, self.names, self.shapes = model, names, shapes
        self.original = original

    def forward(self, *inputs: Any) -> None:
        for name, expected, value in zip(self.names, self.shapes, inputs, strict=False):
            if expected is None or not isinstance(value, torch.Tensor):
                continue
            if value.dim() != len(expected) or any(e is not None and e != v for e, v in zip(expected, value.shape)):
                shown = ", ".join("N" if e is None else str(e) for e in expected)
                only_batch = value.dim() == len(expected) and all(
                    e is None or e == v for e, v in zip(expected[1:], value.shape[1:]))
                which = "dynamic='batch' for any batch size, or dynamic=True for any size" if only_batch else \
                    "dynamic=True to export symbolic sizes"
                raise CaptureError(
                    f"this GraphModule of {self.model} was exported by fxeq for inputs shaped ({shown}) and is "
                    f"specialized to that size; input {name} has shape {tuple(value.shape)}. Use your own model "
                    "with the same weights (fxeq.transform(model, loader, inplace=True) rewrites it and keeps "
                    f"every shape), or pass {which} (slower to capture).",
                    stage="call",
                )
        if self.original is not None:
            self.original(*inputs)


def _install_shape_guard(gm: FxEqGraphModule, model: str) -> None:
    """Check the placeholders' static sizes (from export's metadata) first thing in the graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes: list[tuple[int | None, ...] | None] = []
    for node in placeholders:
        val = node.meta.get("val")
        shape = getattr(val, "shape", None) if isinstance(val, torch.Tensor) else None
        shapes.append(None if shape is None else tuple(d if isinstance(d, int) else None for d in shape))
    existing = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
    original = gm.get_submodule("_guards_fn") if existing is not None else None
    gm.add_submodule("_guards_fn", _ShapeGuard(model, [n.name for n in placeholders], shapes, original))
    if existing is None and placeholders:
        with gm.graph.inserting_after(placeholders[-1]):
            gm.graph.call_module("_guards_fn", tuple(placeholders))
        gm.recompile()
