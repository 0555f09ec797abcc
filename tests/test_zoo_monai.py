"""MONAI's medical U-Nets, 2-D and 3-D: the sites a reader of the source expects, and weights against an oracle.

Every model is built from code with random weights (``pretrained=False``: nothing downloads) and equalized in
place. The sites are checked against the source, cited below as file, class and method (line) in MONAI 1.6.1's
``monai/networks/``, and the rewritten weights against :func:`models.reference_equalize`, which measures each
site with its own float64 hooks and folds with its own loops: it shares no code with fxeq. 3-D inputs are the
smallest the model takes; where the bottom map must hold more than one element (an instance norm there), one
axis is twice the others.

What the source says, in short:

* ``UpCat`` (BasicUNet, BasicUNetPlusPlus, FlexibleUNet; nets/basic_unet.py, ``UpCat.forward``, 152-171)
  upsamples, pads with ``F.pad(x, sp, "replicate")`` (a zero-width pad when sizes agree) and concatenates
  ``[skip, up]`` into ``convs.conv_0.conv``. Upsampling (blocks/upsample.py) is "nontrainable" (interpolation:
  a site), "deconv" (``UpSample.__init__`` registers a ConvTranspose as ``deconv``, 107-120) or "pixelshuffle"
  (``SubpixelUpsample.forward``, 279-293: conv, reshape, pad, avg pool): learned, sites only with
  ``all_concats=True``.
* DynUNet (blocks/dynunet_block.py, ``UnetUpBlock.forward``, 239-244), UNETR and SwinUNETR
  (blocks/unetr_block.py, ``UnetrUpBlock.forward``, 81-86), AttentionUnet (nets/attentionunet.py,
  ``AttentionLayer.forward``, 178-182; ``UpConv``: ConvTranspose, BN, ReLU, 70-89) and VNet (nets/vnet.py,
  ``UpTransition.forward``, 158-168) concatenate a ConvTranspose output: learned upsampling.
* UNet (nets/unet.py, ``UNet._get_connection_block``, 185-196: ``Sequential(down, SkipConnection(sub), up)``)
  concatenates in ``SkipConnection.forward`` (layers/simplelayers.py, 127-131) into the up layer, a
  ConvTranspose (``UNet._get_up_layer``, 250-294; an ADN with PReLU after it except at the top): a
  transposed fusing conv. Its innermost concatenation reads the stride-1 bottom layer
  (``UNet._get_bottom_layer``, 240-248): same resolution.
* SegResNet adds its skips (nets/segresnet.py, ``SegResNet.decode``, 169-177): no concatenation.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from models import explicit_oracle, reference_equalize, same_state, state_of
from torch import nn

import fxeq

monai = pytest.importorskip("monai")
nets = pytest.importorskip("monai.networks.nets")
slow = pytest.mark.slow

FEATURES = (8, 8, 16, 32, 64, 8)
FEATURES_3D = (4, 4, 8, 8, 16, 4)
BASIC_3D = (1, 1, 32, 16, 16)  # four 2x pools; the bottom instance norm needs two elements; a multiple of 16: no pad
LEARNED = r"its upsampled input comes from a {cls} at {path} \(learned upsampling\b[^;]*\); pass all_concats=True " \
          r"to equalize it"
"""A learned upsampling skip's full text (reason; fix): the module class and path, then the fix."""


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


def _sites(report: fxeq.Report) -> list[tuple[list[str], list[tuple[int, int]]]]:
    """The report's structure only, as the oracle takes it: (fusing conv names, input slices) per site."""
    return [([c.module for c in s.convs], [i.channels for i in s.inputs]) for s in report.search.sites]


def _check_weights(original: nn.Module, model: nn.Module, report: fxeq.Report, data: list[torch.Tensor]) -> None:
    """Every fusing conv's weight and bias as the independent reference computes them; nothing else changed."""
    reference = reference_equalize(original, _sites(report), data)
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


def _no_site_warning(caught: pytest.WarningsRecorder) -> str:
    (warning,) = [w for w in caught if issubclass(w.category, fxeq.NoSiteWarning)]
    return str(warning.message)


def _basic_unet(dims: int, upsample: str) -> Any:
    return lambda: nets.BasicUNet(spatial_dims=dims, in_channels=1, out_channels=2,
                                  features=FEATURES if dims == 2 else FEATURES_3D, upsample=upsample)


def _unet(dims: int, channels: tuple[int, ...] = (8, 16, 32, 64), strides: tuple[int, ...] = (2, 2, 2)) -> Any:
    return lambda: nets.UNet(dims, 1, 2, channels=channels, strides=strides, num_res_units=0)


def _dyn_unet(dims: int) -> Any:
    return lambda: nets.DynUNet(dims, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                upsample_kernel_size=[2, 2, 2], filters=[8, 16, 32, 64])


# ---------------------------------------------------------------------------
# BasicUNet, BasicUNet++, FlexibleUNet: UpCat
# ---------------------------------------------------------------------------

@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_basic_unet_interpolation_is_found_through_the_zero_width_pad(dims: int) -> None:
    data = _data((2, 1, 32, 32) if dims == 2 else BASIC_3D)
    original, model, report = _equalized(_basic_unet(dims, "nontrainable"), data)
    assert _convs(report) == [f"upcat_{k}.convs.conv_0.conv" for k in (4, 3, 2, 1)]
    for site in report.search.sites:  # [skip, upsampled]: UpCat.forward, basic_unet.py:170
        assert [i.upsample for i in site.inputs] == [None, "bilinear" if dims == 2 else "trilinear"]
        assert not any(i.padded for i in site.inputs)  # every size a multiple of 16: the pad is zero-width
    assert [len(s.depends_on) > 0 for s in report.search.sites] == [False, True, True, True]
    _check_weights(original, model, report, data)


@slow
def test_a_real_pad_after_the_upsample_is_looked_through_and_reported() -> None:
    """At 40x40 the decoder's maps are odd-sized somewhere, so UpCat pads by one row and column (replicate)."""
    model = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=FEATURES,
                           upsample="nontrainable").eval()
    report = fxeq.find(model, torch.randn(2, 1, 40, 40))
    padded = [s for s in report.search.sites if any(i.padded for i in s.inputs)]
    assert len(report.search.sites) == 4 and padded
    assert any("passes a spatial pad after its upsampling: its statistics include the padded border" in n
               for n in padded[0].notes)


@slow
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("upsample", ["deconv", "pixelshuffle"])
def test_basic_unet_learned_upsampling_is_named_and_equalized_with_all_concats(upsample: str, dims: int) -> None:
    data = _data((2, 1, 32, 32) if dims == 2 else BASIC_3D)
    build = _basic_unet(dims, upsample)
    with pytest.warns(fxeq.NoSiteWarning) as caught:
        _, _, none = _equalized(build, data)
    assert not none.search.sites and len(none.search.skipped) == 4
    # UpSample registers the ConvTranspose as "deconv" (upsample.py:111); SubpixelUpsample's conv is conv_block
    learned = (f"ConvTranspose{dims}d", "upcat_{k}\\.upsample\\.deconv") if upsample == "deconv" else \
        (f"Conv{dims}d", "upcat_{k}\\.upsample\\.pixelshuffle\\.conv_block and a reshape that enlarges its map "
                         "\\(a pixel shuffle\\)")
    for k, skipped in zip((4, 3, 2, 1), none.search.skipped, strict=True):
        assert re.fullmatch(LEARNED.format(cls=learned[0], path=learned[1].format(k=k)), skipped.text), skipped.text
    text = _no_site_warning(caught)
    assert text.count("all_concats=True") == 1, text  # four skips, one fix: said once
    assert text.count("(learned upsampling") == 4
    original, model, report = _equalized(build, data, all_concats=True)
    assert _convs(report) == [f"upcat_{k}.convs.conv_0.conv" for k in (4, 3, 2, 1)]
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_basic_unet_plus_plus_flattens_its_nested_skips(dims: int) -> None:
    data = _data((2, 1, 32, 32)) if dims == 2 else _data(BASIC_3D, n=1)
    original, model, report = _equalized(
        lambda: nets.BasicUNetPlusPlus(spatial_dims=dims, in_channels=1, out_channels=2,
                                       features=FEATURES if dims == 2 else FEATURES_3D, upsample="nontrainable"),
        data)
    # 10 UpCats (BasicUNetPlusPlus.__init__, basic_unetplusplus.py:104-121), their skips nested cats
    # (BasicUNetPlusPlus.forward, basic_unetplusplus.py:147-158)
    assert sorted(_convs(report)) == sorted(f"upcat_{i}_{j}.convs.conv_0.conv"
                                            for i, j in [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (1, 2), (2, 2),
                                                         (0, 3), (1, 3), (0, 4)])
    assert sum("flattened" in n for s in report.search.sites for n in s.notes) == 6
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(("backbone", "frontend"), [("resnet18", "concrete"), ("efficientnet-b0", "export")])
def test_flexible_unet(backbone: str, frontend: str, dims: int) -> None:
    """resnet18 (shortcut 'A') defeats fx and export (a pool built in forward, ``.data`` in a cat): concrete trace.

    Five 2x stages: 32 on every axis is the least; two samples for the encoders' batch norms at a 1-element bottom.
    """
    data = _data((2, 3, 32, 32)) if dims == 2 else _data((2, 1, 32, 32, 32), n=1)
    original, model, report = _equalized(
        lambda: nets.FlexibleUNet(in_channels=3 if dims == 2 else 1, out_channels=2, backbone=backbone,
                                  pretrained=False, decoder_channels=(32, 16, 16, 8, 8), spatial_dims=dims), data)
    assert report.frontend == frontend
    # UNetDecoder.forward (flexible_unet.py:164-177): blocks 0-3 get a skip; UpCat with nearest upsampling
    assert _convs(report) == [f"decoder.blocks.{k}.convs.conv_0.conv" for k in range(4)]
    assert all(s.inputs[1].upsample == "nearest" for s in report.search.sites)
    _check_weights(original, model, report, data)


@slow
def test_flexible_unet_without_inplace_says_no_graph_can_be_deployed() -> None:
    model = nets.FlexibleUNet(in_channels=3, out_channels=2, backbone="resnet18", pretrained=False,
                              decoder_channels=(32, 16, 16, 8, 8), spatial_dims=2).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fxeq.CaptureError, match=r"(?s)could not capture FlexibleUNet as a graph; tried fx, export:"
                                                r".*A concrete trace of one eager forward works and finds 4 fusion "
                                                r"sites, but it is no graph to deploy\. Pass inplace=True"):
        fxeq.transform(model, _data((2, 3, 32, 32)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------
# Learned upsampling: the skip names the module, and the warning gives the fix once
# ---------------------------------------------------------------------------

# (build, input shape, [(class, module path regex) or None for a same-resolution cat, per skipped cat in order])
_SKIP_CASES = [
    # UpCat.forward (basic_unet.py:152-171), UpSample's "deconv" (upsample.py:111); export frontend
    *(pytest.param(_basic_unet(d, "deconv"), (1, 1, 32, 32) if d == 2 else BASIC_3D,
                   [(f"ConvTranspose{d}d", rf"upcat_{k}\.upsample\.deconv") for k in (4, 3, 2, 1)],
                   id=f"basic_unet_deconv-{d}d", marks=slow) for d in (2, 3)),
    # UnetUpBlock.forward (dynunet_block.py:239-244); one object under two names (dynunet.py:167, 224-231)
    *(pytest.param(_dyn_unet(d), (1, 1) + (16,) * d,
                   [(f"ConvTranspose{d}d", r"(upsamples\.\d|skip_layers(\.next_layer)*\.upsample)\.transp_conv\.conv")]
                   * 3, id=f"dyn_unet-{d}d") for d in (2, 3)),
    # SkipConnection.forward (simplelayers.py:131) into UNet._get_up_layer (unet.py:250-294): ConvTranspose, then
    # instance norm, dropout, PReLU; the innermost cat reads the stride-1 bottom layer (unet.py:240-248)
    *(pytest.param(_unet(d), (1, 1, 16, 16) if d == 2 else (1, 1, 16, 8, 8),
                   [None, (f"ConvTranspose{d}d", r"model\.1\.submodule\.1\.submodule\.2\.conv"),
                    (f"ConvTranspose{d}d", r"model\.1\.submodule\.2\.conv")], id=f"unet-{d}d") for d in (2, 3)),
]


@pytest.mark.parametrize(("build", "shape", "expected"), _SKIP_CASES)
def test_a_learned_upsampling_skip_names_the_module_class_and_the_fix(build: Any, shape: tuple[int, ...],
                                                                      expected: list[tuple[str, str] | None]) -> None:
    """Not the aten op (``conv_transpose2d``) on export graphs, and seen through a PReLU (MONAI UNet's ADN)."""
    skipped = fxeq.find(build().eval(), torch.randn(*shape)).search.skipped
    assert len(skipped) == len(expected)
    for s, learned in zip(skipped, expected, strict=True):
        if learned is None:
            assert s.reason.startswith("no input comes from an upsampling op"), s.reason
            assert s.text.endswith("; pass all_concats=True to equalize it"), s.text
        else:
            assert re.fullmatch(LEARNED.format(cls=learned[0], path=learned[1]), s.text), s.text
        assert "conv_transpose" not in s.text


def test_the_no_site_warning_says_pass_all_concats_once() -> None:
    """MONAI UNet: two learned-upsampling skips and a same-resolution one, all with the same fix."""
    with pytest.warns(fxeq.NoSiteWarning) as caught:
        fxeq.transform(_unet(2)().eval(), _data((1, 1, 16, 16), n=1), progress=False)
    text = _no_site_warning(caught)
    assert text.count("all_concats=True") == 1, text
    assert re.search(r"\b[Pp]ass all_concats=True\b", text)
    assert text.count("a ConvTranspose2d at ") == 2 and text.count("(learned upsampling") == 2
    assert "no input comes from an upsampling op" in text


# ---------------------------------------------------------------------------
# Transposed fusing convs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["init", "reparam", "explicit"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_cat_read_by_a_transposed_conv_folds_as_the_oracle_says(dims: int, stride: int, mode: str) -> None:
    """One-level MONAI UNet: ``cat([down(x), bottom(down(x))])`` read by the top up layer, a bare ConvTranspose
    (``conv_only`` at the top, unet.py:273-274). A transposed weight holds its input channels on dim 0; stride 1
    folds the mean into the bias, stride 2 cannot (each output phase has its own taps) and leaves the bias."""
    data = _data((2, 1) + (8,) * dims)
    base = _unet(dims, channels=(4, 8), strides=(stride,))().eval()
    model = copy.deepcopy(base)
    report = fxeq.transform(model, data, inplace=True, progress=False, all_concats=True, mode=mode).fxeq_report
    assert _sites(report) == [(["model.2.conv"], [(0, 4), (4, 12)])]
    (conv,) = report.search.sites[0].convs
    assert conv.transposed and conv.stride == (stride,) * dims
    x = _data((2, 1) + (8,) * dims, n=1, seed=2)[0]
    if mode == "explicit":  # the literal (x - mu) / sigma before the conv, measured by the oracle's own hooks
        reference = copy.deepcopy(base)
        explicit_oracle(reference, report, data)
        assert same_state(model, state_of(base))
    else:
        reference = reference_equalize(base, _sites(report), data)
        if mode == "init":
            _check_weights(base, model, report, data)
        got, expected = model.get_submodule("model.2.conv"), reference.get_submodule("model.2.conv")
        torch.testing.assert_close(got.weight, expected.weight, rtol=2e-4, atol=1e-6)  # reparam: W_raw * scale
        torch.testing.assert_close(got.bias, expected.bias, rtol=2e-4, atol=1e-6)
    # fxeq's own conv: the mean moved its bias only where a single bias can hold it (stride 1, not explicit)
    bias_moved = not torch.equal(model.get_submodule("model.2.conv").bias, base.get_submodule("model.2.conv").bias)
    assert bias_moved == (stride == 1 and mode != "explicit")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_unet_concatenates_into_a_transposed_conv(dims: int) -> None:
    data = _data((2, 1, 16, 16) if dims == 2 else (2, 1, 16, 8, 8))
    original, model, report = _equalized(_unet(dims), data, all_concats=True)
    assert sorted(_convs(report)) == ["model.1.submodule.1.submodule.2.conv", "model.1.submodule.2.conv",
                                      "model.2.conv"]
    assert all(c.transposed and c.stride == (2,) * dims for s in report.search.sites for c in s.convs)
    notes = [n for s in report.search.sites for c in s.convs for n in report.conv_notes(c)]
    assert any(f"transposed conv with stride {(2,) * dims}" in n and "was not folded" in n for n in notes)
    _check_weights(original, model, report, data)


# ---------------------------------------------------------------------------
# ConvTranspose decoders: DynUNet, AttentionUnet, UNETR, SwinUNETR, VNet
# ---------------------------------------------------------------------------

@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_dyn_unet_aliases_are_not_ties(dims: int) -> None:
    """Each up block is registered twice (upsamples.N and skip_layers...upsample): one object, not a tie."""
    data = _data((2, 1) + (16,) * dims)
    report = fxeq.find(_dyn_unet(dims)().eval(), data[0])
    assert not report.search.sites
    assert all("ConvTranspose" in s.reason and "learned upsampling" in s.reason for s in report.search.skipped)
    original, model, report = _equalized(_dyn_unet(dims), data, all_concats=True)
    assert sorted(_convs(report)) == [f"upsamples.{k}.conv_block.conv1.conv" for k in range(3)]
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_attention_unet_names_the_transposed_conv_behind_its_norm(dims: int) -> None:
    data = _data((2, 1) + (16,) * dims)

    def build() -> nn.Module:
        return nets.AttentionUnet(dims, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2))

    skipped = fxeq.find(build().eval(), data[0]).search.skipped
    assert len(skipped) == 3 and all("ConvTranspose" in s.reason for s in skipped)  # UpConv: ConvT, BN, ReLU
    original, model, report = _equalized(build, data, all_concats=True)
    assert len(report.search.sites) == 3 and all(c.endswith("merge.conv") for c in _convs(report))
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_unetr_fuses_into_two_convs_per_site(dims: int) -> None:
    """One 16-patch: 16 on every axis is the least. UNETR.forward (unetr.py:199-213) runs decoder5..decoder2."""
    data = _data((2, 1) + (16,) * dims, n=2 if dims == 2 else 1)
    original, model, report = _equalized(
        lambda: nets.UNETR(1, 2, img_size=16, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4,
                           spatial_dims=dims), data, all_concats=True)
    assert {c.split(".")[0] for c in _convs(report)} == {f"decoder{k}" for k in (5, 4, 3, 2)}
    assert all(sorted(c.module.rsplit(".", 2)[-2] for c in s.convs) == ["conv1", "conv3"]
               for s in report.search.sites)  # UnetResBlock: conv1 and the 1x1 residual conv3
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_swin_unetr(dims: int) -> None:
    """SwinUNETR.forward (swin_unetr.py:392-407): decoder5..decoder1, UnetrUpBlocks (ConvTranspose, cat, res block).

    Each axis a multiple of 2**5 (``_check_input_size``, swin_unetr.py:382-390), and encoder10's instance norm
    needs more than one element at the bottom: 64x64 in 2-D, 64x32x32 in 3-D.
    """
    data = _data((1, 1, 64, 64)) if dims == 2 else _data((1, 1, 64, 32, 32), n=1)
    original, model, report = _equalized(
        lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 2, 2), spatial_dims=dims), data, all_concats=True)
    # no input is interpolated (a ConvTranspose upsamples): no site without all_concats
    assert not any(i.upsample for s in report.search.sites for i in s.inputs)
    assert _convs(report) == [f"decoder{k}.conv_block.{conv}.conv" for k in range(5, 0, -1)
                              for conv in ("conv1", "conv3")]
    # the patch-merging cats (PatchMerging.forward, swin_unetr.py:852-870; PatchMergingV2.forward, 826-846) are
    # on the last axis of channels-last maps: not channel cats
    assert len(report.search.sites) == 5
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_vnet(dims: int) -> None:
    """Four 2x stages: 16 on every axis is the least (batch norms: two samples)."""
    data = _data((2, 1) + (16,) * dims, n=2 if dims == 2 else 1)
    original, model, report = _equalized(lambda: nets.VNet(spatial_dims=dims, in_channels=1, out_channels=2), data,
                                         all_concats=True)
    assert sorted(_convs(report)) == sorted(f"{b}.ops.0.conv_block.conv"
                                            for b in ("up_tr256", "up_tr128", "up_tr64", "up_tr32"))
    # torch.add(out, xcat) in UpTransition.forward (vnet.py:167)
    assert all(any("also feeds" in n for n in s.notes) for s in report.search.sites)
    _check_weights(original, model, report, data)


@slow
@pytest.mark.parametrize("dims", [2, 3])
def test_seg_res_net_fuses_by_addition(dims: int) -> None:
    shape = (2, 1, 16, 16) if dims == 2 else (2, 1, 16, 16, 16)
    model = nets.SegResNet(spatial_dims=dims, init_filters=8, in_channels=1, out_channels=2).eval()
    report = fxeq.find(model, torch.randn(*shape), all_concats=True)
    assert not report.search.sites and not report.search.skipped
