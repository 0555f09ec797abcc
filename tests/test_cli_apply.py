"""``fxeq apply``: a report's statistics folded into a checkpoint with no calibration data, and every refusal.

The runs call :func:`fxeq.cli.main` in this process; one ``fxeq convert`` per
module makes the checkpoint and report that the tests apply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_models import TinyFuse, assert_fails, run_main

from fxeq.cli import outputs
from fxeq.cli.images import generate_images
from fxeq.report import report_path

pytestmark = pytest.mark.slow  # subprocesses and whole runs; -m "not slow" skips them

MODEL = ["--model", "cli_models:TinyFuse", "--model-kwargs", '{"classes": 3}']


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TinyFuse checkpoint and ``fxeq convert`` of it: ``converted.pt`` and its report."""
    root = tmp_path_factory.mktemp("apply")
    generate_images(root / "images", 5, size=40)
    torch.manual_seed(0)
    torch.save(TinyFuse(classes=3).state_dict(), root / "tiny.pt")
    result = run_main("convert", root / "tiny.pt", *MODEL, "--calib", root / "images", "--size", "32",
                      "--batch-size", "2", "-o", root / "converted.pt")
    assert result.returncode == 0, result.stderr
    return {"root": root, "source": root / "tiny.pt", "converted": root / "converted.pt",
            "report": root / "converted.pt.fxeq.json", "images": root / "images"}


def _edited_report(run: dict[str, Path], folder: Path, **changes: Any) -> Path:
    """A copy of the run's report with some top-level fields changed (None: removed)."""
    data = json.loads(run["report"].read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = folder / "edited.fxeq.json"
    path.write_text(json.dumps(data))
    return path


def test_apply_writes_bitwise_what_convert_wrote(run: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "applied.pt"
    result = run_main("apply", run["source"], *MODEL, "--report", run["report"], "-o", output)
    assert result.returncode == 0, result.stderr
    assert f"wrote {output} (rescaled fuse with the statistics in {run['report']};" in result.stdout
    assert output.read_bytes() == run["converted"].read_bytes()  # the file, not only its tensors (README)
    applied, converted = torch.load(output, weights_only=True), torch.load(run["converted"], weights_only=True)
    assert applied.keys() == converted.keys()
    assert all(torch.equal(applied[k], converted[k]) for k in converted)
    report = json.loads(report_path(output).read_text())
    original = json.loads(run["report"].read_text())
    assert report["sites"] == original["sites"] and report["calibration"] == original["calibration"]
    assert report["command"][:2] == ["fxeq", "apply"]
    assert report["checkpoint"] == original["checkpoint"]  # the same checkpoint, by digest
    assert report["replayed"] == {"report": str(run["report"].resolve()), "sha256": outputs.digest(run["report"])}
    assert report["output"] == {"path": str(output.resolve()), "sha256": outputs.digest(output)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["applied.pt", "applied.pt.fxeq.json"]


def test_another_checkpoint_is_refused_without_force(run: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(1)
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "other.pt")
    args = ("apply", tmp_path / "other.pt", *MODEL, "--report", run["report"], "-o", tmp_path / "out.pt")
    assert_fails(run_main(*args), 2, "other.pt is not the checkpoint the report was made from: its SHA-256 is ",
                 f"the report's checkpoint ({run['source'].resolve()}) had {outputs.digest(run['source'])}",
                 "measured on other weights", "pass --force to apply it anyway")
    assert not (tmp_path / "out.pt").exists()
    result = run_main(*args, "--force")
    assert result.returncode == 0, result.stderr
    assert "fxeq: warning: " in result.stderr and "applying it anyway (--force)" in result.stderr


def test_a_report_that_names_no_checkpoint_is_refused_without_force(run: dict[str, Path], tmp_path: Path) -> None:
    """A report written in Python (Report.to_json()) records no checkpoint, so the digest cannot be checked."""
    report = _edited_report(run, tmp_path, checkpoint=None)
    result = run_main("apply", run["source"], *MODEL, "--report", report, "-o", tmp_path / "out.pt")
    assert_fails(result, 2, "edited.fxeq.json does not record the checkpoint it was made from",
                 "cannot check that its statistics were measured on ", "--force")
    assert run_main("apply", run["source"], *MODEL, "--report", report, "-o", tmp_path / "out.pt",
                    "--force").returncode == 0


def test_a_model_whose_sites_differ_from_the_reports_is_refused(run: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(TinyFuse(classes=3, a_channels=5).state_dict(), tmp_path / "wide.pt")
    result = run_main("apply", tmp_path / "wide.pt", "--model", "cli_models:TinyFuse", "--model-kwargs",
                      '{"classes": 3, "a_channels": 5}', "--report", run["report"], "-o", tmp_path / "out.pt",
                      "--force")
    assert_fails(result, 2, "conv fuse (site 'cat'): expected 10 input channels (the report's slices 0:4, 4:10), "
                 "found 11", "not the one the report was written for")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.pt"]


def test_a_converted_checkpoint_is_refused(run: dict[str, Path], tmp_path: Path) -> None:
    result = run_main("apply", run["converted"], *MODEL, "--report", run["report"], "-o", tmp_path / "out.pt")
    assert_fails(result, 2, "converted.pt was already equalized by fxeq", "twice")


def test_the_report_is_never_written_over(run: dict[str, Path], tmp_path: Path) -> None:
    """``-o converted.pt --force`` would put its report on the --report file."""
    output = tmp_path / "model.pt"
    report = _edited_report(run, tmp_path).rename(report_path(output))
    before = report.read_bytes()
    result = run_main("apply", run["source"], *MODEL, "--report", report, "-o", output, "--force")
    assert_fails(result, 2, "the output's report", "model.pt.fxeq.json is the input ", "even with --force")
    assert report.read_bytes() == before and not output.exists()


@pytest.mark.parametrize(("content", "words"), [
    (None, ["nowhere.fxeq.json does not exist", "OUT.fxeq.json beside a converted checkpoint file"]),
    ("{not json", ["--report ", "nowhere.fxeq.json: the report text is not valid JSON"]),
    ("[1, 2]", ["nowhere.fxeq.json: not an fxeq report: expected a JSON object with a 'sites' list", "found list"]),
    ("measurement", ['records a measurement ("folded": false, as fxeq inspect --json prints), not a conversion']),
], ids=["missing", "not-json", "not-a-report", "not-folded"])
def test_unusable_reports(content: str | None, words: list[str], run: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "nowhere.fxeq.json"
    if content == "measurement":
        report = _edited_report(run, tmp_path, folded=False)
    elif content is not None:
        report.write_text(content)
    result = run_main("apply", run["source"], *MODEL, "--report", report, "-o", tmp_path / "out.pt")
    assert_fails(result, 2, *words)


def test_model_is_required_for_a_checkpoint_file(run: dict[str, Path], tmp_path: Path) -> None:
    result = run_main("apply", run["source"], "--report", run["report"], "-o", tmp_path / "out.pt")
    assert_fails(result, 2, "--model is required for a checkpoint file", "save_pretrained folder names its model "
                 "class (in config.json)")
