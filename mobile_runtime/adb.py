"""Run ExecuTorch programs on an Android phone over adb: find and check the device, push the native runner, programs
and inputs into ``/data/local/tmp/<name>``, run pinned to the big cores, pull the outputs, clean up.

Every device command is an argv list quoted with :func:`shell_join` before it reaches the phone's shell, so paths with
spaces or quotes neither break nor inject. The default runner is the aarch64 glibc build started through the glibc
loader pushed beside it (a phone has bionic, not glibc); an NDK-built runner is pushed as is (``runner=``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

from quantize.errors import UserError

__all__ = ["Adb", "AdbError", "DeviceSession", "check_adb", "glibc_bundle", "shell_join"]

DEVICE_ROOT = PurePosixPath("/data/local/tmp")
ARM64_ABI = "arm64-v8a"
GLIBC_LIBS = ("libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "libstdc++.so.6", "libgcc_s.so.1")
LOADER = "ld-linux-aarch64.so.1"


class AdbError(UserError, RuntimeError):
    """Something about the device or the adb connection, with what to do about it."""


ADB_HINT = "give --adb-path the adb executable of Android platform tools (Debian: apt install adb)"


def check_adb(adb: str | os.PathLike) -> str:
    """``adb`` (the ``--adb-path`` value) checked before anything runs it: a path must be an existing executable file,
    a bare name must be on ``PATH``. Returns the path to run."""
    text = os.fspath(adb)
    if not text:
        raise AdbError(f"--adb-path is empty; {ADB_HINT}")
    if os.sep not in text and (os.altsep is None or os.altsep not in text):
        found = shutil.which(text)
        if found is None:
            raise AdbError(f"--adb-path {text}: no {text!r} on PATH; {ADB_HINT}")
        return text
    path = Path(text)
    if not path.exists():
        raise AdbError(f"--adb-path {text}: no such file; {ADB_HINT}")
    if path.is_dir():
        raise AdbError(f"--adb-path {text} is a folder; {ADB_HINT}")
    if not os.access(path, os.X_OK):
        raise AdbError(f"--adb-path {text} is not executable (chmod +x it); {ADB_HINT}")
    return text


def shell_join(argv) -> str:
    """One device shell command from an argv list, each word quoted."""
    return " ".join(shlex.quote(str(a)) for a in argv)


class Adb:
    """One adb device. Use :meth:`connect` to find and check it.

    Args:
        adb: the adb executable.
        serial: the device's serial (``adb -s``).
        timeout: default seconds per adb command.
    """

    def __init__(self, adb: str = "adb", serial: str | None = None, timeout: float = 120) -> None:
        self.adb, self.serial, self.timeout = check_adb(adb), serial, timeout

    def _run(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        cmd = [self.adb, *(["-s", self.serial] if self.serial else []), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.timeout, check=False)
        except FileNotFoundError as e:
            raise AdbError(f"--adb-path {self.adb}: not found; {ADB_HINT}") from e
        except PermissionError as e:
            raise AdbError(f"--adb-path {self.adb}: not executable ({e.strerror}); {ADB_HINT}") from e
        except OSError as e:  # ENOEXEC (not a program for this machine), E2BIG, ...
            raise AdbError(f"--adb-path {self.adb}: cannot be run ({e.strerror or e}); {ADB_HINT}") from e
        except subprocess.TimeoutExpired as e:
            raise AdbError(f"`adb {' '.join(args[:2])}` did not finish within {timeout or self.timeout:.0f} s") from e

    @classmethod
    def devices(cls, adb: str = "adb") -> list[tuple[str, str]]:
        """(serial, state) of every device adb sees."""
        done = cls(adb)._run("devices")
        if done.returncode != 0:
            raise AdbError(f"`adb devices` failed: {done.stderr.strip()}")
        found = []
        for line in done.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                found.append((parts[0], parts[1]))
        return found

    @classmethod
    def connect(cls, adb: str = "adb", serial: str | None = None, timeout: float = 120) -> Adb:
        """The one usable device (or ``serial``), checked: attached, authorized, arm64-v8a."""
        found = cls.devices(adb)
        if serial is not None:
            found = [(s, st) for s, st in found if s == serial]
            if not found:
                raise AdbError(f"no device with serial {serial!r}: `adb devices` lists the attached ones")
        if not found:
            raise AdbError(
                "no Android device found: connect a phone by USB with USB debugging on (Settings > Developer "
                "options), then check `adb devices`"
            )
        if len(found) > 1:
            raise AdbError(
                f"{len(found)} devices attached ({', '.join(s for s, _ in found)}): choose one with --serial"
            )
        serial, state = found[0]
        if state == "unauthorized":
            raise AdbError(f"device {serial} is unauthorized: unlock it and accept the 'Allow USB debugging' prompt")
        if state != "device":
            raise AdbError(
                f"device {serial} is {state}: reconnect it (or `adb reconnect`) until `adb devices` says device"
            )
        device = cls(adb, serial, timeout)
        abi = device.getprop("ro.product.cpu.abi")
        if abi != ARM64_ABI:
            raise AdbError(f"device {serial} is {abi or 'of unknown ABI'}; the runner is built for {ARM64_ABI} phones")
        return device

    def shell(self, argv, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` (a list, quoted here; or an already quoted command string) in the device shell."""
        command = argv if isinstance(argv, str) else shell_join(argv)
        done = self._run("shell", command, timeout=timeout)
        if check and done.returncode != 0:
            raise AdbError(
                f"device command failed (exit {done.returncode}): {command}\n{(done.stdout + done.stderr)[-800:]}"
            )
        return done

    def push(self, local: Path, remote: PurePosixPath) -> None:
        done = self._run("push", str(local), str(remote), timeout=max(self.timeout, 600))
        if done.returncode != 0:
            raise AdbError(f"pushing {local} to {remote} failed: {(done.stdout + done.stderr).strip()[-500:]}")

    def pull(self, remote: PurePosixPath, local: Path) -> None:
        done = self._run("pull", str(remote), str(local))
        if done.returncode != 0:
            raise AdbError(f"pulling {remote} failed: {(done.stdout + done.stderr).strip()[-500:]}")

    def getprop(self, name: str) -> str:
        return self.shell(["getprop", name]).stdout.strip()

    def big_cores(self) -> list[int]:
        """The cores with the highest maximum frequency (a phone's big or prime cluster)."""
        out = self.shell(
            'for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; do echo "$f $(cat "$f")"; done',
            check=False,
        ).stdout
        freqs = {}
        for line in out.splitlines():
            m = re.search(r"/cpu(\d+)/cpufreq/cpuinfo_max_freq (\d+)", line)
            if m:
                freqs[int(m.group(1))] = int(m.group(2))
        if not freqs:
            return []
        top = max(freqs.values())
        return sorted(c for c, f in freqs.items() if f == top)

    def thermal(self) -> dict[str, float]:
        """Temperatures (°C) of the thermal zones, by zone type."""
        out = self.shell(
            'for z in /sys/class/thermal/thermal_zone*; do echo "$(cat "$z/type") $(cat "$z/temp")"; done',
            check=False,
        ).stdout
        temps = {}
        for line in out.splitlines():
            parts = line.rsplit(" ", 1)
            if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
                value = int(parts[1])
                temps[parts[0]] = value / 1000 if abs(value) > 1000 else float(value)  # millidegrees on most phones
        return temps


def glibc_bundle(runner: Path, executorch_lib: Path, sysroot: Path = Path("/usr/aarch64-linux-gnu")) -> list[Path]:
    """What the glibc route pushes: the runner, the glibc loader and libraries, and the executorch libraries."""
    files = [runner, sysroot / "lib" / LOADER]
    files += [sysroot / "lib" / name for name in GLIBC_LIBS]
    files += sorted(executorch_lib.glob("libexecutorch*.so"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise AdbError(f"cannot assemble the runner bundle, missing: {', '.join(missing)} (make system-tools)")
    return files


class DeviceSession:
    """A folder ``/data/local/tmp/<name>`` on the device holding the runner; removed on exit, whatever happened.

    Args:
        device: a connected :class:`Adb`.
        name: folder name under ``/data/local/tmp``.
        bundle: files of the glibc route (:func:`glibc_bundle`), or one NDK-built runner (``ndk=True``).
    """

    def __init__(self, device: Adb, name: str, bundle: list[Path], ndk: bool = False) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise AdbError(f"invalid device folder name {name!r}: one path component, no slash")
        self.device, self.bundle, self.ndk = device, bundle, ndk
        self.root = DEVICE_ROOT / name
        self.cores: list[int] = []

    def __enter__(self) -> DeviceSession:  # noqa: PYI034 (final class in practice; Self needs 3.11)
        self.device.shell(["rm", "-rf", str(self.root)])
        self.device.shell(["mkdir", "-p", str(self.root / "lib")])
        try:
            for path in self.bundle:
                is_runner = path == self.bundle[0]
                target = self.root / (
                    "ptq4ris_runner" if is_runner else (LOADER if path.name == LOADER else f"lib/{path.name}")
                )
                self.device.push(path, target)
            self.device.shell(
                ["chmod", "755", str(self.root / "ptq4ris_runner"), *([] if self.ndk else [str(self.root / LOADER)])]
            )
            self.cores = self.device.big_cores()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        # A runner left running (after a timeout) would keep the big cores busy and the folder's files open.
        # "[m]odel" keeps pkill from matching the shell that runs it, whose command line holds the pattern.
        self.device.shell(["pkill", "-f", f"[m]odel {re.escape(str(self.root))}/"], check=False)
        self.device.shell(["rm", "-rf", str(self.root)], check=False)

    def push(self, local: Path, name: str | None = None) -> PurePosixPath:
        remote = self.root / (name or local.name)
        self.device.push(local, remote)
        return remote

    def run(
        self, pte: PurePosixPath, inputs: list[PurePosixPath], threads: int, warmup: int, runs: int, timeout: float
    ) -> dict:
        """Run the runner on pushed files, pinned to the big cores; returns its report (outputs stay on the device
        as ``output<i>.bin`` in the session folder)."""
        argv = (
            ["./ptq4ris_runner"]
            if self.ndk
            else [f"./{LOADER}", "--library-path", str(self.root / "lib"), "./ptq4ris_runner"]
        )
        argv += ["--model", str(pte)]
        for path in inputs:
            argv += ["--input", str(path)]
        argv += [
            "--output-dir",
            str(self.root),
            "--warmup",
            str(warmup),
            "--runs",
            str(runs),
            "--threads",
            str(threads),
        ]
        if self.cores:
            argv = ["taskset", format(sum(1 << c for c in self.cores), "x"), *argv]
        # An NDK build finds its libraries through LD_LIBRARY_PATH; the glibc route through the loader's option.
        env = "LD_LIBRARY_PATH=lib " if self.ndk else ""
        command = f"cd {shlex.quote(str(self.root))} && {env}{shell_join(argv)}"
        try:
            done = self.device.shell(command, timeout=timeout, check=False)
        except AdbError as e:
            raise AdbError(f"the runner timed out on the device after {timeout:.0f} s: {e}") from e
        if done.returncode != 0:
            raise AdbError(
                f"the runner failed on the device (exit {done.returncode}): {(done.stdout + done.stderr).strip()[-800:]}"
            )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise AdbError(f"the runner printed no report: {done.stdout[-500:]}")
        return json.loads(lines[-1])
