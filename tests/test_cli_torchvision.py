"""torchvision that cannot run beside torch (fxeq._torchvision): one clear sentence with the command that fixes it."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest
import torch
from cli_models import assert_fails, run_main

from fxeq import _torchvision
from fxeq._torchvision import TorchvisionError, install_command, torchvision

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _imports_failing_with(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Importing torchvision (or a submodule) raises ``error``; any other module imports as usual."""
    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> types.ModuleType:
        if name.split(".")[0] == "torchvision":
            raise error
        return real(name, package)

    monkeypatch.setattr(_torchvision, "importlib", types.SimpleNamespace(import_module=import_module))


def test_the_install_command_keeps_the_installed_torch_without_its_local_label(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    assert install_command() == ("pip uninstall -y torch torchvision && pip install torch==2.7.1 torchvision "
                                 f"--index-url {CPU_INDEX}")


def test_a_torchvision_built_for_another_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA torchvision says beside a CPU torch: an operator of its C++ library is missing."""
    _imports_failing_with(monkeypatch, RuntimeError("operator torchvision::nms does not exist\n  (more lines)"))
    monkeypatch.setattr(torch.version, "cuda", None)
    version = torch.__version__.split("+")[0]
    with pytest.raises(TorchvisionError) as caught:
        torchvision("io")
    message = str(caught.value)
    assert message == (
        f"torchvision cannot run beside torch {torch.__version__}: it was built for another torch (operator "
        "torchvision::nms does not exist). Install the two together from one index, on a CPU: pip uninstall -y "
        f"torch torchvision && pip install torch=={version} torchvision --index-url {CPU_INDEX} (for a CUDA build, "
        "replace cpu in the index with the cuXYZ of your CUDA version, e.g. cu126)"
    )


@pytest.mark.parametrize(("name", "problem"), [
    ("torchvision", "torchvision is not installed; "),
    ("torchvision._C", "torchvision failed to import (No module named 'torchvision._C'); "),
], ids=["missing", "broken"])
def test_a_missing_or_broken_torchvision(name: str, problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _imports_failing_with(monkeypatch, ModuleNotFoundError(f"No module named {name!r}", name=name))
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(TorchvisionError) as caught:
        torchvision()
    message = str(caught.value)
    assert message.startswith(problem + "fxeq needs it to read images and to build the demo model. Install it for "
                              f"the torch you have (torch {torch.__version__}), on a CPU: {install_command()} ")
    assert message.endswith("(for a CUDA build, replace cpu in the index with cu126)")


def test_demo_says_it_in_one_line_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _imports_failing_with(monkeypatch, RuntimeError("operator torchvision::nms does not exist"))
    result = run_main("demo", "--workdir", tmp_path / "demo")
    assert_fails(result, 2, f"torchvision cannot run beside torch {torch.__version__}", install_command())
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
