"""fxeq.replay.apply: a report's statistics folded without calibration data, bitwise as transform, and every refusal."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import (
    BNFuse, BNHead, CatTwice, Chained, ChainedBN, NoSite, TwoBranch, batches, leaves_unchanged, reference_fold, state_of,
)
from torch import nn

import fxeq
from fxeq.replay import apply



def _assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    different = [k for k in state if not torch.equal(now[k], state[k])]
    assert not different, f"not bitwise equal: {different}"


def _transformed(factory: Callable[[], nn.Module], **kwargs: Any) -> tuple[nn.Module, nn.Module, fxeq.Report]:
    """(the equalized model, an untouched twin, the report)."""
    model = factory()
    twin = copy.deepcopy(model)
    report = fxeq.transform(model, batches(), inplace=True, progress=False, **kwargs).fxeq_report
    return model, twin, report


class Wrapped(nn.Module):
    """TwoBranch one level down: its parameters are named ``net.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TwoBranch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Swapped(TwoBranch):
    """TwoBranch(ca=3, cb=5) concatenating in the other order: same parameter shapes, other slices::

        cat([up(b), a]) ── fuse        (slices 0:5, 5:8 instead of 0:3, 3:8)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_a(x)
        b = F.interpolate(F.relu(self.conv_b(F.avg_pool2d(x, 4))), size=a.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([b, a], dim=1))


# ---------------------------------------------------------------------------
# Bitwise equal to transform
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [
    TwoBranch,
    lambda: TwoBranch(kernel=3, groups=2),
    lambda: TwoBranch(bias=False),
    BNHead,      # no bias on the fusing conv, a batch norm after it
    Chained,     # two sites, the second measured after the first was folded
    ChainedBN,
    CatTwice,    # one tensor in two slices, an empty input
    lambda: TwoBranch().to(torch.bfloat16),
], ids=["two-branch", "grouped-3x3", "no-bias", "bn-head", "chained", "chained-bn", "cat-twice", "bfloat16"])
def test_apply_equals_transform_bitwise(factory: Callable[[], nn.Module]) -> None:
    model, twin, report = _transformed(factory)
    original = state_of(twin)
    returned = apply(twin, report)
    assert returned is twin
    _assert_same_state(twin, state_of(model))
    convs = [c for s in report.search.sites for c in s.convs]
    assert any(not torch.equal(twin.get_parameter(c.weight), original[c.weight]) for c in convs)
    # and what an independent fold (loops, float64, no fxeq code) makes of the report's statistics
    reference = factory()
    reference.load_state_dict(original)
    for site in report.search.sites:
        stats = [(report.stats[site.name, i.index].mean, report.stats[site.name, i.index].std) for i in site.inputs]
        for conv in site.convs:
            reference_fold(reference, conv.module, [i.channels for i in site.inputs], stats)
    low = next(twin.parameters()).dtype == torch.bfloat16
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], value, rtol=1e-2 if low else 1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("form", ["dict", "json-str", "json-path"])
def test_apply_reads_a_dict_or_a_json_file(form: str, tmp_path: Path) -> None:
    model, twin, report = _transformed(Chained)
    path = tmp_path / "model.fxeq.json"
    path.write_text(report.to_json())
    source = {"dict": report.to_dict(), "json-str": str(path), "json-path": path}[form]
    apply(twin, source)
    _assert_same_state(twin, state_of(model))


def test_apply_reproduces_keep_norm() -> None:
    model, twin, report = _transformed(BNFuse, keep_norm=True)
    apply(twin, report)
    _assert_same_state(twin, state_of(model))


def test_apply_a_calibrated_report_before_convert() -> None:
    model = TwoBranch()
    twin = copy.deepcopy(model)
    prepared = fxeq.calibrate(fxeq.prepare(model, batches()[0]), batches(), progress=False)
    assert not prepared.report.folded
    apply(twin, prepared.report)
    fxeq.convert(prepared)
    _assert_same_state(twin, state_of(prepared.model))


def test_apply_marks_the_model_as_equalized() -> None:
    _, twin, report = _transformed(TwoBranch)
    apply(twin, report)
    with pytest.raises(fxeq.AlreadyEqualizedError, match="conv fuse was already equalized"):
        fxeq.transform(twin, batches())
    with pytest.raises(fxeq.AlreadyEqualizedError, match="conv fuse was already equalized"):
        apply(twin, report)


def test_apply_refuses_a_model_fxeq_equalized() -> None:
    model, _, report = _transformed(TwoBranch)
    before = state_of(model)
    with pytest.raises(fxeq.AlreadyEqualizedError, match="equalizing again would divide its weight twice"):
        apply(model, report)
    _assert_same_state(model, before)


def test_apply_on_a_copy_leaves_the_model_alone() -> None:
    model, twin, report = _transformed(TwoBranch)
    before = state_of(twin)
    copied = apply(twin, report, inplace=False)
    assert copied is not twin
    _assert_same_state(twin, before)
    _assert_same_state(copied, state_of(model))


def test_apply_unwraps_data_parallel() -> None:
    model, twin, report = _transformed(TwoBranch)
    wrapped = nn.DataParallel(twin)
    assert apply(wrapped, report) is wrapped
    _assert_same_state(twin, state_of(model))


def test_apply_with_example_inputs_checks_the_sites() -> None:
    model, twin, report = _transformed(Chained)
    apply(twin, report, example_inputs=batches()[0])
    _assert_same_state(twin, state_of(model))


def test_recorded_dtype_and_shape_that_match_are_accepted() -> None:
    model, twin, report = _transformed(TwoBranch)
    data = report.to_dict()
    data["sites"][0]["convs"][0].update(dtype="float32", shape=[4, 8, 1, 1])
    apply(twin, data)
    _assert_same_state(twin, state_of(model))


# ---------------------------------------------------------------------------
# The model does not fit the report: nothing is written
# ---------------------------------------------------------------------------


_REPORTED: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "two-branch": (TwoBranch, {}),
    "ca4": (lambda: TwoBranch(ca=4), {}),
    "no-bias": (lambda: TwoBranch(bias=False), {}),
    "chained": (Chained, {}),
    "reparam": (TwoBranch, {"mode": "reparam"}),
}


@functools.cache
def _report_json(key: str) -> str:
    factory, kwargs = _REPORTED[key]
    return _transformed(factory, **kwargs)[2].to_json()


def _report(key: str = "two-branch") -> dict[str, Any]:
    """A fresh dict of a report (written once per key)."""
    return json.loads(_report_json(key))


def _refused(model: nn.Module, report: Any, match: str, error: type[Exception] = fxeq.FxEqError,
             **kwargs: Any) -> None:
    with leaves_unchanged(model), pytest.raises(error, match=match):
        apply(model, report, **kwargs)


def test_missing_parameter_names_the_conv() -> None:
    _refused(NoSite(), _report(), r"conv fuse \(site 'cat'\): expected weight parameter 'fuse.weight', found no "
             r"such parameter in NoSite\. The model is not the one the report was written for")


def test_missing_parameter_under_a_prefix_suggests_the_module() -> None:
    _refused(Wrapped(), _report(), r"found no such parameter in Wrapped\. It has 'net.fuse.weight': apply the "
             "report to the module that fxeq equalized")


def test_a_linear_layer_is_not_a_conv() -> None:
    model = TwoBranch()
    model.fuse = nn.Linear(8, 4)  # type: ignore[assignment]
    _refused(model, _report(), r"conv fuse \(site 'cat'\): expected a conv weight \(out, in / groups, \*kernel\), "
             r"found a 2-D parameter of shape \(4, 8\)")


def test_a_transposed_conv_is_not_a_conv() -> None:
    model = TwoBranch()
    model.fuse = nn.ConvTranspose2d(8, 4, 1)  # type: ignore[assignment]
    _refused(model, _report(), r"expected a conv weight .*, found ConvTranspose2d of shape \(8, 4, 1, 1\)")


def test_other_groups() -> None:
    model = TwoBranch()
    model.fuse = nn.Conv2d(8, 4, 1, groups=2)  # type: ignore[assignment]
    _refused(model, _report(), r"conv fuse \(site 'cat'\): expected groups=1, found groups=2")


def test_other_input_channels() -> None:
    _refused(TwoBranch(), _report("ca4"),
             r"expected 9 input channels \(the report's slices 0:4, 4:9\), found 8 \(fuse.weight of shape "
             r"\(4, 8, 1, 1\), groups=1\)")


def test_other_recorded_shape() -> None:
    data = _report()
    data["sites"][0]["convs"][0]["shape"] = [5, 8, 1, 1]
    _refused(TwoBranch(), data, r"expected weight shape \(5, 8, 1, 1\), found \(4, 8, 1, 1\)")


def test_other_dtype() -> None:
    _refused(TwoBranch().double(), _report(), r"conv fuse \(site 'cat'\): expected dtype float32, found float64; "
             r"the statistics were measured in float32\. Apply the report to the model in float32")
    data = _report()
    data["sites"][0]["convs"][0]["dtype"] = "torch.bfloat16"  # torch's spelling is accepted too
    _refused(TwoBranch(), data, "expected dtype bfloat16, found float32")


def test_missing_bias() -> None:
    _refused(TwoBranch(bias=False), _report(), "expected bias parameter 'fuse.bias', found no such parameter")


def test_unexpected_bias() -> None:
    _refused(TwoBranch(), _report("no-bias"),
             r"expected no bias \(the report folded no mean into this conv\), found fuse.bias")


def test_bias_of_another_shape() -> None:
    model = TwoBranch()
    model.fuse.bias = nn.Parameter(torch.zeros(3))
    _refused(model, _report(), r"expected bias fuse.bias of shape \(4,\), found \(3,\)")


def test_failure_at_a_later_site_writes_nothing() -> None:
    model = Chained()
    model.fuse2 = nn.Conv2d(6, 3, 1, bias=False)
    _refused(model, _report("chained"), r"conv fuse2 \(site 'cat_1'\): expected bias parameter 'fuse2.bias'")
    fxeq.transform(model, batches(), progress=False)  # not marked


def test_failing_fold_at_a_later_site_writes_nothing() -> None:
    data = _report("chained")
    data["sites"][1]["inputs"][0]["std"] = 1e-30
    _refused(Chained(), data, r"site 'cat_1' \(conv fuse2\), input 0 .* expected a std above 1e-05 x \|mean\|",
             error=fxeq.CalibrationError)


def test_example_inputs_catch_other_slices() -> None:
    _refused(Swapped(), _report(), r"conv fuse \(site 'cat'\): expected input slices \[0:3, 3:8\], found "
             r"\[0:5, 5:8\]\. The model concatenates its features differently", example_inputs=batches()[0])


class Plain(nn.Module):
    """No concatenation, but a conv with TwoBranch's fusing shape: conv(3 -> 8) ── relu ── fuse(8 -> 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("probe", ["example_inputs", "recorded shapes"])
def test_sites_catch_a_conv_that_fuses_nothing(probe: str) -> None:
    data = _report()
    conv = data["sites"][0]["convs"][0]
    conv.update(module="net.2", weight="net.2.weight", bias="net.2.bias")
    kwargs = {"example_inputs": batches()[0]} if probe == "example_inputs" else {}
    _refused(Plain(), data, r"conv net.2 \(site 'cat'\): expected it to read a concatenation with slices "
             r"\[0:3, 3:8\], found that it reads none that fxeq can equalize in this model \(its fusing convs: "
             r"none\)", **kwargs)


def test_example_inputs_catch_a_site_missing_from_the_report() -> None:
    data = _report("chained")
    del data["sites"][1]
    _refused(Chained(), data, r"conv fuse2: expected only the report's fusing convs \(fuse1\), found that this "
             "conv also fuses upsampled features", example_inputs=batches()[0])


# ---------------------------------------------------------------------------
# Reports that cannot be applied
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reparam", "explicit"])
def test_apply_reproduces_the_other_modes(mode: str) -> None:
    model, twin, report = _transformed(TwoBranch, mode=mode)
    apply(twin, report.to_dict())
    _assert_same_state(twin, state_of(model))
    x = batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_report_without_statistics() -> None:
    report = fxeq.find(TwoBranch(), batches()[0])
    _refused(TwoBranch(), report, r"site 'cat', input 0 \(channels 0:3\): the report holds no mean and std; "
             r"expected a calibrated report\. Reports of fxeq\.find \(uncalibrated\) have none: use the report of "
             r"fxeq\.transform or fxeq\.convert\.")


@pytest.mark.parametrize("std", [float("nan"), 0.0, -1.0])
def test_report_with_unusable_statistics(std: float) -> None:
    data = _report()
    data["sites"][0]["inputs"][1]["std"] = std
    _refused(TwoBranch(), data, r"site 'cat', input 1: expected a finite mean and a finite std above 0, found "
             rf"mean=.*, std={std!r}\. The report is damaged")


def test_report_with_a_conv_in_two_sites() -> None:
    data = _report()
    data["sites"].append(copy.deepcopy(data["sites"][0]) | {"name": "cat_9"})
    _refused(TwoBranch(), data, "conv fuse: the report lists it in sites 'cat' and 'cat_9'")


def test_report_with_slices_that_do_not_tile() -> None:
    data = _report()
    data["sites"][0]["inputs"][1]["channels"] = [4, 8]
    _refused(TwoBranch(), data, r"site 'cat', input 1: expected channels starting at 3, found 4:8")


def test_report_with_an_empty_site() -> None:
    data = _report()
    data["sites"][0]["convs"] = []
    _refused(TwoBranch(), data, "site 'cat': the report lists no fusing conv")
    data = _report()
    data["sites"][0]["inputs"] = []
    _refused(TwoBranch(), data, "site 'cat': the report lists no inputs")


def test_report_with_missing_fields() -> None:
    data = _report()
    del data["sites"][0]["inputs"][0]["channels"]
    _refused(TwoBranch(), data, r"the report's entry for site 'cat' is incomplete or malformed \(KeyError: "
             r"'channels'\)", error=ValueError)


def test_not_a_report(tmp_path: Path) -> None:
    _refused(TwoBranch(), {"frontend": "fx"}, "not an fxeq report: expected a JSON object with a 'sites' list "
             r".*found no 'sites'", error=ValueError)
    path = tmp_path / "list.fxeq.json"
    path.write_text(json.dumps([1, 2]))
    _refused(TwoBranch(), path, f"{path}: not an fxeq report: .*found list", error=ValueError)
    path.write_text("{not json")
    _refused(TwoBranch(), str(path), rf"{path}: the report text is not valid JSON \(.*\)", error=ValueError)
    _refused(TwoBranch(), 42, "report must be an fxeq Report, a dict from Report.to_dict.., the text of "
             "Report.to_json.. or the path of a .fxeq.json file, got int", error=TypeError)


def test_not_a_model() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        apply("model", _report())  # type: ignore[arg-type]


def test_apply_takes_the_report_as_json_text() -> None:
    model, data = TwoBranch(), batches(2)
    twin = copy.deepcopy(model)
    text = fxeq.transform(model, data, inplace=True).fxeq_report.to_json()
    apply(twin, text)
    _assert_same_state(twin, state_of(model))
    with pytest.raises(ValueError, match="the report text is not valid JSON"):
        apply(TwoBranch(), "{not json")


def test_recorded_shapes_catch_other_slices_without_example_inputs() -> None:
    """Same conv shapes, other slices: the report's recorded input shapes let apply capture a probe and compare."""
    _refused(Swapped(), _report(), r"conv fuse \(site 'cat'\): expected input slices \[0:3, 3:8\], found "
             r"\[0:5, 5:8\]\. The model concatenates its features differently")


def test_a_report_without_input_shapes_warns_that_slices_are_not_checked() -> None:
    data = _report()
    del data["example"]
    with pytest.warns(UserWarning, match="the report records no input shapes .* pass example_inputs=batch"):
        apply(TwoBranch(), data)
