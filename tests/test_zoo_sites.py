"""find_sites on segmentation-models-pytorch decoders that once hid their sites.

* FPN with ``merge_policy="cat"``: ``Dropout2d(inplace=True)`` exports as ``aten.feature_dropout_``.
* UnetPlusPlus: nested ``cat([up, cat([x_1, x_2, ...])])``, flattened into one site per block.
* MAnet: the upsampled branch is gated, ``upsample(x) * (se_hl + se_ll)``, before the concatenation.

Captured with torch.export at 64x64 (batch 2, random weights, eval mode).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torchvision

import fxeq
from fxeq.capturing import capture
from fxeq.sites import find_sites

smp = pytest.importorskip("segmentation_models_pytorch")

_NESTED = "decoder.blocks.x_{}_{}.conv1.0"

# Per model: how many leading inputs of each site are upsampled, and each
# fusing conv's module with the channel widths of its site's inputs in order.
_CASES = [
    pytest.param("FPN", {"decoder_merge_policy": "cat"}, 3, {"segmentation_head.0": (128, 128, 128, 128)},
                 id="FPN-cat"),
    pytest.param("UnetPlusPlus", {}, 1, {
        _NESTED.format(0, 0): (512, 256), _NESTED.format(1, 1): (256, 128),
        _NESTED.format(2, 2): (128, 64), _NESTED.format(3, 3): (64, 64),
        _NESTED.format(0, 1): (256, 128, 128), _NESTED.format(1, 2): (128, 64, 64),
        _NESTED.format(2, 3): (64, 64, 64), _NESTED.format(0, 2): (128, 64, 64, 64),
        _NESTED.format(1, 3): (64, 64, 64, 64), _NESTED.format(0, 3): (64, 64, 64, 64, 64),
    }, id="UnetPlusPlus"),
    pytest.param("MAnet", {}, 1, {
        "decoder.blocks.0.conv1.0": (256, 256), "decoder.blocks.1.conv1.0": (128, 128),
        "decoder.blocks.2.conv1.0": (64, 64), "decoder.blocks.3.conv1.0": (64, 64),
    }, id="MAnet"),
]


def _slices(widths: tuple[int, ...]) -> list[tuple[int, int]]:
    stops = list(itertools.accumulate(widths))
    return list(zip([0, *stops[:-1]], stops, strict=True))


@pytest.mark.slow  # real smp models
@pytest.mark.parametrize(("arch", "kwargs", "upsampled", "expected"), _CASES)
def test_smp_sites_are_found(arch: str, kwargs: dict[str, str], upsampled: int,
                             expected: dict[str, tuple[int, ...]]) -> None:
    model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, **kwargs).eval()
    found = find_sites(capture(model, (torch.randn(2, 3, 64, 64),), frontend="export").module)
    assert found.skipped == ()
    assert [len(s.convs) for s in found.sites] == [1] * len(expected)
    assert {s.convs[0].module: [i.channels for i in s.inputs] for s in found.sites} == {
        module: _slices(widths) for module, widths in expected.items()
    }
    for site in found.sites:
        assert [i.index for i in site.inputs] == list(range(len(site.inputs)))
        flags = [i.upsample is not None for i in site.inputs]
        assert flags == [True] * upsampled + [False] * (len(flags) - upsampled)


_OTHERS = [
    # smp: the default FPN, Linknet and PAN fuse by addition; DPT concatenates tokens; DeepLabV3's ASPP projection
    pytest.param(lambda: smp.FPN("resnet18", encoder_weights=None), 64, [], ["no conv"], id="smp-FPN-add"),
    pytest.param(lambda: smp.Linknet("resnet18", encoder_weights=None), 64, [], ["no conv"], id="smp-Linknet"),
    pytest.param(lambda: smp.PAN("resnet18", encoder_weights=None), 128, [], ["no conv"], id="smp-PAN"),
    pytest.param(lambda: smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, dynamic_img_size=True), 224, [],
                 ["not a channel concatenation"], id="smp-DPT"),
    pytest.param(lambda: smp.DeepLabV3("resnet18", encoder_weights=None), 64, ["decoder.aspp.project.0"], [],
                 id="smp-DeepLabV3"),
    # torchvision: FCN and LR-ASPP concatenate nothing
    pytest.param(lambda: torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None), 64, [],
                 ["no conv"], id="torchvision-FCN"),
    pytest.param(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None), 64, [], ["no conv"], id="torchvision-LRASPP"),
]


@pytest.mark.slow  # real models
@pytest.mark.parametrize(("build", "size", "convs", "skips"), _OTHERS)
def test_the_zoo_tables_rows_without_a_site(build: Any, size: int, convs: list[str], skips: list[str]) -> None:
    """The README's zoo table: which models have no fusion site, and why ("no conv": no concatenation at all)."""
    report = fxeq.find(build().eval(), torch.randn(2, 3, size, size))
    assert [c.module for s in report.search.sites for c in s.convs] == convs
    reasons = sorted({s.reason.split(" (")[0] for s in report.search.skipped})
    assert reasons == [r for r in skips if r != "no conv"]
