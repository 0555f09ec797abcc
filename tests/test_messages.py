"""Every error and warning the library modules (fxeq/*.py) raise that no other test matched by its text.

Each test builds the smallest input that reaches one raise or warn and matches the distinctive part of its
message, so that a reworded, garbled or unreachable message shows up here. The command line and the
integrations have their own tests.
"""

from __future__ import annotations

import functools
import json
import locale
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from models import TwoBranch, Untraceable, batches, leaves_unchanged
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode

import fxeq
from fxeq._model import probe_inputs
from fxeq.capturing import capture
from fxeq.fold import fold, per_weight_column
from fxeq.modes import finalize
from fxeq.observe import SiteObservers
from fxeq.replay import apply
from fxeq.report import FOLDER_REPORT, Report
from fxeq.rewrite import equalize
from fxeq.sites import FusingConv, Site, SiteInput, find_sites



# ---------------------------------------------------------------------------
# Fixture models
# ---------------------------------------------------------------------------


class TransposedFuse(TwoBranch):
    """TwoBranch fused by a strided transposed conv (its mean has no single bias)::

        x ── conv_a ───────────────────────────────┐
        x ── pool ── conv_b ── relu ── upsample ───┴─ cat ── fuse: ConvTranspose2d(8, 4, 2, stride=2)
    """

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.ConvTranspose2d(8, 4, 2, stride=2)  # type: ignore[assignment]


class Opaque(Untraceable):
    """Untraceable, whose forward also refuses to run while any tracer records it (eager runs work)::

        if tracing: raise RuntimeError;  if x.sum() > 0: ... else: ...

    fx fails on the data-dependent branch, export and the concrete trace on the refusal.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if get_proxy_mode() is not None:
            raise RuntimeError("this forward refuses to be recorded")
        return super().forward(x)


class Silent(nn.Module):
    """A forward that raises an exception with no message: ``raise RuntimeError()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError()


@functools.cache
def _two_branch_json() -> str:
    return fxeq.transform(TwoBranch(), batches(), inplace=True, progress=False).fxeq_report.to_json()


def _two_branch_report() -> dict[str, Any]:
    """A fresh dict of the report of TwoBranch equalized on the fixture batches (calibrated once)."""
    return json.loads(_two_branch_json())


# ---------------------------------------------------------------------------
# fxeq._model: probe inputs rebuilt from a recorded signature
# ---------------------------------------------------------------------------


def test_probe_inputs_refuse_an_input_recorded_by_name_only() -> None:
    with pytest.raises(ValueError, match=r"^input args\[0\] \(of type Image\) was recorded by name only, so no "
                                         r"input like it can be built; pass example inputs$"):
        probe_inputs({"args": [{"type": "Image"}], "kwargs": {}})
    with pytest.raises(ValueError, match=r"^input kwargs\['image'\] \(of type Image\) was recorded by name only"):
        probe_inputs({"args": [], "kwargs": {"image": {"type": "Image"}}})


@pytest.mark.parametrize(("signature", "found"), [
    ({"args": []}, r"KeyError: 'kwargs'"),
    ({"args": [{"shape": [2, 3], "dtype": "no_such_dtype"}], "kwargs": {}}, r"AttributeError: .*no_such_dtype"),
    ({"args": [7], "kwargs": {}}, r"TypeError: "),
], ids=["no-kwargs", "unknown-dtype", "not-an-entry"])
def test_probe_inputs_refuse_a_malformed_signature(signature: dict[str, Any], found: str) -> None:
    with pytest.raises(ValueError, match=rf"^the recorded input signature is malformed \({found}"):
        probe_inputs(signature)


# ---------------------------------------------------------------------------
# fxeq.fold: the arithmetic's own argument checks
# ---------------------------------------------------------------------------


def test_per_weight_column_refuses_a_transposed_weight_of_other_channels() -> None:
    with pytest.raises(ValueError, match=r"^transposed-conv weight \(4, 2, 1, 1\) reads 4 channels, but mean/std "
                                         r"have 3$"):
        per_weight_column(torch.ones(3), torch.Size([4, 2, 1, 1]), 1, transposed=True)
    assert per_weight_column(torch.ones(4), torch.Size([4, 2, 1, 1]), 1, transposed=True).shape == (4, 1, 1, 1)


def test_per_weight_column_refuses_a_grouped_weight_of_other_channels() -> None:
    with pytest.raises(ValueError, match=r"^weight \(4, 2, 1, 1\) with groups=2 reads 4 channels, but mean/std "
                                         r"have 3$"):
        per_weight_column(torch.ones(3), torch.Size([4, 2, 1, 1]), 2)
    assert per_weight_column(torch.ones(4), torch.Size([4, 2, 1, 1]), 2).shape == (4, 2, 1, 1)


def test_fold_refuses_mean_and_std_of_other_shapes() -> None:
    weight, bias = torch.ones(1, 3, 1, 1), torch.zeros(1)
    with pytest.raises(ValueError, match=r"^mean has shape \(2,\) but std has \(3,\)$"):
        fold(weight, bias, torch.zeros(2), torch.ones(3))


# ---------------------------------------------------------------------------
# fxeq.modes: what finalize cannot bake
# ---------------------------------------------------------------------------


def test_finalize_warns_that_a_strided_transposed_conv_keeps_its_mean() -> None:
    model = TransposedFuse()
    fxeq.transform(model, batches(), mode="explicit", inplace=True, progress=False)
    with pytest.warns(UserWarning, match=r"^conv fuse: a transposed conv with stride \(2, 2\) gives each output phase "
                                         r"its own kernel taps, so the mean \([0-9.e+-]+ at most\) has no single bias "
                                         r"and was not folded; outputs differ from the explicit equalizer by that "
                                         r"term$"):
        assert finalize(model) is model


# ---------------------------------------------------------------------------
# fxeq.pipeline: prepare's refusals, and a model no graph frontend captures
# ---------------------------------------------------------------------------


def test_the_concrete_frontend_needs_inplace() -> None:
    model = TwoBranch()
    with leaves_unchanged(model), pytest.raises(
            ValueError, match=r"^frontend='concrete' records one eager forward, which finds the sites but "
                              r"is no graph to deploy; pass inplace=True to rewrite your model itself, or "
                              r"frontend='auto' for a deployable graph$"):
        fxeq.prepare(model, batches(1)[0], frontend="concrete")
    fxeq.prepare(model, batches(1)[0], frontend="concrete", inplace=True)  # the negative twin


def test_a_model_only_the_concrete_trace_captures_says_to_pass_inplace() -> None:
    model = Untraceable()
    with leaves_unchanged(model), pytest.raises(
            fxeq.CaptureError, match=r"(?s)^could not capture Untraceable as a graph; tried fx, export:\n"
                                     r".*\nA concrete trace of one eager forward works and finds 1 fusion "
                                     r"site, but it is no graph to deploy\. Pass inplace=True: fxeq "
                                     r"then rewrites your model itself") as caught:
        fxeq.transform(model, batches(), progress=False)
    assert caught.value.stage == "trace" and set(caught.value.failures) == {"fx", "export"}
    assert fxeq.transform(model, batches(), inplace=True, progress=False) is model  # as the message says


class UntraceableWithoutSites(nn.Module):
    """Branches on tensor values (neither fx nor export) and concatenates same-resolution features only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fuse = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.sum() > 0 else -x
        return self.fuse(torch.cat([self.a(x), self.b(x)], 1))


def test_a_model_only_the_concrete_trace_captures_without_sites_says_nothing_would_change() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"(?s)^could not capture UntraceableWithoutSites as a graph; tried fx, "
                                                r"export:\n.*\nA concrete trace of one eager forward works but finds no "
                                                r"fusion site in it, so fxeq would not change this model anyway: fxeq "
                                                r"found no fusion site in UntraceableWithoutSites.*no input comes from an "
                                                r"upsampling op \(same-resolution features\)\nFix for the concatenations "
                                                r"above: pass all_concats=True to equalize it\.$"):
        fxeq.transform(UntraceableWithoutSites(), batches(1), progress=False)

    class WithoutCat(UntraceableWithoutSites):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x if x.sum() > 0 else -x)

    with pytest.raises(fxeq.CaptureError, match=r"\nA concrete trace of one eager forward works but finds no fusion "
                                                r"site in it, so fxeq would not change this model anyway\.$"):
        fxeq.transform(WithoutCat(), batches(1), progress=False)


def test_a_model_no_frontend_captures_names_every_failure() -> None:
    with pytest.raises(fxeq.CaptureError, match=(
        r"^could not capture Opaque as a graph; tried fx, export and a concrete trace:\n"
        r"  fx: TraceError: .*\n"
        r"  export: RuntimeError: this forward refuses to be recorded\n"
        r"  concrete: RuntimeError: this forward refuses to be recorded\n"
        r"fx needs a forward without data-dependent Python control flow; torch\.export needs a forward without "
        r"control flow on tensor values or ops it cannot trace \(its message above says which\); the concrete "
        r"trace needs a forward whose tensor ops make_fx can record \(it runs them for real, so control flow is "
        r"fine; see its message above\)\.$"
    )) as caught:
        fxeq.transform(Opaque(), batches(1), progress=False)
    assert caught.value.stage == "trace" and set(caught.value.failures) == {"fx", "export", "concrete"}


# ---------------------------------------------------------------------------
# fxeq.capturing: frontends and the eager run
# ---------------------------------------------------------------------------


def test_export_alone_names_what_export_needs() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"^could not capture Untraceable as a graph; tried export:\n  export: "
                                                r".*\ntorch\.export needs a forward without control flow on "
                                                r"tensor values or ops it cannot trace \(its message above says "
                                                r"which\)\.$"):
        capture(Untraceable(), batches(1)[0], frontend="export")


def test_the_concrete_trace_alone_names_what_it_needs() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"^could not capture Opaque as a graph; tried concrete:\n"
                                                r"  concrete: RuntimeError: this forward refuses to be recorded\n"
                                                r"the concrete trace needs a forward whose tensor ops make_fx can "
                                                r"record \(it runs them for real, so control flow is fine; see its "
                                                r"message above\)\.$"):
        capture(Opaque(), batches(1)[0], frontend="concrete", deployable=False)
    assert capture(Untraceable(), batches(1)[0], frontend="concrete", deployable=False).frontend == "concrete"


def test_an_integer_input_gets_the_hint_to_convert_it() -> None:
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(fxeq.CaptureError, match=r"TwoBranch does not run on the example batch \(uint8 "
                                                r"\(2, 3, 16, 16\); fxeq\.transform's first calibration batch\) in eval "
                                                r"mode: .* An input is an integer tensor: "
                                                r"image models take float tensors; convert them in the loader or with "
                                                r"input_fn \(e\.g\. lambda b: b\[0\]\.float\(\) / 255, then "
                                                r"normalize\)\.$"):
        fxeq.find(TwoBranch(), images)


def test_a_float_input_that_fails_gets_no_integer_hint() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"does not run on the example batch") as caught:
        fxeq.find(TwoBranch(), torch.zeros(2, 5, 16, 16))
    assert "integer tensor" not in str(caught.value)


def test_an_error_without_a_message_is_named_so() -> None:
    with pytest.raises(fxeq.CaptureError, match=r"^Silent does not run on the example batch \(float32 "
                                                r"\(2, 3, 16, 16\); fxeq\.transform's first calibration batch\) in "
                                                r"eval mode: RuntimeError: \(no message\)\. fxeq "
                                                r"captures the model on that batch"):
        fxeq.find(Silent(), batches(1, batch=2)[0])


# ---------------------------------------------------------------------------
# fxeq.batches and fxeq.calibration: an empty loader
# ---------------------------------------------------------------------------


_EMPTY = (r"^the calibration loader yielded no batches; expected at least one batch of inputs\. Pass a non-empty "
          r"DataLoader \(or list of tensors\), and num_batches >= 1 if you set it\.$")


def test_transform_refuses_an_empty_loader() -> None:
    with pytest.raises(fxeq.CalibrationError, match=_EMPTY):
        fxeq.transform(TwoBranch(), [], progress=False)


def test_calibrate_refuses_an_empty_loader() -> None:
    prepared = fxeq.prepare(TwoBranch(), batches(1)[0])
    with pytest.raises(fxeq.CalibrationError, match=_EMPTY):
        fxeq.calibrate(prepared, [], progress=False)


# ---------------------------------------------------------------------------
# fxeq.observe: a site whose conv the model does not have
# ---------------------------------------------------------------------------


def test_observers_refuse_a_site_whose_conv_module_is_missing() -> None:
    inputs = (SiteInput(0, "a", (0, 3), "a"), SiteInput(1, "b", (3, 8), "b"))
    site = Site("cat", inputs, (FusingConv("fuse", "head.fuse", "head.fuse.weight", None, 1, False, False),))
    with pytest.raises(fxeq.CalibrationError, match=r"^site 'cat': the model has no module 'head\.fuse' \(the owner "
                                                    r"of head\.fuse\.weight\)$"):
        SiteObservers(TwoBranch(), [site])


# ---------------------------------------------------------------------------
# fxeq.replay: the report's probe, and a model that cannot be captured on it
# ---------------------------------------------------------------------------


def test_apply_names_a_probe_it_cannot_build() -> None:
    data = _two_branch_report()
    data["example"] = {"args": [{"type": "Image"}], "kwargs": {}}
    model = TwoBranch()
    with leaves_unchanged(model), pytest.raises(
            fxeq.FxEqError, match=r"^cannot build a probe batch from the report's input shapes \(input "
                                  r"args\[0\] \(of type Image\) was recorded by name only, so no input like "
                                  r"it can be built; pass example inputs\); pass example_inputs=batch to "
                                  r"fxeq\.apply$"):
        apply(model, data)
    apply(model, data, example_inputs=batches(1)[0])  # as the message says


def test_apply_names_example_inputs_it_cannot_capture_the_model_on() -> None:
    model = TwoBranch()
    with leaves_unchanged(model), pytest.raises(
            fxeq.FxEqError, match=r"(?s)^could not capture the model to check that it concatenates the "
                                  r"report's channel slices: TwoBranch does not run on the example "
                                  r"batch \(float32 \(2, 5, 16, 16\);.*\nPass "
                                  r"example_inputs=batch with a batch the model takes\.$"):
        apply(model, _two_branch_report(), example_inputs=torch.zeros(2, 5, 16, 16))


def test_apply_refuses_a_plain_conv_where_the_report_has_a_transposed_one() -> None:
    data = fxeq.transform(TransposedFuse(), batches(), inplace=True, progress=False).fxeq_report.to_dict()
    model = TwoBranch()
    model.fuse = nn.Conv2d(8, 4, 2, stride=2)
    with leaves_unchanged(model), pytest.raises(
            fxeq.FxEqError, match=r"^conv fuse \(site 'cat'\): expected a transposed conv weight \(in, "
                                  r"out / groups, \*kernel\), found Conv2d of shape \(4, 8, 2, 2\)\. The "
                                  r"model is not the one the report was written for"):
        apply(model, data)


# ---------------------------------------------------------------------------
# fxeq.report: files, and entries that are not a report's
# ---------------------------------------------------------------------------


def test_read_names_a_file_it_cannot_read(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / FOLDER_REPORT).mkdir(parents=True)  # a folder where the report file should be
    file = re.escape(str(folder / FOLDER_REPORT))
    with pytest.raises(ValueError, match=rf"^{file} is not a readable report \(IsADirectoryError: "):
        Report.read(folder)


@pytest.mark.skipif(locale.getpreferredencoding(False).lower().replace("-", "") != "utf8",
                    reason="Path.read_text decodes with the locale's encoding, which may accept any byte")
def test_read_names_a_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.fxeq.json"
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a readable report \(UnicodeDecodeError: "
                                         r"'utf-8' codec can't decode"):
        Report.read(path)


@pytest.mark.parametrize(("data", "found"), [
    ({"sites": "many"}, "'sites' of type str"),
    ({"version": 1}, "no 'sites'"),
    ([], "list"),
], ids=["sites-not-a-list", "no-sites", "not-an-object"])
def test_from_dict_names_what_it_found_instead_of_sites(data: Any, found: str) -> None:
    with pytest.raises(ValueError, match=r"^not an fxeq report: expected a JSON object with a 'sites' list \(as "
                                         rf"Report\.to_dict\(\), `fxeq convert` and the training callbacks write\), "
                                         rf"found {found}$"):
        Report.from_dict(data)


@pytest.mark.parametrize(("key", "value", "where", "error"), [
    ("skipped", [{"node": "cat_1"}], "the skipped concatenations", r"KeyError: 'reason'"),
    ("calibration", {"passes": 1}, "the calibration summary", r"KeyError: 'batches'"),
], ids=["skipped", "calibration"])
def test_from_dict_names_the_malformed_part(key: str, value: Any, where: str, error: str) -> None:
    data = _two_branch_report()
    data[key] = value
    with pytest.raises(ValueError, match=rf"^the report's entry for {where} is incomplete or malformed \({error}\); "
                                         r"expected the fields that Report\.to_dict\(\) writes"):
        Report.from_dict(data)


# ---------------------------------------------------------------------------
# fxeq.rewrite and fxeq.sites: argument checks
# ---------------------------------------------------------------------------


def test_equalize_needs_somewhere_to_write() -> None:
    with pytest.raises(ValueError, match=r"^equalize needs a graph or a model to write into: pass graph=\.\.\., model=\.\.\. or both$"):
        equalize([], {}, {}, {})


def test_find_sites_refuses_an_eager_model() -> None:
    with pytest.raises(TypeError, match=r"^find_sites expects a torch\.fx\.GraphModule, got TwoBranch: capture it first "
                                        r"\(fxeq\.capture\(model, example\)\.module\), or call fxeq\.find\(model, example\)$"):
        find_sites(TwoBranch())  # type: ignore[arg-type]
    assert find_sites(capture(TwoBranch(), batches(1)[0]).module).sites  # the negative twin
