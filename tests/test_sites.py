"""find_sites: which concatenations are sites, their slices and convs, and why others are skipped."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fxeq
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from models import BNHead, CatTwice, Chained, Negatives, ShapeBranch, SharedFuse, TwoBranch
from torch import nn

from fxeq.capturing import capture
from fxeq.sites import batch_norm_module, conv_parameters, find_sites

X = torch.randn(2, 3, 16, 16)


def _nodes(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    return [(n.op, str(n.target), n.name) for n in gm.graph.nodes]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_two_branch_site(frontend: str) -> None:
    gm = capture(TwoBranch(), (X,), frontend=frontend).module
    before = _nodes(gm)
    found = find_sites(gm)
    assert _nodes(gm) == before, "finding sites must not change the graph"
    assert len(found.sites) == 1 and not found.skipped
    site = found.sites[0]
    assert [(i.channels, i.upsample) for i in site.inputs] == [((0, 3), None), ((3, 8), "bilinear")]
    assert site.inputs[1].scale == (4.0, 4.0)
    (conv,) = site.convs
    assert (conv.module, conv.weight, conv.bias, conv.groups, conv.padded) == ("fuse", "fuse.weight", "fuse.bias",
                                                                               1, False)


class NestedWeights(nn.Module):
    """A fusing conv deep in the module tree, and one whose weight is the root's own::

        x ── a ──────────────┐
        x ── pool ── b ── up ┴─ cat ── decoder.fuse.0 ──┐
        x ── pool ── up ────────────────────────────────┴─ cat ── F.conv2d(·, self.weight)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.decoder = nn.Module()
        self.decoder.fuse = nn.Sequential(nn.Conv2d(4, 3, 1))
        self.weight = nn.Parameter(torch.randn(2, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.avg_pool2d(x, 2)
        y = self.decoder.fuse(torch.cat([self.a(x), F.interpolate(self.b(low), scale_factor=2.0)], 1))
        return F.conv2d(torch.cat([y, F.interpolate(low, scale_factor=2.0)], 1), self.weight)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fusing_conv_names_the_module_owning_its_weight(frontend: str) -> None:
    found = find_sites(capture(NestedWeights(), (X,), frontend=frontend).module)
    assert [(c.module, c.weight, c.bias) for s in found.sites for c in s.convs] == [
        ("decoder.fuse.0", "decoder.fuse.0.weight", "decoder.fuse.0.bias"), ("", "weight", None),
    ]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_padded_conv_and_following_norm_are_recorded(frontend: str) -> None:
    gm = capture(BNHead(), (X,), frontend=frontend).module
    (site,) = find_sites(gm).sites
    (conv,) = site.convs
    assert conv.padded and conv.followed_by_norm and conv.bias is None and conv.batch_norm == "bn"
    # The statistics are taken after each branch's ReLU, so the producer is the ReLU, not the batch norm.
    expected = {"fx": ["a.2 (ReLU)", "b.2 (ReLU)"], "export": ["relu a.2", "relu b.2"]}[frontend]
    assert [i.producer for i in site.inputs] == expected


class LayoutBranch(nn.Module):
    """A channels-last layer norm (ConvNeXt/UPerNet style) feeding a site through permutes::

        x ── conv ── permute ── norm ── permute ─────────┐
        x ── pool ── conv ── up ─────────────────────────┴─ cat ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Conv2d(3, 2, 1)
        self.fuse = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fuse(torch.cat([a, F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_producer_looks_through_layout_ops(frontend: str) -> None:
    (site,) = find_sites(capture(LayoutBranch(), (X,), frontend=frontend).module).sites
    expected = {"fx": ["norm (LayerNorm)", "b (Conv2d)"], "export": ["layer_norm norm", "conv2d b"]}[frontend]
    assert [i.producer for i in site.inputs] == expected


def test_export_is_used_when_fx_fails() -> None:
    captured = capture(ShapeBranch(), (X,))
    assert captured.frontend == "export"
    (site,) = find_sites(captured.module).sites
    assert site.convs[0].weight == "fuse.weight"


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_negative_twins_are_skipped_with_reasons(frontend: str) -> None:
    found = find_sites(capture(Negatives(), (X,), frontend=frontend).module)
    assert found.sites == ()
    reasons = sorted(s.reason for s in found.skipped)
    assert len(reasons) == 3, "the dim=2 concatenation is not a channel concatenation"
    assert any("does not feed a conv" in r for r in reasons)
    assert any("through normalization" in r and "bn" in r for r in reasons)
    assert any("no input comes from an upsampling op" in r for r in reasons)


def test_all_concats_includes_same_resolution_concatenations() -> None:
    found = find_sites(capture(Negatives(), (X,)).module, all_concats=True)
    (site,) = found.sites
    assert site.convs[0].weight == "conv2.weight"
    assert [i.upsample for i in site.inputs] == [None, None]


def test_same_tensor_twice_and_empty_input() -> None:
    (site,) = find_sites(capture(CatTwice(), (X,)).module).sites
    assert [(i.index, i.channels) for i in site.inputs] == [(0, (0, 2)), (2, (2, 4)), (3, (4, 7))]
    assert [i.upsample for i in site.inputs] == ["bilinear", "bilinear", None]


def test_shared_conv_is_skipped() -> None:
    found = find_sites(capture(SharedFuse(), (X,)).module)
    assert found.sites == ()
    assert all("shares parameter fuse.weight" in s.reason for s in found.skipped)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_chained_sites_are_ordered(frontend: str) -> None:
    found = find_sites(capture(Chained(), (X,), frontend=frontend).module)
    first, second = found.sites
    assert first.depends_on == () and second.depends_on == (first.name,)
    assert [[s.name for s in g] for g in found.generations()] == [[first.name], [second.name]]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_normalization_does_not_break_the_dependency(frontend: str) -> None:
    class Normalized(Chained):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = F.interpolate(self.c2(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
            y = self.bn(self.fuse1(torch.cat([self.c1(x), b], 1)))
            c = F.interpolate(self.c3(F.avg_pool2d(x, 4)), scale_factor=4.0)
            return self.fuse2(torch.cat([y, c], 1))

    found = find_sites(capture(Normalized(), (X,), frontend=frontend).module)
    first, second = found.sites
    assert [s.depends_on for s in found.sites] == [(), (first.name,)]
    assert [[s.name for s in g] for g in found.generations()] == [[first.name], [second.name]]
    assert second.depends_on == (first.name,)


@given(widths=st.lists(st.integers(0, 4), min_size=2, max_size=5), groups=st.sampled_from([1, 0]))
@settings(max_examples=15, deadline=None)
def test_slices_tile_the_concatenation(widths: list[int], groups: int) -> None:
    total = sum(widths)
    assume(total > 0)
    groups = total if groups == 0 else 1

    class Many(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(nn.Conv2d(3, w, 1) if w else nn.Identity() for w in widths)
            self.fuse = nn.Conv2d(total, total, 1, groups=groups)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            low = F.avg_pool2d(x, 2)
            parts = [
                F.interpolate(b(low), scale_factor=2.0) if w else x[:, :0]
                for b, w in zip(self.branches, widths, strict=True)
            ]
            return self.fuse(torch.cat(parts, 1))

    (site,) = find_sites(capture(Many(), (X,)).module).sites
    expected, start = [], 0
    for index, width in enumerate(widths):
        if width:
            expected.append((index, (start, start + width)))
        start += width
    assert [(i.index, i.channels) for i in site.inputs] == expected
    assert site.convs[0].groups == groups


class Tied(TwoBranch):
    """TwoBranch whose fusing conv's weight is also ``other.weight`` (one Parameter, two names)::

        cat(a, up(b)) ── fuse ──┐
        cat(x, x, x[:2]) ── other (called or not) ── +
    """

    def __init__(self, called: bool) -> None:
        super().__init__()
        self.other = nn.Conv2d(8, 4, 1)
        self.other.weight = self.fuse.weight
        self.called = called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.other(torch.cat([x, x, x[:, :2]], 1)) if self.called else y


# fx copies only the modules a graph calls, so there a tie to an uncalled module is invisible.
@pytest.mark.parametrize(("frontend", "called"), [("fx", True), ("export", True), ("export", False)])
def test_tied_fusing_conv_is_skipped(frontend: str, called: bool) -> None:
    found = find_sites(capture(Tied(called), (X,), frontend=frontend).module)
    assert found.sites == ()
    (reason,) = [s.reason for s in found.skipped if "shares parameter" in s.reason]
    assert "fuse.weight" in reason and "other.weight" in reason


class InPlace(nn.Module):
    """In-place ops on both sides of the concatenation::

        x ── a ── relu_ ──────────────────┐
        x ── pool ── b ── up ── .mul_(½) ─┴─ cat ── Dropout2d(inplace) ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout2d(0.2, inplace=True)
        self.fuse = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.a(x), inplace=True)
        b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0).mul_(0.5)
        return self.fuse(self.drop(torch.cat([a, b], 1)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_in_place_pass_through_ops(frontend: str) -> None:
    found = find_sites(capture(InPlace(), (X,), frontend=frontend).module)
    (site,) = found.sites
    assert [(i.channels, i.upsample) for i in site.inputs] == [((0, 2), None), ((2, 5), "nearest")]
    assert site.convs[0].weight == "fuse.weight" and not found.skipped


def test_scalar_on_the_left_keeps_the_upsample() -> None:
    class LeftScalar(TwoBranch):
        """TwoBranch with ``0.5 * up(b)`` (fx records operator.mul(0.5, up))."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = 0.5 * F.interpolate(self.conv_b(F.avg_pool2d(x, 4)), scale_factor=4.0, mode="bilinear")
            return self.fuse(torch.cat([self.conv_a(x), b], dim=1))

    (site,) = find_sites(capture(LeftScalar(), (X,), frontend="fx").module).sites
    assert [i.upsample for i in site.inputs] == [None, "bilinear"]


class Nested(nn.Module):
    """Concatenations nested two deep (UNet++ style), with a dropout and an empty input::

        x ── a ──────┐
        x[:, :0] ────┼─ cat ── dropout ──┐
        x ── b ──────┘                   │
        x ── d ──────────────────────────┴─ cat ──┐
        x ── pool ── e ── up ─────────────────────┴─ cat ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.e = nn.Conv2d(3, 5, 1)
        self.fuse = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.e(F.avg_pool2d(x, 2)), scale_factor=2.0)
        inner = torch.cat([self.a(x), x[:, :0], self.b(x)], 1)
        middle = torch.cat([F.dropout(inner, 0.1, self.training), self.d(x)], 1)
        return self.fuse(torch.cat([up, middle], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_nested_concatenations_are_flattened(frontend: str) -> None:
    gm = capture(Nested(), (X,), frontend=frontend).module
    found = find_sites(gm)
    assert found.skipped == (), "the nested concatenations are part of the site, not skipped"
    (site,) = found.sites
    inner, middle, outer = [n for n in gm.graph.nodes if n.op == "call_function" and "cat" in str(n.target)]
    assert site.name == outer.name
    assert [(i.index, i.channels, i.upsample) for i in site.inputs] == [
        (0, (0, 5), "nearest"), (1, (5, 6), None), (3, (6, 8), None), (4, (8, 12), None),
    ]
    a, _, b = inner.args[0]
    assert [i.node for i in site.inputs[1:]] == [a.name, b.name, middle.args[0][1].name]
    assert [i.producer.split()[-1] for i in site.inputs[1:]] == (
        ["(Conv2d)"] * 3 if frontend == "fx" else ["a", "b", "d"]
    )
    assert [n for n in site.notes if "nested" in n] == [
        f"nested concatenation {middle.name} is flattened into this one",
        f"nested concatenation {inner.name} is flattened into this one",
    ]


class SharedInner(nn.Module):
    """An inner concatenation that a conv reads too, so it is not flattened::

        x ── a ──┐
        x ── b ──┴─ cat ── head
                    cat ────────────┐
        x ── pool ── e ── up ───────┴─ cat ── fuse
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.e = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(3, 2, 1)
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = torch.cat([self.a(x), self.b(x)], 1)
        up = F.interpolate(self.e(F.avg_pool2d(x, 2)), scale_factor=2.0)
        return self.head(inner), self.fuse(torch.cat([inner, up], 1))


def test_concatenation_read_by_a_conv_is_not_flattened() -> None:
    gm = capture(SharedInner(), (X,)).module
    found = find_sites(gm)
    (site,) = found.sites
    assert [(i.index, i.node, i.channels) for i in site.inputs] == [(0, "cat", (0, 3)), (1, "interpolate", (3, 8))]
    assert [s.node for s in found.skipped] == ["cat"]
    assert "no input comes from an upsampling op" in found.skipped[0].reason


class Gated(nn.Module):
    """MAnet's attention: the upsampled branch times a gate before the concatenation::

        x ── pool ── b ── up ──────── * gate ──┐
        x ── a ─────────────────────────────── ┴─ cat ── fuse
        gate = sigmoid(conv(avgpool(a)))  [N, C, 1, 1]    (spatial=True: [N, 1, H, W])
    """

    def __init__(self, spatial: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.gate = nn.Conv2d(3, 1 if spatial else 3, 1)
        self.spatial = spatial
        self.fuse = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        gate = torch.sigmoid(self.gate(a if self.spatial else F.adaptive_avg_pool2d(a, 1)))
        up = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
        return self.fuse(torch.cat([up * gate, a], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_gated_upsample_still_comes_from_upsampling(frontend: str) -> None:
    (site,) = find_sites(capture(Gated(), (X,), frontend=frontend).module).sites
    assert [(i.channels, i.upsample, i.scale) for i in site.inputs] == [
        ((0, 3), "bilinear", (2.0, 2.0)), ((3, 6), None, None),
    ]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_product_with_a_spatial_map_is_not_a_gate(frontend: str) -> None:
    found = find_sites(capture(Gated(spatial=True), (X,), frontend=frontend).module)
    assert found.sites == ()
    assert "no input comes from an upsampling op" in found.skipped[0].reason


class TinyViT(nn.Module):
    """A ViT-like encoder with a class token, and a conv head that fuses its tokens::

        x ── patch(4x4) ── flatten ── transpose ─┐
        cls ─────────────────────────────────────┴─ cat(dim=1) [N, 17, 8] ── + pos ── grid ── up ──┐
        x ── a ──────────────────────────────────────────────────────────────────────────────────┴─ cat ── fuse

    where grid drops the class token and reshapes the 16 patch tokens to [N, 8, 4, 4].
    """

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 17, 8))
        self.a = nn.Conv2d(3, 2, 1)
        self.fuse = nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        grid = tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], 8, 4, 4)
        up = F.interpolate(grid, scale_factor=4.0, mode="bilinear")
        return self.fuse(torch.cat([self.a(x), up], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_token_concatenation_is_not_a_channel_concatenation(frontend: str) -> None:
    found = find_sites(capture(TinyViT(), (X,), frontend=frontend).module)
    (site,) = found.sites
    assert site.convs[0].weight == "fuse.weight"
    (skipped,) = found.skipped
    assert skipped.reason == "not a channel concatenation (a 3-D [batch, tokens, channels] tensor)"


class Conv1dFuse(nn.Module):
    """A 1-D fusion: [N, C, L] sequences, one upsampled, fused by a Conv1d::

        s ── a ─────────────────────┐
        s ── pool ── b ── up(linear) ┴─ cat ── fuse (Conv1d)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 2, 1), nn.Conv1d(3, 4, 1)
        self.fuse = nn.Conv1d(6, 2, 3, padding=1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.b(F.avg_pool1d(s, 2)), scale_factor=2.0, mode="linear")
        return self.fuse(torch.cat([self.a(s), up], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_three_d_concatenation_read_by_conv1d_is_a_site(frontend: str) -> None:
    found = find_sites(capture(Conv1dFuse(), (torch.randn(2, 3, 16),), frontend=frontend).module)
    (site,) = found.sites
    assert [(i.channels, i.upsample, i.scale) for i in site.inputs] == [((0, 2), None, None),
                                                                          ((2, 6), "linear", (2.0,))]
    assert site.convs[0].padded and not found.skipped


class FunctionalBN(nn.Module):
    """Functional conv and batch norm on the module's own parameters and buffers::

        cat(a, up(b)) ── F.conv2d(·, fuse_w) ── F.batch_norm(·, bn.running_mean, bn.running_var)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
        self.fuse_w = nn.Parameter(torch.randn(3, 4, 1, 1))
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0)
        y = F.conv2d(torch.cat([self.a(x), up], 1), self.fuse_w)
        return F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_batch_norm_forms_are_read_from_one_table(frontend: str) -> None:
    (site,) = find_sites(capture(FunctionalBN(), (X,), frontend=frontend).module).sites
    (conv,) = site.convs
    assert (conv.module, conv.weight, conv.bias, conv.followed_by_norm, conv.batch_norm) == (
        "", "fuse_w", None, True, "bn")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_conv_parameters_and_batch_norm_module(frontend: str) -> None:
    gm = capture(BNHead(), (X,), frontend=frontend).module
    convs = [n for n in gm.graph.nodes if n.target in ("a.0", "b.0", "fuse", "head", torch.ops.aten.conv2d.default)]
    assert [conv_parameters(gm, n) for n in convs] == [
        ("a.0.weight", "a.0.bias"), ("b.0.weight", "b.0.bias"), ("fuse.weight", None), ("head.weight", "head.bias"),
    ]
    assert [p for p in (batch_norm_module(gm, n) for n in gm.graph.nodes) if p] == ["a.1", "b.1", "bn"]
    placeholder = next(iter(gm.graph.find_nodes(op="placeholder")))
    with pytest.raises(ValueError, match=f"node {placeholder.name} .* is not a conv"):
        conv_parameters(gm, placeholder)


def test_conv_parameters_rejects_a_computed_weight() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.w * 2.0)

    gm = capture(Computed(), (X,)).module
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    with pytest.raises(ValueError, match=r"conv conv2d \(conv2d\) takes its weight or bias from a computed tensor"):
        conv_parameters(gm, conv)


# ---------------------------------------------------------------------------
# Pads, resizes that do not enlarge, learned upsampling, transposed convs, aliasing
# ---------------------------------------------------------------------------

class PadThenCat(nn.Module):
    """x ── a ──┐;  x ── pool ── b ── upsample ── pad(p, replicate) ──┴─ cat ── fuse (MONAI's UpCat)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.a, self.b, self.fuse = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="nearest")
        b = F.pad(b, [0, self.pad, 0, self.pad], mode="replicate")
        a = F.pad(self.a(x), [0, self.pad, 0, self.pad])
        return self.fuse(torch.cat([a, b], 1))


@pytest.mark.parametrize("frontend", ["fx", "export", "concrete"])
@pytest.mark.parametrize("pad", [0, 1])
def test_a_pad_between_upsample_and_cat_is_looked_through(frontend: str, pad: int) -> None:
    (site,) = find_sites(capture(PadThenCat(pad), X, frontend=frontend, deployable=False).module).sites
    assert [i.upsample for i in site.inputs] == [None, "nearest"]
    assert site.inputs[1].padded == bool(pad)
    assert any("passes a spatial pad" in n for n in site.notes) == bool(pad)


class Resize(nn.Module):
    """x ── a ──┐;  x ── b ── resize to (a's size) x factor ──┴─ cat ── fuse: a resize that does not enlarge."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.a, self.b, self.fuse = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(F.avg_pool2d(x, 2) if self.factor < 1 else x)
        b = F.interpolate(self.b(x), size=a.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([a, b], 1))


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_a_resize_that_does_not_enlarge_is_no_upsampling(factor: float) -> None:
    search = find_sites(capture(Resize(factor), X).module)
    assert not search.sites
    assert "no input comes from an upsampling op" in search.skipped[0].reason
    (site,) = find_sites(capture(Resize(factor), X).module, all_concats=True).sites
    assert [i.upsample for i in site.inputs] == [None, None] and site.inputs[1].scale is None


class Learned(nn.Module):
    """x ── a ──┐;  x ── pool ── ConvTranspose(s2) ── BN ── ReLU (PReLU: MONAI UNet's up path) ──┴─ cat ── fuse
    (a ConvTranspose when ``into``)."""

    def __init__(self, into_transposed: bool = False, prelu: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        after = [nn.PReLU()] if prelu else [nn.BatchNorm2d(4), nn.ReLU()]
        self.up = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), *after)
        self.fuse = nn.ConvTranspose2d(8, 2, 3, padding=1) if into_transposed else nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.a(x), self.up(F.avg_pool2d(x, 2))], 1))


class UpsampleThenNorm(nn.Module):
    """x ── a ──┐;  x ── pool ── b ── interpolate ── BN ──┴─ cat ── fuse: the BN sets the branch's scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn, self.fuse = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), \
            nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.bn(F.interpolate(self.b(F.avg_pool2d(x, 2)), scale_factor=2.0))
        return self.fuse(torch.cat([self.a(x), up], 1))


_LEARNED = ("its upsampled input comes from a ConvTranspose2d at up.0 (learned upsampling, not interpolation: not a "
            "site by the paper's definition)")


@pytest.mark.parametrize("frontend", ["fx", "export", "concrete"])
@pytest.mark.parametrize(("build", "reason"), [
    (Learned, _LEARNED),
    (lambda: Learned(prelu=True), _LEARNED),  # the PReLU is looked through, on every frontend
    (UpsampleThenNorm, "its upsampled input is normalized after the interpolation, by a BatchNorm2d at bn, which "
                       "sets its scale"),  # not blamed on a pixel shuffle
], ids=["learned", "learned-prelu", "norm-after-interpolation"])
def test_a_skip_names_why_its_upsampled_input_is_none_and_the_fix(build: Callable[[], nn.Module], reason: str,
                                                                  frontend: str) -> None:
    (skipped,) = find_sites(capture(build(), X, frontend=frontend, deployable=False).module).skipped
    assert (skipped.reason, skipped.fix) == (reason, "pass all_concats=True to equalize it")
    assert skipped.text == f"{reason}; pass all_concats=True to equalize it"


def test_the_no_site_warning_gives_each_fix_once() -> None:
    class Both(nn.Module):  # two skipped concatenations with the same fix
        def __init__(self) -> None:
            super().__init__()
            self.learned, self.a, self.b, self.fuse = Learned(), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), \
                nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.learned(x) + self.fuse(torch.cat([self.a(x), self.b(x)], 1))

    with pytest.warns(fxeq.NoSiteWarning) as caught:
        fxeq.transform(Both(), [X], frontend="export")
    text = str(caught[0].message)
    assert text.count("all_concats=True") == 1
    assert text.endswith("\nFix for the concatenations above: pass all_concats=True to equalize it.")
    assert "ConvTranspose2d at learned.up.0 (learned upsampling" in text
    assert "no input comes from an upsampling op (same-resolution features)" in text


@pytest.mark.parametrize("frontend", ["fx", "export", "concrete"])
def test_a_transposed_fusing_conv_is_a_site_with_all_concats(frontend: str) -> None:
    gm = capture(Learned(into_transposed=True), X, frontend=frontend, deployable=False).module
    (site,) = find_sites(gm, all_concats=True).sites
    (conv,) = site.convs
    assert conv.module == "fuse" and conv.transposed and conv.stride == (1, 1) and conv.shape == (8, 2, 3, 3)


@pytest.mark.parametrize("frontend", ["fx", "export", "concrete"])
def test_a_module_under_two_names_is_no_tie(frontend: str) -> None:
    """An exported graph rebuilds its module tree from names: there the two names are two objects."""
    model = TwoBranch()
    model.alias = model.fuse  # one object, two names (as MONAI's DynUNet registers its up blocks)
    (site,) = find_sites(capture(model, X, frontend=frontend, deployable=False).module, model=model).sites
    assert site.convs[0].module in ("fuse", "alias")


def test_a_parameter_held_by_two_modules_is_a_tie() -> None:
    model = TwoBranch()
    model.other = nn.Conv2d(8, 4, 1)
    model.other.weight = model.fuse.weight  # a tie the graph never shows: `other` is never called
    search = find_sites(capture(model, X).module, model=model)
    assert not search.sites
    assert search.skipped[0].reason == ("its conv fuse (Conv2d) shares parameter fuse.weight with other.weight (tied "
                                        "parameters); rescaling it would change those too")
