"""The command line: convert, inspect, demo and every error path.

Most runs call :func:`fxeq.cli.main` in this process (``run_main``, or the
``cli`` fixture where the current folder matters): a ``python -m fxeq``
subprocess costs an interpreter start and the torch import, a few seconds on
2 CPU cores. The entry point itself runs as a subprocess in the successful
conversion (once per module; several tests read its outputs) and the demo.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torchvision
from cli_models import NoFuse, TinyFuse, assert_fails, run_cli, run_main
from PIL import Image

from fxeq import __version__, files
from fxeq.cli import main, outputs
from fxeq.cli.images import generate_images
from fxeq.report import report_path

pytestmark = pytest.mark.slow  # subprocesses and whole runs; -m "not slow" skips them

MODEL = ["--model", "cli_models:TinyFuse", "--model-kwargs", '{"classes": 3}']
DATA = ["--size", "32", "--batch-size", "2"]
Run = Callable[..., "subprocess.CompletedProcess[str]"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    return torch.load(path, weights_only=True)


def assert_equalized(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    """Only the fusing convs changed, each input's weight slice by exactly 1 / its std."""
    assert after.keys() == before.keys()
    fused = {n for s in report["sites"] for c in s["convs"] for n in (c["weight"], c["bias"]) if n}
    for key in before.keys() - fused:
        assert torch.equal(after[key], before[key]), key
    assert report["sites"]
    for site in report["sites"]:
        for conv in site["convs"]:
            assert conv["groups"] == 1
            old, new = before[conv["weight"]].double(), after[conv["weight"]].double()
            for inp in site["inputs"]:
                lo, hi = inp["channels"]
                # new == old / std up to float32 rounding: one factor per slice (zeros stay zero)
                torch.testing.assert_close(new[:, lo:hi], old[:, lo:hi] / inp["std"], rtol=2e-7, atol=0)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """``fxeq ARGS`` in this process, in ``tmp_path``, with ``sys.path`` restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # main() adds the folder

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["fxeq", *map(str, args)], code, out, err)

    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four images of several sizes and formats, one in a subfolder, and a text file (skipped, with a warning)."""
    folder = tmp_path_factory.mktemp("images")
    generate_images(folder, 2, size=40)
    (folder / "sub").mkdir()
    noise = torch.randint(0, 256, (2, 36, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise[0].numpy()).save(folder / "sub" / "photo.JPG")
    Image.fromarray(noise[1].numpy()).save(folder / "wide.jpeg")
    (folder / "labels.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TinyFuse(classes=3).state_dict()


@pytest.fixture
def ckpt(tmp_path: Path, tiny: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save(tiny, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, images: Path, tiny: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One successful ``fxeq convert`` of TinyFuse, .pt to .pt."""
    folder = tmp_path_factory.mktemp("convert")
    source, output = folder / "tiny.pt", folder / "out" / "tiny.fxeq.pt"
    output.parent.mkdir()
    torch.save(tiny, source)
    before = digest(source)
    result = run_cli("convert", source, *MODEL, "--calib", images, *DATA, "-o", output, cwd=folder)
    return {"result": result, "source": source, "output": output, "digest": before}


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------

def test_convert_succeeds_and_prints_the_table(converted: dict[str, Any]) -> None:
    result = converted["result"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "site cat -> fuse; std max/min" in result.stdout
    assert "bilinear x4" in result.stdout
    assert f"wrote {converted['output']}" in result.stdout
    # stderr is no terminal here: no progress bar (no carriage returns in a log), but notes on each step
    assert "fxeq calibration" not in result.stderr and "\r" not in result.stderr
    assert "finding the fusion sites of TinyFuse on the first batch (frontend auto)" in result.stderr
    assert "found 1 fusion site (fuse); calibrating on 4 images" in result.stderr
    assert "2 batches of up to 2" in result.stderr
    assert "fxeq: warning: skipped 1 file in " in result.stderr and "jpg/jpeg/png/webp: 1 .txt" in result.stderr


def test_convert_rescales_only_the_fusing_conv(converted: dict[str, Any], tiny: dict[str, torch.Tensor]) -> None:
    after = load(converted["output"])
    report = json.loads(Path(f"{converted['output']}.fxeq.json").read_text())
    assert_equalized(tiny, after, report)
    assert not torch.equal(after["fuse.bias"], tiny["fuse.bias"])  # the mean went into the bias
    TinyFuse(classes=3).load_state_dict(after, strict=True)


def test_convert_leaves_the_input_alone_and_writes_a_report(converted: dict[str, Any]) -> None:
    assert digest(converted["source"]) == converted["digest"]
    report = json.loads(Path(f"{converted['output']}.fxeq.json").read_text())
    assert [s["name"] for s in report["sites"]] == ["cat"]
    assert report["folded"] is True
    assert report["command"][:2] == ["fxeq", "convert"]
    assert report["checkpoint"] == {"path": str(converted["source"].resolve()), "sha256": converted["digest"]}
    assert report["output"]["sha256"] == digest(converted["output"])
    assert report["model"] == {"spec": "cli_models:TinyFuse", "kwargs": {"classes": 3}, "class": "cli_models.TinyFuse"}
    assert report["calibration_data"]["images"] == 4 and report["calibration"]["batches"] == 2
    assert {"torch", "torchvision", "fxeq"} <= report["versions"].keys()
    assert sorted(p.name for p in converted["output"].parent.iterdir()) == ["tiny.fxeq.pt", "tiny.fxeq.pt.fxeq.json"]


@pytest.mark.parametrize("wrap", ["ddp", "lightning", "safetensors"])
def test_convert_accepts_wrapped_and_safetensors_checkpoints(
    wrap: str, tmp_path: Path, images: Path, tiny: dict[str, torch.Tensor]
) -> None:
    if wrap == "safetensors":
        source = tmp_path / "tiny.safetensors"
        safetensors.torch.save_file(tiny, source)
    else:
        source = tmp_path / "tiny.pt"
        if wrap == "ddp":
            torch.save({f"module.{k}": v for k, v in tiny.items()}, source)
        else:  # Lightning: wrapped, and prefixed with the LightningModule's attribute name
            torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in tiny.items()}}, source)
    output = tmp_path / "out.safetensors"
    result = run_main("convert", source, *MODEL, "--calib", images, *DATA, "-o", output)
    assert result.returncode == 0, result.stderr
    after = load(output)
    assert_equalized(tiny, after, json.loads((tmp_path / "out.safetensors.fxeq.json").read_text()))
    TinyFuse(classes=3).load_state_dict(after, strict=True)


def test_convert_refuses_a_pickled_module_unless_trusted(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    model = TinyFuse(classes=3)
    source = tmp_path / "whole.pt"
    torch.save(model, source)
    args = ("convert", source, *MODEL, "--calib", images, *DATA, "-o", tmp_path / "out.pt")
    assert_fails(run_main(*args), 2, "pickled", "cli_models.TinyFuse", "runs code", "--trust-pickle")
    assert not (tmp_path / "out.pt").exists()
    result = run_main(*args, "--trust-pickle")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.pt.fxeq.json").read_text())
    assert_equalized(model.state_dict(), load(tmp_path / "out.pt"), report)


def test_convert_replaces_an_existing_output_with_force(ckpt: Path, images: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.pt"
    output.write_bytes(b"old")
    args = ("convert", ckpt, *MODEL, "--calib", images, *DATA, "-o", output)
    assert_fails(run_main(*args), 2, "exists", "--force")
    assert output.read_bytes() == b"old"
    assert run_main(*args, "--force").returncode == 0
    TinyFuse(classes=3).load_state_dict(load(output), strict=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_trust_pickle_reads_a_class_from_the_current_folder(
    cli: Run, tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with python -m, ./mymodels.py is importable: for --model and for the classes a pickle names."""
    (tmp_path / "mymodels.py").write_text(
        "from cli_models import TinyFuse\n\n\nclass Net(TinyFuse):\n    \"\"\"TinyFuse, defined here.\"\"\"\n"
    )
    spec = importlib.util.spec_from_file_location("mymodels", tmp_path / "mymodels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mymodels", module)
    spec.loader.exec_module(module)
    torch.save(module.Net(classes=3), tmp_path / "whole.pt")
    monkeypatch.delitem(sys.modules, "mymodels")  # fxeq must import it from the current folder
    result = cli("convert", "whole.pt", "--model", "mymodels:Net", "--model-kwargs", '{"classes": 3}', "--calib",
                 images, *DATA, "-o", "out.pt", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    TinyFuse(classes=3).load_state_dict(load(tmp_path / "out.pt"), strict=True)


def test_a_file_that_appears_during_the_run_is_left_alone(
    cli: Run, ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run takes OUT after fxeq checked it: fxeq places its files only on free names."""
    output = tmp_path / "out.pt"
    check_output = outputs.check_output

    def then_another_run_writes(*args: Any, **kwargs: Any) -> Path:
        checked = check_output(*args, **kwargs)
        output.write_bytes(b"another run's")
        return checked

    monkeypatch.setattr(outputs, "check_output", then_another_run_writes)
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "-o", output)
    assert_fails(result, 2, "out.pt appeared while fxeq was writing", "left as it is", "choose another output")
    assert output.read_bytes() == b"another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "tiny.pt"]


def test_a_failing_checkpoint_write_takes_its_report_back(
    cli: Run, ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report is placed first, the checkpoint second; if that fails, neither stays."""
    output = tmp_path / "out.pt"
    place = outputs.place

    def disk_full_for_the_checkpoint(tmp: Path, path: Path, *, replace: bool) -> None:
        if path == output:
            raise OSError(28, "No space left on device")
        place(tmp, path, replace=replace)

    monkeypatch.setattr(outputs, "place", disk_full_for_the_checkpoint)
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "-o", output)
    assert_fails(result, 2, f"no space left on the disk of {tmp_path} while writing out.pt; nothing was written "
                 "there. Free some space, or write to another disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


def test_force_checks_for_a_folder_in_the_way_before_writing(
    cli: Run, ckpt: Path, images: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out.pt"
    output.write_bytes(b"old")
    (tmp_path / "out.pt.fxeq.json").mkdir()
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "-o", output, "--force")
    assert_fails(result, 2, "out.pt.fxeq.json is a folder", "even with --force", "choose another output")
    assert output.read_bytes() == b"old"


def test_convert_smp_upernet(tmp_path: Path, images: Path) -> None:
    """A real smp model (captured with torch.export), .pt in, .safetensors out."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    kwargs = {"encoder_name": "resnet18", "encoder_weights": None, "classes": 3}
    torch.manual_seed(0)
    state = smp.UPerNet(**kwargs).state_dict()
    source, output = tmp_path / "upernet.pt", tmp_path / "upernet.fxeq.safetensors"
    torch.save(state, source)
    result = run_main(
        "convert", source, "--model", "segmentation_models_pytorch:UPerNet", "--model-kwargs", json.dumps(kwargs),
        "--calib", images, "--size", "64", "--batch-size", "2", "-o", output,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "upernet.fxeq.safetensors.fxeq.json").read_text())
    assert report["frontend"] == "export" and len(report["sites"]) == 2
    after = load(output)
    assert_equalized(state, after, report)
    smp.UPerNet(**kwargs).load_state_dict(after, strict=True)


# ---------------------------------------------------------------------------
# convert: bad usage and input (exit 2) and failures (exit 1)
# ---------------------------------------------------------------------------

def test_missing_checkpoint(tmp_path: Path, images: Path) -> None:
    result = run_main("convert", tmp_path / "nope.pt", *MODEL, "--calib", images, *DATA, "-o", tmp_path / "o.pt")
    assert_fails(result, 2, f"checkpoint {tmp_path / 'nope.pt'} does not exist; pass the path of a state_dict")


def test_a_folder_as_checkpoint(cli: Run, tmp_path: Path, images: Path) -> None:
    (tmp_path / "model").mkdir()
    result = cli("convert", "model", *MODEL, "--calib", images, *DATA, "-o", "o.pt")
    assert_fails(result, 2, "checkpoint model is a folder", "expected a checkpoint file", ".safetensors")


def test_random_bytes_as_checkpoint(cli: Run, tmp_path: Path, images: Path) -> None:
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 16)
    result = cli("convert", "noise.pt", *MODEL, "--calib", images, *DATA, "-o", "o.pt")
    assert_fails(result, 2, "noise.pt is not a readable PyTorch or safetensors checkpoint (UnpicklingError: ",
                 "written by torch.save", "Is it complete")
    assert "weights_only" not in result.stderr


def test_verbose_shows_the_traceback(tmp_path: Path, images: Path) -> None:
    result = run_main("convert", tmp_path / "nope.pt", *MODEL, "--calib", images, *DATA, "-o", tmp_path / "o.pt",
                      "--verbose")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "fxeq: error: " in result.stderr


def test_wrong_keys(tmp_path: Path, images: Path, tiny: dict[str, torch.Tensor]) -> None:
    state = dict(tiny)
    state["extra.weight"] = state.pop("head.weight")
    source = tmp_path / "tiny.pt"
    torch.save(state, source)
    result = run_main("convert", source, *MODEL, "--calib", images, *DATA, "-o", tmp_path / "o.pt")
    assert_fails(result, 2, "does not fit TinyFuse", "missing keys: 1 (head.weight)",
                 "unexpected keys: 1 (extra.weight)", "--model-kwargs")


def test_wrong_shapes(ckpt: Path, tmp_path: Path, images: Path) -> None:
    result = run_main("convert", ckpt, "--model", "cli_models:TinyFuse", "--calib", images, *DATA,
                      "-o", tmp_path / "o.pt")
    assert_fails(result, 2, "does not fit TinyFuse", "size mismatch", "--model-kwargs")


@pytest.mark.parametrize(
    ("files", "batch", "words"),
    [
        ([], "2", ["found 0 images in --calib ", "at least 2"]),
        (["generated"], "2", ["found 1 image in --calib ", "at least 2"]),
        (["generated", "generated"], "1", ["argument --batch-size: expected at least 2 images per batch, got '1'",
                                           "batch normalization", "Pass --batch-size 2 or more"]),
        (["generated", "generated", "broken.png"], "2", ["broken.png is not a readable image", "save it again"]),
        (["generated", "generated", "a-truncated.png"], "2", ["a-truncated.png is not a readable image", "corrupt"]),
        (["notes.txt"], "2", ["--calib ", "holds no jpg/jpeg/png/webp image, only other files: 1 .txt", "Convert"]),
    ],
    ids=["no-images", "one-image", "batch-size-1", "broken-image", "truncated-image", "no-image-files"],
)
def test_unusable_calibration_data(files: list[str], batch: str, words: list[str], ckpt: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    if "generated" in files:
        generate_images(calib, files.count("generated"), size=16)
    if "broken.png" in files:
        (calib / "broken.png").write_text("not a png")
    if "a-truncated.png" in files:  # a valid header: found when decoded, in the first batch
        (calib / "a-truncated.png").write_bytes((calib / "generated-texture-000.png").read_bytes()[:300])
    if "notes.txt" in files:
        (calib / "notes.txt").write_text("")
    result = run_main("convert", ckpt, *MODEL, "--calib", calib, "--size", "32", "--batch-size", batch,
                      "-o", tmp_path / "o.pt")
    assert_fails(result, 2, *words)
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (["--model", "no_such_module:Net"], ["could not import 'no_such_module'", "install it"]),
        (["--model", "cli_models:TinyFus"], ["has no attribute 'TinyFus'", "did you mean TinyFuse"]),
        (["--model", "cli_models:TinyFuse", "--model-kwargs", "{classes: 3}"], ["not valid JSON", "JSON object"]),
        (["--model", "cli_models:TinyFuse", "--model-kwargs", '{"colours": 3}'], ["colours", "keyword arguments"]),
    ],
    ids=["unknown-module", "unknown-callable", "bad-json", "bad-kwargs"],
)
def test_bad_model_arguments(model: list[str], words: list[str], ckpt: Path, tmp_path: Path, images: Path) -> None:
    result = run_main("convert", ckpt, *model, "--calib", images, *DATA, "-o", tmp_path / "o.pt")
    assert_fails(result, 2, *words)


def test_output_is_input(ckpt: Path, tmp_path: Path, images: Path) -> None:
    before = digest(ckpt)
    result = run_main("convert", ckpt, *MODEL, "--calib", images, *DATA, "-o", ckpt, "--force")
    assert_fails(result, 2, "is the input", "even with --force")
    assert digest(ckpt) == before


def test_the_outputs_report_is_never_written_over_the_input(
    ckpt: Path, cli: Run, tmp_path: Path, images: Path
) -> None:
    """``fxeq convert model.pt.fxeq.json -o model.pt --force`` would put model.pt's report on its input."""
    source = tmp_path / "model.pt.fxeq.json"
    ckpt.rename(source)
    before = digest(source)
    result = cli("convert", source, *MODEL, "--calib", images, *DATA, "-o", tmp_path / "model.pt", "--force")
    assert_fails(result, 2, "the output's report", "model.pt.fxeq.json is the input checkpoint", "even with --force")
    assert digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt.fxeq.json"]


def test_a_link_to_a_converted_checkpoint_is_not_converted_again(
    converted: dict[str, Any], cli: Run, images: Path, tmp_path: Path
) -> None:
    (tmp_path / "model.pt").symlink_to(converted["output"])
    result = cli("convert", "model.pt", *MODEL, "--calib", images, *DATA, "-o", "o.pt")
    assert_fails(result, 2, "model.pt was already equalized by fxeq", "tiny.fxeq.pt.fxeq.json lies beside it", "twice")


def test_converted_checkpoint_is_not_converted_again(converted: dict[str, Any], images: Path, tmp_path: Path) -> None:
    result = run_main("convert", converted["output"], *MODEL, "--calib", images, *DATA, "-o", tmp_path / "o.pt")
    assert_fails(result, 2, "was already equalized by fxeq", "twice", "original checkpoint")


def test_no_site_is_an_error_and_writes_nothing(tmp_path: Path, images: Path) -> None:
    source = tmp_path / "nofuse.pt"
    torch.save(NoFuse().state_dict(), source)
    result = run_main("convert", source, "--model", "cli_models:NoFuse", "--calib", images, *DATA,
                      "-o", tmp_path / "o.pt")
    assert_fails(result, 2, "found no fusion site in NoFuse", "nothing was written", "pass --all-concats")
    assert "fxeq: 0 sites" in result.stdout
    assert "calibrating on" not in result.stderr  # nothing was calibrated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nofuse.pt"]


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------

def test_inspect_prints_sites_and_writes_nothing(ckpt: Path, cli: Run, tmp_path: Path, images: Path) -> None:
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = cli("inspect", ckpt, *MODEL, "--calib", images, *DATA)
    assert result.returncode == 0, result.stderr
    assert "calibrated" in result.stdout and "site cat -> fuse; std max/min" in result.stdout
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_inspect_says_a_converted_checkpoint_is_one(converted: dict[str, Any], cli: Run, images: Path) -> None:
    result = cli("inspect", converted["output"], *MODEL, "--calib", images, *DATA)
    assert result.returncode == 0, result.stderr
    assert f"fxeq: {converted['output']} is a checkpoint equalized by fxeq" in result.stderr
    assert "the fusion inputs measured below are not, so their std ratios are the same as before" in result.stderr
    assert "every upstream fold is already in its weights" in result.stderr
    assert f"  converted from {converted['source'].resolve()}\n" in result.stderr
    assert re.search(r"\n  site cat -> fuse; std max/min \d+\.\d\d divided out", result.stderr)
    assert "site cat -> fuse; std max/min" in result.stdout  # and the measurement, as for any checkpoint


def test_inspect_says_a_lightning_checkpoint_equalized_by_the_callback_is_one(
    converted: dict[str, Any], cli: Run, images: Path, tmp_path: Path
) -> None:
    """ScaleEqualization keeps its report in the callback state of every checkpoint (fxeq/integrations/lightning.py)."""
    report = json.loads(report_path(converted["output"]).read_text())
    report["trainer"] = {"framework": "lightning", "global_step": 0}
    state = {f"model.{k}": v for k, v in load(converted["output"]).items()}
    torch.save({"epoch": 1, "state_dict": state, "callbacks": {"ScaleEqualization": {"report": report}}},
               tmp_path / "last.ckpt")
    result = cli("inspect", "last.ckpt", *MODEL, "--calib", images, *DATA, "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "finding the fusion sites" not in result.stderr  # --quiet: no progress notes, but what the numbers mean
    assert "fxeq: the checkpoint holds the report of fxeq's ScaleEqualization callback: it was equalized during " \
           "training. The fusion inputs measured below are as the equalized model computes them." in result.stderr
    measured = json.loads(result.stdout)
    assert measured["folded"] is False
    assert [i["std"] for i in measured["sites"][0]["inputs"]] == pytest.approx(
        [i["std"] for i in report["sites"][0]["inputs"]], rel=1e-4)  # the inputs, as the original computes them
    result = cli("convert", "last.ckpt", *MODEL, "--calib", images, *DATA, "-o", "out.pt")
    assert_fails(result, 2, "last.ckpt was already equalized by fxeq: it holds the report of fxeq's "
                 "ScaleEqualization callback", "twice",
                 "Use it as it is, or convert the checkpoint the run started from")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_inspect_of_a_checkpoint_whose_report_is_unreadable_says_so(
    ckpt: Path, cli: Run, images: Path, tmp_path: Path
) -> None:
    report_path(ckpt).write_text("{not json")
    result = cli("inspect", ckpt, *MODEL, "--calib", images, *DATA)
    assert result.returncode == 0, result.stderr
    assert f"fxeq: {ckpt} is a checkpoint equalized by fxeq ({report_path(ckpt)} lies beside it)" in result.stderr
    assert f"  (the report could not be read: ValueError: {report_path(ckpt)}: the report text is not valid JSON" \
           in result.stderr
    assert "site cat -> fuse; std max/min" in result.stdout


def test_inspect_counts_in_the_singular(cli: Run, tmp_path: Path) -> None:
    generate_images(tmp_path / "two", 2, size=32)
    result = cli("inspect", *MODEL, "--calib", tmp_path / "two", *DATA)
    assert result.returncode == 0, result.stderr
    assert "calibrating on 2 images from " in result.stderr and "(32x32 RGB, 1 batch of up to 2, cpu)" in result.stderr


def test_inspect_json(cli: Run, tmp_path: Path, images: Path) -> None:
    result = cli("inspect", *MODEL, "--calib", images, *DATA, "--all-concats", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["folded"] is False and "checkpoint" not in report
    (site,) = report["sites"]
    assert site["disequilibrium"] == pytest.approx(max(i["std"] for i in site["inputs"])
                                                   / min(i["std"] for i in site["inputs"]))
    producers = [(i["producer"], i["upsample"]) for i in site["inputs"]]
    assert producers == [("a.2 (ReLU)", None), ("b.2 (ReLU)", "bilinear")]
    assert report["skipped"] == []
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# fxeq itself
# ---------------------------------------------------------------------------

def test_version(cli: Run) -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout == f"fxeq {__version__}\n"


def test_no_command_prints_the_usage(cli: Run) -> None:
    result = cli()
    assert result.returncode == 2
    assert result.stderr == ("fxeq: error: no command given; expected one of convert, apply, inspect, demo (fxeq "
                             "--help shows the commands)\n")


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------

def test_demo_runs_end_to_end_in_an_earlier_demo_folder(tmp_path: Path) -> None:
    """The demo's own folder is reused: stale images go, the old output is replaced."""
    workdir = tmp_path / "demo"
    (workdir / "generated-calibration-images").mkdir(parents=True)
    (workdir / ".fxeq-demo").write_text("")
    (workdir / "generated-calibration-images" / "generated-texture-009.png").write_bytes(b"stale")
    (workdir / "deeplabv3_resnet50.fxeq.safetensors").write_bytes(b"old")
    result = run_cli("demo", "--workdir", workdir, "--size", "64", "--images", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "GENERATED 4 synthetic calibration images" in result.stderr
    assert "fxeq convert" in result.stderr and "--force" in result.stderr
    assert "site cat -> classifier.0.project.0; std max/min" in result.stdout
    assert "training set" in result.stdout
    generated = sorted(p.name for p in (workdir / "generated-calibration-images").iterdir())
    assert generated == [f"generated-texture-{i:03d}.png" for i in range(4)]
    state = load(workdir / "deeplabv3_resnet50.fxeq.safetensors")
    report = json.loads((workdir / "deeplabv3_resnet50.fxeq.safetensors.fxeq.json").read_text())
    assert_equalized(load(workdir / "deeplabv3_resnet50.pt"), state, report)
    torch.manual_seed(1)  # the demo seeds its own model: the same weights, the same report, on every run
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        seeded = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)
    assert torch.equal(load(workdir / "deeplabv3_resnet50.pt")["classifier.0.project.0.weight"],
                       seeded.state_dict()["classifier.0.project.0.weight"])


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    assert_fails(run_main("demo", "--workdir", tmp_path), 2, "not made by fxeq demo", "--workdir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# ---------------------------------------------------------------------------
# Every error caused by what was passed exits 2, naming the flag (trust, round 2)
# ---------------------------------------------------------------------------

def test_a_size_the_model_cannot_take_names_size(cli: Run, images: Path, tmp_path: Path) -> None:
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "checked.pt")
    result = cli("convert", "checked.pt", "--model", "cli_models:ShapeChecked", "--model-kwargs", '{"classes": 3}',
                 "--calib", images, "--size", "36", "--batch-size", "2", "-o", "out.pt")
    assert_fails(result, 2, "ShapeChecked does not run on the calibration images at --size 36 with --channels 3",
                 "(a batch of shape (2, 3, 36, 36))", "ValueError: Wrong input shape width=36",
                 "Fix: pass a --size the model takes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checked.pt"]


def test_a_model_of_other_input_channels_names_channels(cli: Run, images: Path, tmp_path: Path) -> None:
    torch.save(TinyFuse(classes=3, in_channels=1).state_dict(), tmp_path / "gray.pt")
    result = cli("convert", "gray.pt", "--model", "cli_models:TinyFuse", "--model-kwargs",
                 '{"classes": 3, "in_channels": 1}', "--calib", images, *DATA, "-o", "out.pt")
    assert_fails(result, 2, "TinyFuse does not run on the calibration images at --size 32 with --channels 3",
                 "(a batch of shape (2, 3, 32, 32))", "--channels with its input channels")


@pytest.mark.parametrize(("channels", "extra"), [
    (1, []), (4, ["--mean", "0.5,0.5,0.5,0.5", "--std", "0.25,0.25,0.25,0.25"]),
], ids=["grayscale", "rgba"])
def test_channels_decodes_the_images_as_the_model_takes_them(
    channels: int, extra: list[str], cli: Run, images: Path, tmp_path: Path
) -> None:
    torch.save(TinyFuse(classes=3, in_channels=channels).state_dict(), tmp_path / "m.pt")
    result = cli("convert", "m.pt", "--model", "cli_models:TinyFuse", "--model-kwargs",
                 json.dumps({"classes": 3, "in_channels": channels}), "--calib", images, *DATA,
                 "--channels", channels, *extra, "-o", "out.pt")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.pt.fxeq.json").read_text())
    assert report["preprocessing"]["channels"] == channels and len(report["preprocessing"]["mean"]) == channels
    assert report["example"]["args"][0]["shape"][1] == channels
    assert f"32x32 {'grayscale' if channels == 1 else 'RGBA'}" in result.stderr


def test_channels_needs_a_normalization_of_its_length(cli: Run, ckpt: Path, images: Path) -> None:
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "--channels", "4", "-o", "out.pt")
    assert_fails(result, 2, "--mean: --channels 4 (RGBA) has no default normalization; pass --mean and --std with "
                 "4 values each")
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "--mean", "0.5,0.5", "-o", "out.pt")
    assert_fails(result, 2, "--mean 0.5,0.5: expected 3 values, one per channel of --channels 3 (RGB)")
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "--std", "0.5,0,0.5", "-o", "out.pt")
    assert_fails(result, 2, "--std 0.5,0,0.5: every std must be positive")


def test_a_frontend_that_cannot_capture_names_frontend(cli: Run, images: Path, tmp_path: Path) -> None:
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "checked.pt")
    result = cli("convert", "checked.pt", "--model", "cli_models:ShapeChecked", "--model-kwargs", '{"classes": 3}',
                 "--calib", images, *DATA, "--frontend", "fx", "-o", "out.pt")
    assert_fails(result, 2, "--frontend fx could not capture ShapeChecked (fx: TraceError: ",
                 "pass --frontend auto to try every frontend")


def test_skip_reasons_in_the_table_name_the_flag(tmp_path: Path, images: Path) -> None:
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "tiny.pt")
    result = run_main("inspect", tmp_path / "tiny.pt", "--model", "cli_models:SameResolution", "--model-kwargs",
                      '{"classes": 3}', "--calib", images, *DATA)
    assert result.returncode == 0, result.stderr
    assert "skipped cat: no input comes from an upsampling op" in result.stdout
    assert "pass --all-concats" in result.stdout
    assert "all_concats=True" not in result.stdout + result.stderr


def test_a_folder_of_images_as_checkpoint_is_called_what_it_is(cli: Run, images: Path) -> None:
    result = cli("convert", images, *MODEL, "--calib", images, *DATA, "-o", "out")
    assert_fails(result, 2, "is a folder without config.json, so not a Hugging Face save_pretrained folder (it holds "
                 "2 .png files", "expected a checkpoint file")


@pytest.mark.parametrize(("name", "kind"), [("picture.png", "a PNG image"), ("notes.txt", "a text file")])
def test_an_image_or_text_file_as_checkpoint_is_not_one(name: str, kind: str, cli: Run, images: Path,
                                                        tmp_path: Path) -> None:
    path = tmp_path / name
    if name.endswith(".png"):
        Image.new("RGB", (8, 8)).save(path)
    else:
        path.write_text("weights are elsewhere\n")
    result = cli("convert", path, *MODEL, "--calib", images, *DATA, "-o", "out.pt")
    assert_fails(result, 2, f"{name} is not a checkpoint: it is {kind}")
    assert "--trust-pickle" not in result.stderr


def test_a_missing_model_prints_converts_usage(cli: Run, ckpt: Path, images: Path) -> None:
    result = cli("convert", ckpt, "--calib", images, "-o", "out.pt")
    assert result.returncode == 2
    assert result.stderr.startswith("fxeq: error: --model is required for a checkpoint file")
    assert result.stderr.endswith("(fxeq convert --help shows the arguments)\n") and result.stderr.count("\n") == 1


def test_quiet_prints_no_notes_but_the_report(cli: Run, ckpt: Path, images: Path) -> None:
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "--quiet", "-o", "out.pt")
    assert result.returncode == 0, result.stderr
    assert "fxeq: " not in result.stderr.replace("fxeq: warning", "")
    assert "fxeq: warning: skipped 1 file in " in result.stderr  # warnings still show
    assert "site cat -> fuse" in result.stdout


def test_a_full_disk_is_named(cli: Run, ckpt: Path, images: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil_usage(free=1024))
    result = cli("convert", ckpt, *MODEL, "--calib", images, *DATA, "-o", "out.pt")
    assert_fails(result, 2, f"no space left on the disk of {tmp_path} while writing out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


def shutil_usage(*, free: int) -> Any:
    import collections
    return collections.namedtuple("usage", "total used free")(1 << 30, (1 << 30) - free, free)


def test_inspect_of_a_converted_chained_model_gives_the_same_stds(tmp_path: Path) -> None:
    """smp UPerNet has chained sites: inspect must not fold the upstream site a second time on the converted one."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    generate_images(tmp_path / "images", 4, size=64)
    kwargs = {"encoder_name": "resnet18", "encoder_weights": None, "classes": 3, "decoder_channels": 32}
    torch.manual_seed(0)
    torch.save(smp.UPerNet(**kwargs).state_dict(), tmp_path / "upernet.pt")
    model = ["--model", "segmentation_models_pytorch:UPerNet", "--model-kwargs", json.dumps(kwargs)]
    data = ["--calib", tmp_path / "images", "--size", "64", "--batch-size", "2"]
    assert run_main("convert", tmp_path / "upernet.pt", *model, *data, "-o", tmp_path / "eq.pt").returncode == 0
    before = json.loads(run_main("inspect", tmp_path / "upernet.pt", *model, *data, "--json").stdout)
    after = run_main("inspect", tmp_path / "eq.pt", *model, *data, "--json")
    assert "equalized by fxeq" in after.stderr
    after_report = json.loads(after.stdout)
    # measured in one pass on weights that hold every upstream fold: exact, and the report says so
    assert after_report["calibration"]["passes"] == 1 and not after_report["calibration"]["one_pass"]
    assert after_report["calibration"]["semantics"] == "one site at a time, each measured after the folds upstream of it"
    assert len(before["sites"]) == 2 and before["sites"][1]["depends_on"]
    for a, b in zip(before["sites"], after_report["sites"], strict=True):
        for ia, ib in zip(a["inputs"], b["inputs"], strict=True):
            assert ib["std"] == pytest.approx(ia["std"], rel=1e-4), (a["name"], ia["index"])
