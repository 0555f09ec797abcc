"""Capture: frontends, the eager check, state restored, the specialized module's contract."""

from __future__ import annotations

import copy

import pytest
import torch
from models import Counter, ShapeBranch, TwoBranch
from torch import nn

import fxeq
from fxeq._model import as_inputs, preserved_state, unwrap
from fxeq.capturing import FxEqGraphModule, capture


def test_auto_tries_fx_then_export_without_printing_tracebacks(capsys) -> None:
    x = torch.randn(2, 3, 16, 16)
    assert capture(TwoBranch(), (x,)).frontend == "fx"
    captured = capture(ShapeBranch(), (x,))
    assert captured.frontend == "export" and captured.deployable
    assert captured.failures[0].startswith("fx: TraceError")
    assert isinstance(captured.module, FxEqGraphModule) and not captured.module.training
    assert capsys.readouterr().err == "", "fx's failure is handled, so it must not reach stderr"


def test_capture_restores_buffers_and_flags() -> None:
    model = Counter().train()
    for frontend in ("fx", "export"):
        capture(model, (torch.randn(2, 3, 16, 16),), frontend=frontend)
        assert int(model.steps) == 0 and all(m.training for m in model.modules())


def test_unknown_frontend_and_model_type() -> None:
    with pytest.raises(ValueError, match="frontend must be one of 'auto', 'fx', 'export', 'concrete'; got 'jit'"):
        capture(TwoBranch(), (torch.randn(2, 3, 16, 16),), frontend="jit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        capture(lambda x: x, (torch.randn(2, 3, 16, 16),))  # type: ignore[arg-type]


def test_a_model_neither_frontend_captures() -> None:
    class ValueBranch(TwoBranch):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x  # data-dependent: fx fails, export fails

    with pytest.raises(fxeq.CaptureError, match=r"(?s)could not capture ValueBranch as a graph; tried fx, export:"
                                                r"\n  fx: TraceError: .*\n  export: .*\nfx needs a forward") as caught:
        capture(ValueBranch(), (torch.ones(2, 3, 16, 16),))
    assert caught.value.stage == "trace" and set(caught.value.failures) == {"fx", "export"}
    # Without the need for a deployable graph, a concrete trace takes the branch the example takes.
    captured = capture(ValueBranch(), (torch.ones(2, 3, 16, 16),), deployable=False)
    assert captured.frontend == "concrete" and not captured.deployable
    assert [f.split(":")[0] for f in captured.failures] == ["fx", "export"]


def test_shape_guard_names_the_input_and_the_fix() -> None:
    module = capture(ShapeBranch(), (torch.randn(2, 3, 16, 16),), frontend="export", dynamic="batch").module
    assert module(torch.randn(3, 3, 16, 16)).shape == (3, 4, 16, 16)
    with pytest.raises(fxeq.CaptureError, match=r"exported by fxeq for inputs shaped \(N, 3, 16, 16\) and is "
                                                r"specialized to that size; input x has shape \(2, 3, 8, 8\)"):
        module(torch.randn(2, 3, 8, 8))
    restored = copy.deepcopy(module)
    with pytest.raises(fxeq.CaptureError, match="specialized to that size"):
        restored(torch.randn(2, 3, 8, 8))


def test_dynamic_export_takes_other_sizes() -> None:
    module = capture(ShapeBranch(), (torch.randn(2, 3, 16, 16),), frontend="export", dynamic=True).module
    assert module(torch.randn(1, 3, 32, 24)).shape == (1, 4, 32, 24)


def test_keyword_inputs_are_captured_by_both_frontends() -> None:
    class Keyword(TwoBranch):
        def forward(self, pixel_values, scale=None):
            return super().forward(pixel_values)

    x = torch.randn(2, 3, 16, 16)
    for frontend in ("fx", "export"):
        module = capture(Keyword(), ((), {"pixel_values": x}), frontend=frontend).module
        assert module(pixel_values=x).shape == (2, 4, 16, 16)


def test_unwrap_and_as_inputs() -> None:
    net = TwoBranch()
    assert unwrap(nn.DataParallel(net)) is net and unwrap(torch.compile(net)) is net
    x = torch.zeros(1)
    assert as_inputs((x, x)) == ((x, x), {}) and as_inputs(((x,), {"y": x})) == ((x,), {"y": x})


def test_preserved_state_restores_after_an_error() -> None:
    model = nn.BatchNorm1d(2)
    with pytest.raises(RuntimeError, match="boom"), preserved_state(model):
        model.train()(torch.randn(4, 2) + 5)
        raise RuntimeError("boom")
    assert model.running_mean.abs().max() == 0 and model.num_batches_tracked == 0


def test_fully_static_export_names_the_batch_size() -> None:
    module = capture(ShapeBranch(), (torch.randn(3, 3, 16, 16),), frontend="export", dynamic=False).module
    assert module(torch.randn(3, 3, 16, 16)).shape == (3, 4, 16, 16)
    with pytest.raises(fxeq.CaptureError, match=r"inputs shaped \(3, 3, 16, 16\) .*input x has shape \(2, 3, 16, 16\)"):
        module(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="dynamic must be True, False or 'batch', got 'hw'"):
        capture(ShapeBranch(), (torch.randn(3, 3, 16, 16),), dynamic="hw")  # type: ignore[arg-type]


class Reassigning(TwoBranch):
    """TwoBranch that replaces a buffer in forward and registers another there::

        self.calls = self.calls + 1;  self.register_buffer("seen", ...)
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        if "seen" not in self._buffers:
            self.register_buffer("seen", torch.ones(()))
        return super().forward(x)


def test_preserved_state_rebinds_a_replaced_buffer_and_drops_a_new_one() -> None:
    model = Reassigning()
    calls = model.calls
    with preserved_state(model):
        model(torch.randn(2, 3, 16, 16))
        assert model.calls is not calls
    assert model.calls is calls and model.calls.item() == 0
    assert "seen" not in dict(model.named_buffers())


@pytest.mark.parametrize("inplace", [True, False])
def test_transform_leaves_replaced_buffers_as_they_were(inplace: bool) -> None:
    model = Reassigning()
    calls = model.calls
    fxeq.transform(model, [torch.randn(2, 3, 16, 16) for _ in range(2)], inplace=inplace, progress=False)
    assert model.calls is calls and model.calls.item() == 0
    assert sorted(dict(model.named_buffers())) == ["calls"]
