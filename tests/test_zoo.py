"""Real segmentation models: torchvision (fx) and segmentation-models-pytorch (export).

The models are the benchmarks' test zoo (``benchmarks/_common.py``,
``TEST_ZOO``: torchvision deeplabv3 and five smp decoders on two encoders),
built there, so that ``capture_cost.py`` times the models tested here. Each
is transformed with random weights and random calibration batches, then
checked against the explicit equalizer attached to the original model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from models import explicit_oracle
from torch import nn

import fxeq
from fxeq.capturing import capture

pytest.importorskip("segmentation_models_pytorch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _common  # noqa: E402 - the benchmarks folder, put on the path above

pytestmark = pytest.mark.slow


def _frontend(name: str) -> str:
    """fx traces torchvision's models and smp's Unet; the other smp decoders check shapes in forward: export."""
    entry = _common.ZOO[name]
    return "fx" if entry.library == "torchvision" or entry.constructor == "Unet" else "export"


@pytest.mark.parametrize("name", _common.TEST_ZOO)
def test_zoo_model(name: str) -> None:
    frontend = _frontend(name)
    model: nn.Module = _common.build_model(name, seed=0)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    original = {k: v.clone() for k, v in model.state_dict().items()}

    deployed = fxeq.transform(model, data)
    report = deployed.fxeq_report
    assert report.frontend == frontend
    assert report.search.sites, report.table()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    # Same graph, same keys; only the fusing convs changed.
    reference = capture(model, (data[0],), frontend=frontend).module
    ops = [[(n.op, str(n.target)) for n in gm.graph.nodes] for gm in (deployed, reference)]
    assert ops[0] == ops[1]
    assert set(deployed.state_dict()) == set(reference.state_dict())
    folded = {p for s in report.search.sites for c in s.convs for p in (c.weight, c.bias) if p}
    changed = {k for k, v in deployed.state_dict().items() if not torch.equal(v, original[k])}
    assert changed <= folded and changed, (changed, folded)

    # Every site is equalized: the oracle (explicit (x - mu)/sigma modules) computes the same.
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        plain = model(x)
        explicit_oracle(model, report, data)
        expected, got = model(x), deployed(x)
    if isinstance(expected, dict):
        plain, expected, got = plain["out"], expected["out"], got["out"]
    assert not torch.allclose(plain, got, rtol=1e-3, atol=1e-3), "the rewrite must change the outputs"
    inexact = any(c.padded and c.bias is not None for s in report.search.sites for c in s.convs)
    if inexact:
        expected, got = expected[..., 16:-16, 16:-16], got[..., 16:-16, 16:-16]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
