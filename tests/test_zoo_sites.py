"""find_sites on segmentation-models-pytorch decoders that once hid their sites.

* FPN with ``merge_policy="cat"``: ``Dropout2d(inplace=True)`` exports as ``aten.feature_dropout_``.
* UnetPlusPlus: nested ``cat([up, cat([x_1, x_2, ...])])``, flattened into one site per block.
* MAnet: the upsampled branch is gated, ``upsample(x) * (se_hl + se_ll)``, before the concatenation.

Captured with torch.export at 64x64 (batch 2, random weights, eval mode).
"""

from __future__ import annotations

import itertools

import pytest
import torch

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
