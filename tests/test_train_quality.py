"""benchmarks/train_quality.py: the synthetic data, and a ``--quick`` run end to end.

The run's numbers (mIoU, timings) depend on the machine and are never
asserted; the test checks that the run finishes and records what the README
relies on: environment, per-config summaries, paired differences, step-0
gradients and the finalize check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("segmentation_models_pytorch")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import train_quality  # a script folder, put on the path above


def test_synthetic_task_is_deterministic_and_tasks_differ() -> None:
    task = train_quality.SyntheticTask(task=1, classes=6, size=32)
    images, masks = task.sample(3, seed=5)
    again, same_masks = task.sample(3, seed=5)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    assert torch.equal(masks, same_masks)
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32) and masks.dtype == torch.long
    torch.testing.assert_close(images.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    other = train_quality.SyntheticTask(task=0, classes=6, size=32)
    assert not torch.equal(task.textures(), other.textures())


def test_synthetic_task_rejects_too_many_classes() -> None:
    with pytest.raises(ValueError, match="2 to 12 classes"):
        train_quality.SyntheticTask(task=0, classes=13, size=32)


def test_mean_iou_ignores_unlabelled_pixels() -> None:
    masks = torch.tensor([[[0, 1], [-1, 1]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [0, 1]]]), 2).permute(0, 3, 1, 2).float()
    assert train_quality.mean_iou([logits], [(torch.zeros(1), masks)], classes=2) == (100.0, 100.0)


def test_parse_lr() -> None:
    assert train_quality.parse_lr(None, ["sgd"]) == {"sgd": 0.01}
    assert train_quality.parse_lr("0.1", ["sgd", "adamw"]) == {"sgd": 0.1, "adamw": 0.1}
    assert train_quality.parse_lr("adamw=5e-4", ["sgd", "adamw"]) == {"sgd": 0.01, "adamw": 5e-4}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("train_quality")
    command = [sys.executable, str(BENCHMARKS / "train_quality.py"), "--quick", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "train_quality-quick.json").read_text())
    return record, (out / "train_quality-quick.md").read_text()


def test_quick_run_records_environment(quick_run: tuple[dict[str, Any], str]) -> None:
    record, markdown = quick_run
    env = record["environment"]
    assert {"python", "torch", "torchvision", "segmentation_models_pytorch", "timm", "fxeq"} <= set(env["versions"])
    assert "--quick" in env["command"] and env["timestamp"]
    assert env["device"]["cpu"] and "device:" in markdown and "command:" in markdown
    assert record["settings"]["protocols"] == ["scratch", "finetune"] and record["settings"]["threads"] == 1


def test_quick_run_summarizes_every_config(quick_run: tuple[dict[str, Any], str]) -> None:
    record, markdown = quick_run
    modes = record["settings"]["modes"]
    summary = {(e["protocol"], e["mode"]): e for e in record["summary"]}
    assert set(summary) == {(p, m) for p in ("scratch", "finetune") for m in modes}
    for (_, mode), entry in summary.items():
        assert isinstance(entry["miou_mean"], float) and entry["seeds"] == [0]
        if mode != "none":
            assert len(entry["diff_vs_none"]) == 1 and "diff_vs_none_mean" in entry
    for heading in ("scratch: mIoU", "finetune: paired difference", "Step-0 gradient RMS", "fxeq.finalize"):
        assert heading in markdown
    assert record["pretraining"] and record["pretraining"][0]["iters"] == record["settings"]["pretrain_iters"]


def test_quick_run_records_gradients_and_finalize(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    convs = record["sites"]["PSPNet/resnet18"]["fusing_convs"]
    assert convs
    for run in record["runs"]:
        assert set(run["grad_rms_step0"]) == set(convs)
        for conv, slices in convs.items():
            assert len(run["grad_rms_step0"][conv]) == len(slices)
        if run["mode"] == "reparam":
            assert run["finalize"]["max_abs_logit_diff"] >= 0.0 and "miou_before" in run["finalize"]
        if run["mode"] != "none":
            assert run["disequilibrium"]
