"""Report: the table and JSON say what was found, measured, folded and skipped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from models import CatTwice, Chained, TwoBranch, batches

import fxeq
from fxeq._version import versions
from fxeq.report import Report
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


# ---------------------------------------------------------------------------
# The schema round trip, what each mode writes, the picture
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "keep_norm"), [("init", False), ("init", True), ("reparam", False),
                                                  ("explicit", False)])
def test_from_dict_reads_back_what_to_dict_wrote(mode: str, keep_norm: bool) -> None:
    from models import BNFuse

    report = fxeq.transform(BNFuse(), batches(2), mode=mode, keep_norm=keep_norm, progress=False).fxeq_report
    data = report.to_dict()
    again = Report.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert again.search.sites == report.search.sites and again.stats == report.stats
    (conv,) = data["sites"][0]["convs"]
    writes = {"init": ["weight", "bias"], "reparam": ["bias"], "explicit": []}[mode]
    assert conv["writes"] == writes and conv["folded_scale"] == (mode == "init")
    assert conv["folded_mean"] == ("bias" in writes) and conv["keep_norm"] == keep_norm
    assert conv["shape"] == [6, 7, 1, 1] and data["keep_norm"] == keep_norm
    assert data["example"] == {"args": [{"shape": [4, 3, 16, 16], "dtype": "float32"}], "kwargs": {}}


def test_from_dict_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match=r"the report's entry for site 'cat' is incomplete or malformed \(KeyError: "
                                         r"'weight'\)"):
        Report.from_dict({"sites": [{"name": "cat", "inputs": [], "convs": [{}]}]})
    with pytest.raises(ValueError, match="the report's mode is 'fold': mode must be one of"):
        Report.from_dict({"sites": [], "mode": "fold"})


def test_from_dict_refuses_a_report_from_before_writes_were_recorded() -> None:
    data = fxeq.transform(TwoBranch(), batches(2), progress=False).fxeq_report.to_dict()
    del data["sites"][0]["convs"][0]["writes"]
    data["versions"]["fxeq"] = "0.2.0"
    with pytest.raises(ValueError, match=r"the report was written by fxeq 0\.2\.0, which did not record which "
                                         r"tensors of each conv it wrote \(conv fuse\.weight has no 'writes'\) nor "
                                         r"whether it restored weight norms.*convert the original checkpoint again"):
        Report.from_dict(data)


def test_from_dict_refuses_a_conv_whose_module_does_not_own_its_weight() -> None:
    data = fxeq.transform(TwoBranch(), batches(2), progress=False).fxeq_report.to_dict()
    data["sites"][0]["convs"][0]["module"] = "owner"
    with pytest.raises(ValueError, match=r"the report's entry for site 'cat' is incomplete or malformed \(ValueError: "
                                         r"conv module 'owner' does not own weight 'fuse.weight'\)"):
        Report.from_dict(data)


def test_plot_draws_a_png(tmp_path: Path) -> None:
    report = fxeq.transform(Chained(), batches(2), progress=False).fxeq_report
    path = report.plot(tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="the plot is written as PNG; end its path with .png"):
        report.plot(tmp_path / "report.pdf")
    with pytest.raises(ValueError, match="the report has no calibrated fusion site to draw"):
        Report(SiteSearch((), ()), "fx").plot(tmp_path / "empty.png")


def test_plot_after_is_what_the_conv_receives(tmp_path: Path) -> None:
    from fxeq.plot import _after

    model = Chained()
    report = fxeq.transform(model, batches(2), progress=False).fxeq_report
    first, second = report.search.sites
    assert _after(report, second, None) == ([1.0, 1.0], "")  # measured after the upstream fold: exact
    one_pass = fxeq.transform(Chained(), batches(2), progress=False, one_pass=True).fxeq_report
    assert _after(one_pass, one_pass.search.sites[1], None)[1] == "≈"
    assert _after(one_pass, one_pass.search.sites[0], None)[1] == ""
    # a converted model measured again: after is the std now over the std the conversion folded
    folded = {k: 2 * v.std for k, v in report.stats.items()}
    after, how = _after(report, first, folded)
    assert how == "" and after == pytest.approx([0.5] * len(first.inputs))
    path = report.plot(tmp_path / "again.png", title="Chained", folded=folded)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_leaves_matplotlib_backend_alone(tmp_path: Path) -> None:
    """A caller's backend (here pdf) stays; matplotlib.use("Agg") or importing pyplot would not leave it."""
    import matplotlib

    previous = dict.__getitem__(matplotlib.rcParams, "backend")  # raw: reading it may resolve (import pyplot)
    matplotlib.use("pdf")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    try:
        fxeq.transform(TwoBranch(), batches(2), progress=False).fxeq_report.plot(tmp_path / "r.png")
        assert dict.__getitem__(matplotlib.rcParams, "backend") == "pdf"
        assert pyplot_before or "matplotlib.pyplot" not in sys.modules
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", previous)


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    report = Report(SiteSearch((), ()), "fx")
    with pytest.raises(ImportError, match=r"drawing the report needs matplotlib, which is not installed: "
                                          r"pip install -e '\.\[plot\]'"):
        report.plot(tmp_path / "r.png")
