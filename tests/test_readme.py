"""Every Python snippet in the README runs on its own, as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_README = Path(__file__).resolve().parents[1] / "README.md"
_SNIPPETS = re.findall(r"^```python\n(.*?)^```", _README.read_text(), flags=re.M | re.S)


def test_the_readme_has_snippets() -> None:
    assert len(_SNIPPETS) >= 3


@pytest.mark.parametrize("code", _SNIPPETS, ids=[f"snippet-{k + 1}" for k in range(len(_SNIPPETS))])
def test_snippet_runs_alone(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for package in ("transformers", "lightning", "segmentation_models_pytorch"):
        if package in code:
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(_README), "exec"), {"__name__": "__readme__"})  # a fresh namespace each
