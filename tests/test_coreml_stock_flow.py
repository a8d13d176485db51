"""coremltools' stock W8A8 flow (the iPhone peer of the stock XNNPACK baseline) on the small LAVT of the export
tests, calibrated on three ShapesRef pairs: the package quantizes activations and stores int8 weights, is written
atomically, and the MIL interpreter runs every op of it to an output close to the float model's."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
pytest.importorskip("executorch.backends.apple.coreml.quantizer")

from ios_export.coreml_stock_flow import build_coreml_stock_w8a8, quantization_op_counts
from ios_export.export_coreml import weight_bytes
from ios_export.mil_interpreter import load_program
from ios_export.parity import CoreMLProgram
from quantize.errors import UserError

from .test_export_pte import small_model
from .test_stock_xnnpack import _pairs


def _source(var) -> str:
    """The program input (or op output) a variable comes from, through fp16 casts."""
    while var.op is not None and var.op.op_type == "cast":
        var = var.op.x
    return var.name


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def calib():
    images, ids, mask = _pairs(0, 3)
    return [(images[i : i + 1], ids[i : i + 1], mask[i : i + 1]) for i in range(3)]


@pytest.fixture(scope="module")
def built(model, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock") / "stock.mlpackage"
    start = time.perf_counter()
    path = build_coreml_stock_w8a8(model, calib, out)
    return path, time.perf_counter() - start


def test_written_atomically_under_its_name(built):
    path, _ = built
    assert path.is_dir() and (path / "Manifest.json").is_file()
    assert [p.name for p in path.parent.iterdir()] == ["stock.mlpackage"]  # no staging folder left behind


def test_activations_quantized_and_weights_int8(built, model):
    path, _ = built
    counts = quantization_op_counts(path)
    assert counts["quantize"] >= 20 and counts["dequantize"] >= counts["quantize"], counts
    # iOS17: weights are constexpr_affine_dequantize over 8-bit data: int8 for conv/linear weights and the word table,
    # uint8 for constants the quantizer treats as activations (position embeddings, norm scales).
    assert counts["constexpr_affine_dequantize"] >= 20, counts
    assert counts["weight_dtypes"].get("int8", 0) >= 10 and set(counts["weight_dtypes"]) <= {"int8", "uint8"}, counts
    ops = load_program(path).functions["main"].operations
    image_q = [op for op in ops if op.op_type == "quantize" and _source(op.input) == "image"]
    assert image_q, "the image does not enter the first conv through an activation quantize op"
    # No large float weight is left: the word table and every conv/linear weight are stored in 8 bits (only the
    # per-channel scales of those constexpr ops, and biases, stay float).
    large_float = [
        op.outputs[0].name
        for op in ops
        if op.op_type == "const"
        and isinstance(op.outputs[0].val, np.ndarray)
        and op.outputs[0].val.dtype.kind == "f"
        and op.outputs[0].val.size >= 4096
        and not all(child.op_type.startswith("constexpr_") for child in op.outputs[0].child_ops)
    ]
    assert not large_float, large_float[:5]
    params = sum(p.numel() for p in model.parameters())
    # One byte a parameter plus per-channel scales; fp16 weights would take two.
    assert weight_bytes(path) < 1.2 * params, (weight_bytes(path), params)


def test_io_types_as_the_repo_packages(built):
    spec = ct.models.MLModel(str(built[0]), skip_model_load=True).get_spec()
    inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
    assert list(inputs) == ["image", "input_ids", "attention_mask"]
    int32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    assert inputs["input_ids"].dataType == int32 and inputs["attention_mask"].dataType == int32
    assert spec.description.output[0].name == "logits"
    assert spec.specificationVersion >= 8  # iOS17: the first with activation quantize/dequantize


def test_interpreter_output_close_to_float_but_quantized(built, model, calib):
    program = CoreMLProgram(built[0], stage="full")
    image, ids, mask = calib[1]
    with torch.no_grad():
        reference = model(image, ids, mask)
    got = program(image, ids, mask)
    assert got.shape == reference.shape and torch.isfinite(got).all()
    assert (got - reference).abs().max().item() > 1e-3, "output equals the float model's: nothing was quantized"
    agreement = (got.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement > 0.9, agreement
    correlation = np.corrcoef(got.flatten().numpy(), reference.flatten().numpy())[0, 1]
    assert correlation > 0.5, correlation


def test_refuses_bad_arguments_before_any_work(model, calib, tmp_path):
    with pytest.raises(UserError, match=".mlpackage"):
        build_coreml_stock_w8a8(model, calib, tmp_path / "stock.pte")
    with pytest.raises(UserError, match="iOS17"):
        build_coreml_stock_w8a8(model, calib, tmp_path / "s.mlpackage", target="iOS16")
    with pytest.raises(UserError, match="calibration pair"):
        build_coreml_stock_w8a8(model, [], tmp_path / "s.mlpackage")
    assert not list(tmp_path.iterdir())
