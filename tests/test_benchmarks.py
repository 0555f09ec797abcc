"""The benchmark scripts run end to end and record where and how they ran.

Each script's ``--quick`` mode runs once as a subprocess, writing into a
temporary folder; the test checks the exit status and that the JSON and
markdown results carry the environment record. Timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("segmentation_models_pytorch")

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
_SCRIPTS = ["latency", "calibration_cost", "variance"]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def _check_latency(record: dict) -> None:
    for result in record["results"]:
        assert result["graph_identical"] is True, result["model"]
        assert {(t["mode"], t["device"], t["dtype"]) for t in result["timings"]} >= {
            ("inference", "cpu", "float32"), ("train", "cpu", "float32")}
        for timing in result["timings"]:
            assert set(timing["median_ms"]) == {"original", "fxeq", "explicit", "batchnorm"}
            assert timing["ratio"]["original"] == 1.0


def _check_calibration_cost(record: dict) -> None:
    for result in record["results"]:
        assert {"time_ratio", "memory_ratio", "setup_s", "peak_bytes"} <= set(result)
        assert result["peak_bytes"]["plain"] > 0


def _check_variance(record: dict) -> None:
    assert [row["r"] for row in record["iid"]] == list(range(2, 9))
    assert all(row["nearest"] == pytest.approx(1.0) for row in record["iid"])
    assert {site["model"] for site in record["sites"]} == {"unet_resnet18", "upernet_resnet18"}


_CHECKS = {"latency": _check_latency, "calibration_cost": _check_calibration_cost, "variance": _check_variance}


@pytest.mark.parametrize("name", _SCRIPTS)
def test_quick_run_writes_results(name: str, tmp_path: Path) -> None:
    # One thread: a quick run must not stall when other processes share the CPU.
    extra = ["--no-plot"] if name == "variance" else []
    proc = _run(str(_BENCHMARKS / f"{name}.py"), "--quick", "--threads", "1", *extra, "--out", str(tmp_path),
                timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    record = json.loads((tmp_path / f"{name}-quick.json").read_text())
    env = record["environment"]
    assert record["benchmark"] == name
    assert env["device"]["cpu"] and env["device"]["torch_threads"] == 1
    assert {"python", "torch", "torchvision", "timm", "segmentation_models_pytorch", "fxeq"} <= set(env["versions"])
    assert f"{name}.py --quick" in env["command"] and env["timestamp"]
    assert record["settings"]["models"] == ["unet_resnet18", "upernet_resnet18"]
    _CHECKS[name](record)

    markdown = (tmp_path / f"{name}-quick.md").read_text()
    assert env["command"] in markdown and "device:" in markdown and "versions:" in markdown
    assert "|---" in markdown


def test_help() -> None:
    for name in _SCRIPTS:
        proc = _run(str(_BENCHMARKS / f"{name}.py"), "--help", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "--quick" in proc.stdout and "--out" in proc.stdout
