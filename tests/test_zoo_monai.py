"""MONAI's medical U-Nets, 2-D and 3-D: the sites a reader of the source expects, and weights against an oracle.

Every model is built from code with random weights (MONAI 1.6; ``pretrained=False``: nothing downloads) and
equalized in place. The sites are checked against the source (file and line below, in MONAI 1.6.1), and the
rewritten weights against :func:`models.reference_equalize`, which measures each site with its own float64 hooks
and folds with its own loops: it shares no code with fxeq.

What the source says, in short:

* ``UpCat`` (BasicUNet, BasicUNetPlusPlus, FlexibleUNet; networks/nets/basic_unet.py:160-171) upsamples,
  pads with ``F.pad(x, sp, "replicate")`` (a zero-width pad when sizes agree) and concatenates
  ``[skip, up]`` into ``convs.conv_0.conv``. Upsampling is "nontrainable" (interpolation: a site),
  "deconv" (ConvTranspose) or "pixelshuffle" (conv, reshape, pad, avg pool): learned, sites only with
  ``all_concats=True``.
* DynUNet (dynunet_block.py:242), UNETR and SwinUNETR (unetr_block.py:84), AttentionUnet (attentionunet.py:181)
  and VNet (vnet.py:165) concatenate a ConvTranspose output: learned upsampling.
* UNet (layers/simplelayers.py:131) concatenates into a ConvTranspose (unet.py:263): a transposed fusing conv.
* SegResNet adds its skips (segresnet.py:171): no concatenation.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import reference_equalize
from torch import nn

import fxeq

monai = pytest.importorskip("monai")
nets = pytest.importorskip("monai.networks.nets")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FEATURES = (8, 8, 16, 32, 64, 8)


def _data(shape: tuple[int, ...], n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _equalized(build: Any, data: list[torch.Tensor], **kwargs: Any) -> tuple[nn.Module, nn.Module, fxeq.Report]:
    """(the original, the model equalized in place, its report)."""
    torch.manual_seed(0)
    model = build().eval()
    original = copy.deepcopy(model)
    report = fxeq.transform(model, data, inplace=True, progress=False, **kwargs).fxeq_report
    return original, model, report


def _check_weights(original: nn.Module, model: nn.Module, report: fxeq.Report, data: list[torch.Tensor]) -> None:
    """Every fusing conv's weight and bias as the independent reference computes them; nothing else changed."""
    sites = [([c.module for c in s.convs], [i.channels for i in s.inputs]) for s in report.search.sites]
    reference = reference_equalize(original, sites, data)
    expected, got = reference.state_dict(), model.state_dict(keep_vars=True)
    assert expected.keys() == got.keys()
    # by identity: an aliased module (DynUNet) lists a folded parameter under a second name too
    folded = {id(model.get_parameter(n)) for s in report.search.sites for c in s.convs for n in (c.weight, c.bias)
              if n}
    for key, value in got.items():
        value = value.detach()
        if id(got[key]) in folded:
            torch.testing.assert_close(value, expected[key], rtol=2e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(value, original.state_dict()[key]), key


def _convs(report: fxeq.Report) -> list[str]:
    return [c.module for s in report.search.sites for c in s.convs]


@pytest.mark.parametrize("dims", [2, 3])
def test_basic_unet_interpolation_is_found_through_the_zero_width_pad(dims: int) -> None:
    shape = (2, 1, 32, 32) if dims == 2 else (2, 1, 32, 32, 32)
    data = _data(shape)
    original, model, report = _equalized(
        lambda: nets.BasicUNet(spatial_dims=dims, in_channels=1, out_channels=2, features=FEATURES,
                               upsample="nontrainable"), data)
    assert _convs(report) == [f"upcat_{k}.convs.conv_0.conv" for k in (4, 3, 2, 1)]
    for site in report.search.sites:  # [skip, upsampled], basic_unet.py:170
        assert [i.upsample for i in site.inputs] == [None, "bilinear" if dims == 2 else "trilinear"]
        assert not any(i.padded for i in site.inputs)  # the pad is zero-width at 32 (a multiple of 16)
    assert [len(s.depends_on) > 0 for s in report.search.sites] == [False, True, True, True]
    _check_weights(original, model, report, data)


def test_a_real_pad_after_the_upsample_is_looked_through_and_reported() -> None:
    """At 40x40 the decoder's maps are odd-sized somewhere, so UpCat pads by one row and column (replicate)."""
    model = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=FEATURES,
                           upsample="nontrainable").eval()
    report = fxeq.find(model, torch.randn(2, 1, 40, 40))
    padded = [s for s in report.search.sites if any(i.padded for i in s.inputs)]
    assert len(report.search.sites) == 4 and padded
    assert any("passes a spatial pad after its upsampling: its statistics include the padded border" in n
               for n in padded[0].notes)


@pytest.mark.parametrize(("upsample", "learned"), [("deconv", "a transposed conv"), ("pixelshuffle", "pixel shuffle")])
def test_basic_unet_learned_upsampling_is_named_and_equalized_with_all_concats(upsample: str, learned: str) -> None:
    data = _data((2, 1, 32, 32))

    def build() -> nn.Module:
        return nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=FEATURES, upsample=upsample)

    with pytest.warns(fxeq.NoSiteWarning, match="(?s)learned upsampling.*Pass all_concats=True to equalize "
                                                "concatenations of learned upsampling"):
        _, _, none = _equalized(build, data)
    assert not none.search.sites and len(none.search.skipped) == 4
    assert all(learned in s.reason and "pass all_concats=True to equalize it" in s.reason
               for s in none.search.skipped)
    original, model, report = _equalized(build, data, all_concats=True)
    assert _convs(report) == [f"upcat_{k}.convs.conv_0.conv" for k in (4, 3, 2, 1)]
    _check_weights(original, model, report, data)


def test_basic_unet_plus_plus_flattens_its_nested_skips() -> None:
    data = _data((2, 1, 32, 32))
    original, model, report = _equalized(
        lambda: nets.BasicUNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=2, features=FEATURES,
                                       upsample="nontrainable"), data)
    # 10 UpCats (basic_unetplusplus.py:104-121), their skips nested cats (basic_unetplusplus.py:147-158)
    assert sorted(_convs(report)) == sorted(f"upcat_{i}_{j}.convs.conv_0.conv"
                                            for i, j in [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (1, 2), (2, 2),
                                                         (0, 3), (1, 3), (0, 4)])
    assert sum("flattened" in n for s in report.search.sites for n in s.notes) == 6
    _check_weights(original, model, report, data)


@pytest.mark.parametrize(("backbone", "frontend"), [("resnet18", "concrete"), ("efficientnet-b0", "export")])
def test_flexible_unet(backbone: str, frontend: str) -> None:
    """resnet18 (shortcut 'A') defeats fx and export (a pool built in forward, ``.data`` in a cat): concrete trace."""
    data = _data((2, 3, 32, 32))
    original, model, report = _equalized(
        lambda: nets.FlexibleUNet(in_channels=3, out_channels=2, backbone=backbone, pretrained=False,
                                  decoder_channels=(32, 16, 16, 8, 8), spatial_dims=2), data)
    assert report.frontend == frontend
    # UNetDecoder blocks 0-3 get a skip (flexible_unet.py:170-174); nearest upsampling by default
    assert _convs(report) == [f"decoder.blocks.{k}.convs.conv_0.conv" for k in range(4)]
    assert all(s.inputs[1].upsample == "nearest" for s in report.search.sites)
    _check_weights(original, model, report, data)


def test_flexible_unet_without_inplace_says_no_graph_can_be_deployed() -> None:
    model = nets.FlexibleUNet(in_channels=3, out_channels=2, backbone="resnet18", pretrained=False,
                              decoder_channels=(32, 16, 16, 8, 8), spatial_dims=2).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fxeq.CaptureError, match=r"(?s)could not capture FlexibleUNet as a graph; tried fx, export:"
                                                r".*A concrete trace of one eager forward works and finds 4 fusion "
                                                r"site\(s\), but it is no graph to deploy\. Pass inplace=True"):
        fxeq.transform(model, _data((2, 3, 32, 32)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dims", [2, 3])
def test_dyn_unet_aliases_are_not_ties(dims: int) -> None:
    """Each up block is registered twice (upsamples.N and skip_layers...upsample): one object, not a tie."""
    shape = (2, 1, 16, 16) if dims == 2 else (2, 1, 16, 16, 16)
    data = _data(shape)

    def build() -> nn.Module:
        return nets.DynUNet(dims, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                            upsample_kernel_size=[2, 2, 2], filters=[8, 16, 32, 64])

    report = fxeq.find(build().eval(), data[0])
    assert not report.search.sites
    assert all("ConvTranspose" in s.reason and "learned upsampling" in s.reason for s in report.search.skipped)
    original, model, report = _equalized(build, data, all_concats=True)
    assert sorted(_convs(report)) == [f"upsamples.{k}.conv_block.conv1.conv" for k in range(3)]
    _check_weights(original, model, report, data)


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_unet_names_the_transposed_conv_behind_its_norm(dims: int) -> None:
    shape = (2, 1, 16, 16) if dims == 2 else (2, 1, 16, 16, 16)
    data = _data(shape)

    def build() -> nn.Module:
        return nets.AttentionUnet(dims, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2))

    skipped = fxeq.find(build().eval(), data[0]).search.skipped
    assert len(skipped) == 3 and all("ConvTranspose" in s.reason for s in skipped)  # UpConv: ConvT, BN, ReLU
    original, model, report = _equalized(build, data, all_concats=True)
    assert len(report.search.sites) == 3 and all(c.endswith("merge.conv") for c in _convs(report))
    _check_weights(original, model, report, data)


def test_unet_concatenates_into_a_transposed_conv() -> None:
    data = _data((2, 1, 16, 16))
    original, model, report = _equalized(
        lambda: nets.UNet(2, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=0), data,
        all_concats=True)
    assert sorted(_convs(report)) == ["model.1.submodule.1.submodule.2.conv", "model.1.submodule.2.conv",
                                      "model.2.conv"]
    assert all(c.transposed and c.stride == (2, 2) for s in report.search.sites for c in s.convs)
    notes = [n for s in report.search.sites for c in s.convs for n in report.conv_notes(c)]
    assert any("transposed conv with stride (2, 2)" in n and "was not folded" in n for n in notes)
    _check_weights(original, model, report, data)


def test_unetr_fuses_into_two_convs_per_site() -> None:
    data = _data((2, 1, 16, 16, 16))
    original, model, report = _equalized(
        lambda: nets.UNETR(1, 2, img_size=16, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4), data,
        all_concats=True)
    assert len(report.search.sites) == 4
    assert all(sorted(c.module.rsplit(".", 2)[-2] for c in s.convs) == ["conv1", "conv3"]
               for s in report.search.sites)  # UnetResBlock: conv1 and the 1x1 residual conv3
    _check_weights(original, model, report, data)


def test_swin_unetr() -> None:
    """Sites only: its decoder is UNETR's UnetrUpBlock, whose weights the UNETR test checks (64^3 is the least input)."""
    model = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 2, 2)).eval()
    report = fxeq.find(model, torch.randn(1, 1, 64, 64, 64), all_concats=True)
    # no input is interpolated (a ConvTranspose upsamples): no site without all_concats
    assert not any(i.upsample for s in report.search.sites for i in s.inputs)
    assert sorted(c.module for s in report.search.sites for c in s.convs) == sorted(
        f"decoder{k}.conv_block.{conv}.conv" for k in range(1, 6) for conv in ("conv1", "conv3"))
    # the patch-merging cats (swin_unetr.py:833-870) are on the last axis of channels-last maps: not channel cats
    assert len(report.search.sites) == 5


def test_vnet() -> None:
    data = _data((2, 1, 16, 16, 16))
    original, model, report = _equalized(lambda: nets.VNet(spatial_dims=3, in_channels=1, out_channels=2), data,
                                         all_concats=True)
    assert sorted(_convs(report)) == sorted(f"{b}.ops.0.conv_block.conv"
                                            for b in ("up_tr256", "up_tr128", "up_tr64", "up_tr32"))
    assert all(any("also feeds" in n for n in s.notes) for s in report.search.sites)  # torch.add(out, xcat)
    _check_weights(original, model, report, data)


@pytest.mark.parametrize("dims", [2, 3])
def test_seg_res_net_fuses_by_addition(dims: int) -> None:
    shape = (2, 1, 16, 16) if dims == 2 else (2, 1, 16, 16, 16)
    model = nets.SegResNet(spatial_dims=dims, init_filters=8, in_channels=1, out_channels=2).eval()
    report = fxeq.find(model, torch.randn(*shape), all_concats=True)
    assert not report.search.sites and not report.search.skipped
