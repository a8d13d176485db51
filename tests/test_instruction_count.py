"""The instruction counter's meaning, checked once: it scales with the work and repeats exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mobile_runtime.instruction_count import count_instructions

ROOT = Path(__file__).resolve().parents[1]
NEEDS = {
    "aarch64": (("qemu-aarch64", "aarch64-linux-gnu-g++", "cmake", "cc"), "qemu-user g++-aarch64-linux-gnu cmake"),
    "x86": (("valgrind", "cmake", "c++"), "valgrind cmake"),
}


def _skip_without(arch: str) -> None:
    tools, packages = NEEDS[arch]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: `make system-tools` (Debian: {packages})")


def _linear_program(path, rows: int, width: int = 256) -> tuple[torch.Tensor, ...]:
    """Two XNNPACK-delegated linear layers on ``rows`` rows: twice the rows is exactly twice the GEMM work."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).eval()
    example = (torch.randn(rows, width),)
    edge = to_edge_transform_and_lower(torch.export.export(model, example), partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    return example


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("count")
    small, large = folder / "rows64.pte", folder / "rows128.pte"
    return (small, _linear_program(small, 64)), (large, _linear_program(large, 128))


@pytest.mark.parametrize("arch", ["aarch64", "x86"])
def test_count_scales_with_the_work_and_repeats_exactly(programs, arch, tmp_path):
    _skip_without(arch)
    (small, small_inputs), (large, large_inputs) = programs
    build = ROOT / "build"  # the runners' usual folder: built once, shared with the device-harness tests
    first = count_instructions(small, small_inputs, arch, build)
    again = count_instructions(small, small_inputs, arch, build)
    double = count_instructions(large, large_inputs, arch, build)
    if arch == "x86":  # callgrind runs the guest deterministically: exactly the same count
        assert first.per_forward == again.per_forward and first.totals == again.totals, (first, again)
    else:
        # Under qemu the guest's memory placement follows the host's, which qemu's own threads perturb; copies and
        # kernels then take alignment-dependent paths a few hundred instructions apart in millions (measured: up to
        # 2e-4 of a forward). Far below any difference between two programs worth comparing.
        assert abs(first.per_forward - again.per_forward) <= 1e-3 * first.per_forward, (first, again)
    # Twice the rows: twice the multiply-adds; fixed per-call costs keep the ratio a little under 2.
    assert 1.7 < double.per_forward / first.per_forward < 2.1, (first, double)
    # A forward is a real share of a run, not noise on top of loading the program.
    assert first.per_forward > 0.01 * first.totals[0]


def test_count_with_a_relative_build_folder(programs, tmp_path, monkeypatch):
    """The runner runs inside its own working folder: paths given relative to the caller's must still resolve."""
    _skip_without("aarch64")
    (small, inputs), _ = programs
    monkeypatch.chdir(ROOT)
    # The runners' usual folder, named relative to the working folder.
    assert count_instructions(small, inputs, "aarch64", Path("build")).per_forward > 0


def test_unknown_architecture_is_a_user_error(programs):
    from quantize.errors import UserError

    (small, inputs), _ = programs
    with pytest.raises(UserError, match="unknown architecture"):
        count_instructions(small, inputs, "riscv")
