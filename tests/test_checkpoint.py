"""Checkpoints (fxeq.cli.checkpoints, fxeq.cli.outputs, fxeq.files): reading safely, clear refusals, and writing a checkpoint (a file or a
save_pretrained folder) with its report as a unit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from fxeq import files
from fxeq.cli import hf, outputs
from fxeq.cli.checkpoints import load_into, load_state_dict
from fxeq.cli.outputs import check_not_converted, check_output, check_output_folder, save_converted
from fxeq.report import converted_report, report_path

STATE = {"w": torch.arange(4.0)}
DOUBLE_PERIOD = re.compile(r"(?<!\.)\.\.(?!\.)")  # "..", but not an ellipsis


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    """The message names the file and torch's own error, without its advice to turn weights_only off."""
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=r"noise\.pt is not a readable PyTorch or safetensors checkpoint "
                                         r"\(UnpicklingError: .+\); expected a state_dict written by torch\.save, "
                                         r"or a \.safetensors file\. Is it complete") as info:
        load_state_dict(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_torch_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(STATE, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable PyTorch or safetensors checkpoint \(.*zip"):
        load_state_dict(path)


def test_a_broken_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(STATE, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable safetensors checkpoint \(.+\); "
                                         r"expected a file written by safetensors"):
        load_state_dict(path)


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=r"is a folder without config\.json, so not a Hugging Face "
                                                r"save_pretrained folder \(it is empty\); expected a checkpoint file: a "
                                                r"state_dict saved as \.pt/\.pth \(torch\.save\) or \.safetensors, "
                                                r"or a folder written by save_pretrained"):
        load_state_dict(tmp_path)


def test_an_unimportable_pickled_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fxeq_vanishing.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fxeq_vanishing  # noqa: PLC0415 - written just above

    torch.save(fxeq_vanishing.Net(1, 1), tmp_path / "whole.pt")
    monkeypatch.delitem(sys.modules, "fxeq_vanishing")
    (tmp_path / "fxeq_vanishing.py").unlink()
    with pytest.raises(ValueError, match=r"could not unpickle .*whole\.pt \(ModuleNotFoundError: No module named "
                                         r"'fxeq_vanishing'\): the classes it holds must be importable\. Run fxeq "
                                         r"from the folder that holds their module"):
        load_state_dict(tmp_path / "whole.pt", trust_pickle=True)


def test_a_shape_mismatch_reads_as_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"does not fit Linear: size mismatch for weight: copying a param with shape "
                                         r"torch\.Size\(\[3, 2\]\) from checkpoint, the shape in current model is "
                                         r"torch\.Size\(\[4, 2\]\); size mismatch for bias: .*torch\.Size\(\[4\]\)\. "
                                         r"Check --model-kwargs") as info:
        load_into(nn.Linear(2, 4), nn.Linear(2, 3).state_dict())
    assert not DOUBLE_PERIOD.search(str(info.value))


# ---------------------------------------------------------------------------
# The input is never overwritten; converted checkpoints are recognized
# ---------------------------------------------------------------------------

def test_the_outputs_report_may_not_be_the_input(tmp_path: Path) -> None:
    """``fxeq convert model.pt.fxeq.json -o model.pt`` would write its report over the input."""
    source = tmp_path / "model.pt.fxeq.json"
    source.write_text("{}")
    with pytest.raises(ValueError, match=r"the output's report .*model\.pt\.fxeq\.json is the input checkpoint .*; "
                                         r"fxeq never overwrites its input, even with --force"):
        check_output(tmp_path / "model.pt", source=source, force=True)


@pytest.mark.parametrize("linked", ["output", "input"])
def test_links_are_resolved_before_comparing_output_and_input(linked: str, tmp_path: Path) -> None:
    target, link = tmp_path / "model.pt", tmp_path / "link.pt"
    torch.save(STATE, target)
    link.symlink_to(target)
    output, source = (link, target) if linked == "output" else (target, link)
    with pytest.raises(ValueError, match=r"the output .* is the input checkpoint"):
        check_output(output, source=source, force=True)


@pytest.mark.parametrize("folder", ["out.pt", "out.pt.fxeq.json"])
def test_a_folder_in_the_way_is_refused_even_with_force(folder: str, tmp_path: Path) -> None:
    (tmp_path / folder).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"{re.escape(folder)} is a folder, where fxeq would write a "
                                                r"file \(even with --force, it replaces files only\); choose another"):
        check_output(tmp_path / "out.pt", source=tmp_path / "in.pt", force=True)


def test_a_dangling_link_counts_as_an_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out.pt").symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(FileExistsError, match=r"out\.pt exists; pass --force to replace it"):
        check_output(tmp_path / "out.pt", source=tmp_path / "in.pt")


def test_a_link_to_a_converted_checkpoint_is_converted(tmp_path: Path) -> None:
    save_converted(STATE, tmp_path / "converted.pt", {})
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "model.pt"
    link.symlink_to(tmp_path / "converted.pt")
    assert converted_report(link) == tmp_path / "converted.pt.fxeq.json"
    with pytest.raises(ValueError, match=r"model\.pt was already equalized by fxeq \(.*converted\.pt\.fxeq\.json lies "
                                         r"beside it\); equalizing it again would divide .* twice"):
        check_not_converted(link)


# ---------------------------------------------------------------------------
# Writing a checkpoint and its report as a unit
# ---------------------------------------------------------------------------

def test_save_converted_writes_both_and_records_the_digest(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    assert save_converted(STATE, out, {"sites": []}) == report_path(out)
    record = json.loads(report_path(out).read_text())
    assert record["output"] == {"path": str(out.resolve()), "sha256": outputs.digest(out)}
    torch.testing.assert_close(safetensors.torch.load_file(out), STATE)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~files.umask())
    assert names(tmp_path) == ["out.safetensors", "out.safetensors.fxeq.json"]


@pytest.mark.parametrize("fault", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("earlier", [False, True], ids=["new", "forced-over-earlier"])
def test_a_failure_between_the_two_writes_leaves_the_files_as_they_were(
    fault: BaseException, earlier: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report is placed first; if placing the checkpoint fails, the report is put back as it was."""
    out = tmp_path / "out.pt"
    if earlier:
        out.write_bytes(b"old checkpoint")
        report_path(out).write_text("old report")
    place = outputs.place

    def fail_on_checkpoint(tmp: Path, path: Path, *, replace: bool) -> None:
        if path == out:
            raise fault
        place(tmp, path, replace=replace)

    monkeypatch.setattr(outputs, "place", fail_on_checkpoint)
    with pytest.raises(type(fault)):
        save_converted(STATE, out, {}, force=earlier)
    if earlier:
        assert out.read_bytes() == b"old checkpoint" and report_path(out).read_text() == "old report"
    assert names(tmp_path) == (["out.pt", "out.pt.fxeq.json"] if earlier else [])


@pytest.mark.parametrize("taken", ["out.pt", "out.pt.fxeq.json"])
def test_a_file_that_appears_meanwhile_is_not_replaced(taken: str, tmp_path: Path) -> None:
    """Without force, each file is placed only if its name is free, checked as it is placed."""
    (tmp_path / taken).write_bytes(b"another run's")
    with pytest.raises(FileExistsError, match=rf"{re.escape(taken)} appeared while fxeq was writing \(another run "
                                              r"writing to the same output\?\) and was left as it is; choose another "
                                              r"output, or pass --force"):
        save_converted(STATE, tmp_path / "out.pt", {})
    assert (tmp_path / taken).read_bytes() == b"another run's"
    assert names(tmp_path) == [taken]


def test_without_hard_links_an_exclusive_create_claims_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    save_converted(STATE, tmp_path / "out.pt", {})
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), STATE)
    (tmp_path / "taken.pt").write_bytes(b"another run's")
    with pytest.raises(FileExistsError, match=r"taken\.pt appeared while fxeq was writing"):
        save_converted(STATE, tmp_path / "taken.pt", {})
    assert (tmp_path / "taken.pt").read_bytes() == b"another run's"
    assert names(tmp_path) == ["out.pt", "out.pt.fxeq.json", "taken.pt"]


_SLOW_WRITER = """
import sys, time
import torch
from fxeq import files
from fxeq.cli import hf, outputs
from fxeq.report import FOLDER_REPORT, report_path

def slow_save(obj, file):  # torch.save, given the open temporary file
    file.write(b"the first bytes of a large checkpoint")
    file.flush()
    print("writing", flush=True)
    time.sleep(60)

torch.save = slow_save
outputs.save_converted({"w": torch.ones(1)}, sys.argv[1], {})
"""


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, None)])
def test_a_signal_during_the_write_leaves_no_temporary_file(signum: int, status: int | None, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_SLOW_WRITER))
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()
    with subprocess.Popen([sys.executable, driver, out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        assert process.stdout is not None and process.stdout.readline() == "writing\n"
        assert [p.name for p in out.parent.iterdir() if ".tmp" in p.name]  # the write is under way
        process.send_signal(signum)
        process.wait(timeout=60)
    assert process.returncode != 0
    if status is not None:
        assert process.returncode == status
    assert names(out.parent) == []


# ---------------------------------------------------------------------------
# save_pretrained folders: checked, written as a unit, renamed into place
# ---------------------------------------------------------------------------

def write_model(folder: Path) -> None:
    """What save_pretrained writes, in miniature (safetensors makes owner-only files)."""
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    safetensors.torch.save_file(STATE, folder / "model.safetensors")


def test_save_converted_folder_writes_the_model_the_copies_and_the_report_inside(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "preprocessor_config.json").write_text('{"size": 64}')
    out = tmp_path / "out"
    report = outputs.save_converted_folder(write_model, out, {"sites": []},
                                              copy=[tmp_path / "in" / "preprocessor_config.json"])
    assert report == out / "fxeq.json"
    assert names(out) == ["config.json", "fxeq.json", "model.safetensors", "preprocessor_config.json"]
    assert (out / "preprocessor_config.json").read_text() == '{"size": 64}'
    assert json.loads(report.read_text())["output"] == {"path": str(out.resolve()), "sha256": outputs.digest(out)}
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~files.umask())
    assert names(tmp_path) == ["in", "out"]
    assert converted_report(out) == report


def test_a_folders_digest_is_that_of_its_top_level_files_but_the_report(tmp_path: Path) -> None:
    write_model(tmp_path)
    before = outputs.digest(tmp_path)
    (tmp_path / "fxeq.json").write_text("{}")
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "optimizer.pt").write_bytes(b"not part of the model")
    assert outputs.digest(tmp_path) == before
    safetensors.torch.save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert outputs.digest(tmp_path) != before


@pytest.mark.parametrize("other", ["empty", "filled"])
def test_a_folder_that_appears_meanwhile_is_left_alone(other: str, tmp_path: Path) -> None:
    """Without force, an empty placeholder claims the name (rename alone would replace an empty folder)."""
    out = tmp_path / "out"
    out.mkdir()
    if other == "filled":
        (out / "theirs.txt").write_text("another run's")
    with pytest.raises(FileExistsError, match=r"out appeared while fxeq was writing \(another run writing to the "
                                              r"same output\?\) and was left as it is; choose another output"):
        outputs.save_converted_folder(write_model, out, {})
    assert names(out) == ([] if other == "empty" else ["theirs.txt"])
    assert names(tmp_path) == ["out"]


def test_a_folder_written_into_the_placeholder_meanwhile_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    mkdir = os.mkdir

    def then_another_run_writes(path: Any, *args: Any) -> None:
        mkdir(path, *args)
        if Path(path) == out:
            (out / "theirs.txt").write_text("another run's")

    monkeypatch.setattr(os, "mkdir", then_another_run_writes)
    with pytest.raises(FileExistsError, match=r"out appeared while fxeq was writing"):
        outputs.save_converted_folder(write_model, out, {})
    assert names(out) == ["theirs.txt"]
    assert names(tmp_path) == ["out"]


def test_force_replaces_an_earlier_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "stale.bin").write_bytes(b"old weights")
    outputs.save_converted_folder(write_model, out, {}, force=True)
    assert names(out) == ["config.json", "fxeq.json", "model.safetensors"]
    assert names(tmp_path) == ["out"]  # nothing left aside


@pytest.mark.parametrize("step", ["save", "rename"])
def test_a_failing_folder_write_leaves_the_earlier_folder_as_it_was(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")

    def failing_save(folder: Path) -> None:
        write_model(folder)
        raise OSError(28, "No space left on device")

    rename = os.rename

    def failing_rename(src: Any, dst: Any) -> None:
        if Path(src).name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    if step == "rename":
        monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="(?i)no space left on"):
        outputs.save_converted_folder(failing_save if step == "save" else write_model, out, {}, force=True)
    assert names(out) == ["config.json"] and (out / "config.json").read_text() == "old"
    assert names(tmp_path) == ["out"]


def test_check_output_folder_accepts_a_new_folder_and_forced_model_or_empty_ones(tmp_path: Path) -> None:
    assert check_output_folder(tmp_path / "new", source=tmp_path / "in") == tmp_path / "new"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for existing in ("model", "empty"):
        with pytest.raises(FileExistsError, match=rf"{existing} exists; pass --force to replace it"):
            check_output_folder(tmp_path / existing, source=tmp_path / "in")
        check_output_folder(tmp_path / existing, source=tmp_path / "in", force=True)


@pytest.mark.parametrize(("output", "error", "words"), [
    ("out.safetensors", ValueError, r"the input is a Hugging Face save_pretrained folder, so the output is one too, "
                                    r"and .*out\.safetensors ends in \.safetensors; pass a folder path without it, "
                                    r"e\.g\. .*out-fxeq"),
    ("in", ValueError, r"the output .*in is the input .*in or holds it; fxeq never overwrites its input, even with "
                       r"--force\. Write to a new folder\."),
    ("link", ValueError, r"the output .*link is the input"),
    (".", ValueError, r"the output \. is the input .*in or holds it"),
    ("file", NotADirectoryError, r"file exists and is not a folder, where fxeq would write a save_pretrained folder "
                                 r"\(even with --force, it replaces folders only\)"),
    ("notes", ValueError, r"notes holds files but neither config\.json nor fxeq\.json: even with --force, fxeq "
                          r"replaces only folders that save_pretrained or fxeq wrote, or empty ones"),
    ("missing/out", FileNotFoundError, r"-o missing/out: the folder missing does not exist; create it first, or "
                                       r"write into an existing folder"),
], ids=["suffix", "input", "link-to-input", "holds-the-input", "file-in-the-way", "not-a-model-folder", "no-parent"])
def test_check_output_folder_refusals(
    output: str, error: type[Exception], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    (tmp_path / "file").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(error, match=words):
        check_output_folder(Path(output), source=Path("in"), force=True)


def test_a_converted_folder_is_refused_as_input(tmp_path: Path) -> None:
    outputs.save_converted_folder(write_model, tmp_path / "converted", {})
    with pytest.raises(ValueError, match=r"converted was already equalized by fxeq \(.*converted/fxeq\.json lies in "
                                         r"it\); equalizing it again would divide .* twice"):
        check_not_converted(tmp_path / "converted")


def test_a_folder_without_transformers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path)
    (tmp_path / hf.PREPROCESSOR_CONFIG).write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    message = (r"is a Hugging Face save_pretrained folder \(it holds config\.json\); reading it needs the "
               r"transformers package, which is not installed\. Install fxeq's Hugging Face extra: "
               r"pip install -e '\.\[hf\]'")
    with pytest.raises(ValueError, match=message):
        hf.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        hf.load_image_processor(tmp_path)
    assert hf.is_pretrained_folder(tmp_path) and not hf.is_pretrained_folder(tmp_path / "config.json")
