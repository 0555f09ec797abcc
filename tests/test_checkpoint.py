"""Checkpoints (fxeq.checkpoint): reading safely, clear refusals, and writing a checkpoint with its report as a unit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from fxeq import checkpoint
from fxeq.checkpoint import (
    check_not_converted,
    check_output,
    converted_report,
    load_into,
    load_state_dict,
    report_path,
    save_converted,
)

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
                                         r"or a \.safetensors file\. If it holds pickled Python objects and you "
                                         r"trust where it comes from, --trust-pickle") as info:
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
    with pytest.raises(IsADirectoryError, match=r"is a folder; expected a checkpoint file: a state_dict saved as "
                                                r"\.pt/\.pth \(torch\.save\) or \.safetensors"):
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
    with pytest.raises(ValueError, match=r"model\.pt was written by fxeq convert \(.*converted\.pt\.fxeq\.json lies "
                                         r"beside it\); converting it again would divide .* twice"):
        check_not_converted(link)


# ---------------------------------------------------------------------------
# Writing a checkpoint and its report as a unit
# ---------------------------------------------------------------------------

def test_save_converted_writes_both_and_records_the_digest(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    assert save_converted(STATE, out, {"sites": []}) == report_path(out)
    record = json.loads(report_path(out).read_text())
    assert record["output"] == {"path": str(out.resolve()), "sha256": checkpoint.sha256(out)}
    torch.testing.assert_close(safetensors.torch.load_file(out), STATE)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~checkpoint._umask())
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
    place = checkpoint._place

    def fail_on_checkpoint(tmp: Path, path: Path, *, replace: bool) -> None:
        if path == out:
            raise fault
        place(tmp, path, replace=replace)

    monkeypatch.setattr(checkpoint, "_place", fail_on_checkpoint)
    with pytest.raises(type(fault)):
        save_converted(STATE, out, {}, force=earlier)
    if earlier:
        assert out.read_bytes() == b"old checkpoint" and report_path(out).read_text() == "old report"
    assert names(tmp_path) == (["out.pt", "out.pt.fxeq.json"] if earlier else [])


@pytest.mark.parametrize("taken", ["out.pt", "out.pt.fxeq.json"])
def test_a_file_that_appears_meanwhile_is_not_replaced(taken: str, tmp_path: Path) -> None:
    """Without force, each file is placed only if its name is free, checked as it is placed."""
    (tmp_path / taken).write_bytes(b"another run's")
    with pytest.raises(FileExistsError, match=rf"{re.escape(taken)} appeared while fxeq was writing \(another fxeq "
                                              r"convert to the same output\?\) and was left as it is; choose another "
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
from pathlib import Path
import torch
from fxeq import checkpoint

def slow_save(obj, file):
    Path(file).write_bytes(b"the first bytes of a large checkpoint")
    print("writing", flush=True)
    time.sleep(60)

torch.save = slow_save
checkpoint.save_converted({"w": torch.ones(1)}, sys.argv[1], {})
"""


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
