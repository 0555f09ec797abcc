"""Hugging Face transformers end to end: small random configs, dict batches, ModelOutput results.

Each model is built from its config classes (nothing is downloaded), transformed
with the batches a Hugging Face DataLoader yields (``pixel_values`` and
``labels``), and checked against the explicit equalizer attached to the
original model, and against the sites an independent reading of the
architectures expects.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from models import explicit_oracle
from torch import nn

import fxeq

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

_BACKBONE = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
_VIT = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
        "intermediate_size": 64, "num_labels": 3}


def _upernet(backbone: object) -> nn.Module:
    config = T.UperNetConfig(backbone_config=backbone, hidden_size=32, use_auxiliary_head=False, num_labels=3)
    return T.UperNetForSemanticSegmentation(config)


_ZOO: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "UperNet-ConvNeXt": (
        lambda: _upernet(T.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], **_BACKBONE)),
        ["decode_head.bottleneck.conv", "decode_head.fpn_bottleneck.conv"],
    ),
    "UperNet-Swin": (
        lambda: _upernet(T.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                                      **_BACKBONE)),
        ["decode_head.bottleneck.conv", "decode_head.fpn_bottleneck.conv"],
    ),
    "Segformer": (
        lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
            depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=32, num_labels=3)),
        ["decode_head.linear_fuse"],
    ),
    "BEiT": (
        lambda: T.BeitForSemanticSegmentation(T.BeitConfig(
            out_indices=[0, 1, 2, 3], pool_scales=[1, 2], use_auxiliary_head=False, **_VIT)),
        ["decode_head.psp_bottleneck.convolution", "decode_head.fpn_bottleneck.convolution"],
    ),
    "Data2VecVision": (
        lambda: T.Data2VecVisionForSemanticSegmentation(T.Data2VecVisionConfig(
            out_indices=[0, 1, 2, 3], pool_scales=[1, 2], use_auxiliary_head=False, **_VIT)),
        ["decode_head.psp_bottleneck.convolution", "decode_head.fpn_bottleneck.convolution"],
    ),
    "MobileViT": (
        lambda: T.MobileViTForSemanticSegmentation(T.MobileViTConfig(
            image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
            aspp_out_channels=16, num_labels=3)),
        ["segmentation_head.aspp.project.convolution"],
    ),
    "MobileViTV2": (
        lambda: T.MobileViTV2ForSemanticSegmentation(T.MobileViTV2Config(
            image_size=64, width_multiplier=0.25, aspp_out_channels=16, num_labels=3)),
        ["segmentation_head.aspp.project.convolution"],
    ),
    "DPT": (
        lambda: T.DPTForSemanticSegmentation(T.DPTConfig(
            backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
            use_auxiliary_head=False, **_VIT)),
        [],
    ),
}


def _batches(n: int = 2, size: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(2, 3, size, size, generator=g),
             "labels": torch.randint(0, 3, (2, size, size), generator=g)} for _ in range(n)]


def _randomized(model: nn.Module) -> nn.Module:
    """He-scaled random weights: some configs initialize layers to (near) zero, which hides the fold."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


@pytest.mark.parametrize("name", list(_ZOO))
def test_hf_model(name: str) -> None:
    build, expected = _ZOO[name]
    torch.manual_seed(0)
    model = _randomized(build()).eval()
    data = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxeq.NoSiteWarning)
        deployed = fxeq.transform(model, data, progress=False)
    report = deployed.fxeq_report
    assert [s.convs[0].module for s in report.search.sites] == expected, report.table()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = deployed(pixel_values=x)
        assert isinstance(out, T.modeling_outputs.SemanticSegmenterOutput)
        if not expected:
            return
        plain = model(pixel_values=x).logits
        explicit_oracle(model, report, data, forward=lambda m, b: m(pixel_values=b["pixel_values"]))
        reference = model(pixel_values=x).logits
    scale = reference.abs().max()  # some configs' eval-mode logits are tiny: compare relative to them
    assert (out.logits - plain).abs().max() > 1e-2 * scale, "the rewrite must change the outputs"
    exact = all(not c.padded or c.bias is None for s in report.search.sites for c in s.convs)
    if not exact:
        out_logits, reference = out.logits[..., 4:-4, 4:-4], reference[..., 4:-4, 4:-4]
    else:
        out_logits = out.logits
    torch.testing.assert_close(out_logits, reference, rtol=1e-3, atol=1e-4 * float(scale))


def test_hf_inplace_keeps_the_class_and_takes_training_batches() -> None:
    build, _ = _ZOO["Segformer"]
    torch.manual_seed(0)
    model = build()
    keys = list(model.state_dict())
    fxeq.transform(model, _batches(), inplace=True, progress=False)
    assert type(model) is T.SegformerForSemanticSegmentation and list(model.state_dict()) == keys
    loss = model(**_batches(1, size=96)[0]).loss  # any size, labels included: the user's own model
    assert torch.isfinite(loss)


def test_hf_input_fn_may_return_a_dict() -> None:
    build, _ = _ZOO["Segformer"]
    torch.manual_seed(0)
    model = build()
    images = [b["pixel_values"] for b in _batches()]
    via_dict = fxeq.transform(model, images, input_fn=lambda x: {"pixel_values": x}, progress=False)
    via_batches = fxeq.transform(model, _batches(), progress=False)
    assert via_dict.fxeq_report.stats == via_batches.fxeq_report.stats
