"""Build and drive the native runner (``mobile_runtime/native/``): the same C++ program on the host, under qemu as an
emulated ARM phone, and (through :mod:`mobile_runtime.adb`) on a real one.

``python -m mobile_runtime.native_runner build [--target host|aarch64]`` builds it; the aarch64 build cross-compiles
with Debian's ``g++-aarch64-linux-gnu`` against the aarch64 ExecuTorch wheel from PyPI (downloaded once into the
build folder). :class:`NativeRunner` writes real input tensors as raw files, runs the binary, and reads back its outputs
and latency.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from quantize.errors import MissingFileError, UserError

from .runtime import check_pte_file

__all__ = ["NativeRunner", "RunResult", "ToolMissing", "build_lock", "build_runner", "executorch_root"]

SOURCE = Path(__file__).parent / "native"
DEFAULT_BUILD = Path("build")
# qemu 7.2's default `-cpu max` computes wrong int8 results; a phone-class core is both right and realistic.
QEMU_CPU = "cortex-a76"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8}
INSTALL_HINT = "install the system tools with `make system-tools` (Debian: qemu-user g++-aarch64-linux-gnu cmake)"


class ToolMissing(UserError, RuntimeError):
    """A system tool the native runner needs is not installed."""


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolMissing(f"{tool} is not installed: {INSTALL_HINT}")
    return path


def executorch_root() -> Path:
    """The installed executorch package folder (headers, libraries and CMake config for the host build)."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise ToolMissing("the executorch package is not installed: pip install -e .")
    return Path(next(iter(spec.submodule_search_locations)))


def aarch64_executorch_root(build_dir: Path) -> Path:
    """The aarch64 executorch wheel's package folder, downloaded from PyPI into ``build_dir`` on first use."""
    from importlib.metadata import version

    target = build_dir / "executorch-aarch64"
    root = target / "executorch"
    if (root / "share" / "cmake" / "executorch-config.cmake").is_file():
        return root
    wanted = version("executorch")
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
            "manylinux_2_28_aarch64", "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
            "--dest", tmp, f"executorch=={wanted}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("executorch-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ToolMissing(
                f"could not download the aarch64 executorch {wanted} wheel from PyPI ({done.stderr.strip()[-300:]}); "
                "the aarch64 runner links against its libraries"
            )
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.startswith(("executorch/lib/", "executorch/include/",
                                                                     "executorch/share/"))]  # fmt: skip
            wheel.extractall(staging, members)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # complete or absent: never a half-unpacked package
    return root


def build_runner(target: str = "host", build_dir: Path = DEFAULT_BUILD, log=print) -> Path:
    """Configure and build the runner for ``host`` or ``aarch64``; returns the binary. Rebuilds only what changed."""
    if target not in ("host", "aarch64"):
        raise UserError(
            f"unknown target {target!r}: host or aarch64 (Android: see mobile_runtime/native/CMakeLists.txt)"
        )
    _require("cmake")
    build_dir = Path(build_dir)
    with build_lock(build_dir):
        return _build_runner(target, build_dir, log)


def build_lock(build_dir: Path) -> FileLock:
    """Held while anything is built in ``build_dir``: two processes (a bench beside a test run, parallel test workers)
    configuring one CMake tree, or writing one plugin, would corrupt it; the second waits for the first."""
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(build_dir / ".build.lock")


def _build_runner(target: str, build_dir: Path, log) -> Path:
    out = build_dir / f"native-{target}"
    args = ["-DCMAKE_BUILD_TYPE=Release"]
    if target == "host":
        _require("c++")
        args.append(f"-DEXECUTORCH_ROOT={executorch_root()}")
    else:
        _require("aarch64-linux-gnu-g++")
        args += [
            f"-DEXECUTORCH_ROOT={aarch64_executorch_root(build_dir).resolve()}",
            f"-DCMAKE_TOOLCHAIN_FILE={(SOURCE / 'aarch64-linux-gnu.cmake').resolve()}",
        ]
    for cmd in (["cmake", "-S", str(SOURCE), "-B", str(out), *args], ["cmake", "--build", str(out), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{(done.stdout + done.stderr)[-2000:]}")
    binary = out / "ptq4ris_runner"
    log(f"built {binary} ({target})")
    return binary


@dataclass
class RunResult:
    """What one runner invocation measured: outputs of the last run and the latency of the timed runs (ms)."""

    outputs: list[torch.Tensor]
    latency_ms: dict[str, float]
    threads: int
    runs: int


def write_inputs(inputs: tuple[torch.Tensor, ...], folder: Path) -> list[Path]:
    """Each input as the raw little-endian bytes the runner reads (``input<i>.bin``)."""
    paths = []
    for i, x in enumerate(inputs):
        path = folder / f"input{i}.bin"
        path.write_bytes(x.detach().contiguous().cpu().numpy().tobytes())
        paths.append(path)
    return paths


def read_outputs(report: dict, folder: Path) -> list[torch.Tensor]:
    outputs = []
    for i, meta in enumerate(report["outputs"]):
        data = np.fromfile(folder / f"output{i}.bin", dtype=_DTYPES[meta["dtype"]])
        outputs.append(torch.from_numpy(data.reshape(meta["shape"])))
    return outputs


def parse_report(stdout: str) -> dict:
    """The runner's JSON line (the last line of its stdout)."""
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the runner printed no report:\n{stdout[-1000:]}")
    return json.loads(lines[-1])


class NativeRunner:
    """The native runner on this machine: ``emulate=False`` runs the host build, ``emulate=True`` the aarch64 build
    under ``qemu-aarch64 -cpu cortex-a76`` (XNNPACK's ARM NEON kernels, executed by emulation).

    Args:
        binary: the built runner.
        emulate: run it under qemu (an aarch64 binary).
        timeout: seconds one invocation may take.
    """

    def __init__(self, binary: str | Path, emulate: bool = False, timeout: float = 600) -> None:
        self.binary = Path(binary)
        if not self.binary.is_file():
            raise MissingFileError(
                f"no runner at {self.binary}: build it with `python -m mobile_runtime.native_runner build`"
            )
        self.emulate, self.timeout = emulate, timeout
        self.prefix = [_require("qemu-aarch64"), "-cpu", QEMU_CPU, "-L", str(AARCH64_SYSROOT)] if emulate else []

    def run(
        self,
        pte: str | Path,
        inputs: tuple[torch.Tensor, ...],
        warmup: int = 0,
        runs: int = 1,
        threads: int = 1,
        prefix: list[str] | None = None,
        timing: bool = True,
        env: dict[str, str] | None = None,
    ) -> RunResult:
        """Run ``pte`` on ``inputs``; ``prefix`` replaces the command the binary runs under (qemu for an emulated
        runner), e.g. to run it under an instruction counter, which also wants ``timing=False`` (no latency: then
        ``latency_ms`` is empty) and a fixed ``env``."""
        check_pte_file(pte)  # a missing, foreign or truncated file is named here, not by the runner's exit status
        with tempfile.TemporaryDirectory(prefix="ptq4ris-run-") as tmp:
            folder = Path(tmp)
            # Run inside the folder with relative names: the random folder name stays out of the runner's memory,
            # where it could move an instruction count.
            cmd = [*(self.prefix if prefix is None else prefix), str(self.binary.resolve()), "--model",
                   str(Path(pte).resolve())]  # fmt: skip
            for path in write_inputs(inputs, folder):
                cmd += ["--input", path.name]
            cmd += [
                "--output-dir",
                ".",
                "--warmup",
                str(warmup),
                "--runs",
                str(runs),
                "--threads",
                str(threads),
                *([] if timing else ["--no-timing"]),
            ]
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=self.timeout, check=False, env=env, cwd=folder
                )
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"the runner did not finish {pte} within {self.timeout:.0f} s") from e
            if done.returncode != 0:
                raise RuntimeError(
                    f"the runner failed on {pte} (exit {done.returncode}): {done.stderr.strip()[-1000:]}"
                )
            report = parse_report(done.stdout)
            latency = report["latency_ms"] or {}
            return RunResult(read_outputs(report, folder), latency, report["threads"], report["runs"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mobile_runtime.native_runner",
        description="Build the native ExecuTorch runner (C++, executorch::extension::Module) for this machine or for "
        "aarch64 Linux (cross-compiled; run it under qemu-aarch64, or on a phone through tests/device_parity.py).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="configure and build the runner")
    b.add_argument("--target", choices=["host", "aarch64"], default="host", help="(default: %(default)s)")
    b.add_argument("--build-dir", default=str(DEFAULT_BUILD), help="(default: %(default)s)")
    args = p.parse_args(argv)
    try:
        build_runner(args.target, Path(args.build_dir))
    except (ToolMissing, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
