"""Training semantics: init / keep_norm / reparam / explicit, finalize, plain state_dicts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import BNFuse, BNHead, TwoBranch, batches, explicit_oracle
from torch import nn

import fxeq
from fxeq.capturing import capture
from fxeq.modes import InputScale, finalize, load_plain_state_dict, plain_state_dict


def _ops(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()


def test_the_mode_names_are_the_strategies() -> None:
    from typing import get_args

    from fxeq.modes import MODES, STRATEGIES, Mode

    assert get_args(Mode) == MODES == tuple(STRATEGIES)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_reparam_gradients_equal_the_explicit_equalizer(frontend: str) -> None:
    base, data, x = BNFuse(), batches(), torch.randn(4, 3, 16, 16)
    reparam, explicit = copy.deepcopy(base), copy.deepcopy(base)
    fxeq.transform(reparam, data, inplace=True, mode="reparam", frontend=frontend)
    fxeq.transform(explicit, data, inplace=True, mode="explicit", frontend=frontend)
    assert isinstance(reparam.fuse.parametrizations.weight[0], InputScale)
    _step(reparam, x)
    _step(explicit, x)
    torch.testing.assert_close(reparam.fuse.parametrizations.weight.original.grad, explicit.fuse.weight.grad,
                               rtol=1e-4, atol=1e-6)
    # A batch norm in training mode cancels the bias: both bias gradients are rounding noise around 0.
    scale = float(explicit.fuse.weight.grad.abs().max())
    torch.testing.assert_close(reparam.fuse.bias.grad, explicit.fuse.bias.grad, rtol=0, atol=1e-3 * scale)

    # Negative twin: the folded init weight's gradient still scales with sigma.
    init = copy.deepcopy(base)
    fxeq.transform(init, data, inplace=True)
    _step(init, x)
    assert not torch.allclose(init.fuse.weight.grad, explicit.fuse.weight.grad, rtol=1e-2, atol=1e-5)


def test_reparam_without_norm_differs_by_the_mean_term() -> None:
    base, data, x = BNFuse(norm=False), batches(), torch.randn(4, 3, 16, 16)
    reparam, explicit = copy.deepcopy(base), copy.deepcopy(base)
    fxeq.transform(reparam, data, inplace=True, mode="reparam")
    report = fxeq.transform(explicit, data, inplace=True, mode="explicit").fxeq_report
    _step(reparam, x)
    _step(explicit, x)
    # d/dW_raw = d/dW_explicit + (mu / sigma) * sum(dL/dy) per (out, in) pair.
    stats = [report.stats["cat", i] for i in (0, 1)]
    ratio = torch.tensor([stats[0].mean / stats[0].std] * 3 + [stats[1].mean / stats[1].std] * 4)
    dy_sum = explicit.fuse.bias.grad
    expected = explicit.fuse.weight.grad + (dy_sum.view(-1, 1) * ratio.view(1, -1)).view_as(explicit.fuse.weight)
    torch.testing.assert_close(reparam.fuse.parametrizations.weight.original.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mode", ["init", "reparam", "explicit"])
def test_modes_agree_at_step_zero(frontend: str, inplace: bool, mode: str) -> None:
    base, data, x = TwoBranch(), batches(), torch.randn(4, 3, 16, 16)  # an export takes the calibration shape
    model = copy.deepcopy(base)
    deployed = fxeq.transform(model, data, frontend=frontend, inplace=inplace, mode=mode)
    assert deployed.fxeq_report.mode == mode
    reference = copy.deepcopy(base)  # the explicit equalizer with statistics of its own (1x1 fuse: exact)
    explicit_oracle(reference, deployed.fxeq_report, data)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)
        if inplace:
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(model(x), base(x))
    keys = base.state_dict() if inplace else capture(base, (x,), frontend=frontend).module.state_dict()
    assert list(plain_state_dict(deployed)) == list(keys)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("mode", ["reparam", "explicit"])
def test_finalize_restores_graph_and_keys_and_keeps_outputs(frontend: str, mode: str) -> None:
    base, data, x = BNHead(), batches(), torch.randn(4, 3, 16, 16)
    original_ops = _ops(capture(base, (x,), frontend=frontend).module)
    deployed = fxeq.transform(copy.deepcopy(base), data, frontend=frontend, mode=mode)
    model = copy.deepcopy(base)
    fxeq.transform(model, data, frontend=frontend, mode=mode, inplace=True)
    with torch.no_grad():
        before, before_model = deployed(x), model.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert finalize(deployed) is deployed and finalize(model) is model
    assert _ops(deployed) == original_ops
    assert list(deployed.state_dict()) == list(base.state_dict()) and list(model.state_dict()) == list(base.state_dict())
    inner = (..., slice(1, -1), slice(1, -1))  # fuse is 3x3: the mean fold is exact off the border
    with torch.no_grad():
        torch.testing.assert_close(deployed(x)[inner], before[inner], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x)[inner], before_model[inner], rtol=1e-5, atol=1e-5)
    with pytest.raises(fxeq.AlreadyEqualizedError):
        fxeq.transform(model, data)


def test_finalize_explicit_mean_goes_to_batch_norm_running_mean() -> None:
    model = BNHead()
    running_mean, weight = model.bn.running_mean.clone(), model.fuse.weight.detach().double().clone()
    report = fxeq.transform(model, batches(), mode="explicit", inplace=True).fxeq_report
    finalize(model)
    # No bias: conv((x - mu) / sigma) = conv(x) - sum_c,kernel W[:, c] mu_c / sigma_c moves into running_mean.
    mu = torch.tensor([report.stats["cat", 0].mean] * 4 + [report.stats["cat", 1].mean] * 6, dtype=torch.float64)
    sigma = torch.tensor([report.stats["cat", 0].std] * 4 + [report.stats["cat", 1].std] * 6, dtype=torch.float64)
    expected = running_mean.double() + (weight.sum((2, 3)) * (mu / sigma)).sum(1)
    torch.testing.assert_close(model.bn.running_mean.double(), expected, rtol=1e-5, atol=1e-6)


def test_finalize_reports_a_mean_it_cannot_fold() -> None:
    model = TwoBranch(bias=False)
    fxeq.transform(model, batches(), mode="explicit", inplace=True)
    with pytest.warns(UserWarning, match="conv fuse: no bias and no batch norm after it, so the mean"):
        assert finalize(model) is model


def test_keep_norm_restores_output_channel_norms_and_the_train_forward() -> None:
    base, data, x = BNFuse(), batches(), torch.randn(4, 3, 16, 16)
    base.bn.eps = 1e-10  # scale invariance of batch norm is exact up to its eps
    init, kept = copy.deepcopy(base), copy.deepcopy(base)
    fxeq.transform(init, data, inplace=True)
    deployed = fxeq.transform(kept, data, inplace=True, keep_norm=True)
    dims = (1, 2, 3)
    norm = torch.linalg.vector_norm
    torch.testing.assert_close(norm(kept.fuse.weight, dim=dims), norm(base.fuse.weight, dim=dims))
    assert not torch.allclose(norm(init.fuse.weight, dim=dims), norm(base.fuse.weight, dim=dims))
    with torch.no_grad():
        torch.testing.assert_close(kept.train()(x), init.train()(x), rtol=1e-4, atol=1e-4)
    assert "keep_norm: per-output-channel weight norms restored" in deployed.fxeq_report.table()


def test_keep_norm_is_refused_where_no_batch_norm_follows() -> None:
    model = TwoBranch()
    init = fxeq.transform(copy.deepcopy(model), batches())
    deployed = fxeq.transform(model, batches(), keep_norm=True)
    assert torch.equal(deployed.fuse.weight, init.fuse.weight)
    assert "keep_norm refused: no batch norm reads this conv" in deployed.fxeq_report.table()


def test_plain_state_dict_round_trip() -> None:
    base, data, x = BNFuse(), batches(), torch.randn(2, 3, 16, 16)
    model = copy.deepcopy(base)
    fxeq.transform(model, data, inplace=True, mode="reparam")
    assert "fuse.parametrizations.weight.original" in model.state_dict()
    plain = plain_state_dict(model)
    assert list(plain) == list(base.state_dict())
    fresh = BNFuse()
    fresh.load_state_dict(plain)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    again = copy.deepcopy(model)
    with torch.no_grad():
        again.fuse.parametrizations.weight.original.zero_()
    load_plain_state_dict(again, plain)
    torch.testing.assert_close(again.fuse.weight, model.fuse.weight)


def test_bad_mode_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of 'init', 'reparam', 'explicit'; got 'bn'"):
        fxeq.transform(TwoBranch(), batches(), mode="bn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_norm=True applies to mode='init' only, got mode='reparam'"):
        fxeq.transform(TwoBranch(), batches(), mode="reparam", keep_norm=True)


def test_a_conv_computed_by_a_function_is_skipped_with_the_reason() -> None:
    class Functional(nn.Module):
        """x ── conv ──┐;  x ── pool ── conv ── up ──┴─ cat ── fuse;  cat(up, a) ── F.conv2d(self.w)"""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 2, 1)
            self.b = nn.Conv2d(3, 2, 1)
            self.fuse = nn.Conv2d(4, 2, 1)
            self.w = nn.Parameter(torch.randn(2, 4, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            up = torch.nn.functional.interpolate(self.b(torch.nn.functional.avg_pool2d(x, 2)), scale_factor=2.0)
            first = self.fuse(torch.cat([self.a(x), up], 1))
            return first + torch.nn.functional.conv2d(torch.cat([up, self.a(x)], 1), self.w)

    model = Functional()
    w = model.w.detach().clone()
    report = fxeq.transform(model, batches(), mode="explicit", inplace=True).fxeq_report
    assert [s.convs[0].module for s in report.search.sites] == ["fuse"]
    (skipped,) = [s for s in report.search.skipped if "Functional" in s.reason]
    assert "its conv weight w belongs to a Functional, not to a conv module" in skipped.reason
    assert torch.equal(model.w, w)


def test_explicit_inplace_tensors_follow_the_model_to_another_dtype() -> None:
    model, data, x = TwoBranch(), batches(), torch.randn(2, 3, 16, 16)
    fxeq.transform(model, data, mode="explicit", inplace=True)
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(x).double()
        got = model.double()(x.double())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.fuse.fxeq_standardize.mean.dtype == torch.float64
    assert list(model.state_dict()) == keys, "the equalizer's tensors are not state_dict entries"
    assert copy.deepcopy(model).double()(x.double()).shape == (2, 4, 16, 16)


def test_finalize_after_reparam_keeps_the_original_key_order() -> None:
    model = TwoBranch()
    keys = list(model.state_dict())
    fxeq.transform(model, batches(), mode="reparam", inplace=True)
    assert list(finalize(model).state_dict()) == keys
