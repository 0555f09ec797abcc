"""Report: the table and JSON say what was found, measured, folded and skipped."""

from __future__ import annotations

import json

import torch
from models import CatTwice, Chained, TwoBranch, batches

import fxeq
from fxeq.report import Report, versions
from fxeq.sites import SiteSearch


def test_table_and_json_of_a_calibrated_model() -> None:
    report = fxeq.transform(TwoBranch(kernel=3, bias=False), batches(3)).fxeq_report
    table = report.table()
    assert table.splitlines()[0] == "fxeq: 1 site, 0 concatenations skipped (frontend fx, mode init)"
    assert "calibration: one site at a time, each measured after the folds upstream of it; 1 pass, 3 batches" in table
    assert "no bias: the mean was not folded" in table
    data = json.loads(report.to_json())
    assert data["calibration"]["passes"] == 1 and data["calibration"]["batches"] == 3
    (site,) = data["sites"]
    stds = [i["std"] for i in site["inputs"]]
    assert site["disequilibrium"] == max(stds) / min(stds) > 1.0
    assert [i["samples"] for i in site["inputs"]] == [12, 12]
    assert data["versions"] == versions() and data["versions"]["fxeq"] == fxeq.__version__


def test_chained_sites_say_what_they_were_calibrated_after() -> None:
    report = fxeq.transform(Chained(), batches(2)).fxeq_report
    first, second = report.search.sites
    assert f"calibrated after: {first.name}" in report.table()
    assert json.loads(report.to_json())["sites"][1]["depends_on"] == [first.name]
    assert "2 passes, 4 batches" in report.table()


def test_uncalibrated_and_plural_forms() -> None:
    assert Report(SiteSearch((), ()), "fx").table() == "fxeq: 0 sites, 0 concatenations skipped (frontend fx, not calibrated)"
    found = fxeq.find(CatTwice(), torch.randn(2, 3, 16, 16))
    assert found.table().startswith("fxeq: 1 site, ")
    assert json.loads(found.to_json())["calibration"] is None


def test_modes_notes() -> None:
    for mode, note in (("reparam", "W_raw * (1 / sigma)"), ("explicit", "explicit (x - mu) / sigma")):
        report = fxeq.transform(TwoBranch(), batches(2), mode=mode).fxeq_report
        assert note in report.table() and report.mode == mode
