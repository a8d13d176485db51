"""Shared test settings."""

import os

import pytest
import torch

# Children the tests start (the CLI in subprocesses) compute on one intra-op thread too, unless the caller says
# otherwise: with two test workers on two cores, a child's OpenMP threads spin-wait against the other worker's and
# crawl (a calibration child took 4x as long).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Files whose module fixtures calibrate and lower lavt-tiny (minutes each): scheduled first, so the test workers
# finish together instead of one of them starting the longest file last.
LONG_FILES = (
    "test_bench.py",
    "test_device_parity.py",
    "test_bad_inputs.py",
    "test_demo.py",
    "test_export_pte.py",
    "test_export_coreml.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """lavt-tiny's ops are too small to gain from intra-op threads, and when anything else runs on the machine their
    spin-waits slow every small op down by one or two orders of magnitude (a calibration test: 9 s vs 314 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
