"""The benchmark scripts run end to end, record where and how they ran, and compute what they report.

Each script's ``--quick`` mode runs once, in this process (``main(argv)``
with ``sys.argv`` as a user would type it, one torch thread), writing into a
temporary folder. Timings are never compared with a target. What a table
derives from them (medians, ratios, per-pass figures) is recomputed from the
raw times recorded beside it, and what does not depend on the machine
(frontends, sites, calibration passes, folded bytes, standard deviations) is
checked against an independent computation.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("segmentation_models_pytorch")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402 - the benchmarks folder, put on the path above
import calibration_cost  # noqa: E402
import capture_cost  # noqa: E402
import latency  # noqa: E402
import variance  # noqa: E402

import fxeq  # noqa: E402
from fxeq.sites import Site  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and whole runs; -m "not slow" skips them

_SCRIPTS = {"latency": latency, "calibration_cost": calibration_cost, "variance": variance,
            "capture_cost": capture_cost}
_EXTRA = {"variance": ["--no-plot"]}


def _quick(name: str, out: Path) -> dict[str, Any]:
    argv = ["--quick", "--threads", "1", *_EXTRA.get(name, []), "--out", str(out)]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(BENCHMARKS / f"{name}.py"), *argv])
        try:
            assert _SCRIPTS[name].main(argv) == 0
        finally:
            torch.set_num_threads(threads)
    return {"record": json.loads((out / f"{name}-quick.json").read_text()),
            "markdown": (out / f"{name}-quick.md").read_text()}


class _Runs(dict[str, dict[str, Any]]):
    """Each script's quick run, made on first use and shared by the tests of this module."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, name: str) -> dict[str, Any]:
        self[name] = _quick(name, self.factory.mktemp(name))
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> _Runs:
    return _Runs(tmp_path_factory)


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """Per quick model, what fxeq.find says and what its fusing convs' weights and biases weigh."""
    out = {}
    for name in _common.QUICK_MODELS:
        model = _common.build_model(name)
        report = fxeq.find(model, torch.randn(2, 3, 64, 64))
        convs = {c.weight.rsplit(".", 1)[0] for s in report.search.sites for c in s.convs}
        folded = sum(p.numel() * p.element_size() for conv in convs
                     for p in model.get_submodule(conv).parameters(recurse=False))
        out[name] = {"frontend": report.frontend, "sites": len(report.search.sites),
                     "passes": len(report.search.generations()), "folded_bytes": folded}
    return out


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------
# Every script: environment record, settings, tables
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_SCRIPTS))
def test_quick_run_records_environment(name: str, runs: _Runs) -> None:
    record, markdown = runs[name]["record"], runs[name]["markdown"]
    env = record["environment"]
    assert record["benchmark"] == name
    assert env["device"]["cpu"] and env["device"]["torch_threads"] == 1
    versions = fxeq.report.versions()
    assert {k: env["versions"][k] for k in versions} == versions
    assert {"timm", "segmentation_models_pytorch", "fxeq_git"} <= set(env["versions"])
    assert f"{name}.py --quick --threads 1" in env["command"] and env["timestamp"]
    assert record["settings"]["models"] == list(_common.QUICK_MODELS)
    assert env["command"] in markdown and "device:" in markdown and "versions:" in markdown
    assert "|---" in markdown


def test_help_lists_shared_options(capsys: pytest.CaptureFixture[str]) -> None:
    for module in _SCRIPTS.values():
        with pytest.raises(SystemExit) as exit_info:
            module._parse(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--quick" in text and "--out" in text and "--threads" in text


def test_quick_results_go_to_a_git_ignored_folder() -> None:
    p = _common.parser("demo", quick="nothing")
    assert _common.Run("demo", p.parse_args(["--quick"])).path(".json").parent == _common.QUICK_RESULTS
    assert _common.Run("demo", p.parse_args([])).path(".json").parent == _common.DEFAULT_RESULTS
    root = BENCHMARKS.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(_common.QUICK_RESULTS / "demo-quick.json")],
                             cwd=root, capture_output=True)
    tracked = subprocess.run(["git", "check-ignore", "-q", str(_common.DEFAULT_RESULTS / "demo.json")],
                             cwd=root, capture_output=True)
    assert (ignored.returncode, tracked.returncode) == (0, 1)


def test_profiler_noise_is_dropped_and_other_stderr_kept(capfd: pytest.CaptureFixture[str]) -> None:
    def work() -> None:
        torch.ones(1000).sum()
        sys.stderr.write("a line of our own\n")

    assert _common.peak_memory(work, torch.device("cpu")) >= 4000
    err = capfd.readouterr().err
    assert "a line of our own" in err
    assert not any(noise in err for noise in ("profiler_start", "profiler_stop", "gpuGetDeviceCount"))


# ---------------------------------------------------------------------------
# What each script computes
# ---------------------------------------------------------------------------


def test_latency_ratios_come_from_the_recorded_times(runs: _Runs) -> None:
    for result in runs["latency"]["record"]["results"]:
        assert result["graph_identical"] is True, result["model"]
        assert {(t["mode"], t["device"], t["dtype"]) for t in result["timings"]} >= {
            ("inference", "cpu", "float32"), ("train", "cpu", "float32")}
        for timing in result["timings"]:
            medians = _medians(timing["times_ms"])
            assert set(medians) == {"original", "fxeq", "explicit", "batchnorm"}
            assert all(len(v) == 2 for v in timing["times_ms"].values())  # --quick: 2 repetitions
            assert timing["median_ms"] == pytest.approx(medians)
            assert timing["ratio"] == pytest.approx({k: v / medians["original"] for k, v in medians.items()})


def test_capture_cost_ratio_sites_and_frontends(runs: _Runs,
                                                reference: dict[str, dict[str, Any]]) -> None:
    record = runs["capture_cost"]["record"]
    assert record["target"] == 3.0 and record["skipped"] == {}
    for r in record["results"]:
        expected = reference[r["model"]]
        assert (r["frontend"], r["sites"]) == (expected["frontend"], expected["sites"])
        medians = _medians(r["times_s"])
        assert r["median_s"] == pytest.approx(medians)
        assert r["ratio"] == pytest.approx(medians["find"] / medians["static_export"])
        assert r["prepare_ratio"] == pytest.approx(medians["prepare"] / medians["static_export"])
        assert r["prepare_static_ratio"] == pytest.approx(medians["prepare_static"] / medians["static_export"])
        assert r["meets_target"] == (r["ratio"] <= 3.0)
        # fx captures smp's Unet and fails on the other smp models, whose forward checks shapes.
        assert (r["parts_s"]["capture_fx"]["error"] is None) == (r["model"] == "unet_resnet18")
        assert r["parts_s"]["capture_export"]["error"] is None
        assert r["dynamic_find"] is None  # only with --dynamic
    assert "fxeq.find and fxeq.prepare vs one static export" in runs["capture_cost"]["markdown"]


def test_calibration_cost_passes_ratios_and_memory(runs: _Runs,
                                                   reference: dict[str, dict[str, Any]]) -> None:
    record = runs["calibration_cost"]["record"]
    for r in record["results"]:
        expected = reference[r["model"]]
        assert (r["frontend"], r["sites"], r["passes"]) == (expected["frontend"], expected["sites"],
                                                             expected["passes"])
        medians = _medians(r["times_s"])
        assert r["median_s"] == pytest.approx(medians)
        # Each timed calibration's passes are part of it, repetition by repetition.
        assert len(r["pass_times_s"]) == r["passes"]
        for rep, total in enumerate(r["times_s"]["fxeq"]):
            assert sum(p[rep] for p in r["pass_times_s"]) <= total
        assert r["pass_median_s"] == pytest.approx([statistics.median(p) for p in r["pass_times_s"]])
        slowest, floor = max(r["pass_median_s"]), medians["batch_stats"]
        assert r["ratio"]["slowest_pass_vs_batch_stats"] == pytest.approx(slowest / floor)
        assert r["ratio"]["mean_pass_vs_batch_stats"] == pytest.approx(medians["fxeq"] / r["passes"] / floor)
        assert r["ratio"]["total_vs_eval"] == pytest.approx(medians["fxeq"] / medians["eval"])
        assert r["time_meets_target"] == (slowest / floor <= record["targets"]["time_per_pass"])
        # Memory: calibration holds the folded weights, and the passes are part of the whole call.
        peak = r["peak_bytes"]
        assert r["folded_bytes"] == expected["folded_bytes"]
        assert peak["fxeq"] >= max(peak["fxeq_passes"], r["folded_bytes"]) and peak["fxeq_passes"] > 0
        assert r["memory_ratio"]["passes_vs_batch_stats"] == pytest.approx(peak["fxeq_passes"] / peak["batch_stats"])
    assert "folded weights" in runs["calibration_cost"]["markdown"]


def test_variance_matches_closed_form_and_fxeq_equalizes(runs: _Runs) -> None:
    record = runs["variance"]["record"]
    assert [row["r"] for row in record["iid"]] == list(range(2, 9))
    for row in record["iid"]:
        assert row["nearest"] == pytest.approx(1.0)
        assert row["closed_form"] == pytest.approx(variance.closed_form(row["r"]))
        assert row["bilinear_interior"] == pytest.approx(row["closed_form"], rel=0.02)
    assert {site["model"] for site in record["sites"]} == set(_common.QUICK_MODELS)
    for site in record["sites"]:
        sigma = site["sigma_calibration"]
        assert site["ratio_calibration"] == pytest.approx(max(sigma) / min(sigma))
        assert site["sigma_after"] == pytest.approx([1.0] * len(sigma), rel=0.1), site["conv"]


class _TwoScales(nn.Module):
    """Two Conv-BN-ReLU branches, one at half resolution, fused by a conv; dropout before the fusion::

        x ── a ───────────────────────────┐
        x ── pool/2 ── b ── upsample x2 ──┴─ cat ── dropout ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fuse = nn.Conv2d(5, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
        return self.fuse(self.drop(torch.cat([self.a(x), up], 1)))


def test_slice_stds_against_a_plain_torch_computation() -> None:
    torch.manual_seed(0)
    model = _TwoScales().eval()
    batches = [torch.randn(2, 3, 8, 8) * 3 + 1 for _ in range(3)]
    sites: list[Site] = list(fxeq.find(model, batches[0]).search.sites)
    assert [s.name for s in sites] == ["cat"]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    got = variance.slice_stds(model, sites, batches)

    # Reference: batch norm with batch statistics, dropout off, float64 population std over all batches.
    reference = _TwoScales()
    reference.load_state_dict(state)
    reference.train().drop.eval()
    seen: list[torch.Tensor] = []
    reference.fuse.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        for x in batches:
            reference(x)
    inputs = torch.cat(seen)
    expected = {("cat", 0): inputs[:, :2].std(correction=0).item(), ("cat", 1): inputs[:, 2:].std(correction=0).item()}
    assert got == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing written
