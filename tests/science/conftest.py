"""Tiny models only in this folder: one intra-op thread avoids OpenMP spin-waiting (10-100x slower
small matmuls) when the CPU is shared with other jobs; the previous setting is restored."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
