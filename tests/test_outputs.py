"""Data safety: outputs replace only what ptq4ris wrote, interrupted runs leave the previous result usable, and a
calibrated folder edited after calibration is refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from quantize.calibration.artifact import check_quantized, load_quantized, save_quantized
from quantize.calibration.calibrate import CalibrationBatch
from quantize.calibration.placement import place_quantizers
from quantize.calibration.recipe import make_recipe
from quantize.errors import UserError
from quantize.models import build_model
from quantize.outputs import MANIFEST, check_output_file, check_output_folder, replace_folder

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, kind: str | None = "thing", name: str = "data.txt", text: str = "new") -> None:
    with replace_folder(folder, kind) as tmp:
        tmp.mkdir()
        (tmp / name).write_text(text)


def test_a_folder_is_replaced_only_when_ptq4ris_wrote_it_as_the_same_kind(tmp_path):
    out = tmp_path / "out"
    _write(out, text="first")
    _write(out, text="second")  # ours, same kind: replaced
    assert (out / "data.txt").read_text() == "second" and (out / MANIFEST).is_file()
    with pytest.raises(UserError, match="did not write as a other"):
        _write(out, kind="other")
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="photos holds files ptq4ris did not write"):
        check_output_folder(user, "--out", "thing")
    with pytest.raises(UserError):
        _write(user)
    assert (user / "holiday.jpg").read_bytes() == b"precious" and not (user / "data.txt").exists()
    note = tmp_path / "note.txt"
    note.write_text("mine")
    with pytest.raises(UserError, match="existing file, not a folder"):
        _write(note)
    assert note.read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("name", ["old", "new", "previous", "staging"])
def test_replacing_twice_works_whatever_the_folder_is_called(tmp_path, name):
    out = tmp_path / name
    _write(out, text="1")
    _write(out, text="2")
    _write(out, text="3")
    assert (out / "data.txt").read_text() == "3"


def test_an_error_inside_the_block_keeps_the_previous_result(tmp_path):
    out = tmp_path / "out"
    _write(out, text="good")
    with pytest.raises(RuntimeError):
        with replace_folder(out, "thing") as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "data.txt").read_text() == "good"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_run_are_removed_and_a_half_swap_is_undone(tmp_path):
    out = tmp_path / "out"
    _write(out, text="previous result")
    # A run killed with SIGKILL inside the block: its staging folder stays behind.
    script = (
        "import os, signal, sys\n"
        "from quantize.outputs import replace_folder\n"
        "with replace_folder(sys.argv[1], 'thing') as tmp:\n"
        "    tmp.mkdir(); (tmp / 'data.txt').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True)
    assert run.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and (out / "data.txt").read_text() == "previous result"
    # A kill that fell between the two renames of the swap: the previous result sits in the staging folder.
    os.replace(out, leftovers[0] / "previous")
    check_output_folder(out, "--out", "thing")  # the next run's check cleans up first
    assert (out / "data.txt").read_text() == "previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_files_are_checked_before_work(tmp_path):
    from quantize.file_kinds import is_png

    png = tmp_path / "out.png"
    png.write_text("not a picture")
    with pytest.raises(UserError, match="not a PNG ptq4ris wrote"):
        check_output_file(png, "--out", (".png",), is_png, "PNG")
    with pytest.raises(UserError, match=r"name a \.png file"):
        check_output_file(tmp_path / "out.jpg", "--out", (".png",), is_png, "PNG")
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, "--out", (".png",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "sub" / "out.png", "--out", (".png",))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="no permission"):
            check_output_file(locked / "out.png", "--out", (".png",))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A loadable calibrated folder, made in seconds: quantizers placed with their initial grids (the layout and the
    checks are what matter here, not the calibration)."""
    model = build_model("lavt-tiny").eval()
    recipe = make_recipe("minmax", "w8a8")
    place_quantizers(model, recipe)
    side, tokens = model.config.swin.img_size, model.config.preprocess.max_tokens
    pixels = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    from quantize.data.preprocess import normalize_image

    batch = CalibrationBatch(
        normalize_image(pixels), torch.randint(1, 1000, (2, tokens)), torch.ones(2, tokens, dtype=torch.long)
    )
    out = tmp_path_factory.mktemp("artifact") / "art"
    save_quantized(model, recipe, out, "lavt-tiny", {"calibration": {"pairs": 2}}, calibration_inputs=batch)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "qparams.json").write_text("{}"), "qparams.json was changed after calibration"),
        (lambda d: _edit_recipe(d, bits=(4, 4)), "config.json was changed after calibration"),
        (lambda d: _edit_recipe(d, method="magic"), "config.json was changed after calibration"),
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors was changed after calibration"),
        (lambda d: (d / "calibration_inputs.safetensors").unlink(), "calibration_inputs.safetensors is missing"),
        (lambda d: (d / MANIFEST).unlink(), "no ptq4ris-manifest.json"),
    ],
    ids=["qparams", "recipe-bits", "recipe-method", "truncated-weights", "deleted-inputs", "no-manifest"],
)
def test_an_edited_artifact_is_refused_by_name(artifact, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    check_quantized(copy)
    edit(copy)
    with pytest.raises(UserError, match=message):
        load_quantized(copy)


def _edit_recipe(folder: Path, bits=None, method=None) -> None:
    config = json.loads((folder / "config.json").read_text())
    if bits:
        config["recipe"]["weight_bits"], config["recipe"]["act_bits"] = bits
    if method:
        config["recipe"]["method"] = method
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Ctrl-C reaches the child as in a terminal: a test run started in the background (nohup, `make test &`) has
    # SIGINT ignored, an ignored signal stays ignored across exec, and a handled one is reset to the default.
    restore = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        restore = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ptq4ris", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)


def _interrupt_after(proc: subprocess.Popen, seconds: float) -> tuple[int, str]:
    time.sleep(seconds)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_during_calibration_leaves_the_previous_artifact_usable(artifact, tmp_path):
    import shutil

    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # No refer root is needed to start: the random-weights lavt-tiny on drawn pairs is enough to be interrupted.
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "ptq4ris", "data", "synth", "--out", str(data), "--splits", "train", "--train-scenes",
         "16"], cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    proc = _cli("calibrate", "--refer-root", str(data), "--calib-size", "16", "--out", str(out), cwd=tmp_path)
    code, err = _interrupt_after(proc, 12)
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    check_quantized(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ctrl_c_during_data_synth_keeps_the_earlier_data(tmp_path):
    data = tmp_path / "data"
    first = subprocess.run(
        [sys.executable, "-m", "ptq4ris", "data", "synth", "--out", str(data), "--splits", "val", "--val-scenes", "8"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    meta = (data / "shapesref" / "meta.json").read_bytes()
    proc = _cli("data", "synth", "--out", str(data), "--splits", "train", "--train-scenes", "40000", cwd=tmp_path)
    # Interrupted once rendering is under way (its staging folder exists), however slow the machine is to get there.
    deadline = time.monotonic() + 120
    while not list(data.glob(".shapesref-staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    code, err = _interrupt_after(proc, 2)
    assert code == 130 and "Traceback" not in err, err
    assert (data / "shapesref" / "meta.json").read_bytes() == meta
    assert not [p for p in data.iterdir() if p.name.startswith(".")]
