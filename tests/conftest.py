"""Shared test settings."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """lavt-tiny's ops are too small to gain from intra-op threads, and when anything else runs on the machine their
    spin-waits slow every small op down by one or two orders of magnitude (a calibration test: 9 s vs 314 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
