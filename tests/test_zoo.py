"""Real segmentation models: torchvision (fx) and segmentation-models-pytorch (export).

Each is transformed with random weights and random calibration batches, then
checked against the explicit equalizer attached to the original model.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from models import explicit_oracle
from torch import nn

import fxeq
from fxeq.capturing import capture

smp = pytest.importorskip("segmentation_models_pytorch")
pytestmark = pytest.mark.slow

_SMP = ["UPerNet", "PSPNet", "DeepLabV3Plus", "Segformer", "Unet"]
_ENCODERS = ["resnet18", "tu-convnext_atto"]


def _zoo() -> list:
    cases = [pytest.param(
        lambda: torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5),
        "fx", id="torchvision-deeplabv3_resnet50",
    )]
    for arch in _SMP:
        for encoder in _ENCODERS:
            def build(a: str = arch, e: str = encoder) -> nn.Module:
                return getattr(smp, a)(encoder_name=e, encoder_weights=None, classes=3)

            cases.append(pytest.param(build, "fx" if arch == "Unet" else "export", id=f"smp-{arch}-{encoder}"))
    return cases


@pytest.mark.parametrize(("build", "frontend"), _zoo())
def test_zoo_model(build, frontend: str) -> None:
    torch.manual_seed(0)
    model: nn.Module = build().eval()
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
    folded = {name for s in report.search.sites for c in s.convs for name in (c.weight, c.bias) if name}
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
