"""``torchrun`` for the command line: ranks, the process group, who writes, who speaks.

Under ``torchrun`` (its environment: ``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``), ``fxeq convert`` and ``fxeq inspect`` join a
process group (gloo on the CPU, nccl for CUDA), even as its only process, so
that ``torchrun --nproc-per-node 1`` runs the path that several processes run.
Each process calibrates on its share of the batches, fxeq merges the
statistics across processes, and rank 0 alone writes and prints; the others
wait for it at a barrier.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["is_rank_zero", "launched", "note", "process_group", "rank_zero_writes", "ranks"]

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")  # what init_process_group("env://") reads


def ranks() -> tuple[int, int]:
    """This process's rank and the number of processes: torch.distributed's, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process: several processes, or its environment set."""
    return ranks()[1] > 1 or all(os.environ.get(name) for name in _LAUNCHER_ENV)


def is_rank_zero() -> bool:
    """Whether this process writes and prints (the only one, or rank 0)."""
    return ranks()[0] == 0


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[str | None]:
    """torch.distributed, initialized from torchrun's environment for the block and destroyed after it.

    gloo on the CPU, nccl on CUDA; under torchrun always, even with one
    process. Outside torchrun, or when the caller initialized a process
    group, nothing is done. Yields the backend in use, or None without one.
    """
    if not launched() or dist.is_initialized():
        yield dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield dist.get_backend()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_writes() -> Iterator[bool]:
    """Whether this process writes the output: rank 0 alone; the others wait at a barrier until it is done or failed."""
    try:
        yield is_rank_zero()
    finally:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()


def note(text: str, *, quiet: bool = False) -> None:
    """A message on stderr, from rank 0 only under torchrun; none with ``quiet``."""
    if is_rank_zero() and not quiet:
        print(f"fxeq: {text}", file=sys.stderr, flush=True)
