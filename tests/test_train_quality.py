"""experiments/train_quality.py: the synthetic data, the metrics, and a ``--quick`` run end to end.

The run's mIoU and timings depend on the machine and are never asserted. What
does not is checked against an independent computation: the step-0 gradient
RMS of the ``none`` run against one forward and backward computed here, the
``reparam`` gradient against the ``init`` gradient divided by sigma (the chain
rule through ``W = W_raw / sigma``), and ``fxeq.finalize`` of a
parametrization against the unchanged logits it must give.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("segmentation_models_pytorch")

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
sys.path[:0] = [str(ROOT / "benchmarks"), str(EXPERIMENTS)]

import _common  # noqa: E402 - the benchmarks and experiments folders, put on the path above
import _tq_data  # noqa: E402
import _tq_experiment  # noqa: E402
import train_quality  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and whole runs; -m "not slow" skips them


def test_synthetic_task_is_deterministic_and_tasks_differ() -> None:
    task = _tq_data.SyntheticTask(task=1, classes=6, size=32)
    images, masks = task.sample(3, seed=5)
    again, same_masks = task.sample(3, seed=5)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    assert torch.equal(masks, same_masks)
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32) and masks.dtype == torch.long
    torch.testing.assert_close(images.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    other = _tq_data.SyntheticTask(task=0, classes=6, size=32)
    assert not torch.equal(task.textures(), other.textures())


def test_synthetic_task_rejects_too_many_classes() -> None:
    with pytest.raises(ValueError, match="2 to 12 classes"):
        _tq_data.SyntheticTask(task=0, classes=13, size=32)


def test_mean_iou_ignores_unlabelled_pixels() -> None:
    masks = torch.tensor([[[0, 1], [-1, 1]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [0, 1]]]), 2).permute(0, 3, 1, 2).float()
    assert _tq_experiment.mean_iou([logits], [(torch.zeros(1), masks)], classes=2) == (100.0, 100.0)


def test_parse_lr() -> None:
    assert train_quality.parse_lr(None, ["sgd"]) == {"sgd": 0.01}
    assert train_quality.parse_lr("0.1", ["sgd", "adamw"]) == {"sgd": 0.1, "adamw": 0.1}
    assert train_quality.parse_lr("adamw=5e-4", ["sgd", "adamw"]) == {"sgd": 0.01, "adamw": 5e-4}


def test_shares_the_common_options() -> None:
    args = train_quality.parse_args(["--quick"])
    assert args.threads == 1 and args.tag == "" and args.out is None  # None: _common.Run picks results/tmp/
    assert _common.Run("train_quality", args).path(".json").parent == _common.QUICK_RESULTS
    assert (args.iters, args.archs, args.seeds) == (20, ["PSPNet"], [0])
    full = train_quality.parse_args(["--seeds", "3,4", "--device", "cpu"])
    assert (full.iters, full.archs, full.seeds, full.threads) == (400, ["UPerNet", "PSPNet"], [3, 4], None)


def test_a_budget_stops_before_the_next_run(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        assert train_quality.main(["--quick", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "train_quality-quick.json").read_text())
    assert record["complete"] is True and record["runs"] == [] and record["pretraining"] == []
    assert record["budget"] == {"seconds": 0.0, "stopped": True, "runs": 0, "planned": 6}
    markdown = (tmp_path / "train_quality-quick.md").read_text()
    assert "budget stopped the run after 0 of 6 training runs" in markdown
    assert "No equalized config has a `none` run" in markdown


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    # A subprocess: the script as a user runs it, its sibling modules found from its own folder.
    out = tmp_path_factory.mktemp("train_quality")
    command = [sys.executable, str(EXPERIMENTS / "train_quality.py"), "--quick", "--device", "cpu", "--out", str(out)]
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
    assert env["device"]["torch_threads"] == 1
    assert record["complete"] is True and record["budget"] == {"seconds": None, "stopped": False, "runs": 6,
                                                               "planned": 6}


def test_quick_run_summarizes_every_config(quick_run: tuple[dict[str, Any], str]) -> None:
    record, markdown = quick_run
    modes = record["settings"]["modes"]
    summary = {(e["protocol"], e["mode"]): e for e in record["summary"]}
    assert set(summary) == {(p, m) for p in ("scratch", "finetune") for m in modes}
    runs = {(r["protocol"], r["mode"]): r for r in record["runs"]}
    for key, entry in summary.items():
        assert entry["seeds"] == [0] and entry["miou_mean"] == pytest.approx(runs[key]["miou"])
        if key[1] != "none":
            assert entry["diff_vs_none"] == pytest.approx([runs[key]["miou"] - runs[key[0], "none"]["miou"]])
    for heading in ("scratch: mIoU", "finetune: paired difference", "Step-0 gradient RMS", "fxeq.finalize"):
        assert heading in markdown
    assert record["pretraining"] and record["pretraining"][0]["iters"] == record["settings"]["pretrain_iters"]


def test_quick_run_gradient_of_none_matches_an_independent_step(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    settings = record["settings"]
    run = next(r for r in record["runs"] if (r["protocol"], r["mode"], r["seed"]) == ("scratch", "none", 0))
    slices = record["sites"]["PSPNet/resnet18"]["fusing_convs"]

    # Step 0 of train(): the seed-0 model, the first batch of task B's seed-0 stream, dropout seeded by the seed.
    model = _common.build_smp("PSPNet", "resnet18", classes=settings["classes"], seed=0).train()
    task = _tq_data.SyntheticTask(_tq_data.TASK_B, settings["classes"], settings["size"])
    images, masks = task.sample(settings["batch"], _tq_data.stream_seed(0, 0))
    torch.manual_seed(0)
    F.cross_entropy(model(images), masks, ignore_index=_tq_data.IGNORE).backward()
    for conv, channel_slices in slices.items():
        grad = model.get_submodule(conv).weight.grad.double()
        expected = [grad[:, a:b].pow(2).mean().sqrt().item() for a, b in channel_slices]
        assert run["grad_rms_step0"][conv] == pytest.approx(expected, rel=1e-3)


def test_quick_run_reparam_gradient_is_init_gradient_over_sigma(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    convs = record["sites"]["PSPNet/resnet18"]["fusing_convs"]
    assert convs
    runs = {(r["protocol"], r["mode"], r["seed"]): r for r in record["runs"]}
    for (protocol, mode, seed), run in runs.items():
        assert set(run["grad_rms_step0"]) == set(convs)
        if mode != "reparam":
            continue
        init = runs[protocol, "init", seed]
        assert run["sigma"] == init["sigma"]  # the same calibration
        for conv, sigma in run["sigma"].items():
            assert len(sigma) == len(convs[conv])
            expected = [g / s for g, s in zip(init["grad_rms_step0"][conv], sigma)]
            assert run["grad_rms_step0"][conv] == pytest.approx(expected, rel=1e-3)


def test_quick_run_finalize_of_reparam_keeps_the_logits(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    finalized = [r for r in record["runs"] if r["mode"] == "reparam"]
    assert finalized
    for run in finalized:
        # Baking W_raw * (1 / sigma) into the weight computes the same weight: the logits do not move.
        assert run["finalize"]["max_abs_logit_diff"] <= 1e-4
        assert run["finalize"]["changed_predictions"] == 0.0 and run["finalize"]["notes"] == []
        assert run["finalize"]["miou_before"] == pytest.approx(run["miou"])
