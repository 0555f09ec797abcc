"""The command line's failures: each caused by what was passed exits 2 with one line naming the flag; fxeq's own
exits 1; Ctrl-C exits 130. And the library's advice in the words of the command line's flags (fxeq.cli.errors).

Every run calls :func:`fxeq.cli.main` in this process on a tiny model (no subprocess start-up), and most fail
before any calibration.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_models import Pooled, SameResolution, TinyFuse, assert_fails, run_main

import fxeq
from fxeq.batches import EMPTY_LOADER
from fxeq.cli import commands, images
from fxeq.cli.errors import _FLAGS, for_cli, one_line
from fxeq.errors import CalibrationError, CaptureError
from fxeq.report import Report, report_path

MODEL = ["--model", "cli_models:TinyFuse", "--model-kwargs", '{"classes": 3}']
DATA = ["--size", "32", "--batch-size", "2", "--quiet"]



@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calib")
    images.generate_images(folder, 4, size=32)
    return folder


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(TinyFuse(classes=3).state_dict(), tmp_path / "tiny.pt")
    return tmp_path / "tiny.pt"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr, which must be the error alone, on one line (runs pass --quiet)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxeq: error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------
# The library's advice, in the command line's words: one real message per rule
# ---------------------------------------------------------------------------

def _skipped_same_resolution() -> str:
    (skipped,) = fxeq.find(SameResolution(classes=3), torch.randn(2, 3, 32, 32)).search.skipped
    return skipped.text


def _concrete_without_inplace() -> str:
    with pytest.raises(ValueError) as caught:
        fxeq.prepare(TinyFuse(), torch.randn(2, 3, 32, 32), frontend="concrete")
    return str(caught.value)


def _calibration_error(model: torch.nn.Module, example: torch.Tensor, batches: list[torch.Tensor],
                       **kwargs: float) -> str:
    prepared = fxeq.prepare(model, example, inplace=True)
    with pytest.raises(CalibrationError) as caught:
        fxeq.calibrate(prepared, batches, progress=False, **kwargs)
    return str(caught.value)


def _min_std_too_large() -> str:
    x = torch.randn(2, 3, 32, 32)
    return _calibration_error(TinyFuse(), x, [x], min_std=1e6)


def _empty_loader() -> str:
    message = _calibration_error(TinyFuse(), torch.randn(2, 3, 32, 32), [])
    assert message == EMPTY_LOADER
    return message


def _batch_of_one() -> str:
    x = torch.randn(1, 3, 32, 32)
    return _calibration_error(Pooled(), x, [x])


# (what the library says, made by calling it; what the command line says instead; what it may no longer say)
LIBRARY_MESSAGES: dict[str, tuple[Callable[[], str], list[str], list[str]]] = {
    "all_concats": (_skipped_same_resolution, ["pass --all-concats to equalize it"], ["all_concats"]),
    "frontend": (_concrete_without_inplace, ["--frontend concrete records one eager forward", "--frontend auto"],
                 ["frontend="]),
    "min_std": (_min_std_too_large, ["expected a std of at least --min-std 1e+06, found",
                                     "pass a smaller --min-std;", "use --batch-size 2 or more"],
                ["min_std", "batches of at least"]),
    "num_batches": (_empty_loader, ["--num-batches of at least 1 if you set it"], ["num_batches"]),
    "batch_size": (_batch_of_one, ["Expected more than 1 value per channel", "Use --batch-size 2 or more."],
                   ["batch size of at least"]),
}


@pytest.mark.parametrize("name", LIBRARY_MESSAGES)
def test_library_advice_is_given_with_the_flags(name: str) -> None:
    make, said, unsaid = LIBRARY_MESSAGES[name]
    message = for_cli(make())
    for words in said:
        assert words in message, message
    for words in unsaid:
        assert words not in message, message


def test_every_rule_rewrites_a_real_library_message() -> None:
    """No rule is dead: each pattern matches one of the messages the library gives today."""
    messages = [make() for make, _, _ in LIBRARY_MESSAGES.values()]
    for pattern, _ in _FLAGS:
        assert any(re.search(pattern, m) for m in messages), pattern


def test_one_line_keeps_the_first_line_of_a_quoted_cause_and_joins_the_rest() -> None:
    cause = RuntimeError("shapes differ\n  conv 3 got (2, 8)\n  expected (2, 9)")
    message = f"batch 0 failed: RuntimeError: {cause}\nUse a batch size of at least 2."
    assert one_line(message, cause) == "batch 0 failed: RuntimeError: shapes differ. Use a batch size of at least 2."
    assert one_line("tried:\n  fx: no\n  export: no") == "tried: fx: no. export: no"
    assert one_line("one line.") == "one line."


def test_a_failing_calibration_batch_is_one_line(
    calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library's message has two lines (the failure, then the advice); the command line's has one."""
    monkeypatch.setattr(images, "_batches", lambda count, size: tuple((i,) for i in range(count)))  # batches of 1
    torch.save(Pooled().state_dict(), tmp_path / "pooled.pt")
    result = run_main("convert", tmp_path / "pooled.pt", "--model", "cli_models:Pooled", "--calib", calib, *DATA,
                      "-o", tmp_path / "out.pt")
    assert_fails(result, 2, "calibration batch 0 (inputs (1, 3, 32, 32)) failed: ValueError: Expected more than 1 "
                 "value per channel when training, got input size torch.Size([1, 6, 1, 1]). Calibration runs batch "
                 "normalization with batch statistics", "Use --batch-size 2 or more.")
    one_error_line(result)
    assert names(tmp_path) == ["pooled.pt"]


def test_a_std_below_min_std_names_the_flag(ckpt: Path, calib: Path, tmp_path: Path) -> None:
    result = run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "--min-std", "1e6", "-o", tmp_path / "o.pt")
    assert_fails(result, 2, "input 0 (node ", "expected a std of at least --min-std 1e+06, found mean=",
                 "pass a smaller --min-std; nothing was modified.")
    one_error_line(result)
    assert names(tmp_path) == ["tiny.pt"]


# ---------------------------------------------------------------------------
# Values the parser refuses, naming the flag
# ---------------------------------------------------------------------------

def test_a_negative_value_is_shown_how_to_write_it(tmp_path: Path) -> None:
    result = run_main("inspect", "--model", "cli_models:TinyFuse", "--calib", tmp_path, "--std", "-0.2,0.2,0.2")
    assert result.returncode == 2
    assert result.stderr == ("fxeq: error: argument --std: expected one argument; a value that starts with "
                             "'-' is written --std=-VALUE (fxeq inspect --help shows the arguments)\n")


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--model", "segmentation_models_pytorch.UPerNet",
     "argument --model: expected MODULE:CALLABLE, e.g. segmentation_models_pytorch:UPerNet, got "
     "'segmentation_models_pytorch.UPerNet'"),
    ("--model-kwargs", "[150]", "argument --model-kwargs: expected a JSON object such as '{\"classes\": 150}', got "
                                "'[150]'"),
    ("--model-kwargs", "{classes: 3}", "argument --model-kwargs: not valid JSON (Expecting property name enclosed in "
                                       "double quotes"),
    ("--size", "0", "argument --size: expected a positive whole number, got '0'"),
    ("--num-batches", "many", "argument --num-batches: expected a positive whole number, got 'many'"),
    ("--mean", "0.5,x", "argument --mean: expected comma-separated numbers, one per channel, such as "
                        "0.485,0.456,0.406, got '0.5,x'"),
    ("--std", "nan", "argument --std: expected comma-separated numbers"),
    ("--min-std", "-1", "argument --min-std: expected a positive number such as 1e-6, got '-1'"),
    ("--batch-size", "1", "argument --batch-size: expected at least 2 images per batch, got '1': calibration runs "
                          "batch normalization with batch statistics"),
    ("--frontend", "torchscript", "argument --frontend: invalid choice: 'torchscript'"),
], ids=["model", "kwargs-not-object", "kwargs-not-json", "size", "num-batches", "mean", "std", "min-std",
        "batch-size", "frontend"])
def test_a_bad_value_names_its_flag(flag: str, value: str, words: str, tmp_path: Path) -> None:
    args = {"--model": "cli_models:TinyFuse", "--calib": str(tmp_path), flag: value}
    result = run_main("inspect", *[x for kv in args.items() for x in kv])
    assert_fails(result, 2, words)
    assert result.stderr.startswith("fxeq: error: ") and result.stderr.count("\n") == 1  # one line
    assert result.stderr.endswith("(fxeq inspect --help shows the arguments)\n")


@pytest.mark.parametrize(("args", "words"), [
    (["--size", "8"], ["argument --size: expected at least 9 pixels, got '8': deeplabv3_resnet50 computes its ASPP "
                       "features at 1/8 of the image", "Pass --size 9 or more"]),
    (["--size", "1"], ["argument --size: expected at least 9 pixels, got '1'"]),
    (["--images", "1"], ["argument --images: expected at least 2 images, got '1'", "Pass --images 2 or more"]),
])
def test_demo_refuses_sizes_and_counts_it_cannot_run(args: list[str], words: list[str], tmp_path: Path) -> None:
    result = run_main("demo", "--workdir", tmp_path / "demo", *args)
    assert_fails(result, 2, *words)
    assert "--all-concats" not in result.stderr  # advice demo can take
    assert list(tmp_path.iterdir()) == []


def test_help_documents_every_flag() -> None:
    """--quiet and --channels too; and the order auto tries the frontends in, for a model the CLI rewrites."""
    for command in ("convert", "inspect", "apply", "demo"):
        result = run_main(command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert "--quiet, -q no progress bars or progress notes on stderr (the report, warnings and errors still " \
               "print)" in text
        if command in ("convert", "inspect"):
            assert "--channels N the model's input channels, how images are decoded: 1 grayscale, 3 RGB, 4 RGBA " \
                   "(default: 3)" in text
            assert "--frontend {auto,fx,export,concrete}" in text
            assert "auto tries fx, then export, then the concrete trace" in text


# ---------------------------------------------------------------------------
# Inputs and outputs that cannot be used, named by their flag, before anything is written
# ---------------------------------------------------------------------------

def test_a_missing_calibration_folder_names_calib(ckpt: Path, tmp_path: Path) -> None:
    result = run_main("convert", ckpt, *MODEL, "--calib", tmp_path / "nowhere", *DATA, "-o", tmp_path / "o.pt")
    assert_fails(result, 2, f"--calib {tmp_path / 'nowhere'} does not exist or is not a folder; pass a folder of "
                 "jpg/jpeg/png/webp images (searched recursively)")
    one_error_line(result)
    assert names(tmp_path) == ["tiny.pt"]


def test_an_output_in_a_missing_folder_names_o(ckpt: Path, calib: Path, tmp_path: Path) -> None:
    output = tmp_path / "missing" / "o.pt"
    result = run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "-o", output)
    assert_fails(result, 2, f"-o {output}: the folder {output.parent} does not exist; create it first, or write into "
                 "an existing folder")
    one_error_line(result)
    assert names(tmp_path) == ["tiny.pt"]


def test_an_output_of_unknown_format_names_o(ckpt: Path, calib: Path, tmp_path: Path) -> None:
    result = run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "-o", tmp_path / "o.onnx")
    assert_fails(result, 2, f"-o {tmp_path / 'o.onnx'}: cannot tell the output format from 'o.onnx'; end the output "
                 "path with .safetensors or .pt or .pth")


@pytest.mark.parametrize(("plot", "words"), [
    ("p.txt", "the plot is written as PNG, so its path must end in .png; pass e.g. --plot "),
    ("missing/p.png", "the folder "),
    ("folder.png", "is a folder; pass the path of a .png file to write"),
    ("calib/p.png", "is inside "),
], ids=["suffix", "missing-folder", "a-folder", "inside-calib"])
def test_plot_is_checked_before_anything_is_written(
    plot: str, words: str, ckpt: Path, calib: Path, tmp_path: Path
) -> None:
    (tmp_path / "folder.png").mkdir()
    own_calib = tmp_path / "calib"
    own_calib.mkdir()
    for image in calib.iterdir():
        (own_calib / image.name).write_bytes(image.read_bytes())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_main("convert", ckpt, *MODEL, "--calib", own_calib, *DATA, "--plot", tmp_path / plot,
                      "-o", tmp_path / "o.pt")
    assert_fails(result, 2, f"--plot {tmp_path / plot}", words)
    one_error_line(result)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_plot_without_matplotlib_names_the_extra(
    ckpt: Path, calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run_main("inspect", ckpt, *MODEL, "--calib", calib, *DATA, "--plot", tmp_path / "p.png")
    assert_fails(result, 2, "--plot needs matplotlib, which is not installed: pip install -e '.[plot]'",
                 "or leave --plot out")
    assert names(tmp_path) == ["tiny.pt"]


def test_plot_draws_the_report_in_one_step(ckpt: Path, calib: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "p.png").write_bytes(b"an older plot")
    result = run_main("inspect", ckpt, *MODEL, "--calib", calib, *DATA, "--plot", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'p.png'}" in result.stdout
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    assert names(tmp_path) == ["p.png", "tiny.pt"]  # no temporary left
    result = run_main("inspect", ckpt, *MODEL, "--calib", calib, "--size", "32", "--batch-size", "2", "--json",
                      "--plot", tmp_path / "p.png")
    assert json.loads(result.stdout)["sites"]  # the JSON alone on stdout
    assert f"fxeq: wrote {tmp_path / 'p.png'}" in result.stderr


def test_the_plot_of_a_converted_checkpoint_shows_what_its_convs_receive(ckpt: Path, calib: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "tiny.fxeq.pt"
    assert run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "-o", out).returncode == 0
    drawn: dict[str, object] = {}
    real = Report.plot

    def spy(self: Report, path: Path, **kwargs: object) -> Path:
        drawn.update(kwargs, stats={k: v.std for k, v in self.stats.items()})
        return real(self, path, **kwargs)

    monkeypatch.setattr(Report, "plot", spy)
    result = run_main("inspect", out, *MODEL, "--calib", calib, *DATA, "--plot", tmp_path / "again.png")
    assert result.returncode == 0, result.stderr
    conversion = Report.read(report_path(out))
    assert drawn["title"] == "TinyFuse"
    assert drawn["folded"] == {k: v.std for k, v in conversion.stats.items()}
    # measured on the same images, the converted model's inputs are the original's: its convs receive std 1
    for key, std in drawn["stats"].items():
        assert std / drawn["folded"][key] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(("content", "words"), [
    ([1, 2], "expected a state_dict (a mapping of names to tensors), found a list. Save the model with "
             "torch.save(model.state_dict(), path)."),
    ({"epoch": 3, "optimizer": {"lr": 0.1}}, "expected a state_dict, or a dict holding one under 'state_dict' or "
                                             "'model'; found keys epoch, optimizer, and the value at 'epoch' is of "
                                             "type int, not a tensor"),
], ids=["a-list", "no-tensors"])
def test_a_file_holding_no_state_dict(content: object, words: str, calib: Path, tmp_path: Path) -> None:
    torch.save(content, tmp_path / "x.pt")
    result = run_main("inspect", tmp_path / "x.pt", *MODEL, "--calib", calib, *DATA)
    assert_fails(result, 2, f"{tmp_path / 'x.pt'}: ", words)


def test_inspect_of_a_missing_checkpoint(calib: Path, tmp_path: Path) -> None:
    result = run_main("inspect", tmp_path / "nope.pt", *MODEL, "--calib", calib, *DATA)
    assert_fails(result, 2, f"checkpoint {tmp_path / 'nope.pt'} does not exist; pass the path of a state_dict saved "
                 "as .pt/.pth (torch.save) or .safetensors")


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "cli_models:TESTS"], "--model cli_models:TESTS: TESTS is a PosixPath, not a class or function"),
    (["--model", "cli_models:subprocess_env"], "--model cli_models:subprocess_env returned a dict, expected a "
                                               "torch.nn.Module"),
    ([*MODEL, "--device", "abacus"], "--device abacus: not usable here ("),
], ids=["not-callable", "not-a-module", "device"])
def test_a_model_or_device_that_cannot_be_used(args: list[str], words: str, calib: Path) -> None:
    if sys.platform == "win32" and "TESTS" in args[1]:
        pytest.skip("a WindowsPath there")
    result = run_main("inspect", *args, "--calib", calib, *DATA)
    assert_fails(result, 2, words)
    one_error_line(result)


def test_no_frontend_capturing_the_model_names_each_failure(
    calib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"fx": "TraceError: symbolically traced variables cannot be used as inputs to control flow",
                "export": "UserError: data-dependent branch", "concrete": "RuntimeError: unsupported op"}

    def fails(*args: object, **kwargs: object) -> None:
        raise CaptureError("no frontend could capture TinyFuse", stage="trace", failures=failures)

    monkeypatch.setattr(commands, "prepare", fails)
    result = run_main("inspect", *MODEL, "--calib", calib, *DATA)
    assert_fails(result, 2, "no frontend could capture TinyFuse (fx: TraceError: symbolically traced variables",
                 "; export: UserError: data-dependent branch; concrete: RuntimeError: unsupported op)",
                 "--verbose shows the traceback")


# ---------------------------------------------------------------------------
# fxeq's own failures (exit 1) and Ctrl-C (exit 130)
# ---------------------------------------------------------------------------

def test_fxeqs_own_failure_exits_1_and_says_so(
    ckpt: Path, calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an internal invariant broke\n  in pass 2")

    monkeypatch.setattr(commands, "calibrate", bug)
    result = run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "-o", tmp_path / "o.pt")
    assert_fails(result, 1, "RuntimeError: an internal invariant broke. in pass 2 (this is fxeq's failure, not "
                 "yours: run again with --verbose for the traceback, and report it)")
    one_error_line(result)
    assert names(tmp_path) == ["tiny.pt"]
    verbose = run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "-o", tmp_path / "o.pt", "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "fxeq's failure" not in verbose.stderr


def test_ctrl_c_exits_130(ckpt: Path, calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "calibrate", interrupted)
    result = run_main("convert", ckpt, *MODEL, "--calib", calib, *DATA, "-o", tmp_path / "o.pt")
    assert result.returncode == 130
    assert one_error_line(result) == ("fxeq: error: interrupted; fxeq places each output whole or not at all, so "
                                      "none is half-written")
    assert names(tmp_path) == ["tiny.pt"]
