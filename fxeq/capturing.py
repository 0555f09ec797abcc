"""Capture: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule``.

fxeq reads graphs to find fusion sites, and returns one as the deployable
model. Two frontends produce them:

* ``"fx"``: :func:`torch.fx.symbolic_trace`. Fast and shape-generic, keeps
  ``call_module`` nodes, but fails on models whose ``forward`` branches on
  tensor shapes (19 of 21 segmentation-models-pytorch models).
* ``"export"``: :func:`torch.export.export`. Its graph holds aten ops whose
  weights are ``get_attr`` nodes named after the original parameters, which
  it shares with the model. It is exported with a dynamic batch size and
  *static* spatial sizes: symbolic heights and widths cost minutes on some
  models (a small Swin UperNet: minutes, against about a second static; see
  ``benchmarks/results/capture_cost-cpu.md``), and calibration does not need
  them, because it runs the user's eager model (see :mod:`fxeq.calibration`).
  The returned module is therefore specialized to the example's spatial
  size, and says so clearly when it is called at another one;
  ``dynamic=True`` asks for symbolic sizes and pays their cost, and
  ``dynamic=False`` exports the batch size static too (the cheapest).

``"auto"`` tries fx first and falls back to export. Before either, the model
runs once eagerly on the example, so that a model that cannot run at all
says so instead of reporting a tracing failure. Everything runs in eval mode
under ``torch.no_grad``; the model's training flags and buffers are restored
afterwards. Every node's ``meta["tensor_meta"]`` then holds the shape seen on
the example (:class:`torch.fx.passes.shape_prop.ShapeProp`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from .errors import CaptureError

if TYPE_CHECKING:
    from .report import Report

__all__ = ["Captured", "Dynamic", "Frontend", "FxEqGraphModule", "Inputs", "as_inputs", "capture", "preserved_state", "unwrap"]

_logger = logging.getLogger(__name__)

Frontend = Literal["auto", "fx", "export"]
_FRONTENDS = ("auto", "fx", "export")

Dynamic = bool | Literal["batch"]
"""Which input sizes an export keeps symbolic: True (all but channels), "batch", or False (none)."""

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""A model call's positional and keyword arguments."""


class FxEqGraphModule(torch.fx.GraphModule):
    """The GraphModule fxeq captures and returns; after a rewrite, ``fxeq_report`` says what was done."""

    fxeq_report: Report | None = None


@dataclass(frozen=True)
class Captured:
    """A captured graph and how it was obtained.

    Attributes:
        module: the deployable graph (eval-mode semantics). Its parameters are the
            captured model's own parameter objects, under the same names.
        frontend: ``"fx"`` or ``"export"``.
        specialized: whether ``module`` only accepts the example's spatial
            sizes (export without ``dynamic=True``).
    """

    module: FxEqGraphModule
    frontend: Literal["fx", "export"]
    specialized: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside ``DataParallel``, ``DistributedDataParallel`` or ``torch.compile``.

    Example:
        >>> net = nn.Conv2d(3, 4, 1)
        >>> unwrap(nn.DataParallel(net)) is net
        True
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every buffer's value and every module's training flag on exit.

    Capture and calibration run the model's forward, which may update batch
    norm running statistics or a user's own counters; nothing of that may
    outlive fxeq.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with preserved_state(bn):
        ...     _ = bn.train()(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in _unique(model.buffers()) if not b.is_meta]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for m, flag in flags:
            m.training = flag


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any] | Inputs,
    *,
    frontend: Frontend = "auto",
    dynamic: Dynamic = "batch",
) -> Captured:
    """Capture ``model`` as a GraphModule that shares its parameters.

    Args:
        model: the model; ``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped.
        example_inputs: one batch: a Tensor, a tuple of positional inputs, a
            dict of keyword arguments, or an ``(args, kwargs)`` pair.
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.
        dynamic: which sizes torch.export keeps symbolic: ``"batch"`` (the
            returned module takes any batch size; on smp and Hugging Face
            models the export costs up to about 2x a static one), ``False``
            (none: the fastest, for when only the graph is read, as
            :func:`fxeq.find` does) or ``True`` (batch, height and width: any
            size, but this can cost minutes). fx graphs take any size anyway.
            Default: ``"batch"``.

    Returns:
        A :class:`Captured` whose ``module`` is in eval mode.

    Raises:
        ValueError: unknown ``frontend``.
        CaptureError: the model does not run on the example, or the chosen
            frontend(s) could not capture it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        >>> cap = capture(net, (torch.randn(2, 3, 8, 8),))
        >>> cap.frontend, [n.op for n in cap.module.graph.nodes]
        ('fx', ['placeholder', 'call_module', 'call_module', 'output'])
    """
    if frontend not in _FRONTENDS:
        raise ValueError(f"frontend must be one of {_FRONTENDS}, got {frontend!r}")
    if dynamic not in (True, False, "batch"):
        raise ValueError(f"dynamic must be True, False or 'batch', got {dynamic!r}")
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = as_inputs(example_inputs)
    tries = ("fx", "export") if frontend == "auto" else (frontend,)
    failures: list[str] = []
    with preserved_state(model), torch.no_grad():
        model.eval()
        _run_eagerly(model, args, kwargs)
        for name in tries:
            try:
                gm = _trace_fx(model) if name == "fx" else _export(model, args, kwargs, dynamic)
                with contextlib.redirect_stderr(io.StringIO()):  # fx prints tracebacks it re-raises
                    ShapeProp(gm).propagate(*_flat_inputs(gm, model, name, args, kwargs))
            except Exception as e:  # noqa: BLE001 - every frontend failure is reported together
                _logger.debug("frontend %s failed on %s: %s", name, type(model).__name__, e)
                failures.append(f"  {name}: {type(e).__name__}: {_first_line(e)}")
                continue
            specialized = name == "export" and dynamic is not True
            if specialized:
                _install_shape_guard(gm, type(model).__name__)
            gm.eval()
            return Captured(gm, name, specialized)  # type: ignore[arg-type]
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph; tried {', '.join(tries)}:\n"
        + "\n".join(failures)
        + "\nfx needs a forward without data-dependent Python control flow; torch.export needs "
        "forward to be exportable with the example batch. Try frontend='export' explicitly, "
        "or pass inplace=True and use your own model afterwards."
    )


def as_inputs(example: torch.Tensor | tuple[Any, ...] | dict[str, Any] | Inputs) -> Inputs:
    """One batch as ``(args, kwargs)``: from a Tensor, a positional tuple, a dict of keyword arguments or a pair.

    Example:
        >>> x = torch.zeros(1)
        >>> as_inputs(x) == ((x,), {}), as_inputs({"pixel_values": x}) == ((), {"pixel_values": x})
        (True, True)
    """
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, dict):
        return (), dict(example)
    if len(example) == 2 and isinstance(example[0], tuple) and isinstance(example[1], dict):
        return example[0], dict(example[1])
    return tuple(example), {}


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
            f"{type(model).__name__} does not run on the first calibration batch ({shapes}) in eval mode: "
            f"{type(e).__name__}: {_first_line(e)}. fxeq captures the model on that batch, so it must be "
            f"a valid input: check its shape, dtype and device (some models need a larger input size).{hint}"
        ) from e


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _trace_fx(model: nn.Module) -> FxEqGraphModule:
    traced = torch.fx.symbolic_trace(model)
    return FxEqGraphModule(traced, traced.graph, class_name=type(model).__name__)


def _flat_inputs(
    gm: torch.fx.GraphModule, model: nn.Module, frontend: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[Any]:
    """The placeholders' values, in graph order."""
    if frontend == "export":
        return pytree.tree_leaves((args, kwargs))
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
    # ep.module() refuses .train()/.eval(); a plain GraphModule over the same
    # graph and parameters behaves like any other module.
    return FxEqGraphModule(unlifted, copy.deepcopy(unlifted.graph), class_name=type(model).__name__)


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
                raise CaptureError(
                    f"this GraphModule of {self.model} was exported by fxeq for inputs shaped ({shown}) and is "
                    f"specialized to that size; input {name} has shape {tuple(value.shape)}. Use your own model "
                    "with the same weights (fxeq.transform(model, loader, inplace=True) rewrites it and keeps "
                    "every shape), or pass dynamic=True to export symbolic sizes (slower to capture)."
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
