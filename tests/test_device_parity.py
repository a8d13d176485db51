"""The device harness against the fake adb (tests/fake_adb/adb): every way a phone setup goes wrong gives a clear
error and leaves nothing on the device, shell commands survive hostile paths, and `python tests/device_parity.py
--adb` runs end to end (aarch64 runner under qemu with an empty sysroot, as on a phone without glibc)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mobile_runtime.adb import Adb, AdbError, DeviceSession
from mobile_runtime.runtime import stage_paths
from quantize.deploy.parity_stats import NATURAL_PHOTOS

ROOT = Path(__file__).resolve().parents[1]
FAKE_ADB = str(ROOT / "tests" / "fake_adb" / "adb")
PHONE = {"serial": "PHONE1", "state": "device", "abi": "arm64-v8a", "cpu_max_freq": [1800000, 2400000],
         "thermal": {"cpu-big": 41000}}  # fmt: skip


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Writes the fake's device list; returns a function that sets it."""
    home = tmp_path / "fake-adb"
    home.mkdir()
    monkeypatch.setenv("FAKE_ADB_HOME", str(home))

    def devices(*entries: dict) -> Path:
        (home / "devices.json").write_text(json.dumps(list(entries)))
        return home

    return devices


def _left_on_device(home: Path, serial: str = "PHONE1") -> list[str]:
    tmp = home / serial / "data" / "local" / "tmp"
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")) if tmp.exists() else []


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_no_device(fake):
    fake()
    with pytest.raises(AdbError, match="no Android device found"):
        Adb.connect(FAKE_ADB)


def test_several_devices_need_a_serial(fake):
    fake(PHONE, dict(PHONE, serial="PHONE2"))
    with pytest.raises(AdbError, match=r"2 devices attached \(PHONE1, PHONE2\): choose one with --serial"):
        Adb.connect(FAKE_ADB)
    assert Adb.connect(FAKE_ADB, serial="PHONE2").serial == "PHONE2"
    with pytest.raises(AdbError, match="no device with serial 'PHONE3'"):
        Adb.connect(FAKE_ADB, serial="PHONE3")


def test_unauthorized_device(fake):
    fake(dict(PHONE, state="unauthorized"))
    with pytest.raises(AdbError, match="unauthorized: unlock it and accept"):
        Adb.connect(FAKE_ADB)


def test_wrong_abi(fake):
    fake(dict(PHONE, abi="x86_64"))
    with pytest.raises(AdbError, match="is x86_64; the runner is built for arm64-v8a"):
        Adb.connect(FAKE_ADB)


def test_big_cores_and_thermal_are_read(fake):
    fake(dict(PHONE, cpu_max_freq=[1800000, 1800000, 2400000, 2400000]))
    device = Adb.connect(FAKE_ADB)
    assert device.big_cores() == [2, 3]
    assert device.thermal() == {"cpu-big": 41.0}


def test_push_failure_leaves_nothing(fake, tmp_path):
    home = fake(dict(PHONE, fail_push=True))
    runner = _script(tmp_path / "runner", "exit 0")
    with pytest.raises(AdbError, match="pushing .* failed: .*No space left"), \
            DeviceSession(Adb.connect(FAKE_ADB), "ptq4ris-test", [runner], ndk=True):  # fmt: skip
        pass
    assert _left_on_device(home) == []


def test_crashing_runner_is_reported_and_cleaned_up(fake, tmp_path):
    home = fake(PHONE)
    runner = _script(tmp_path / "runner", "echo 'Segmentation fault' >&2; exit 139")
    with pytest.raises(AdbError, match=r"runner failed on the device \(exit 139\).*Segmentation fault"), \
            DeviceSession(Adb.connect(FAKE_ADB), "ptq4ris-test", [runner], ndk=True) as session:  # fmt: skip
        session.run(session.root / "model.pte", [], threads=1, warmup=0, runs=1, timeout=60)
    assert _left_on_device(home) == []


def test_hung_runner_times_out_and_is_killed(fake, tmp_path):
    home = fake(PHONE)
    runner = _script(tmp_path / "runner", "while true; do sleep 0.1; done")
    with pytest.raises(AdbError, match="timed out on the device after 2 s"), \
            DeviceSession(Adb.connect(FAKE_ADB), "ptq4ris-test", [runner], ndk=True) as session:  # fmt: skip
        session.run(session.root / "model.pte", [], threads=1, warmup=0, runs=1, timeout=2)
    assert _left_on_device(home) == []
    alive = subprocess.run(["pgrep", "-f", "[p]tq4ris_runner --model"], capture_output=True, text=True, check=False)
    alive = alive.stdout
    assert not alive.strip(), "the hung runner was left running"


def test_hostile_folder_name_neither_breaks_nor_injects(fake, tmp_path):
    """A name with spaces, quotes and a command separator stays one path on the device."""
    home = fake(PHONE)
    runner = _script(tmp_path / "runner", 'echo "{\\"ran\\": \\"$PWD\\", \\"outputs\\": []}"')
    name = "run 'x'; touch PWNED"
    with DeviceSession(Adb.connect(FAKE_ADB), name, [runner], ndk=True) as session:
        report = session.run(session.root / "m.pte", [], threads=1, warmup=0, runs=1, timeout=60)
        assert report["ran"].endswith("/data/local/tmp/" + name)
        assert _left_on_device(home) == [name, f"{name}/lib", f"{name}/ptq4ris_runner"]
    assert _left_on_device(home) == []
    assert not list(home.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))


def test_folder_name_with_a_slash_is_refused(fake):
    fake(PHONE)
    with pytest.raises(AdbError, match="one path component"):
        DeviceSession(Adb.connect(FAKE_ADB), "../etc", [])


@pytest.fixture(scope="module")
def default_programs(tmp_path_factory):
    """The default model (the embedded lavt-tiny) calibrated at W8A8 with ptq4ris-deploy, and the programs the Android
    app loads (text and visual) plus the float program, made by the same commands as `ptq4ris demo`: two
    `export-pte` children lower the stage programs side by side."""
    if not (shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-g++") and shutil.which("cmake")):
        pytest.skip("needs qemu-user, g++-aarch64-linux-gnu and cmake: `make system-tools`")
    from quantize.data.shapesref import write_shapesref

    folder = tmp_path_factory.mktemp("device")
    root = folder / "refer"
    # The first train scenes are those of the full data set: calibration sees the demo's first 32 refs.
    write_shapesref(root, seed=0, split_scenes={"train": 16, "val": 4})
    artifact, pte = folder / "lavt-tiny-w8a8", folder / "android" / "lavt-tiny-w8a8.pte"
    cli = [sys.executable, "-m", "ptq4ris.cli"]
    done = subprocess.run([*cli, "calibrate", "--bits", "w8a8", "--method", "ptq4ris-deploy", "--out", str(artifact),
                           "--refer-root", str(root)], capture_output=True, text=True, cwd=ROOT, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    export = [*cli, "export-pte", "--quantized", str(artifact), "--out", str(pte), "--no-kernels",
              "--stages"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    children = [
        subprocess.Popen([*export, *flags], cwd=ROOT, env=env, **pipe)
        for flags in (("visual", "--no-float"), ("text",))
    ]
    for child in children:
        log, _ = child.communicate(timeout=1800)
        assert child.returncode == 0, log[-3000:]
    return root, artifact, pte


def test_device_parity_over_fake_adb_end_to_end(fake, default_programs, tmp_path):
    """The acceptance run of the harness: the default W8A8 model's stage programs, chained on the emulated phone
    exactly as the Android app chains them, against the simulated model and the host's x86 kernels."""
    root, artifact, pte = default_programs
    assert not pte.exists() and all(p.is_file() for p in stage_paths(pte))  # what the demo ships: no full program
    home = fake(PHONE)
    out = tmp_path / "report.json"
    argv = [sys.executable, str(ROOT / "tests" / "device_parity.py"), "--adb", "--adb-path", FAKE_ADB, "--pte",
            str(pte), "--quantized", str(artifact), "--refer-root", str(root), "--pairs", "4", "--runs", "2",
            "--json", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("adb device PHONE1")
    assert report["recipe"] == "ptq4ris-deploy w8a8"
    assert "skipped" in report["programs"]["full"]
    for name in ("text", "visual", "float"):
        assert report["programs"][name]["latency_ms"]["1"]["median"] > 0, name
    val, photos = report["parity"]["val"], report["parity"]["photos"]
    assert val["pairs"] == 4 and val["mask_agreement"] >= 99.5, val
    assert photos["pairs"] == len(NATURAL_PHOTOS), photos  # all of them, as `ptq4ris parity` checks
    for which in (val, photos):
        assert which["device_vs_x86_max_lsb"] < 32, which  # ARM and x86 kernels differ in rounding only
    assert report["thermal_before"] == {"cpu-big": 41.0}
    assert "parity" in done.stdout and "thermal" in done.stdout
    assert _left_on_device(home) == []
