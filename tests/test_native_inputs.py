"""No input a user can give aborts the process, and no third-party exception escapes for a bad user file.

Fuzz-style: ExecuTorch programs (random bytes, truncated at several lengths, flipped header bytes, a corrupt XNNPACK
payload that aborts the native loader, a text file, an empty file, a folder, a program of another model), Core ML
packages (truncated, random or empty spec, no or broken manifest, missing items, truncated or random weights), weight
files (safetensors and torch.save), ``--device`` on a machine without the accelerator, and ``--adb-path``. Each must be
a one-line :class:`~quantize.errors.UserError` naming the file or flag; a few go through the real command line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_runtime import runtime
from mobile_runtime.runtime import (
    PTE_IDENTIFIER,
    PteInputError,
    PteProgram,
    check_pte_file,
    load_full_model,
    probe_programs,
    stage_paths,
)
from quantize.errors import MissingFileError, UserError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------- programs


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(module.eval(), example)
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


class _Toy(torch.nn.Module):
    """A full-model signature (image, input_ids, attention_mask) -> logits, tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, image, input_ids, attention_mask):
        return self.conv(image) * (input_ids.float().mean() + attention_mask.float().mean())


@pytest.fixture(scope="session")
def programs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Linear program (another model than LAVT, delegated to XNNPACK) and a tiny full-signature program."""
    folder = tmp_path_factory.mktemp("programs")
    torch.manual_seed(0)
    linear = folder / "linear.pte"
    linear.write_bytes(_export(torch.nn.Linear(4, 3), (torch.randn(1, 4),)))
    toy = folder / "toy.pte"
    ids = torch.ones(1, 4, dtype=torch.long)
    toy.write_bytes(_export(_Toy(), (torch.randn(1, 3, 8, 8), ids, ids)))
    return {"linear": linear, "toy": toy}


def _one_line_naming(error: BaseException, path: Path | str) -> None:
    text = str(error)
    assert "\n" not in text, text
    assert str(path) in text, text


def test_header_facts_of_a_real_program(programs):
    """The layout the checks rely on, read from a program exported here: root offset, "ET12", "eh00" and sizes."""
    data = programs["linear"].read_bytes()
    assert data[4:8] == PTE_IDENTIFIER == b"ET12"
    assert data[8:12] == b"eh00"
    length, program_size, base, data_size = struct.unpack_from("<IQQQ", data, 12)
    assert length == 32 and base >= program_size and base + data_size == len(data)
    header = check_pte_file(programs["linear"])
    assert header.program_size == program_size
    assert (header.segment_base_offset, header.segment_data_size) == (base, data_size)
    assert 8 <= struct.unpack_from("<I", data, 0)[0] < program_size


def test_valid_programs_load_and_run(programs):
    toy = load_full_model(programs["toy"])
    out = toy(torch.randn(1, 3, 8, 8), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    assert out.shape == (1, 2, 8, 8)
    assert PteProgram(programs["linear"])(torch.randn(1, 4)).shape == (1, 3)


def _random(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size,seed", [(5000, 0), (5000, 1), (100_000, 2), (41, 3), (7, 4)])
def test_random_bytes_are_refused_from_the_header(tmp_path, size, seed):
    bad = tmp_path / "random.pte"
    bad.write_bytes(_random(size, seed))
    with pytest.raises(PteInputError) as err:
        check_pte_file(bad)
    _one_line_naming(err.value, bad)
    with pytest.raises(PteInputError):
        load_full_model(bad)


def test_random_bytes_behind_a_valid_identifier_are_refused(tmp_path):
    """Random bytes that happen to carry "ET12": past the header checks, the probe process takes the failure."""
    data = bytearray(_random(5000, 5))
    data[4:8] = PTE_IDENTIFIER
    data[0:4] = struct.pack("<I", 64)
    bad = tmp_path / "random-et12.pte"
    bad.write_bytes(bytes(data))
    with pytest.raises(PteInputError, match="re-export") as err:
        PteProgram(bad)
    _one_line_naming(err.value, bad)


@pytest.mark.parametrize("cut", ["10", "100", "half", "all-but-1"])
def test_truncated_program_is_refused(programs, tmp_path, cut):
    data = programs["linear"].read_bytes()
    n = {"10": 10, "100": 100, "half": len(data) // 2, "all-but-1": len(data) - 1}[cut]
    bad = tmp_path / f"cut-{cut}.pte"
    bad.write_bytes(data[:n])
    with pytest.raises(PteInputError, match="truncated") as err:
        load_full_model(bad)
    _one_line_naming(err.value, bad)


# (byte, value): root offset, identifier, extended header magic / length / program size / segment offset and size.
HEADER_FLIPS = [(3, 0x82), (4, 0x82), (6, 0xFF), (12, 0x00), (15, 0x82), (23, 0xFF), (25, 0xFF), (33, 0x82), (39, 0xFF)]


@pytest.mark.parametrize("pos,value", HEADER_FLIPS)
def test_flipped_header_bytes_are_refused_before_native_code(programs, tmp_path, pos, value):
    data = bytearray(programs["linear"].read_bytes())
    data[pos] = value
    bad = tmp_path / f"flip-{pos}.pte"
    bad.write_bytes(bytes(data))
    with pytest.raises(PteInputError) as err:
        check_pte_file(bad)
    _one_line_naming(err.value, bad)


@pytest.mark.parametrize("pos,value", [(0, 0x82), (8, 0x00)])
def test_flipped_header_bytes_the_runtime_refuses(programs, tmp_path, pos, value):
    """A root offset still inside the program, a damaged "eh00": only loading finds these; the probe does."""
    data = bytearray(programs["linear"].read_bytes())
    data[pos] = value
    bad = tmp_path / f"flip-{pos}.pte"
    bad.write_bytes(bytes(data))
    check_pte_file(bad)  # the header alone cannot tell
    with pytest.raises(PteInputError, match="not a loadable ExecuTorch program") as err:
        PteProgram(bad)
    _one_line_naming(err.value, bad)


def _aborting_program(programs, folder: Path) -> Path:
    """A program whose XNNPACK payload magic ("XH00") holds a byte that is not UTF-8: the header is fine, and the
    runtime, logging that magic through Python, aborts its process (SIGABRT) while loading the method."""
    data = bytearray(programs["linear"].read_bytes())
    at = data.index(b"XH00", check_pte_file(programs["linear"]).segment_base_offset)
    data[at + 1] = 0x82
    bad = folder / "xnnpack-payload.pte"
    bad.write_bytes(bytes(data))
    return bad


def test_program_that_aborts_the_native_loader_is_refused_in_the_probe(programs, tmp_path):
    bad = _aborting_program(programs, tmp_path)
    check_pte_file(bad)
    with pytest.raises(PteInputError, match="aborted loading it, SIGABRT") as err:
        load_full_model(bad)
    _one_line_naming(err.value, bad)


def test_empty_text_folder_and_missing_pte(tmp_path):
    empty = tmp_path / "empty.pte"
    empty.write_bytes(b"")
    text = tmp_path / "notes.pte"
    text.write_text("these are my notes about the model, not a program\n" * 4)
    folder = tmp_path / "x.pte"
    folder.mkdir()
    for bad, words in ((empty, "empty"), (text, "not an ExecuTorch program"), (folder, "is a folder")):
        with pytest.raises(PteInputError, match=words) as err:
            load_full_model(bad)
        _one_line_naming(err.value, bad)
        with pytest.raises(PteInputError, match=words):
            PteProgram(bad)
    with pytest.raises(MissingFileError, match="export-pte"):
        load_full_model(tmp_path / "none.pte")


def test_program_of_another_model_is_refused_by_its_inputs(programs):
    with pytest.raises(PteInputError, match=r"takes 1 input\(s\) of shapes \[1, 4\].*full LAVT program takes 3") as err:
        load_full_model(programs["linear"])
    _one_line_naming(err.value, programs["linear"])


def test_stage_programs_of_another_model_are_refused(programs, tmp_path):
    text, visual = stage_paths(tmp_path / "model.pte")
    shutil.copy(programs["linear"], text)
    shutil.copy(programs["toy"], visual)
    with pytest.raises(PteInputError, match="text stage program takes input_ids and attention_mask") as err:
        load_full_model(tmp_path / "model.pte")
    _one_line_naming(err.value, text)


def test_probe_runs_once_per_file_version(programs, tmp_path, monkeypatch):
    copy = tmp_path / "copy.pte"
    shutil.copy(programs["linear"], copy)
    PteProgram(copy)
    calls = []
    real_run = subprocess.run

    def counting_run(*args, **kwargs):
        calls.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runtime.subprocess, "run", counting_run)
    PteProgram(copy)
    assert calls == []  # this file version was probed already
    copy.write_bytes(copy.read_bytes())
    os.utime(copy, ns=(1, 1))  # a changed file is probed again
    PteProgram(copy)
    assert len(calls) == 1


def test_probe_failure_to_start_falls_back_to_in_process_load(programs, tmp_path, monkeypatch, caplog):
    copy = tmp_path / "fallback.pte"
    shutil.copy(programs["linear"], copy)

    def no_processes(*args, **kwargs):
        raise OSError("fork: resource temporarily unavailable")

    monkeypatch.setattr(runtime.subprocess, "run", no_processes)
    assert PteProgram(copy).input_shapes == [(1, 4)]
    assert "could not start a probe process" in caplog.text


def test_probe_names_each_of_several_programs(programs, tmp_path):
    bad = _aborting_program(programs, tmp_path)
    good = tmp_path / "good.pte"
    shutil.copy(programs["linear"], good)
    with pytest.raises(PteInputError) as err:
        probe_programs(good, bad)
    _one_line_naming(err.value, bad)
    assert str(good) not in str(err.value)


def test_native_runner_checks_the_header_before_running(tmp_path):
    from mobile_runtime.native_runner import NativeRunner

    marker = tmp_path / "ran"
    runner = tmp_path / "ptq4ris_runner"
    runner.write_text(f"#!/bin/sh\ntouch {marker}\n")
    runner.chmod(0o755)
    bad = tmp_path / "random.pte"
    bad.write_bytes(_random(3000, 6))
    with pytest.raises(PteInputError) as err:
        NativeRunner(runner).run(bad, (torch.zeros(1, 4),))
    _one_line_naming(err.value, bad)
    with pytest.raises(MissingFileError):
        NativeRunner(runner).run(tmp_path / "none.pte", (torch.zeros(1, 4),))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------- the CLI


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != runtime.PROBE_ENV}
    return subprocess.run(
        [sys.executable, "-m", "ptq4ris.cli", *argv],
        capture_output=True,
        text=True,
        errors="replace",
        cwd=ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )


def _assert_refused(done: subprocess.CompletedProcess, path: Path) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ptq4ris: error:"), done.stderr[-2000:]
    assert str(path) in lines[0], lines[0]


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "circle.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("kind", ["random", "aborting", "other-model"])
def test_cli_segment_refuses_bad_programs_with_one_line(programs, photo, tmp_path, kind):
    if kind == "random":
        bad = tmp_path / "random.pte"
        bad.write_bytes(_random(5000, 7))
    elif kind == "aborting":
        bad = _aborting_program(programs, tmp_path)
    else:
        bad = programs["linear"]
    out = tmp_path / "o.png"
    done = _cli("segment", "--backend", "pte", "--pte", str(bad), "--image", str(photo), "--text", "the red circle",
                "--out", str(out))  # fmt: skip
    _assert_refused(done, bad)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- Core ML packages


MODEL = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")


@pytest.fixture(scope="session")
def package(tmp_path_factory) -> Path:
    """A real .mlpackage of a tiny module with the full model's input names (but not its shapes)."""
    ct = pytest.importorskip("coremltools")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 32)

        def forward(self, image, input_ids, attention_mask):
            return self.linear(image) + attention_mask.float().sum()

    ids = torch.ones(1, 4, dtype=torch.int32)
    example = (torch.randn(1, 64), ids, ids)
    exported = torch.export.export(Tiny().eval(), example).run_decompositions({})
    inputs = [
        ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float32 if x.dtype.is_floating_point else np.int32)
        for n, x in zip(("image", "input_ids", "attention_mask"), example)
    ]
    model = ct.convert(exported, inputs=inputs, minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    path = tmp_path_factory.mktemp("coreml") / "tiny.mlpackage"
    model.save(str(path))
    assert (path / MODEL).is_file() and (path / WEIGHTS).is_file()
    return path


def _truncate(rel: Path, keep):
    def mutate(p: Path) -> None:
        data = (p / rel).read_bytes()
        (p / rel).write_bytes(data[: keep(len(data))])

    return mutate


def _write(rel: Path, data):
    def mutate(p: Path) -> None:
        target = p / rel
        target.write_bytes(data(target) if callable(data) else data)

    return mutate


def _remove(rel: Path):
    def mutate(p: Path) -> None:
        target = p / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return mutate


PACKAGE_DAMAGE = {
    "model truncated to 10 bytes": _truncate(MODEL, lambda n: 10),
    "model truncated to half": _truncate(MODEL, lambda n: n // 2),
    "model missing its last byte": _truncate(MODEL, lambda n: n - 1),
    "model of random bytes": _write(MODEL, lambda t: _random(t.stat().st_size, 8)),
    "model empty": _write(MODEL, b""),
    "model missing": _remove(MODEL),
    "no Manifest.json": _remove(Path("Manifest.json")),
    "Manifest.json not JSON": _write(Path("Manifest.json"), b"{not json"),
    "Manifest.json of random bytes": _write(Path("Manifest.json"), _random(600, 9)),
    "Manifest.json without a root model": _write(Path("Manifest.json"), b'{"itemInfoEntries": {}}'),
    "weights folder missing": _remove(Path("Data/com.apple.CoreML/weights")),
    "weights truncated to 100 bytes": _truncate(WEIGHTS, lambda n: 100),
    "weights truncated to half": _truncate(WEIGHTS, lambda n: n // 2),
    "weights missing their last byte": _truncate(WEIGHTS, lambda n: n - 1),
    "weights empty": _write(WEIGHTS, b""),
    "weights of random bytes": _write(WEIGHTS, lambda t: _random(t.stat().st_size, 10)),
}


@pytest.mark.parametrize("damage", list(PACKAGE_DAMAGE))
def test_damaged_package_is_refused_with_one_line(package, tmp_path, damage):
    from ios_export.parity import CoreMLProgram

    bad = tmp_path / "damaged.mlpackage"
    shutil.copytree(package, bad)
    PACKAGE_DAMAGE[damage](bad)
    with pytest.raises(UserError) as err:
        CoreMLProgram(bad)
    _one_line_naming(err.value, bad)


def test_paths_that_are_not_packages(package, tmp_path):
    from ios_export.mil_interpreter import load_program

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_random(100, 11))
    a_file = tmp_path / "model.mlpackage"
    a_file.write_bytes(_random(100, 12))
    for bad, words in ((folder, "no Manifest.json"), (a_file, "is a file, not a Core ML package")):
        with pytest.raises(UserError, match=words) as err:
            load_program(bad)
        _one_line_naming(err.value, bad)
    with pytest.raises(MissingFileError, match="export-coreml"):
        load_program(tmp_path / "none.mlpackage")


def test_package_of_another_model_is_refused_for_parity(package):
    from ios_export.parity import CoreMLProgram

    assert CoreMLProgram(package).input_names == ["image", "input_ids", "attention_mask"]  # a sound package
    with pytest.raises(UserError, match=r"takes image \[1, 64\].*full LAVT package") as err:
        CoreMLProgram(package, stage="full")
    _one_line_naming(err.value, package)
    with pytest.raises(UserError, match="text LAVT package"):
        CoreMLProgram(package, stage="text")


def test_cli_segment_refuses_a_truncated_package(package, photo, tmp_path):
    bad = tmp_path / "cut.mlpackage"
    shutil.copytree(package, bad)
    _truncate(MODEL, lambda n: n // 2)(bad)
    done = _cli("segment", "--backend", "coreml-interp", "--coreml", str(bad), "--image", str(photo), "--text",
                "the red circle", "--out", str(tmp_path / "o.png"))  # fmt: skip
    _assert_refused(done, bad)


# ----------------------------------------------------------------------------------------------------- weights


def _safetensors(header, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="session")
def good_safetensors(tmp_path_factory) -> bytes:
    from safetensors.torch import save

    return save({"a": torch.randn(50, 50), "b": torch.randn(10)})


WEIGHT_DAMAGE = {
    "truncated.safetensors": lambda good: good[: len(good) // 2],
    "all-but-1.safetensors": lambda good: good[:-1],
    "empty.safetensors": lambda good: b"",
    "five-bytes.safetensors": lambda good: b"12345",
    "header-too-large.safetensors": lambda good: struct.pack("<Q", 2**62) + b"{}",
    "header-not-json.safetensors": lambda good: _safetensors(b"{abcd"),
    "data-not-covered.safetensors": lambda good: _safetensors(
        {"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    ),
    "shape-overflow.safetensors": lambda good: _safetensors(
        {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "random.safetensors": lambda good: _random(1000, 13),
    "random.pth": lambda good: _random(1000, 14),
    "text.pth": lambda good: b"hello, this is not a checkpoint\n",
    "empty.pth": lambda good: b"",
    "truncated-zip.pth": lambda good: _torch_bytes({"w": torch.randn(100)})[:300],
    "all-but-1-zip.pth": lambda good: _torch_bytes({"w": torch.randn(100)})[:-1],
    "legacy-pickle-of-objects.pth": lambda good: pickle.dumps({"a": argparse.ArgumentParser}, protocol=2),
}


@pytest.mark.parametrize("name", list(WEIGHT_DAMAGE))
def test_damaged_checkpoint_is_refused_with_one_line(good_safetensors, tmp_path, name):
    from quantize.models import load_checkpoint
    from quantize.models.lavt import LAVT
    from tests.test_models import tiny_config

    bad = tmp_path / name
    bad.write_bytes(WEIGHT_DAMAGE[name](good_safetensors))
    with pytest.raises(UserError) as err:
        load_checkpoint(LAVT(tiny_config()), bad)
    _one_line_naming(err.value, bad)


def test_checkpoint_folder_is_refused(tmp_path):
    from quantize.models import load_checkpoint
    from quantize.models.lavt import LAVT
    from tests.test_models import tiny_config

    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    with pytest.raises(UserError, match="is a folder") as err:
        load_checkpoint(LAVT(tiny_config()), folder)
    _one_line_naming(err.value, folder)


def test_read_safetensors_for_other_owners(good_safetensors, tmp_path):
    """The helper a calibrated folder's reader uses: its own error class and fix, the same one-line message."""
    from quantize.safe_files import read_safetensors, read_torch_file

    class FolderError(UserError):
        pass

    good = tmp_path / "model.safetensors"
    good.write_bytes(good_safetensors)
    assert set(read_safetensors(good)) == {"a", "b"}
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good_safetensors[:100])
    with pytest.raises(FolderError, match="recalibrate$") as err:
        read_safetensors(bad, fix="recalibrate", error=FolderError)
    _one_line_naming(err.value, bad)
    with pytest.raises(MissingFileError):
        read_safetensors(tmp_path / "none.safetensors")
    state = tmp_path / "state.pth"
    torch.save({"w": torch.ones(2)}, state)
    assert torch.equal(read_torch_file(state)["w"], torch.ones(2))


def test_cli_evaluate_refuses_a_truncated_checkpoint(good_safetensors, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good_safetensors[: len(good_safetensors) // 2])
    done = _cli("evaluate", "--model", "lavt-tiny", "--checkpoint", str(bad), "--refer-root", str(tmp_path))
    _assert_refused(done, bad)


# ------------------------------------------------------------------------------------------------------- devices


def test_resolve_device_accepts_the_cpu():
    from quantize.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    "name,cuda,count,mps,words",
    [
        ("cuda", False, 0, False, "CUDA is not available"),
        ("cuda:0", False, 0, False, "CUDA is not available"),
        ("cuda:3", True, 1, False, r"1 CUDA device\(s\)"),
        ("mps", False, 0, False, "MPS"),
        ("gpu", False, 0, False, "not a device torch knows"),
        ("cuda:x", True, 1, False, "not a device torch knows"),
        ("", False, 0, False, "not a device torch knows"),
    ],
)
def test_resolve_device_refuses_what_this_machine_lacks(monkeypatch, name, cuda, count, mps, words):
    from quantize.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    with pytest.raises(UserError, match=words) as err:
        resolve_device(name)
    assert "--device" in str(err.value) and "--device cpu" in str(err.value)
    assert "\n" not in str(err.value)


def test_cuda_devices_that_exist_are_accepted(monkeypatch):
    from quantize.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")


def test_train_evaluate_calibrate_refuse_cuda_without_it(monkeypatch, tmp_path):
    from quantize.calibration.calibrate import calibrate
    from quantize.evaluate import evaluate
    from quantize.train import TrainConfig, train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        evaluate(torch.nn.Identity(), [], device="cuda")
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        calibrate(torch.nn.Identity(), None, None, device="cuda")
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
        train(TrainConfig(data_root=str(tmp_path), out_dir=str(out), device="cuda"), progress=False)
    assert not out.exists()  # refused before anything was written


# ----------------------------------------------------------------------------------------------------------- adb


def test_adb_path_that_cannot_run_is_refused(tmp_path, monkeypatch):
    from mobile_runtime.adb import Adb, AdbError

    not_executable = tmp_path / "adb-plain"
    not_executable.write_text("#!/bin/sh\necho hi\n")
    not_executable.chmod(0o644)
    folder = tmp_path / "platform-tools"
    folder.mkdir()
    cases = [
        (tmp_path / "none" / "adb", "no such file"),
        (folder, "is a folder"),
        (not_executable, "is not executable"),
    ]
    for path, words in cases:
        with pytest.raises(AdbError, match=words) as err:
            Adb.devices(str(path))
        assert "--adb-path" in str(err.value) and str(path) in str(err.value)
    garbage = tmp_path / "adb-garbage"  # executable, but not a program this machine can run (ENOEXEC)
    garbage.write_bytes(b"\x7fELF" + _random(200, 15))
    garbage.chmod(0o755)
    with pytest.raises(AdbError, match="--adb-path .*cannot be run"):
        Adb.devices(str(garbage))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(AdbError, match="no 'adb' on PATH"):
        Adb.devices("adb")


def test_adb_permission_error_at_run_time_is_translated(tmp_path, monkeypatch):
    from mobile_runtime import adb as adb_module

    fake = tmp_path / "adb"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    device = adb_module.Adb(str(fake))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(adb_module.subprocess, "run", denied)
    with pytest.raises(adb_module.AdbError, match="--adb-path .* not executable"):
        device.shell(["true"])


def test_device_parity_script_refuses_a_bad_adb_path(programs, tmp_path):
    bad = tmp_path / "adb"
    bad.write_text("not a program")
    bad.chmod(0o644)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "device_parity.py"), "--adb", "--adb-path", str(bad), "--pte",
         str(programs["linear"])],
        capture_output=True, text=True, errors="replace", cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--adb-path" in errors[0] and str(bad) in errors[0], done.stderr[-2000:]
