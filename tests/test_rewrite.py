"""fold / fold_site / write_parameters: weight-slice math against a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxeq.errors import AlreadyEqualizedError, FxEqError
from fxeq.fold import fold, fold_site
from fxeq.rewrite import check_not_equalized, mark_folded, write_parameters
from fxeq.sites import FusingConv, Site, SiteInput


def _reference(x, weight, bias, mean, std, groups, padding):
    """conv((x - mean) / std) in float64, with the standardized input padded by zeros."""
    z = (x.double() - mean.double().view(1, -1, 1, 1)) / std.double().view(1, -1, 1, 1)
    b = None if bias is None else bias.double()
    return F.conv2d(z, weight.double(), b, padding=padding, groups=groups)


@given(
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    group_kind=st.sampled_from(["one", "two", "depthwise"]),
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_fold_matches_float64_reference(widths, group_kind, kernel, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    channels = sum(widths)
    groups = {"one": 1, "two": 2 if channels % 2 == 0 else 1, "depthwise": channels}[group_kind]
    out = groups * 2
    weight = torch.randn(out, channels // groups, kernel, kernel, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    slice_mean = torch.randn(len(widths), generator=g) * 3
    slice_std = torch.rand(len(widths), generator=g) * 4 + 0.1
    mean = torch.repeat_interleave(slice_mean, torch.tensor(widths))
    std = torch.repeat_interleave(slice_std, torch.tensor(widths))
    x = (torch.randn(2, channels, 6, 6, generator=g) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).to(dtype)

    new_w, new_b = fold(weight, b, mean, std, groups)
    assert new_w.dtype == dtype and (new_b is None or new_b.dtype == dtype)
    expected = _reference(x, weight, b, mean if bias else torch.zeros_like(mean), std, groups, kernel // 2)
    got = F.conv2d(x.double(), new_w.double(), None if new_b is None else new_b.double(),
                   padding=kernel // 2, groups=groups)
    if kernel == 3:  # the mean fold is exact only where no zero padding is read
        expected, got = expected[..., 1:-1, 1:-1], got[..., 1:-1, 1:-1]
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(got, expected, atol=tol * scale * 10, rtol=tol)


def test_scale_is_exact_per_slice_for_misaligned_groups():
    """Groups of 3 channels over slices of 2 and 4: every column maps to its own slice."""
    weight = torch.ones(6, 3, 1, 1, dtype=torch.float64)
    std = torch.tensor([2.0, 2.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    new_w, _ = fold(weight, None, torch.zeros(6, dtype=torch.float64), std, groups=2)
    assert new_w[:3, :, 0, 0].tolist() == [[0.5, 0.5, 0.2]] * 3
    assert new_w[3:, :, 0, 0].tolist() == [[0.2, 0.2, 0.2]] * 3


def test_fold_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="reads 4 channels, but mean/std have 3"):
        fold(torch.ones(2, 4, 1, 1), None, torch.zeros(3), torch.ones(3))


def _site() -> Site:
    return Site(
        "cat", (SiteInput(0, "a", (0, 2), "conv a"), SiteInput(1, "b", (2, 3), "conv b", "bilinear", (2.0, 2.0))),
        (FusingConv("fuse", "fuse", "fuse.weight", "fuse.bias", 1, False, False),),
    )


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [
        ({0: 0.0, 1: 0.0}, {0: 1.0, 1: 0.0}, r"site 'cat' \(conv fuse\), input 1 \(node 'b'.*std above 1e-05 x "
                                              r"\|mean\| \(anything smaller is a constant.*std=0"),
        ({0: float("nan"), 1: 0.0}, {0: 1.0, 1: 1.0}, r"input 0 .*finite mean.*mean=nan"),
        ({0: 0.0, 1: 0.0}, {0: float("inf"), 1: 1.0}, r"input 0 .*std=inf"),
    ],
)
def test_fold_site_rejects_unusable_statistics(mean, std, message):
    params = {"fuse.weight": torch.ones(2, 3, 1, 1), "fuse.bias": torch.zeros(2)}
    with pytest.raises(FxEqError, match=message):
        fold_site(_site(), mean, std, params)


def test_fold_site_rejects_overflow_in_low_precision():
    params = {"fuse.weight": torch.full((2, 3, 1, 1), 60000.0, dtype=torch.float16), "fuse.bias": None}
    site = Site(_site().name, _site().inputs, (FusingConv("fuse", "fuse", "fuse.weight", None, 1, False, False),))
    with pytest.raises(FxEqError, match=r"site 'cat': folding into fuse.weight overflows torch.float16 \(std as small "
                                        r"as 0\.001\)\. Calibrate the model in a wider dtype \(e\.g\. model\.float\(\)\), "
                                        r"then cast it back; nothing was modified\."):
        fold_site(site, {0: 0.0, 1: 0.0}, {0: 1.0, 1: 1e-3}, params)


def test_write_parameters_writes_shared_parameters_once_and_marks_them():
    conv = nn.Conv2d(3, 2, 1)
    holder = nn.Module()
    holder.fuse = conv
    new = {"fuse.weight": torch.full_like(conv.weight, 7.0), "fuse.bias": torch.zeros(2)}
    write_parameters([holder, holder], new)
    assert conv.weight.eq(7.0).all() and conv.bias.eq(0).all()
    check_not_equalized(holder)
    mark_folded([holder], {"fuse.weight": "cat"})
    with pytest.raises(AlreadyEqualizedError, match="conv fuse was already equalized by fxeq .*site 'cat'"):
        check_not_equalized(holder)
    with pytest.raises(AlreadyEqualizedError, match="conv fuse was already equalized"):
        check_not_equalized(copy.deepcopy(holder))


def test_write_parameters_validates_every_shape_first():
    holder = nn.Module()
    holder.fuse = nn.Conv2d(3, 2, 1)
    before = holder.fuse.bias.detach().clone()
    new = {"fuse.bias": torch.zeros(2), "fuse.weight": torch.zeros(2, 3, 3, 3)}
    with pytest.raises(FxEqError, match=r"parameter fuse.weight has shape \(2, 3, 1, 1\), expected \(2, 3, 3, 3\)"):
        write_parameters([holder], new)
    assert torch.equal(holder.fuse.bias, before)
