"""`ptq4ris export-coreml` and `ptq4ris parity --coreml` end to end on the small LAVT of the `.pte` tests: the
packages carry the calibrated scales, int4 weights at W4, the metadata Xcode shows, and the MIL interpreter runs every
op of the float, W8A8 and W4 packages and agrees with the simulated model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from ios_export.export_coreml import package_paths, weight_bytes
from ios_export.mil_interpreter import MilInterpreter, load_program
from ptq4ris.cli import main
from quantize.data.shapesref import write_shapesref

from .test_export_pte import _artifact


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_shapesref(root, seed=0, split_scenes={"train": 8, "val": 8})
    return root


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coreml")
    # Calibrated on a data set that is gone by the time of export: the artifact carries its calibration inputs.
    data = write_shapesref(folder / "data", seed=0, split_scenes={"train": 8})
    w8 = _artifact(data, folder / "w8a8", "ptq4ris-deploy")
    w4 = _artifact(data, folder / "w4a8", "ptq4ris-deploy", bits="w4a8")
    shutil.rmtree(data)
    out8, out4 = folder / "pkg" / "model.mlpackage", folder / "pkg4" / "model.mlpackage"
    common = ["--json"]
    assert (
        main(
            [
                "export-coreml",
                "--quantized",
                str(w8),
                "--out",
                str(out8),
                "--precision",
                "fp32",
                "--stages",
                "full",
                "text",
                "visual",
                *common,
            ]
        )
        == 0
    )
    assert main(["export-coreml", "--quantized", str(w4), "--out", str(out4), "--no-float", *common]) == 0
    return {"w8": w8, "w4": w4, "out8": out8, "out4": out4}


def _ops(package) -> set[str]:
    return {op.op_type for op in load_program(package).functions["main"].operations}


def test_every_package_written_and_nothing_half_written(packages):
    names = sorted(p.name for p in packages["out8"].parent.iterdir())
    assert names == sorted(
        [
            "model.mlpackage",
            "model.text.mlpackage",
            "model.visual.mlpackage",
            "model.float.mlpackage",
            "model.coreml.json",
        ]
    ), names
    assert sorted(p.name for p in packages["out4"].parent.iterdir()) == ["model.coreml.json", "model.mlpackage"]


def test_activation_quantize_ops_carry_the_calibrated_scales(packages):
    qparams = json.loads((packages["w8"] / "qparams.json").read_text())
    calibrated = qparams["backbone.patch_embed.proj"]["input_quantizer"]
    program = load_program(packages["out8"])
    image_q = next(
        op for op in program.functions["main"].operations if op.op_type == "quantize" and op.input.name == "image"
    )
    assert np.isclose(float(image_q.scale.val), calibrated["scale"], rtol=1e-6)
    assert int(image_q.zero_point.val) == int(calibrated["zero_point"]) - 128  # uint8 grid as int8
    ops = _ops(packages["out8"])
    assert {"quantize", "dequantize", "constexpr_blockwise_shift_scale"} <= ops
    assert not {"quantize", "dequantize"} & _ops(package_paths(packages["out8"])["float"])


def test_w4_package_stores_int4_weights_and_is_smaller(packages):
    from coremltools.converters.mil.mil import types

    program = load_program(packages["out4"])
    dtypes = set()
    for op in program.functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            meta = op.data.val.dtype.metadata  # sub-byte types ride on an int8/uint8 numpy dtype
            dtypes.add(types.builtin_to_string(meta["true_dtype"]) if meta else str(op.data.val.dtype))
    assert "int4" in dtypes and "int8" not in dtypes, dtypes  # 4-bit weights and (4-bit) word table
    float_bytes = weight_bytes(package_paths(packages["out8"])["float"])  # fp32 weights
    w8, w4 = weight_bytes(packages["out8"]), weight_bytes(packages["out4"])
    assert w8 < 0.3 * float_bytes and w4 < 0.8 * w8, (float_bytes, w8, w4)


def test_metadata_and_io_types_as_xcode_shows_them(packages):
    model = ct.models.MLModel(str(packages["out8"]), skip_model_load=True)
    spec = model.get_spec()
    inputs = {i.name: i for i in spec.description.input}
    assert list(inputs) == ["image", "input_ids", "attention_mask"]
    int32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert inputs["input_ids"].type.multiArrayType.dataType == int32
    assert list(inputs["input_ids"].type.multiArrayType.shape) == [1, 20]
    assert spec.description.output[0].name == "logits"
    assert spec.description.output[0].type.multiArrayType.dataType == float32
    assert model.author == "ptq4ris" and "W8A8" in model.short_description
    assert "WordPiece" in model.input_description["input_ids"]
    recipe = json.loads(model.user_defined_metadata["ptq4ris.recipe"])
    assert recipe == {"method": "ptq4ris-deploy", "bits": "w8a8"}


def test_interpreter_covers_every_op_of_float_w8a8_and_w4_packages(packages):
    paths = package_paths(packages["out8"])
    for package in (paths["full"], paths["float"], paths["text"], paths["visual"], packages["out4"]):
        MilInterpreter(load_program(package))  # refuses any op it cannot execute


def test_parity_coreml_end_to_end_and_per_stage(packages, refer_root, tmp_path, capsys):
    out = tmp_path / "parity.json"
    argv = [
        "parity",
        "--coreml",
        str(packages["out8"]),
        "--quantized",
        str(packages["w8"]),
        "--refer-root",
        str(refer_root),
        "--out",
        str(out),
        "--first-divergence",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "coreml mIoU" in printed and "stage packages" in printed
    report = json.loads(out.read_text())
    val = report["sets"]["shapesref val"]
    # mIoU is not compared here: the one-block model's masks are small blobs, where a few pixels move IoU by points
    # (lavt-tiny's figures, all val pairs, are in docs/results.md).
    assert val["pairs"] > 15 and val["mask_agreement"] >= 99.0, val
    assert "deployed" in val and report["sets"]["natural photographs"]["mask_agreement"] >= 97.0
    assert report["sets"]["natural photographs"]["pairs"] == 8
    assert report["stages"]["visual"]["mask_agreement"] >= 99.0
    text = report["stages"]["text"]
    assert text["mean_abs_feature_diff"] < 0.02 * text["max_abs_feature"], text
    fd = report["first_divergence"]
    assert fd["matched_ops"] > 100, fd


def test_first_divergence_names_where_a_package_departs(packages, refer_root):
    """Compared with the float graph instead of its own, the W8A8 package departs at its first quantized op."""
    import torch

    from ios_export.parity import first_divergence
    from quantize.calibration.artifact import load_quantized
    from quantize.deploy.stages import float_stage

    model, _, _ = load_quantized(packages["w8"])
    image = torch.randn(1, 3, model.config.swin.img_size, model.config.swin.img_size)
    ids = torch.tensor([[101, 1996, 2417, 4418, 102] + [0] * 15])
    mask = (ids > 0).long()
    report = first_divergence(packages["out8"], float_stage(model, "full"), (image, ids, mask), 1e-3)
    assert report["first"] is not None and report["matched_ops"] > 10


def test_bad_input_is_named(packages, tmp_path, capsys):
    common = []
    assert main(["export-coreml", "--quantized", str(packages["w8"]), "--out", str(tmp_path / "m.pte"), *common]) == 2
    assert "name a .mlpackage" in capsys.readouterr().err
    argv = [
        "export-coreml",
        "--quantized",
        str(packages["w4"]),
        "--out",
        str(tmp_path / "m.mlpackage"),
        "--target",
        "iOS17",
        *common,
    ]
    assert main(argv) == 2
    assert "iOS18" in capsys.readouterr().err
    assert main(["export-coreml", "--quantized", str(tmp_path / "none"), "--out", str(tmp_path / "m.mlpackage")]) == 2
    assert "calibrate" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="export-coreml"):
        load_program(tmp_path / "missing.mlpackage")
    assert not list(tmp_path.glob("*.mlpackage"))
