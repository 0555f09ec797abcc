"""transform / prepare / calibrate / convert against the explicit-equalizer oracle, and every error path."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (
    BNHead,
    CatTwice,
    Chained,
    NoSite,
    ShapeBranch,
    TwoBranch,
    Untraceable,
    batches,
    explicit_equalizer,
    explicit_oracle,
    reference_stats,
    same_state,
    state_of,
)
from torch import nn

import fxeq
from fxeq.capturing import capture


def _ops(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_transform_matches_the_explicit_equalizer_at_1x1(frontend: str) -> None:
    model, data = TwoBranch(), batches()
    state = state_of(model)
    deployed = fxeq.transform(model, data, frontend=frontend)
    assert same_state(model, state), "inplace=False must leave the model untouched"
    report = deployed.fxeq_report
    assert report.frontend == frontend and report.folded

    expected_stats = reference_stats(model, "fuse", data, [(0, 3), (3, 8)])
    got_stats = [(report.stats["cat", k].mean, report.stats["cat", k].std) for k in (0, 1)]
    torch.testing.assert_close(got_stats, expected_stats, rtol=1e-5, atol=1e-6)

    explicit_oracle(model, report, data)
    x = torch.randn(4, 3, 16, 16)  # an export takes the calibration batch's shape
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_padded_conv_matches_the_oracle_in_the_interior() -> None:
    model, data = TwoBranch(kernel=3), batches()
    deployed = fxeq.transform(model, data)
    explicit_oracle(model, deployed.fxeq_report, data)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got, expected = deployed(x), model(x)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().amax() > 1e-3, "the border differs: the zero padding is not standardized"
    assert any("zero-padded borders" in n for n in deployed.fxeq_report.to_dict()["sites"][0]["convs"][0]["notes"])


def test_returned_graph_has_the_original_nodes_and_keys() -> None:
    model = BNHead()
    deployed = fxeq.transform(model, batches())
    original = capture(model, (torch.randn(2, 3, 16, 16),)).module
    assert _ops(deployed) == _ops(original)
    assert list(deployed.state_dict()) == list(model.state_dict())
    changed = [k for k, v in deployed.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed == ["fuse.weight"]


def test_running_statistics_are_untouched_and_modes_restored() -> None:
    model = BNHead().train()
    state = state_of(model)
    fxeq.transform(model, batches(), inplace=True)
    for name, value in model.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert torch.equal(value, state[name]), name
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_inplace_rewrites_the_users_model(frontend: str) -> None:
    model = TwoBranch()
    reference = copy.deepcopy(model)
    deployed = fxeq.transform(model, batches(), inplace=True, frontend=frontend)
    assert type(model) is TwoBranch
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, reference.state_dict()[k])]
    assert changed == ["fuse.weight", "fuse.bias"]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), deployed(x))


def test_chained_sites_equal_sequential_equalization() -> None:
    model, data = Chained(), batches()
    deployed = fxeq.transform(model, data)
    report = deployed.fxeq_report
    first, second = report.search.sites
    assert second.depends_on == (first.name,)

    # Oracle: equalize fuse1 explicitly, then measure fuse2's inputs through it.
    oracle = copy.deepcopy(model)
    stats1 = reference_stats(oracle, "fuse1", data, [(0, 3), (3, 6)])
    explicit_equalizer(oracle, {"fuse1": [((0, 3), *stats1[0]), ((3, 6), *stats1[1])]})
    stats2 = reference_stats(oracle, "fuse2", data, [(0, 4), (4, 6)])
    explicit_equalizer(oracle, {"fuse2": [((0, 4), *stats2[0]), ((4, 6), *stats2[1])]})
    got = [(report.stats[second.name, k].mean, report.stats[second.name, k].std) for k in (0, 1)]
    torch.testing.assert_close(got, stats2, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), oracle(x), rtol=1e-5, atol=1e-5)


def test_same_tensor_twice() -> None:
    model, data = CatTwice(), batches()
    deployed = fxeq.transform(model, data)
    stats = deployed.fxeq_report.stats
    assert stats["cat", 2].std == pytest.approx(3 * stats["cat", 0].std, rel=1e-6)
    explicit_oracle(model, deployed.fxeq_report, data)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_step_by_step_api() -> None:
    model, data = TwoBranch(), batches()
    prepared = fxeq.prepare(model, data[0])
    assert prepared.report.stats == {}
    with pytest.raises(fxeq.FxEqError, match="call fxeq.calibrate"):
        fxeq.convert(prepared)
    fxeq.calibrate(prepared, data, num_batches=2)
    assert prepared.report.stats["cat", 0].samples == 8
    deployed = fxeq.convert(prepared)
    assert deployed.fxeq_report.folded
    assert "site cat -> fuse" in str(deployed.fxeq_report)


def test_returned_module_behaves_like_a_module() -> None:
    deployed = fxeq.transform(ShapeBranch(), batches(), frontend="export", dynamic="batch")
    assert not deployed.training
    deployed.train()
    deployed.eval()
    with torch.no_grad():
        assert deployed(torch.randn(5, 3, 16, 16)).shape == (5, 4, 16, 16)
    assert copy.deepcopy(deployed)(torch.randn(1, 3, 16, 16)).shape == (1, 4, 16, 16)


def test_data_parallel_is_unwrapped() -> None:
    model = TwoBranch()
    deployed = fxeq.transform(nn.DataParallel(model), batches(), inplace=True)
    assert torch.equal(model.fuse.weight, deployed.get_parameter("fuse.weight"))


@given(
    widths=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    kernel=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, "depthwise"]),
    bias=st.booleans(),
    mode=st.sampled_from(["bilinear", "nearest", "bicubic"]),
)
@settings(max_examples=12, deadline=None)
def test_property_transform_equals_explicit(widths, kernel, groups, bias, mode) -> None:
    ca, cb = widths
    g = ca + cb if groups == "depthwise" else 1
    model = TwoBranch(ca, cb, out=(ca + cb) * (2 if g > 1 else 1), kernel=kernel, groups=g, bias=bias, mode=mode)
    data = batches(2)
    deployed = fxeq.transform(model, data)
    explicit_oracle(model, deployed.fxeq_report, data, with_mean=bias)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got, expected = deployed(x), model(x)
    if kernel == 3:
        got, expected = got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype: torch.dtype) -> None:
    model = TwoBranch()
    reference = fxeq.transform(copy.deepcopy(model).double(), batches(dtype=torch.float64))
    deployed = fxeq.transform(model.to(dtype), batches(dtype=dtype))
    assert deployed.get_parameter("fuse.weight").dtype == dtype
    torch.testing.assert_close(
        deployed.get_parameter("fuse.weight").double(), reference.get_parameter("fuse.weight"),
        rtol=2e-2, atol=2e-2,
    )


# ---------------------------------------------------------------------------
# Error paths: each leaves the model exactly as it was.
# ---------------------------------------------------------------------------


def test_empty_loader() -> None:
    model = TwoBranch()
    state = state_of(model)
    with pytest.raises(fxeq.CalibrationError, match="yielded no batches"):
        fxeq.transform(model, [], inplace=True)
    assert same_state(model, state)


def test_nan_input_names_the_site_and_changes_nothing() -> None:
    model = TwoBranch()
    state = state_of(model)
    data = batches()
    data[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(fxeq.FxEqError, match=r"site 'cat' \(conv fuse\), input 0 .*mean=nan"):
        fxeq.transform(model, data, inplace=True)
    assert same_state(model, state)


def test_zero_std_names_the_input_and_changes_nothing() -> None:
    model = TwoBranch()
    with torch.no_grad():
        model.conv_b.weight.zero_()
        model.conv_b.bias.zero_()
    state = state_of(model)
    with pytest.raises(fxeq.FxEqError, match=r"input 1 \(node 'interpolate', channels 3:8, from relu\): .*std=0"):
        fxeq.transform(model, batches(), inplace=True)
    assert same_state(model, state)


def test_failure_at_a_later_site_leaves_earlier_sites_unwritten() -> None:
    model = Chained()
    with torch.no_grad():
        model.c3.weight.zero_()
        model.c3.bias.zero_()
    state = state_of(model)
    with pytest.raises(fxeq.FxEqError, match="site 'cat_1'"):
        fxeq.transform(model, batches(), inplace=True)
    assert same_state(model, state)


def test_untraceable_model() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"could not capture Untraceable as a graph; tried fx, export.*\n  fx: .*\n  export: "):
        fxeq.transform(Untraceable(), batches())


def test_unknown_frontend() -> None:
    with pytest.raises(ValueError, match="frontend must be one of"):
        fxeq.transform(TwoBranch(), batches(), frontend="jit")  # type: ignore[arg-type]


def test_batch_of_one_with_pooled_batch_norm() -> None:
    class Pooled(nn.Module):
        """x ── gap ── conv ── bn ── upsample ──┬─ cat ── fuse;  x ── conv ──┘"""

        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
            self.a = nn.Conv2d(3, 2, 1)
            self.fuse = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = nn.functional.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear")
            return self.fuse(torch.cat([self.a(x), p], 1))

    model = Pooled()
    data = [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)]
    with pytest.raises(fxeq.CalibrationError, match=r"(?s)calibration batch 1 .*\(1, 3, 8, 8\).*at least 2"):
        fxeq.transform(model, data)


def test_batch_without_input_fn() -> None:
    data = [{"image": x} for x in batches()]
    with pytest.raises(TypeError, match="input_fn=lambda b: b\\['image'\\]"):
        fxeq.transform(TwoBranch(), data)
    deployed = fxeq.transform(TwoBranch(), data, input_fn=lambda b: b["image"])
    assert deployed.fxeq_report.folded


def test_already_equalized_is_refused() -> None:
    model = TwoBranch()
    deployed = fxeq.transform(model, batches(), inplace=True)
    weight = model.fuse.weight.clone()
    for again in (model, copy.deepcopy(model), deployed):
        with pytest.raises(fxeq.AlreadyEqualizedError, match="conv fuse was already equalized by fxeq"):
            fxeq.transform(again, batches(), inplace=True)
    assert torch.equal(model.fuse.weight, weight)


def test_no_site_warns_and_changes_nothing() -> None:
    model = NoSite()
    state = state_of(model)
    with pytest.warns(fxeq.NoSiteWarning) as caught:
        deployed = fxeq.transform(model, batches())
    assert str(caught[0].message) == (
        "fxeq found no fusion site in NoSite: it looks for a channel concatenation (torch.cat, dim=1) with an "
        "upsampled input (F.interpolate, nn.Upsample, aten.upsample_*) whose output feeds a conv. The model is "
        "returned unchanged.")  # no concatenation, so nothing to skip and no fix to offer
    assert same_state(deployed, state) and not deployed.fxeq_report.folded


def test_report_serializes() -> None:
    import json

    model = BNHead()
    expected = reference_stats(model, "fuse", batches(), [(0, 4), (4, 10)])
    deployed = fxeq.transform(model, batches())
    data = json.loads(deployed.fxeq_report.to_json())
    (site,) = data["sites"]
    assert [i["channels"] for i in site["inputs"]] == [[0, 4], [4, 10]]
    assert site["convs"][0]["folded_mean"] is False
    assert "no bias" in site["convs"][0]["notes"][0]
    stds = [std for _, std in expected]
    assert [i["std"] for i in site["inputs"]] == pytest.approx(stds, rel=1e-5)
    assert site["disequilibrium"] == pytest.approx(max(stds) / min(stds), rel=1e-5)
    assert data["versions"]["fxeq"] == fxeq.__version__


def test_model_that_cannot_be_copied() -> None:
    import threading

    model = TwoBranch()
    model.lock = threading.Lock()
    with pytest.raises(fxeq.FxEqError, match="could not copy TwoBranch.*pass inplace=True"):
        fxeq.transform(model, batches())
    assert fxeq.transform(model, batches(), inplace=True).fxeq_report.folded
