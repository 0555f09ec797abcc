"""Calibration you can trust: the statistics fxeq folds are those the convs receive, or it refuses.

The oracle is ``models.reference_stats``: float64 statistics of what a conv
module receives, measured with a plain pre-hook on the model (no fxeq code).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from models import (
    BNHead,
    Chained,
    ChainedBN,
    Counter,
    OneShot,
    ShapeBranch,
    TwoBranch,
    batches,
    explicit_equalizer,
    reference_stats,
    remeasure,
    same_state,
    state_of,
)
from torch import nn

import fxeq
from fxeq._model import calibration_mode
from fxeq.batches import CalibrationData, batch_inputs


def _assert_invariant(model: nn.Module, report, data: list[torch.Tensor], rel: float = 1e-3) -> None:
    """Every site input, re-measured on the transformed model, has the statistics folded into its conv."""
    measured = remeasure(model, report, data)
    for key, (mean, std) in measured.items():
        folded = report.stats[key]
        assert std == pytest.approx(folded.std, rel=rel), (key, std, folded.std)
        assert mean == pytest.approx(folded.mean, rel=rel, abs=1e-6 * folded.std), (key, mean, folded.mean)


# ---------------------------------------------------------------------------
# Chained sites: one at a time, whatever lies between them
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [Chained, ChainedBN], ids=["no-norm", "batch-norm-between"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_every_site_sees_the_statistics_folded_into_it(build, frontend: str) -> None:
    torch.manual_seed(0)
    model, data = build(), batches(3)
    deployed = fxeq.transform(model, data, inplace=True, frontend=frontend)
    report = deployed.fxeq_report
    assert [len(g) for g in report.search.generations()] == [1, 1]
    assert report.calibration.passes == 2 and report.calibration.batches == 6
    _assert_invariant(model, report, data)


def test_one_pass_is_the_approximate_shortcut_and_says_so() -> None:
    torch.manual_seed(0)
    exact, shortcut, data = ChainedBN(), None, batches(3)
    shortcut = copy.deepcopy(exact)
    fxeq.transform(exact, data, inplace=True)
    report = fxeq.transform(shortcut, data, inplace=True, one_pass=True).fxeq_report
    assert report.calibration.passes == 1
    assert "approximate" in report.table() and "approximate" in report.to_json()
    measured = remeasure(shortcut, report, data)
    upstream, downstream = report.search.sites
    assert measured[upstream.name, 1][1] == pytest.approx(report.stats[upstream.name, 1].std, rel=1e-4)
    # Downstream, the shortcut folded statistics of the unfolded model: the conv no longer sees them.
    assert measured[downstream.name, 0][1] != pytest.approx(report.stats[downstream.name, 0].std, rel=1e-3)


@pytest.mark.slow
def test_smp_upernet_chained_sites_are_exact() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.UPerNet("resnet18", encoder_weights=None, classes=3)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    report = fxeq.transform(model, data, inplace=True).fxeq_report
    assert report.calibration.passes == 2, report.table()
    _assert_invariant(model, report, data)


# ---------------------------------------------------------------------------
# Silent wrong results, now refused or right
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_of_one_sample_on_the_export_path_is_refused() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=3)
    state = state_of(model)
    with pytest.raises(fxeq.CalibrationError, match="at least 2 samples"):
        fxeq.transform(model, [torch.randn(1, 3, 64, 64)] * 2, inplace=True)
    assert same_state(model, state)


def test_constant_input_up_to_rounding_is_refused_naming_the_input() -> None:
    model = TwoBranch()
    with torch.no_grad():  # branch b: a constant 1e4 plus float32 rounding noise
        model.conv_b.weight.mul_(1e-12)
        model.conv_b.bias.fill_(1e4)
    state = state_of(model)
    with pytest.raises(fxeq.CalibrationError, match=r"input 1 .*1e-05 x \|mean\|.*nothing was modified"):
        fxeq.transform(model, batches(2), inplace=True)
    assert same_state(model, state)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_user_pre_hook_on_the_fusing_conv_is_measured(frontend: str) -> None:
    torch.manual_seed(0)
    model, data = TwoBranch(), batches(3)
    model.fuse.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
    oracle = copy.deepcopy(model)
    slices = [(0, 3), (3, 8)]
    stats = reference_stats(oracle, "fuse", data, slices)
    explicit_equalizer(oracle, {"fuse": [(s, m, sd) for s, (m, sd) in zip(slices, stats, strict=True)]})
    deployed = fxeq.transform(model, data, frontend=frontend)
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), oracle(x), rtol=1e-4, atol=1e-4)


def test_one_shot_iterable_uses_every_batch() -> None:
    data = batches(3)
    report = fxeq.transform(TwoBranch(), OneShot(data)).fxeq_report
    assert {s.samples for s in report.stats.values()} == {12}
    assert report.calibration.batches == 3


def test_one_shot_iterable_matches_a_list() -> None:
    torch.manual_seed(0)
    model, data = TwoBranch(), batches(3)
    from_list = fxeq.transform(model, data).fxeq_report.stats
    from_iter = fxeq.transform(model, iter(data)).fxeq_report.stats
    assert from_list == from_iter


@pytest.mark.parametrize("make", [lambda d: OneShot(d), lambda d: (x for x in d)], ids=["shared-iterator", "generator"])
def test_one_shot_iterable_is_refused_before_work_when_chained(make) -> None:
    model = Chained()
    state = state_of(model)
    with pytest.raises(fxeq.CalibrationError, match="can be read only once.*2 passes"):
        fxeq.transform(model, make(batches(3)), inplace=True)
    assert same_state(model, state)


def test_step_api_refuses_a_second_calibrate_or_convert() -> None:
    data = batches(2)
    prepared = fxeq.prepare(TwoBranch(), data[0], inplace=True)
    fxeq.calibrate(prepared, data)
    fxeq.convert(prepared)
    weight = prepared.model.fuse.weight.detach().clone()
    with pytest.raises(fxeq.AlreadyEqualizedError, match="already converted"):
        fxeq.calibrate(prepared, data)
    with pytest.raises(fxeq.AlreadyEqualizedError, match="already converted"):
        fxeq.convert(prepared)
    assert torch.equal(prepared.model.fuse.weight, weight)


@pytest.mark.parametrize("mode", ["init", "reparam", "explicit"])
def test_convert_twice_is_refused_in_every_mode(mode: str) -> None:
    data = batches(2)
    model = TwoBranch()
    prepared = fxeq.calibrate(fxeq.prepare(model, data[0], inplace=True), data)
    fxeq.convert(prepared, mode=mode)
    keys, hooks = sorted(model.state_dict()), dict(model.fuse._forward_pre_hooks)
    with pytest.raises(fxeq.AlreadyEqualizedError, match="already converted"):
        fxeq.convert(prepared, mode=mode)
    assert sorted(model.state_dict()) == keys and dict(model.fuse._forward_pre_hooks) == hooks
    with pytest.raises(fxeq.AlreadyEqualizedError, match="conv fuse was already equalized"):
        fxeq.transform(model, data, inplace=True)


# ---------------------------------------------------------------------------
# State: buffers, flags and hooks are exactly as before
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
def test_buffers_are_untouched(frontend: str, fail: bool) -> None:
    model = Counter()
    model.train()
    state, hooks = state_of(model), dict(model.fuse._forward_pre_hooks)
    if fail:
        with pytest.raises(fxeq.CalibrationError, match="nothing was modified"):
            fxeq.transform(model, batches(2), inplace=True, frontend=frontend, min_std=1e6)
        assert same_state(model, state)
    else:
        fxeq.transform(model, batches(2), inplace=True, frontend=frontend)
        assert int(model.steps) == 0
    assert model.training and all(m.training for m in model.modules())
    assert dict(model.fuse._forward_pre_hooks) == hooks


def test_calibration_mode_uses_batch_statistics_and_restores_everything() -> None:
    model = BNHead()
    model.train()
    state = state_of(model)
    with calibration_mode(model):
        assert not model.drop.training and model.bn.training and not model.training
        model(batches(1)[0])
    assert same_state(model, state) and all(m.training for m in model.modules())


# ---------------------------------------------------------------------------
# Any batch shape; the returned module's contract
# ---------------------------------------------------------------------------


def test_calibration_batches_of_other_sizes_on_an_export_only_model() -> None:
    torch.manual_seed(0)
    model = ShapeBranch()
    data = [batches(1, size=16, batch=4)[0], batches(1, size=24, batch=3, seed=1)[0], batches(1, size=32, batch=1)[0]]
    report = fxeq.transform(model, data).fxeq_report
    assert report.frontend == "export"
    expected = reference_stats(model, "fuse", data, [(0, 3), (3, 8)])
    for (mean, std), index in zip(expected, (0, 1), strict=True):
        assert report.stats["cat", index].std == pytest.approx(std, rel=1e-6)
        assert report.stats["cat", index].mean == pytest.approx(mean, rel=1e-6, abs=1e-9)


def test_exported_module_takes_its_shape_and_refuses_another_with_the_fix() -> None:
    model = ShapeBranch()
    deployed = fxeq.transform(model, batches(2))  # static by default: the cheapest export
    assert deployed.fxeq_report.frontend == "export"
    assert deployed(torch.randn(4, 3, 16, 16)).shape == (4, 4, 16, 16)
    with pytest.raises(fxeq.CaptureError, match=r"exported by fxeq for inputs shaped \(4, 3, 16, 16\) and is specialized "
                                                r"to that size; input x has shape \(5, 3, 16, 16\).*inplace=True.*pass "
                                                r"dynamic='batch' for any batch size, or dynamic=True for any size"):
        deployed(torch.randn(5, 3, 16, 16))
    with pytest.raises(fxeq.CaptureError, match=r"specialized to that size.*inplace=True.*pass dynamic=True to export "
                                                r"symbolic sizes"):
        deployed(torch.randn(4, 3, 32, 32))
    batch = fxeq.transform(model, batches(2), dynamic="batch")
    assert batch(torch.randn(5, 3, 16, 16)).shape == (5, 4, 16, 16)
    with pytest.raises(fxeq.CaptureError, match=r"inputs shaped \(N, 3, 16, 16\).*dynamic=True to export symbolic"):
        batch(torch.randn(2, 3, 32, 32))
    dynamic = fxeq.transform(model, batches(2), dynamic=True)
    assert dynamic(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_batches": 1.5}, ValueError, "num_batches must be a whole number of at least 1, or None for all; got 1.5"),
        ({"num_batches": 0}, ValueError, "num_batches must be a whole number"),
        ({"min_std": float("nan")}, ValueError, "min_std must be a finite number greater than 0, got nan"),
        ({"min_std": -1.0}, ValueError, "min_std must be a finite number greater than 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        fxeq.transform(TwoBranch(), batches(1), **kwargs)


@pytest.mark.parametrize(
    ("loader", "error", "message"),
    [
        (None, TypeError, "calib_loader must be an iterable of batches .* got NoneType"),
        (torch.randn(4, 3, 16, 16), TypeError, r"single Tensor of shape \(4, 3, 16, 16\).*\[x\]"),
        ([], fxeq.CalibrationError, "yielded no batches"),
    ],
)
def test_bad_loaders(loader, error, message) -> None:
    with pytest.raises(error, match=message):
        fxeq.transform(TwoBranch(), loader)


def test_input_fn_that_raises_names_the_batch() -> None:
    data = [{"image": x} for x in batches(2)]
    with pytest.raises(fxeq.CalibrationError, match=r"input_fn raised KeyError: 'img' .*dict with keys \['image'\]"):
        fxeq.transform(TwoBranch(), data, input_fn=lambda b: b["img"])


def test_uint8_batches_say_to_convert_to_float() -> None:
    data = [torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)]
    with pytest.raises(fxeq.CaptureError, match=r"does not run on the example batch \(uint8.*float"):
        fxeq.transform(TwoBranch(), data)


def test_meta_device_model_is_refused() -> None:
    with torch.device("meta"):
        model = TwoBranch()
    with pytest.raises(ValueError, match=r"meta device \(e.g. conv_a.weight\).*to_empty"):
        fxeq.transform(model, batches(1))


def test_model_that_cannot_run_on_the_batch_says_so() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"TwoBranch does not run on the example batch \(float32 "
                                                r"\(2, 5, 16, 16\); fxeq\.transform's first calibration batch\).*check "
                                                r"its shape"):
        fxeq.transform(TwoBranch(), [torch.randn(2, 5, 16, 16)])


def test_compiled_model_is_unwrapped() -> None:
    model = TwoBranch()
    compiled = torch.compile(model)
    before = model.fuse.weight.detach().clone()
    fxeq.transform(compiled, batches(2), inplace=True)
    assert not torch.equal(model.fuse.weight, before)


def test_reparam_model_is_already_equalized() -> None:
    model = TwoBranch()
    fxeq.transform(model, batches(2), inplace=True, mode="reparam")
    with pytest.raises(fxeq.AlreadyEqualizedError, match="conv fuse was already equalized"):
        fxeq.transform(model, batches(2), inplace=True)


def test_calibration_shape_change_inside_the_model_names_the_site() -> None:
    class Switch(TwoBranch):
        def forward(self, x):
            if x.shape[0] == 3:  # data-dependent path: the fusing conv gets another tensor
                return self.fuse(torch.cat([self.conv_a(x), self.conv_a(x), self.conv_a(x)[:, :2]], 1)[:, :7])
            return super().forward(x)

    data = [torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    with pytest.raises(fxeq.CalibrationError, match="expected to receive the 8-channel concatenation, but received"):
        fxeq.transform(Switch(), data, frontend="export")


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def test_dict_batches_become_keyword_arguments() -> None:
    class Keyword(TwoBranch):
        def forward(self, pixel_values, labels=None):
            return super().forward(pixel_values)

    torch.manual_seed(0)
    model, data = Keyword(), batches(2)
    dicts = [{"pixel_values": x, "labels": torch.zeros(4, 16, 16)} for x in data]
    stats = fxeq.transform(model, dicts).fxeq_report.stats
    assert stats == fxeq.transform(model, data).fxeq_report.stats


def test_dict_batch_without_a_forward_argument() -> None:
    with pytest.raises(TypeError, match=r"found a dict with keys \['image'\]. Pass input_fn"):
        batch_inputs({"image": torch.zeros(1)}, model=TwoBranch())


def test_calibration_data_reads_the_first_batch_once() -> None:
    data = CalibrationData(OneShot([1, 2, 3]))
    assert data.first() == 1 and data.first() == 1
    assert list(data.epoch(1, 1)) == [1, 2, 3]


class _Passes:
    """Re-iterable; each iteration yields what ``make(number)`` gives (number counts from 1)."""

    def __init__(self, make) -> None:
        self.make, self.count = make, 0

    def __iter__(self):
        self.count += 1
        return iter(self.make(self.count))


def test_a_second_pass_without_batches_says_why() -> None:
    data = _Passes(lambda n: batches(2) if n <= 2 else [])  # check_passes takes iteration 2 for pass 2
    exhausted = _Passes(lambda n: batches(2) if n == 1 else [])
    fxeq.transform(Chained(), data)
    with pytest.raises(fxeq.CalibrationError, match="yielded no batches on pass 2 of 2, after batches on pass 1: it was exhausted by the first"):
        fxeq.transform(Chained(), exhausted)


def test_a_conv_that_never_runs_in_a_pass_is_named() -> None:
    class Skips(Chained):
        def forward(self, x):
            return x if x.shape[0] == 3 else super().forward(x)

    data = _Passes(lambda n: batches(2) if n == 1 else batches(2, batch=3))
    with pytest.raises(fxeq.CalibrationError, match="its conv fuse2 never ran during calibration pass 2"):
        fxeq.transform(Skips(), data)


def test_site_observers_refuse_a_site_without_a_conv_module() -> None:
    from fxeq.observe import SiteObservers
    from fxeq.sites import FusingConv, Site, SiteInput

    site = Site("cat", (SiteInput(0, "a", (0, 2), "a"),), (FusingConv("c", "", "w", None, 1, False, False),))
    holder = nn.Module()
    holder.w = nn.Parameter(torch.ones(1, 2, 1, 1))
    with pytest.raises(fxeq.CalibrationError, match="site 'cat': its conv weight w belongs to a Module, not to a conv"):
        SiteObservers(holder, [site])


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("norm", [nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm])
def test_a_parametrized_fusing_conv_is_skipped_with_the_fix(frontend: str, norm) -> None:
    model = TwoBranch()
    norm(model.fuse)
    state = state_of(model)
    with pytest.warns(fxeq.NoSiteWarning, match=r"(?s)computed tensor.*weight_norm.*remove_parametrizations"):
        fxeq.transform(model, batches(2), frontend=frontend, inplace=True)
    assert same_state(model, state)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_weight_tied_to_a_module_the_graph_never_calls_is_skipped(frontend: str) -> None:
    model = TwoBranch()
    model.other = nn.Conv2d(8, 4, 1)  # never called in forward, but holds the fusing conv's weight
    model.other.weight = model.fuse.weight
    state = state_of(model)
    with pytest.warns(fxeq.NoSiteWarning, match=r"(?s)shares parameter.*other.weight.*tied parameters"):
        fxeq.transform(model, batches(2), frontend=frontend, inplace=True)
    assert same_state(model, state)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tied_weights_both_called_are_skipped(frontend: str) -> None:
    class Tied(TwoBranch):
        def __init__(self) -> None:
            super().__init__()
            self.other = nn.Conv2d(8, 4, 1)
            self.other.weight = self.fuse.weight

        def forward(self, x):
            y = super().forward(x)
            return y + self.other(torch.cat([x, x[:, :2] * 0 + 1, x * 2], 1)[:, :8])

    model = Tied()
    x = batches(1, seed=3)[0]
    with torch.no_grad():
        before = model.other(torch.cat([x, x[:, :2], x], 1)[:, :8])
    with pytest.warns(fxeq.NoSiteWarning, match="tied parameters"):
        fxeq.transform(model, batches(2), frontend=frontend, inplace=True)
    with torch.no_grad():
        torch.testing.assert_close(model.other(torch.cat([x, x[:, :2], x], 1)[:, :8]), before)


# ---------------------------------------------------------------------------
# Trust, round 2: loaders, a model prepared twice, progress
# ---------------------------------------------------------------------------

class _Stream(torch.utils.data.IterableDataset):
    """Batches from an iterable dataset, which has no len()."""

    def __init__(self, items: list[torch.Tensor]) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


class _LyingStream(_Stream):
    """An iterable dataset whose len() says 0 while it yields batches."""

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize("dataset", [_Stream, _LyingStream], ids=["no-len", "len-0"])
def test_a_dataloader_over_an_iterable_dataset_uses_every_batch(dataset) -> None:
    data = batches(3)
    model = TwoBranch()
    expected = reference_stats(model, "fuse", data, [(0, 3), (3, 8)])
    loader = torch.utils.data.DataLoader(dataset(data), batch_size=None)
    report = fxeq.transform(model, loader, inplace=True, progress=False).fxeq_report
    assert report.calibration.batches == 3 and {s.samples for s in report.stats.values()} == {12}
    for k, (mean, std) in enumerate(expected):
        assert report.stats["cat", k].mean == pytest.approx(mean, rel=1e-6, abs=1e-7)
        assert report.stats["cat", k].std == pytest.approx(std, rel=1e-6)


def test_two_prepared_of_one_model_do_not_fold_it_twice() -> None:
    data = batches(2)
    model = TwoBranch()
    first = fxeq.calibrate(fxeq.prepare(model, data[0], inplace=True), data)
    second = fxeq.calibrate(fxeq.prepare(model, data[0], inplace=True), data)
    fxeq.convert(first)
    weight = model.fuse.weight.detach().clone()
    with pytest.raises(fxeq.AlreadyEqualizedError, match=r"conv fuse was already equalized by fxeq .* The model of "
                                                         r"this Prepared was equalized after fxeq\.prepare"):
        fxeq.convert(second)
    with pytest.raises(fxeq.AlreadyEqualizedError, match="equalized after fxeq.prepare"):
        fxeq.calibrate(second, data)
    assert torch.equal(model.fuse.weight, weight)


def test_the_first_pass_bar_has_a_total(capsys: pytest.CaptureFixture[str]) -> None:
    fxeq.transform(Chained(), batches(3), progress=True)
    err = capsys.readouterr().err
    assert "fxeq calibration 1/2" in err and "3/3" in err.split("fxeq calibration 2/2")[0]


def test_an_aliased_fusing_conv_keeps_its_parameter_through_chained_passes() -> None:
    """A module under two names (as in MONAI's DynUNet) must come out of the passes with its own Parameter.

    torch.func.functional_call(..., tie_weights=True) restores a plain tensor in place of such a parameter.
    """
    model = Chained()
    model.alias = model.fuse1  # one module object, two names
    fxeq.transform(model, batches(2), inplace=True, progress=False)
    assert isinstance(model.fuse1._parameters["weight"], nn.Parameter)
    assert model.alias.weight is model.fuse1.weight and model.fuse1.weight.requires_grad


def test_a_std_above_min_std_but_tiny_beside_the_mean_is_refused() -> None:
    """min_std alone would let it through: only the relative check (std <= 1e-5 x |mean|) refuses it."""
    model = TwoBranch()
    with torch.no_grad():  # branch b: 1e4 plus a signal of std about 1e-3
        model.conv_b.weight.mul_(1e-3)
        model.conv_b.bias.fill_(1e4)
    state = state_of(model)
    with pytest.raises(fxeq.CalibrationError, match=r"input 1 .*above 1e-05 x \|mean\|") as caught:
        fxeq.transform(model, batches(2), inplace=True, min_std=1e-6)
    assert "Check that this branch is not constant" in str(caught.value)
    assert "smaller min_std" not in str(caught.value)  # it would not help
    std = float(re.search(r"found mean=\S+, std=([0-9.e+-]+)\.", str(caught.value)).group(1))
    assert 1e-6 < std < 1e-5 * 1e4
    assert same_state(model, state)


def test_a_std_below_min_std_says_a_smaller_min_std_would_take_it() -> None:
    model = TwoBranch()
    with pytest.raises(fxeq.CalibrationError, match=r"input 0 .*: expected a std of at least min_std=1e\+06, found "
                                                    r"mean=.*; if features this small are genuine, pass a smaller "
                                                    r"min_std; nothing was modified\.$"):
        fxeq.transform(model, batches(2), inplace=True, min_std=1e6)


def test_non_finite_statistics_point_at_the_data() -> None:
    model = TwoBranch()
    with torch.no_grad():
        model.conv_b.bias.fill_(float("inf"))
    with pytest.raises(fxeq.CalibrationError, match=r"input 1 .*: expected a finite mean and std, found mean=.*"
                                                    r"Check the calibration data for NaN/Inf; nothing was modified"):
        fxeq.transform(model, batches(2), inplace=True)


@pytest.mark.parametrize("key", ["labels", "label", "target", "targets"])
def test_target_keys_are_left_out_of_dict_batches(key: str) -> None:
    class Net(nn.Module):
        def forward(self, pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:
            return pixel_values

    x = torch.zeros(2, 3, 4, 4)
    args, kwargs = batch_inputs({"pixel_values": x, key: torch.zeros(2), "mask": x}, model=Net())
    assert args == () and sorted(kwargs) == ["mask", "pixel_values"]
