"""find_sites: which concatenations are sites, their slices and convs, and why others are skipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import BNHead, CatTwice, Chained, Negatives, ShapeBranch, SharedFuse, TwoBranch
from torch import nn

from fxeq.capture import capture
from fxeq.sites import find_sites

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
    assert (conv.weight, conv.bias, conv.groups, conv.padded) == ("fuse.weight", "fuse.bias", 1, False)


def test_padded_conv_and_following_norm_are_recorded() -> None:
    gm = capture(BNHead(), (X,)).module
    (site,) = find_sites(gm).sites
    (conv,) = site.convs
    assert conv.padded and conv.followed_by_norm and conv.bias is None
    assert [i.producer for i in site.inputs] == ["a.1 (BatchNorm2d)", "b.1 (BatchNorm2d)"]


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


def test_normalization_breaks_the_dependency() -> None:
    class Normalized(Chained):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = F.interpolate(self.c2(F.avg_pool2d(x, 2)), scale_factor=2.0, mode="bilinear")
            y = self.bn(self.fuse1(torch.cat([self.c1(x), b], 1)))
            c = F.interpolate(self.c3(F.avg_pool2d(x, 4)), scale_factor=4.0)
            return self.fuse2(torch.cat([y, c], 1))

    found = find_sites(capture(Normalized(), (X,)).module)
    assert [s.depends_on for s in found.sites] == [(), ()]
    assert len(found.generations()) == 1


@given(widths=st.lists(st.integers(0, 4), min_size=2, max_size=5), groups=st.sampled_from([1, 0]))
@settings(max_examples=15, deadline=None)
def test_slices_tile_the_concatenation(widths: list[int], groups: int) -> None:
    total = sum(widths)
    if total == 0:
        return
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
