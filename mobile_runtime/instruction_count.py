"""Instructions retired per forward of a ``.pte`` program: a cost measure that machine noise cannot move.

Wall-clock time on a shared x86 host neither shows what an ARM phone pays (its int8 dot-product units and its
overheads differ) nor repeats from run to run. Instructions retired by the same native runner do repeat (exactly on
x86; on aarch64 within about 2e-4 of a forward, since qemu's own threads perturb where guest memory lands and copies
take alignment-dependent paths):

- ``aarch64``: the aarch64 runner under ``qemu-aarch64 -cpu cortex-a76`` (XNNPACK's NEON and dot-product kernels) with
  a small TCG plugin (``native/insn_count.c``, built here) that counts the guest instructions of every block the main
  thread executes;
- ``x86``: the host runner under valgrind's callgrind (``Ir`` inside the forwards, on the main thread).

One forward is the difference between a run of the program with two timed forwards and one with one (both after a
warm-up forward), so loading the program, packing weights and writing outputs cancel out. Counts are taken at one
thread: a worker pool's spin-waits would add instructions that depend on scheduling.

An instruction is not a cycle: a ``sdot`` does 16 multiply-adds in one instruction, a scalar float op one. The count
says how much work a core issues, which is what the int8 kernels cut; the ratio of two programs' counts on the same
architecture is the figure to compare.

``python -m mobile_runtime.instruction_count build`` builds the plugin; ``... count --arch aarch64 model.pte`` counts.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from quantize.errors import UserError

from .native_runner import DEFAULT_BUILD, SOURCE, NativeRunner, ToolMissing, build_lock, build_runner

__all__ = ["ARCHES", "InstructionCount", "build_counter_plugin", "count_instructions"]

ARCHES = ("aarch64", "x86")
PLUGIN_SOURCE = SOURCE / "insn_count.c"
INSTALL_HINT = {
    "aarch64": "install the system tools with `make system-tools` (Debian: qemu-user g++-aarch64-linux-gnu cmake)",
    "x86": "install valgrind (`make system-tools`, Debian: valgrind)",
}


# The environment is copied onto the stack of the counted process: the same for every count, whatever the caller's.
_FIXED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class InstructionCount:
    """Instructions retired by one forward of ``program`` on ``arch`` (and the two totals it is the difference of)."""

    program: str
    arch: str
    per_forward: int
    totals: tuple[int, int]


def build_counter_plugin(build_dir: Path = DEFAULT_BUILD) -> Path:
    """Compile the qemu instruction-counting plugin for this machine (qemu runs here); rebuilt when the source
    changes."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ToolMissing(f"no C compiler (cc) to build the qemu plugin: {INSTALL_HINT['aarch64']}")
    # Absolute: qemu runs inside the runner's own working folder.
    out = (Path(build_dir) / "qemu-plugin" / "libptq4ris_insn_count.so").resolve()
    with build_lock(Path(build_dir)):
        if out.is_file() and out.stat().st_mtime >= PLUGIN_SOURCE.stat().st_mtime:
            return out
        return _compile_plugin(compiler, out)


def _compile_plugin(compiler: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [compiler, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(tmp), str(PLUGIN_SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-2000:]}")
    tmp.replace(out)
    return out


def _counting_prefix(runner: NativeRunner, arch: str, plugin: Path | None, count_file: Path) -> list[str]:
    # Fixed addresses (no ASLR): copies and kernels take alignment-dependent paths, so a randomly placed stack or heap
    # moves the count by a few instructions from one run to the next.
    fixed = [shutil.which("setarch") or "setarch", "-R"]
    if arch == "aarch64":
        # The plugin goes between qemu's own options and the guest binary.
        return [*fixed, *runner.prefix, "-plugin", f"{plugin},outfile={count_file}"]
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise ToolMissing(f"valgrind is not installed: {INSTALL_HINT['x86']}")
    # Only the forwards are counted (collection toggled on inside Module::execute), on the main thread's own file: at
    # startup the default thread pool is made and replaced by a one-thread one, and how long the main thread waits for
    # the old pool's worker depends on scheduling.
    return [
        *fixed,
        valgrind,
        "--tool=callgrind",
        "--quiet",
        "--separate-threads=yes",
        "--collect-atstart=no",
        "--toggle-collect=executorch::extension::*Module::execute(*",
        f"--callgrind-out-file={count_file}",
    ]


def _read_total(arch: str, count_file: Path) -> int:
    if arch == "x86":
        count_file = count_file.with_name(count_file.name + "-01")  # the main thread's
    text = count_file.read_text()
    pattern = r"^instructions (\d+)$" if arch == "aarch64" else r"^(?:totals|summary): (\d+)"
    found = re.search(pattern, text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no instruction total in {count_file}: {text[:200]!r}")
    return int(found.group(1))


def count_instructions(
    pte: str | Path,
    inputs: tuple[torch.Tensor, ...],
    arch: str = "aarch64",
    build_dir: Path = DEFAULT_BUILD,
    timeout: float = 1800,
) -> InstructionCount:
    """Instructions retired by one steady-state forward of ``pte`` on ``inputs`` (built runners are reused)."""
    if arch not in ARCHES:
        raise UserError(f"unknown architecture {arch!r}: choose from {', '.join(ARCHES)}")
    build_dir = Path(build_dir)
    if arch == "aarch64":
        binary = build_runner("aarch64", build_dir, log=lambda _: None)
        runner, plugin = NativeRunner(binary, emulate=True, timeout=timeout), build_counter_plugin(build_dir)
    else:
        if shutil.which("valgrind") is None:
            raise ToolMissing(f"valgrind is not installed: {INSTALL_HINT['x86']}")
        runner, plugin = NativeRunner(build_runner("host", build_dir, log=lambda _: None), timeout=timeout), None
    totals = []
    with tempfile.TemporaryDirectory(prefix="ptq4ris-count-") as tmp:
        for runs in (1, 2):
            count_file = Path(tmp) / f"count-{runs}.txt"
            prefix = _counting_prefix(runner, arch, plugin, count_file)
            runner.run(pte, inputs, warmup=1, runs=runs, threads=1, prefix=prefix, timing=False, env=_FIXED_ENV)
            totals.append(_read_total(arch, count_file))
    return InstructionCount(str(pte), arch, totals[1] - totals[0], (totals[0], totals[1]))


def main(argv: list[str] | None = None) -> int:
    from .benchmark import program_inputs
    from .runtime import PteProgram

    p = argparse.ArgumentParser(
        prog="python -m mobile_runtime.instruction_count",
        description="Instructions retired per forward of .pte programs (aarch64 under qemu, x86 under callgrind).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the qemu counting plugin and the runners")
    b.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    c = sub.add_parser("count", help="count one forward of each program, on its declared-shape inputs")
    c.add_argument("programs", nargs="+", metavar="PTE")
    c.add_argument("--arch", choices=ARCHES, nargs="+", default=list(ARCHES))
    c.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            print(build_counter_plugin(Path(args.build_dir)))
            for target in ("host", "aarch64"):
                build_runner(target, Path(args.build_dir))
            return 0
        for pte in args.programs:
            inputs = tuple(program_inputs(PteProgram(pte)))
            for arch in args.arch:
                n = count_instructions(pte, inputs, arch, Path(args.build_dir))
                print(f"{pte} {arch}: {n.per_forward:,} instructions per forward")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
