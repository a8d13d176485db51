"""The `ptq4ris` command line end to end on small ShapesRef splits: synth → evaluate, train → resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ptq4ris.cli import main
from quantize.data.shapesref import write_shapesref


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_shapesref(root, seed=0, split_scenes={"train": 24, "val": 40})
    return root


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "ptq4ris.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "train", "evaluate", "calibrate", "analyze", "export-pte", "parity"):
        assert command in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "ptq4ris.cli", "evaluate", "--help"], capture_output=True, text=True, check=True
    )
    assert "--checkpoint" in out.stdout and "--shuffled-expressions" in out.stdout


def test_embedded_model_segments_shapesref_and_needs_language(refer_root, capsys):
    good = run_json(capsys, "evaluate", "--refer-root", str(refer_root), "--split", "val", "--limit", "64", "--json")
    assert good["pairs"] == 64
    assert good["mIoU"] > 85, good
    assert set(good["mIoU_by_kind"]) <= {"attribute", "location", "relation", "ordinal"}
    shuffled = run_json(
        capsys,
        "evaluate",
        "--refer-root",
        str(refer_root),
        "--split",
        "val",
        "--limit",
        "64",
        "--json",
        "--shuffled-expressions",
    )
    assert shuffled["mIoU"] < good["mIoU"] - 30


def test_train_writes_weights_and_resumes(refer_root, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data-root", str(refer_root), "--out", str(out), "--batch-size", "4", "--save-every", "2"]
    assert main(args + ["--steps", "2"]) == 0
    first = json.loads((out / "training.json").read_text())
    assert first["steps_done"] == 2 and (out / "lavt-tiny.safetensors").is_file()
    assert main(args + ["--steps", "3"]) == 0
    second = json.loads((out / "training.json").read_text())
    assert second["steps_done"] == 3  # continued from step 2, not restarted
    assert not list(out.glob(".*"))  # no temporary files left behind
    # the trained file loads strictly as a lavt-tiny checkpoint
    assert (
        main(
            [
                "evaluate",
                "--refer-root",
                str(refer_root),
                "--limit",
                "4",
                "--json",
                "--checkpoint",
                str(out / "lavt-tiny.safetensors"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "--model", "lavt-xl"], "valid names: lavt-b, lavt-tiny"),
        (["evaluate", "--checkpoint", "missing.pth"], "checkpoint not found"),
        (["evaluate", "--refer-root", ".", "--split", "testC"], "unknown split 'testC'"),
        (["evaluate", "--refer-root", ".", "--split-by", "umd"], "has no 'umd' split"),
        (["evaluate", "--refer-root", "nowhere"], "ptq4ris data synth"),
        (["evaluate", "--model", "lavt-b"], "--checkpoint"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, refer_root, capsys, monkeypatch):
    monkeypatch.chdir(refer_root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_checkpoint_of_another_architecture_is_named(refer_root, tmp_path, capsys):
    import torch

    from quantize.models.lavt import LAVT
    from tests.test_models import tiny_config

    path = tmp_path / "other.pth"
    torch.save({"model": LAVT(tiny_config()).state_dict()}, path)
    assert main(["evaluate", "--refer-root", str(refer_root), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "mis-shaped" in err


def test_calibrate_evaluate_analyze(refer_root, tmp_path, capsys):
    """calibrate writes a folder that evaluate and analyze reload without recalibrating."""
    out = tmp_path / "minmax-w8a8"
    argv = ["calibrate", "--refer-root", str(refer_root), "--method", "minmax", "--bits", "w8a8"]
    assert main([*argv, "--calib-size", "8", "--out", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["method"] == "minmax" and config["calibration"]["split"] == "train"
    # 8-bit activations: the everyday expressions join the 8 split pairs by default.
    assert (config["calibration"]["pairs"], config["calibration"]["everyday_expressions"]) == (8, 32)
    evaluated = run_json(
        capsys, "evaluate", "--quantized", str(out), "--refer-root", str(refer_root), "--limit", "32", "--json"
    )
    assert evaluated["mIoU"] > 80 and "simulated" in evaluated["model"]
    assert main(["analyze", "--quantized", str(out), "--refer-root", str(refer_root), "--limit", "16",
                 "--sqnr-pairs", "4"]) == 0  # fmt: skip
    report = json.loads((out / "sensitivity.json").read_text())
    assert set(report["modalities"]) == {"vision", "text", "fusion", "decoder"}
    assert len(report["layers"]) == config_sites(config)
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def config_sites(config: dict) -> int:
    return len(config["sites"])


def test_calibrate_rejects_bad_settings(refer_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--bits", "w3a3", "--out", str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err
    argv = ["calibrate", "--refer-root", str(refer_root), "--calib-split", "testA", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "unknown split 'testA'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["evaluate", "--quantized", str(tmp_path / "missing")]) == 2
    assert "ptq4ris calibrate" in capsys.readouterr().err
