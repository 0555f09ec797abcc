"""The command line under torchrun: calibration sharded across processes, statistics merged, rank 0 writes.

``python -m torch.distributed.run --standalone`` starts two gloo processes on
this machine (loopback only), each ``python -m fxeq convert``; the result is
compared with a single-process conversion of the same images.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_models import TinyFuse, assert_fails, run_cli, run_main, subprocess_env

from fxeq.cli.images import generate_images

MODEL = ["--model", "cli_models:TinyFuse", "--model-kwargs", '{"classes": 3}']
DATA = ["--size", "32", "--batch-size", "2"]


def torchrun(*args: object, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node N -m fxeq ARGS``, with gloo on the loopback interface."""
    env = {**subprocess_env(), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
         "-m", "fxeq", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo, and Linux (loopback interface lo)")
def test_two_processes_give_what_one_gives(tmp_path: Path) -> None:
    """5 images in batches of 2 form batches [0, 1] and [2, 3, 4] (a lone last image joins the one before).

    Batch k goes to rank k % 2, so each process calibrates on whole batches that a
    single process would form too. TinyFuse has batch norm (batch statistics in
    calibration) before the fusion: its features depend on which images share a
    batch, so sharding images instead of batches would change them. With whole
    batches, every feature is the single process's and only the order in which
    the float64 statistics are merged differs.
    """
    generate_images(tmp_path / "images", 5, size=40)
    torch.manual_seed(0)
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "tiny.pt")
    common = ("convert", "tiny.pt", *MODEL, "--calib", "images", *DATA, "--device", "cpu")
    sharded = torchrun(*common, "-o", "sharded.pt", cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr
    single = run_cli(*common, "-o", "single.pt", cwd=tmp_path)
    assert single.returncode == 0, single.stderr

    a, b = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("sharded", "single"))
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0, msg=key)
    ra, rb = (json.loads((tmp_path / f"{name}.pt.fxeq.json").read_text()) for name in ("sharded", "single"))
    for sa, sb in zip(ra["sites"][0]["inputs"], rb["sites"][0]["inputs"], strict=True):
        assert (sa["count"], sa["samples"]) == (sb["count"], sb["samples"]) and sa["samples"] == 5  # each image once
        assert sa["mean"] == pytest.approx(sb["mean"], rel=1e-9) and sa["std"] == pytest.approx(sb["std"], rel=1e-9)
    assert ra["calibration_data"]["processes"] == 2 and ra["calibration_data"]["images"] == 5
    # all processes' batches, as a single process runs them
    assert ra["calibration"]["batches"] == rb["calibration"]["batches"] == ra["calibration_data"]["batches"] == 2
    assert rb["calibration_data"]["processes"] == 1

    # Rank 0 alone wrote and printed; rank 1 waited and exited 0.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "images", "sharded.pt", "sharded.pt.fxeq.json", "single.pt", "single.pt.fxeq.json", "tiny.pt"]
    assert sharded.stdout.count("wrote sharded.pt ") == 1
    assert sharded.stderr.count("calibrating on 5 images") == 1
    assert "2 processes, batch k on rank k % 2" in sharded.stderr
    assert "fxeq: error" not in sharded.stderr


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_one_process_under_torchrun_joins_a_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchrun --nproc-per-node 1`` runs the path several processes run (gloo here, nccl with --device cuda).

    torchrun's environment, in this process: the group is set up for the run and destroyed after it.
    """
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                        "WORLD_SIZE": "1", "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(name, value)
    started: list[str] = []
    init = dist.init_process_group

    def spy(backend: str, **kwargs: object) -> None:
        started.append(backend)
        init(backend, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    generate_images(tmp_path / "images", 4, size=32)
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "tiny.pt")
    result = run_main("convert", tmp_path / "tiny.pt", *MODEL, "--calib", tmp_path / "images", *DATA,
                      "--device", "cpu", "-o", tmp_path / "out.pt")
    assert result.returncode == 0, result.stderr
    assert started == ["gloo"] and not dist.is_initialized()
    report = json.loads((tmp_path / "out.pt.fxeq.json").read_text())
    assert report["calibration_data"]["processes"] == 1 and report["calibration"]["batches"] == 2
    assert report["calibration_data"]["process_group"] == "gloo"  # benchmarks/gpu.sh reads nccl here
    assert "rank 0" not in result.stderr


@pytest.mark.parametrize("images", [2, 5], ids=["more-ranks-than-images", "more-ranks-than-batches"])
def test_more_processes_than_batches_is_an_error_before_any_work(
    images: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun's environment, in this process: the error comes before the process group or the model."""
    generate_images(tmp_path / "images", images, size=32)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "tiny.pt")
    result = run_main("convert", tmp_path / "tiny.pt", *MODEL, "--calib", tmp_path / "images", *DATA,
                      "-o", tmp_path / "out.pt")
    batches = "1 batch of up to 2" if images == 2 else "2 batches of up to 3"
    assert_fails(result, 2, f"rank 0 of 3: found {images} images in ", f"which make {batches}, fewer than the 3 "
                 "processes calibrating", "each process calibrates on whole batches of its own",
                 f"or start at most {'1 process' if images == 2 else '2 processes'}")
    assert not dist.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "tiny.pt"]


@pytest.mark.parametrize("command", [["apply", "x.pt", *MODEL, "--report", "x.fxeq.json", "-o", "y.pt"], ["demo"]])
def test_commands_that_do_not_calibrate_refuse_torchrun(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process would write the same files; they have no calibration to share."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = run_main(*command)
    assert_fails(result, 2, f"fxeq {command[0]} runs in one process: under torchrun, only fxeq convert and fxeq "
                 "inspect share their calibration across processes", "Run it without torchrun")
    assert list(tmp_path.iterdir()) == []
