"""Make the fixture models importable as ``models`` and keep tests deterministic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the suite starts; see one_thread


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite, restored after.

    The suite's models are small, so a second thread gains little, and on a
    machine whose cores are busy with other work two threads contend: the
    quick loop took 39 s with two threads and 12 s with one on a loaded 2-core
    machine. Subprocesses get the same through ``OMP_NUM_THREADS``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
