"""Capture: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule``.

fxeq works on graphs. Two frontends produce them:

* ``"fx"``: :func:`torch.fx.symbolic_trace`. Fast, keeps ``call_module`` nodes,
  but fails on models whose ``forward`` branches on tensor shapes (19 of 21
  segmentation-models-pytorch models).
* ``"export"``: :func:`torch.export.export` with dynamic batch and spatial
  sizes, so that calibration batches may differ in size. Its graph holds aten
  ops whose weights are ``get_attr`` nodes named after the original parameters,
  which it shares with the model.

``"auto"`` tries fx first and falls back to export. The model is captured in
eval mode (the deployable graph); the training flags of its modules are
restored afterwards. After capture, every node's ``meta["tensor_meta"]`` holds
the shape seen on the example input (:class:`torch.fx.passes.shape_prop.ShapeProp`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CaptureError

__all__ = ["Captured", "Frontend", "capture", "unwrap"]

_logger = logging.getLogger(__name__)

Frontend = Literal["auto", "fx", "export"]
_FRONTENDS = ("auto", "fx", "export")


@dataclass(frozen=True)
class Captured:
    """A captured graph and how it was obtained.

    Attributes:
        module: the deployable graph (eval-mode semantics). Its parameters are the
            captured model's own parameter objects, under the same names.
        frontend: ``"fx"`` or ``"export"``.
    """

    module: torch.fx.GraphModule
    frontend: str


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside ``DataParallel`` / ``DistributedDataParallel``.

    Example:
        >>> net = nn.Conv2d(3, 4, 1)
        >>> unwrap(nn.DataParallel(net)) is net
        True
    """
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def capture(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    frontend: Frontend = "auto",
) -> Captured:
    """Capture ``model`` as a GraphModule that shares its parameters.

    Args:
        model: the model; ``DataParallel`` / ``DistributedDataParallel`` are
            unwrapped.
        example_inputs: positional inputs of one batch, used by torch.export
            and to record shapes.
        frontend: ``"auto"``, ``"fx"`` or ``"export"``. Default: ``"auto"``.

    Returns:
        A :class:`Captured` whose ``module`` is in eval mode.

    Raises:
        ValueError: unknown ``frontend``.
        CaptureError: the chosen frontend(s) could not capture the model.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        >>> cap = capture(net, (torch.randn(2, 3, 8, 8),))
        >>> cap.frontend, [n.op for n in cap.module.graph.nodes]
        ('fx', ['placeholder', 'call_module', 'call_module', 'output'])
    """
    if frontend not in _FRONTENDS:
        raise ValueError(f"frontend must be one of {_FRONTENDS}, got {frontend!r}")
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tries = ("fx", "export") if frontend == "auto" else (frontend,)
    failures: list[str] = []
    with eval_mode(model), torch.no_grad():
        for name in tries:
            try:
                gm = _FRONTEND_FNS[name](model, example_inputs)
                ShapeProp(gm).propagate(*example_inputs)
            except Exception as e:  # noqa: BLE001 - every frontend failure is reported together
                _logger.debug("frontend %s failed on %s: %s", name, type(model).__name__, e)
                failures.append(f"  {name}: {type(e).__name__}: {_first_line(e)}")
                continue
            return Captured(gm, name)
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph; tried {', '.join(tries)}:\n"
        + "\n".join(failures)
        + "\nfx needs a forward without data-dependent Python control flow; torch.export needs "
        "forward(*tensors) to be exportable with the example batch. Check that the example batch "
        "is what forward expects, try frontend='export' explicitly, or wrap the decoder alone."
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _trace_fx(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(model)


def _export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    dynamic = tuple(
        {d: _dynamic_dim(k, d) for d in range(x.dim()) if d != 1} if isinstance(x, torch.Tensor) else None
        for k, x in enumerate(example_inputs)
    )
    program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic)
    unlifted = program.module()
    # ep.module() refuses .train()/.eval(); a plain GraphModule over the same
    # graph and parameters behaves like any other module.
    return torch.fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph))


def _dynamic_dim(arg: int, dim: int) -> object:
    """Dim.AUTO (torch >= 2.6) lets export keep a size dynamic or specialize it as needed."""
    auto = getattr(torch.export.Dim, "AUTO", None)
    return auto if auto is not None else torch.export.Dim(f"arg{arg}_dim{dim}")


_FRONTEND_FNS = {"fx": _trace_fx, "export": _export}
