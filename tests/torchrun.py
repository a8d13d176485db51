"""Run a module under ``torchrun`` (2 processes on the CPU, gloo) the way a user launches it, for the tests that
compare a sharded run with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun(*argv: str, module: str = "ptq4ris", nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC -m MODULE ARGV...`` from the repository root."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_json(*argv: str, **kwargs) -> dict:
    """The JSON object a sharded ``--json`` command prints: stdout must be that one object (rank 0 reports, the
    other ranks print nothing)."""
    done = torchrun(*argv, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


WALL_CLOCK = ("seconds", "pairs_per_second", "processes")


def without_wall_clock(report):
    """``report`` without the figures a second process legitimately changes (time, throughput, process count)."""
    if isinstance(report, dict):
        return {k: without_wall_clock(v) for k, v in report.items() if k not in WALL_CLOCK}
    if isinstance(report, list):
        return [without_wall_clock(v) for v in report]
    return report
