"""The benchmark scripts run end to end, record where and how they ran, and compute what they report.

Each script's ``--quick`` mode runs once, in this process (``main(argv)``
with ``sys.argv`` as a user would type it, one torch thread), writing into a
temporary folder. Timings are never compared with a target. What a table
derives from them (medians, ratios, per-pass figures) is recomputed from the
raw times recorded beside it, and what does not depend on the machine
(frontends, sites, calibration passes, folded bytes, standard deviations,
ONNX graphs) is checked against an independent computation. ``gpu.sh`` runs
once with ``--dry-run``: its steps on the CPU at smoke sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
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
import _gpu  # noqa: E402
import calibration_cost  # noqa: E402
import capture_cost  # noqa: E402
import latency  # noqa: E402
import onnx_parity  # noqa: E402
import variance  # noqa: E402

import fxeq  # noqa: E402
from fxeq.sites import Site  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and whole runs; -m "not slow" skips them

_SCRIPTS = {"latency": latency, "calibration_cost": calibration_cost, "variance": variance,
            "capture_cost": capture_cost, "onnx_parity": onnx_parity}
_EXTRA = {"variance": ["--no-plot"]}
_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


def _quick_models(name: str) -> list[str]:
    """The models a script's --quick run takes, where their libraries are installed."""
    models = _SCRIPTS[name]._parse(["--quick"]).quick_models
    return [m for m in models if _common.available(m) is None]


def _quick(name: str, out: Path) -> dict[str, Any]:
    if name == "onnx_parity" and not _ONNX:
        pytest.skip("onnx, onnxscript or onnxruntime is missing: pip install -e '.[onnx]'")
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
    """Per quick model of any script, what fxeq.find says and what its fusing convs' weights and biases weigh."""
    out = {}
    for name in dict.fromkeys(m for script in _SCRIPTS for m in _quick_models(script)):
        model = _common.build_model(name)
        report = fxeq.find(model, torch.randn(2, 3, 64, 64), **_common.find_options(name))
        convs = {c.weight.rsplit(".", 1)[0] for s in report.search.sites for c in s.convs}
        folded = sum(p.numel() * p.element_size() for conv in convs
                     for p in model.get_submodule(conv).parameters(recurse=False))
        out[name] = {"frontend": report.frontend, "sites": len(report.search.sites), "convs": sorted(convs),
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
    assert record["settings"]["models"] == _SCRIPTS[name]._parse(["--quick"]).quick_models
    assert record["complete"] is True
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
    assert record["target"] == 3.0
    assert [r["model"] for r in record["results"]] == _quick_models("capture_cost")
    for r in record["results"]:
        expected = reference[r["model"]]
        assert (r["frontend"], r["sites"]) == (expected["frontend"], expected["sites"])
        # Both frontends found the sites fxeq.find finds here, fusing conv by fusing conv.
        assert r["fusing_convs"]["find"] == r["fusing_convs"]["concrete"] == expected["convs"]
        assert r["concrete_agrees"] is True and r["concrete_sites"] == expected["sites"]
        medians = _medians(r["times_s"])
        assert r["median_s"] == pytest.approx(medians)
        assert set(medians) | set(r["failed"]) == set(capture_cost.VARIANTS)
        assert not set(medians) & set(r["failed"])
        if "static_export" in medians:
            assert r["ratio"] == pytest.approx({k: v / medians["static_export"] for k, v in medians.items()})
            assert r["meets_target"] == {k: v <= 3.0 for k, v in r["ratio"].items() if k != "static_export"}
        assert r["concrete_vs_auto_inplace"] == pytest.approx(
            medians["prepare_inplace_concrete"] / medians["prepare_inplace"])
        parts = r["parts_s"]
        assert parts["capture_concrete"]["error"] is None
        assert r["dynamic_find"] is None  # only with --dynamic
        if r["frontend"] == "concrete":
            # fx and export both fail; only the concrete trace captures it, and no deployable graph exists.
            assert {"static_export", "prepare"} <= set(r["failed"]) and r["ratio"] == {}
            assert parts["capture_fx"]["error"] and parts["capture_export"]["error"]
            assert "could not capture" in r["failed"]["prepare"]
        else:
            # fx captures smp's Unet and fails on the other smp models, whose forward checks shapes.
            assert r["failed"] == {}
            assert (parts["capture_fx"]["error"] is None) == (r["frontend"] == "fx")
            assert parts["capture_export"]["error"] is None
    markdown = runs["capture_cost"]["markdown"]
    assert "fxeq.find and fxeq.prepare vs one static export" in markdown
    assert "concrete trace as the inplace=True default?" in markdown


def test_site_signature_tells_sites_apart() -> None:
    model = _TwoScales().eval()
    x = torch.randn(2, 3, 8, 8)
    signature = capture_cost.site_signature(fxeq.find(model, x))
    assert signature == [(["fuse"], [(0, 2), (2, 5)])]
    assert capture_cost.site_signature(fxeq.find(model, x, frontend="concrete")) == signature
    assert capture_cost.site_signature(fxeq.find(nn.Sequential(nn.Conv2d(3, 3, 1)), x)) == []


def test_calibration_cost_passes_ratios_and_memory(runs: _Runs,
                                                   reference: dict[str, dict[str, Any]]) -> None:
    record = runs["calibration_cost"]["record"]
    assert record["targets"] == calibration_cost.TARGETS
    for r in record["results"]:
        expected = reference[r["model"]]
        assert (r["frontend"], r["sites"], r["passes"]) == (expected["frontend"], expected["sites"],
                                                             expected["passes"])
        medians = _medians(r["times_s"])
        assert r["median_s"] == pytest.approx(medians)
        # Each timed calibration's passes, as its report records them, are part of it, repetition by repetition.
        assert len(r["pass_times_s"]) == r["passes"]
        for rep, total in enumerate(r["times_s"]["fxeq"]):
            assert sum(p[rep] for p in r["pass_times_s"]) <= total
        assert r["pass_median_s"] == pytest.approx([statistics.median(p) for p in r["pass_times_s"]])
        slowest, floor = max(r["pass_median_s"]), medians["batch_stats"]
        assert r["ratio"]["slowest_pass_vs_batch_stats"] == pytest.approx(slowest / floor)
        assert r["ratio"]["mean_pass_vs_batch_stats"] == pytest.approx(medians["fxeq"] / r["passes"] / floor)
        assert r["ratio"]["total_vs_eval"] == pytest.approx(medians["fxeq"] / medians["eval"])
        assert r["time_meets_target"] == (slowest / floor <= record["targets"]["time_per_pass"])
        # The whole call is held to the target only where one pass does the work (both quick models chain).
        total = medians["fxeq"] / floor
        assert r["call_meets_target"] == (total <= 1.05 if r["passes"] == 1 else None)
        # Memory: calibration holds the folded weights, and the passes are part of the whole call.
        peak = r["peak_bytes"]
        assert r["folded_bytes"] == expected["folded_bytes"]
        assert peak["fxeq"] >= max(peak["fxeq_passes"], r["folded_bytes"]) and peak["fxeq_passes"] > 0
        assert r["memory_ratio"]["passes_vs_batch_stats"] == pytest.approx(peak["fxeq_passes"] / peak["batch_stats"])
    markdown = runs["calibration_cost"]["markdown"]
    assert "folded weights" in markdown and "whole call / batch stats" in markdown


def test_calibration_cost_judges_the_whole_call_of_a_single_pass_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both quick models chain their sites, so this is the run where the whole-call verdict is computed."""
    monkeypatch.setattr(calibration_cost, "build_model", lambda name, seed: _TwoScales().eval())
    monkeypatch.setattr(calibration_cost, "describe_model", lambda name: "_TwoScales()")
    monkeypatch.setattr(calibration_cost, "find_options", lambda name: {})
    args = argparse.Namespace(seed=0, batches=2, batch=2, size=8, reps=2, warmup=1, breakdown=False)
    r = calibration_cost.bench_model("two_scales", args, torch.device("cpu"))
    medians = r["median_s"]
    assert r["passes"] == 1
    assert r["call_meets_target"] == (medians["fxeq"] / medians["batch_stats"] <= 1.05)
    assert r["ratio"]["total_vs_batch_stats"] == pytest.approx(medians["fxeq"] / medians["batch_stats"])


def test_calibration_cost_verdict_of_a_single_pass_call() -> None:
    result = {"passes": 1, "ratio": {"total_vs_batch_stats": 1.02}, "call_meets_target": True}
    assert calibration_cost._call_verdict(result) == "**1.020x** (meets 1.05x)"
    chained = {"passes": 4, "ratio": {"total_vs_batch_stats": 2.7}, "call_meets_target": None}
    assert calibration_cost._call_verdict(chained) == "2.700x (4 passes: per-pass target)"


def test_calibration_cost_breakdown_hooks_do_nothing_but_hook() -> None:
    """The breakdown's pieces run fxeq's public observers and torch hooks, and leave the model as it was."""
    model = _TwoScales().eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    prepared = fxeq.calibrate(fxeq.prepare(model, batches[0]), batches, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = calibration_cost._breakdown_calls(model, prepared, batches)
    seen: list[tuple[str, int, int]] = []
    piece = ""
    model.fuse.register_forward_pre_hook(
        lambda module, args: seen.append((piece, args[0].shape[1], len(module._forward_pre_hooks))))
    for piece in ("hooks", "observers", "observers_stop", "functional_call"):
        calls[piece]()
    # every piece reached the fusing conv on every batch; all but the last with a hook of its own beside ours
    assert seen == [(p, 5, 2) for p in ("hooks", "observers", "observers_stop") for _ in batches] + \
        [("functional_call", 5, 1)] * 2
    assert len(model.fuse._forward_pre_hooks) == 1  # ours: the pieces removed theirs
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training is False


def test_calibration_cost_forward_probe_marks_each_pass_and_leaves_the_model() -> None:
    model = _TwoScales().eval()
    probe = calibration_cost._ForwardProbe(model, torch.device("cpu"))
    x = torch.randn(2, 3, 8, 8)
    with probe.installed():
        assert "forward" in vars(model)
        with torch.profiler.profile() as prof:
            model(x)
    assert "forward" not in vars(model)
    assert sum(e.name == calibration_cost.PASS_RANGE for e in prof.events()) == 1
    # a megabyte allocated outside the forward counts in the whole call's peak, not in the passes'
    whole, passes = calibration_cost._passes_peak(lambda: (model(x), torch.ones(10**6)), model,
                                                  torch.device("cpu"))
    assert whole >= 4e6 > passes > 0


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


# ---------------------------------------------------------------------------
# ONNX parity
# ---------------------------------------------------------------------------


def test_onnx_parity_graphs_and_ratios(runs: _Runs, reference: dict[str, dict[str, Any]]) -> None:
    record = runs["onnx_parity"]["record"]
    assert [r["model"] for r in record["results"]] == list(_common.QUICK_MODELS)
    for r in record["results"]:
        assert r["sites"] == reference[r["model"]]["sites"]
        # fxeq changes numbers, not the graph: the same ONNX ops in the same order, the same initializers.
        assert r["onnx_nodes"]["original"] == r["onnx_nodes"]["fxeq"] > 0
        assert r["same_nodes"] is True and r["same_initializers"] is True
        assert max(r["max_abs_error_vs_torch"].values()) < 1e-3
        medians = _medians(r["times_ms"])
        assert all(len(v) == 3 for v in r["times_ms"].values())  # --quick: 3 runs
        assert r["median_ms"] == pytest.approx(medians)
        assert r["ratio"] == pytest.approx(medians["fxeq"] / medians["original"])
    markdown = runs["onnx_parity"]["markdown"]
    header = ("| model | sites | ONNX nodes, original | ONNX nodes, fxeq | same sequence | ORT CPU original ms | "
              "ORT CPU fxeq ms | ratio |")
    assert header in markdown
    assert all(line.count("|") == header.count("|") for line in markdown.splitlines()
               if line.startswith("| unet_resnet18 | 4 |"))


def test_onnx_parity_names_the_extra_when_a_package_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(SystemExit, match=r"missing: onnxscript\. Install them with: pip install -e '\.\[onnx\]'"):
        onnx_parity.main(["--quick", "--out", "unused"])


# ---------------------------------------------------------------------------
# Result files written as a run goes, and gpu.sh
# ---------------------------------------------------------------------------


def test_partial_results_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _common.parser("demo", quick="nothing").parse_args(["--out", str(tmp_path), "--tag", "t"])
    run = _common.Run("demo", args)
    run.write({"results": [1]}, ["## table"], complete=False)
    assert json.loads((tmp_path / "demo-t.json").read_text())["complete"] is False
    assert "**Partial" in (tmp_path / "demo-t.md").read_text() and capsys.readouterr().out == ""
    run.write({"results": [1, 2]}, ["## table"])
    assert json.loads((tmp_path / "demo-t.json").read_text())["complete"] is True
    assert "Partial" not in (tmp_path / "demo-t.md").read_text() and "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-t.json", "demo-t.md"]  # no temporary file left


def test_run_models_skips_a_missing_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _common.parser("demo", quick="nothing").parse_args(
        ["--out", str(tmp_path), "--models", "unet_resnet18", "yolov8n"])
    monkeypatch.setattr(_common, "available", lambda name: "not here" if name == "yolov8n" else None)
    written: list[bool] = []
    run = _common.Run("demo", args)
    monkeypatch.setattr(run, "write", lambda data, sections, complete=True: written.append(complete))
    assert _common.run_models(run, lambda name: {"model": name}, lambda results, skipped: []) == 0
    assert written == [False, True]


def test_gpu_summary_reports_figures_and_missing_files(runs: _Runs, tmp_path: Path) -> None:
    for name in ("latency", "calibration_cost"):
        record = dict(runs[name]["record"], complete=name == "latency")
        (tmp_path / f"{name}-t.json").write_text(json.dumps(record))
    steps = tmp_path / "steps.txt"
    steps.write_text("latency: exit 0 after 9s\ncalibration_cost: stopped at its 65s limit (exit 124) after 65s\n")
    text = _gpu.summary(tmp_path, "t", steps)
    assert text == (tmp_path / "gpu-t.md").read_text()
    assert "latency: exit 0 after 9s" in text and "stopped at its 65s limit" in text
    assert "calibration_cost-t.json: partial" in text
    assert "torchrun-t.json: missing" in text and "train_quality-t.json: missing" in text
    for r in runs["latency"]["record"]["results"]:
        for t in r["timings"]:
            assert f"| {r['model']} | {t['mode']} | {t['dtype']} | {t['median_ms']['original']:.1f} | " \
                   f"{t['ratio']['fxeq']:.3f}x |" in text
    for r in runs["calibration_cost"]["record"]["results"]:
        assert f"| {r['model']} | {r['passes']} | {r['ratio']['slowest_pass_vs_batch_stats']:.3f}x" in text


def test_gpu_sh_dry_run(tmp_path: Path) -> None:
    """Every step of gpu.sh on the CPU at smoke sizes: each writes its files, and the summary reads them all."""
    if shutil.which("torchrun") is None or shutil.which("timeout") is None:
        pytest.skip("gpu.sh needs torchrun and timeout on PATH")
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--dry-run", str(tmp_path)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (tmp_path / "gpu-dry-run.md").read_text()
    assert summary in result.stdout
    for step in ("latency", "calibration_cost", "torchrun_prepare", "torchrun", "train_quality"):
        assert f"  {step}: exit 0 after" in summary, summary
    for name in ("latency", "calibration_cost", "train_quality"):
        assert json.loads((tmp_path / f"{name}-dry-run.json").read_text())["complete"] is True
    torchrun = json.loads((tmp_path / "torchrun-dry-run.json").read_text())
    assert torchrun["exit"] == 0 and torchrun["processes"] == 1 and torchrun["device"] == "cpu"
    assert torchrun["fusing_convs"] == ["decoder.fusion_block.0", "decoder.psp.out_conv.0"]
    assert "missing" not in summary and "partial" not in summary
    assert "| scratch | PSPNet/resnet18 | sgd |" in summary  # the training-quality table
