"""ScaleObserver and channel_moments: statistics against float64, chunked reductions, the merge across ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxeq.observe import merge_across_ranks
from fxeq.observe import ScaleObserver


@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    offset=st.sampled_from([0.0, 1.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_observer_matches_float64_reference(sizes, offset, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(n, 3, generator=g) * 0.5 + offset).to(dtype) for n in sizes]
    observer = ScaleObserver()
    for p in parts:
        assert observer(p) is p
    everything = torch.cat([p.double() for p in parts])
    assert observer.count == everything.numel()
    assert observer.samples == sum(sizes)
    torch.testing.assert_close(observer.mean.item(), everything.mean().item(), rtol=1e-6, atol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(observer.std().item(), everything.std(unbiased=False).item(), rtol=tol, atol=1e-6)


def test_large_mean_keeps_a_positive_exact_variance():
    """A float32 sum / sum-of-squares gives a negative variance here; Chan's merge does not."""
    observer = ScaleObserver()
    g = torch.Generator().manual_seed(0)
    data = [1e4 + torch.randn(64, 8, 8, 8, generator=g) for _ in range(8)]
    for x in data:
        observer(x)
    naive = sum((x.sum() for x in data), torch.tensor(0.0))
    naive_sq = sum(((x * x).sum() for x in data), torch.tensor(0.0))
    n = sum(x.numel() for x in data)
    reference = torch.cat([x.double().flatten() for x in data]).std(unbiased=False).item()
    assert abs((naive_sq / n - (naive / n) ** 2).item() - reference**2) > 0.5, "the naive float32 way is wrong here"
    assert abs(observer.std().item() - reference) < 1e-3


def test_observer_reset():
    observer = ScaleObserver()
    observer(torch.ones(3))
    assert observer.count == 3
    observer.reset()
    assert observer.count == 0 and observer.samples == 0


def test_merge_across_ranks_is_a_no_op_without_distributed():
    observer = ScaleObserver()
    observer(torch.arange(4.0))
    merge_across_ranks([observer])
    assert observer.count == 4 and observer.mean.item() == 1.5


def _merge_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        observers = [ScaleObserver(), ScaleObserver()]
        for _ in range(rank + 1):
            observers[0](torch.randn(3 + rank, 4, generator=g) * (rank + 1) + 100 * rank)
            observers[1](torch.randn(2, 5, generator=g))
        merge_across_ranks(observers)
        torch.save([(o.count, o.samples, o.mean.item(), o.std().item()) for o in observers], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_merge_across_ranks_equals_the_pooled_statistics(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats")
    mp.spawn(_merge_worker, args=(2, port, out), nprocs=2)
    pooled = [[], []]
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        for _ in range(rank + 1):
            pooled[0].append((torch.randn(3 + rank, 4, generator=g) * (rank + 1) + 100 * rank).double())
            pooled[1].append(torch.randn(2, 5, generator=g).double())
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    assert results[0] == results[1], "every rank must end with the same statistics"
    for (count, samples, mean, std), parts in zip(results[0], pooled, strict=True):
        values = torch.cat([p.flatten() for p in parts])
        assert count == values.numel() and samples == sum(p.shape[0] for p in parts)
        assert mean == pytest.approx(values.mean().item(), rel=1e-7)
        assert std == pytest.approx(values.std(unbiased=False).item(), rel=1e-5)


def test_channel_moments_in_blocks_equal_the_float64_reference(monkeypatch):
    import fxeq.observe as observe

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 5, 4, generator=g) * torch.arange(1, 8).view(1, 7, 1, 1) + 50.0
    whole = observe.channel_moments(x)
    monkeypatch.setattr(observe, "_BLOCK_ELEMENTS", 2 * 60)  # two channels per block, the last one alone
    count, mean, m2 = observe.channel_moments(x)
    reference = x.double().transpose(0, 1).reshape(7, -1)
    assert count == whole[0] == 60
    torch.testing.assert_close(mean, reference.mean(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m2, ((reference - reference.mean(1, keepdim=True)) ** 2).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((mean, m2), whole[1:], rtol=1e-6, atol=1e-9)


def test_channel_moments_correct_the_shifts_rounding():
    """A float32 mean of values near 1e4 is off by about 1e-3; the deviations' sum corrects it (float64)."""
    from fxeq.observe import channel_moments

    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(1, 2, 512, 512, generator=g, dtype=torch.float64)).float()
    count, mean, m2 = channel_moments(x)
    reference = x.double()
    expected_mean = reference.mean(dim=(0, 2, 3))
    expected_m2 = ((reference - expected_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    assert count == 512 * 512
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=1e-6)  # uncorrected: 3e-4 off
    torch.testing.assert_close(m2, expected_m2, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_channel_moments_when_the_shift_sample_is_far_from_the_mean(dtype):
    """The shift comes from a sample of each row; a sample far off the mean (a constant border) must not matter."""
    from fxeq.observe import channel_moments

    g = torch.Generator().manual_seed(1)
    offset, scale = (1e4, 1.0) if dtype == torch.float32 else (20.0, 3.0)
    x = offset + scale * torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    x[0, :, :2, :] = 0.0  # the first rows of sample 0 are a zero border
    x[:, :, :, ::2] = x[:, :, :, ::2] * 1.5  # the sampled columns differ from the others
    values = x.to(dtype)
    count, mean, m2 = channel_moments(values)
    reference = values.double()
    expected_mean = reference.mean(dim=(0, 2, 3))
    expected_m2 = ((reference - expected_mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    torch.testing.assert_close(mean, expected_mean, rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(m2, expected_m2, rtol=1e-5, atol=0)


def test_channel_moments_of_a_channels_last_tensor():
    from fxeq.observe import channel_moments

    x = torch.randn(2, 5, 6, 7) * 3 + 2
    count, mean, m2 = channel_moments(x.contiguous(memory_format=torch.channels_last))
    reference = x.double().transpose(0, 1).reshape(5, -1)
    assert count == 2 * 6 * 7
    torch.testing.assert_close(mean, reference.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2, ((reference - reference.mean(1, keepdim=True)) ** 2).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(2048, 2048), (2047, 2049)], ids=["cut-in-pieces", "no-divisor"])
def test_channel_moments_of_long_rows_keep_float64_precision(size):
    """A 2048x2048 map is one row of 4M values: a float32 norm of it lost 1e-4 of the std."""
    from fxeq.observe import channel_moments

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, *size, generator=g) * 0.5 + 2
    count, mean, m2 = channel_moments(x)
    reference = x.double().transpose(0, 1).reshape(2, -1)
    expected = ((reference - reference.mean(1, keepdim=True)) ** 2).sum(1)
    torch.testing.assert_close(m2, expected, rtol=1e-6, atol=0)


def test_channel_moments_when_outliers_sit_where_the_shift_is_sampled():
    """Outliers on a regular grid of the map must not pull the shift away (a negative M2 before)."""
    from fxeq.observe import channel_moments

    g = torch.Generator().manual_seed(3)
    x = torch.zeros(1, 1, 2048, 2048) + 5.0
    x.view(-1)[torch.arange(0, 2048 * 2048, 2048 * 2048 // 16)] = 1e5
    x += torch.randn(1, 1, 2048, 2048, generator=g) * 0.1
    count, mean, m2 = channel_moments(x)
    reference = x.double().flatten()
    assert m2.item() > 0
    assert (m2.item() / count) ** 0.5 == pytest.approx(reference.std(unbiased=False).item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["no-samples", "no-positions"])
def test_channel_moments_of_an_empty_tensor_count_nothing(shape):
    from fxeq.observe import channel_moments

    count, mean, m2 = channel_moments(torch.randn(*shape))
    assert count == 0 and mean.tolist() == [0.0] * 3 and m2.tolist() == [0.0] * 3
