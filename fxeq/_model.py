"""Model helpers that every stage needs: unwrapping, checking, inputs, device, and state that must not leak.

A leaf module: it imports nothing else of fxeq but its errors, so capture,
calibration, the rewrite and replay can all use it without importing each
other.

* :func:`unwrap` and :func:`checked_model` turn what the user passed into the
  model fxeq works on, refusing what it cannot work on before any work;
* :data:`Inputs` and :func:`as_inputs` are one model call's arguments;
* :func:`preserved_state` and :func:`calibration_mode` run the model's
  forward and leave no trace of it: every buffer and training flag restored;
* :func:`model_device_and_dtype` says where calibration batches go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "Inputs", "as_inputs", "calibration_mode", "checked_model", "input_signature", "model_device_and_dtype",
    "preserved_state", "probe_inputs", "resolve_owner", "unwrap",
]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""A model call's positional and keyword arguments."""


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


def checked_model(model: object) -> nn.Module:
    """The unwrapped model, refusing what fxeq cannot work on, before any work.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: it has parameters or buffers on the meta device.

    Example:
        >>> checked_model("resnet")
        Traceback (most recent call last):
        ...
        TypeError: model must be a torch.nn.Module, got str
    """
    if isinstance(model, nn.Module):
        model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"{type(model).__name__} has tensors on the meta device (e.g. {meta}): they hold no values to "
            "calibrate or rescale. Load real weights first, e.g. model.to_empty(device='cpu') and then "
            "model.load_state_dict(state)."
        )
    return model


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


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the model's first floating parameter (None, None without one).

    Example:
        >>> model_device_and_dtype(nn.Linear(1, 1).double())
        (device(type='cpu'), torch.float64)
    """
    for param in model.parameters():
        if param.is_floating_point():
            return param.device, param.dtype
    return None, None


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every buffer and every module's training flag on exit, whatever the forward did to them.

    Capture and calibration run the model's forward, which may update batch
    norm running statistics or a user's own counters; nothing of that may
    outlive fxeq. Values written in place are copied back; a buffer that
    ``forward`` replaced (``self.calls = self.calls + 1``) gets its own tensor
    object back, with its old value; one that it registered is removed.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with preserved_state(bn):
        ...     _ = bn.train()(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
        ([0.0, 0.0], 0)
    """
    modules = list(model.modules())
    flags = [(m, m.training) for m in modules]
    registered = [(m, dict(m._buffers)) for m in modules]
    values = {id(b): (b, b.detach().clone()) for _, buffers in registered for b in buffers.values()
              if b is not None and not b.is_meta}
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in values.values():
                buffer.copy_(value)
        for m, buffers in registered:
            m._buffers.clear()
            m._buffers.update(buffers)
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode except normalization layers, which use batch statistics; all state restored on exit.

    Example:
        >>> net = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3))
        >>> with calibration_mode(net):
        ...     [m.training for m in net]
        [False, True]
        >>> net.training, net[1].num_batches_tracked.item()
        (True, 0)
    """
    with preserved_state(model):
        model.eval()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.train()
        yield model


def resolve_owner(module: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The submodule holding a qualified attribute name, and the local name (None if absent).

    Example:
        >>> owner, local = resolve_owner(nn.Sequential(nn.Conv2d(1, 1, 1)), "0.weight")
        >>> type(owner).__name__, local
        ('Conv2d', 'weight')
    """
    prefix, _, local = name.rpartition(".")
    try:
        return (module.get_submodule(prefix) if prefix else module), local
    except AttributeError:
        return None, local


def input_signature(inputs: Inputs) -> dict[str, Any]:
    """The shapes and dtypes of one call's inputs, as JSON: enough to build a probe of the same kind.

    Tensors become ``{"shape": [...], "dtype": "float32"}``; None, booleans,
    numbers and strings are kept as ``{"value": ...}``; anything else as
    ``{"type": name}`` (no probe can be built then).

    Example:
        >>> input_signature(((torch.zeros(2, 3, 8, 8),), {"labels": None}))
        {'args': [{'shape': [2, 3, 8, 8], 'dtype': 'float32'}], 'kwargs': {'labels': {'value': None}}}
    """
    def one(value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        return {"type": type(value).__name__}

    args, kwargs = inputs
    return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in kwargs.items()}}


def probe_inputs(signature: Mapping[str, Any], *, device: torch.device | None = None, seed: int = 0) -> Inputs:
    """Inputs of the kind :func:`input_signature` describes: random normal floats, zero integers.

    Raises:
        ValueError: the signature holds an input that cannot be rebuilt (``{"type": ...}``) or is malformed.

    Example:
        >>> args, kwargs = probe_inputs({"args": [{"shape": [2, 3, 4, 4], "dtype": "float32"}], "kwargs": {}})
        >>> args[0].shape, kwargs
        (torch.Size([2, 3, 4, 4]), {})
    """
    generator = torch.Generator().manual_seed(seed)

    def one(entry: Mapping[str, Any], where: str) -> Any:
        if "shape" in entry:
            dtype = getattr(torch, str(entry["dtype"]))
            shape = [int(s) for s in entry["shape"]]
            if dtype.is_floating_point:
                return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
            return torch.zeros(shape, dtype=dtype, device=device)
        if "value" in entry:
            return entry["value"]
        raise ValueError(f"input {where} (of type {entry.get('type', '?')}) was recorded by name only, so no input "
                         "like it can be built; pass example inputs")

    try:
        return (tuple(one(a, f"args[{k}]") for k, a in enumerate(signature["args"])),
                {k: one(v, f"kwargs[{k!r}]") for k, v in signature["kwargs"].items()})
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"the recorded input signature is malformed ({type(e).__name__}: {e}); expected "
                         "{'args': [...], 'kwargs': {...}} as input_signature writes it") from e
