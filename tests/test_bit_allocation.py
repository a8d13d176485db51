"""Mixed weight bits under a size budget: the size model, the exact knapsack, the recipe that records the choice, and
a mixed artifact lowered with both weight widths (its program as large as the size model says)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from ptq4ris.cli import main
from quantize.calibration.artifact import load_quantized, save_quantized
from quantize.calibration.bit_allocation import (
    allocate_weight_bits,
    check_budget,
    knapsack,
    program_bytes,
    stored_bytes,
)
from quantize.calibration.calibrate import calibrate, calibration_batch
from quantize.calibration.placement import place_quantizers, quantized_sites
from quantize.calibration.recipe import Recipe, make_recipe
from quantize.data import open_split
from quantize.errors import UserError
from quantize.models import build_model

from .test_export_pte import refer_root, small_model  # noqa: F401 (fixture)


def test_knapsack_is_exact():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = 7
        costs = torch.randint(0, 9, (n,), generator=g).tolist()
        gains = torch.rand(n, generator=g).tolist()
        capacity = int(torch.randint(0, 25, (1,), generator=g))
        chosen = knapsack(costs, gains, capacity)
        assert sum(costs[i] for i in chosen) <= capacity
        best = max(
            sum(gains[i] for i in subset)
            for r in range(n + 1)
            for subset in itertools.combinations(range(n), r)
            if sum(costs[i] for i in subset) <= capacity
        )
        assert sum(gains[i] for i in chosen) == pytest.approx(best)


def test_stored_bytes_follow_what_xnnpack_packs():
    shape = torch.Size([64, 128])
    scales = 64 * 4
    assert stored_bytes("linear", shape, 8) == 64 * 128 + scales
    assert stored_bytes("linear", shape, 4) == 64 * 128 // 2 + scales  # QC4W: two values a byte
    # No 4-bit convolution kernel: a conv's 4-bit values sit in int8, so its 8 bits cost nothing more.
    conv = torch.Size([64, 32, 3, 3])
    assert stored_bytes("conv2d", conv, 4) == stored_bytes("conv2d", conv, 8)
    # Five- to seven-bit values are int8 containers for every op.
    assert stored_bytes("linear", shape, 6) == stored_bytes("linear", shape, 8)
    assert stored_bytes("linear", shape, 4, copies=2.0, streams=2) == 64 * 128 + 2 * scales  # DRQ's two regions


def test_recipe_records_layer_bits():
    name = "text_encoder.encoder.layer.0.intermediate.dense"
    recipe = make_recipe("ptq4ris-deploy", "w4a8", layer_weight_bits=[[name, 8]])
    assert recipe.layer_weight_bits == ((name, 8),) and recipe.mixed
    assert recipe.bits == "w4/8a8" and recipe.weight_bits_of(name) == 8 and recipe.weight_bits_of("other") == 4
    assert recipe.rounding_at(8) == "nearest" and recipe.rounding_at(4) == "gptq"
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe
    with pytest.raises(UserError, match="layer_weight_bits"):
        make_recipe("ptq4ris-deploy", "w4a8", layer_weight_bits=[[name, 9]])
    with pytest.raises(UserError, match="layer_weight_bits"):
        make_recipe("ptq4ris-deploy", "w4a8", layer_weight_bits=[[name, 8], [name, 4]])
    model = build_model("lavt-tiny")
    placed = {s.info.name: s for s in place_quantizers(model, recipe)}
    assert placed[name].weight_quantizer.bits == 8
    assert placed["text_encoder.encoder.layer.0.output.dense"].weight_quantizer.bits == 4
    with pytest.raises(UserError, match="no quantized weights for"):
        place_quantizers(build_model("lavt-tiny"), make_recipe("ptq4ris-deploy", "w4a8", layer_weight_bits=[["x", 8]]))


def test_budget_refusals_name_the_smallest_program():
    model = build_model("lavt-tiny")
    recipe = make_recipe("ptq4ris-deploy", "w4a8")
    low, high = check_budget(model, recipe, 10**12)
    assert low < high
    assert program_bytes(model, make_recipe("ptq4ris-deploy", "w8a8")) > high  # its word table is 8-bit too
    with pytest.raises(UserError, match=f"{low / 1e6:.2f} MB"):
        check_budget(model, recipe, low - 1)
    with pytest.raises(UserError, match="4-bit weights"):
        check_budget(model, make_recipe("ptq4ris-deploy", "w8a8"), 10**12)
    with pytest.raises(UserError, match="ptq4ris-deploy"):
        check_budget(model, make_recipe("ptq4ris", "w4a8"), 10**12)


@pytest.fixture(scope="module")
def mixed(refer_root, tmp_path_factory):  # noqa: F811
    """The small model allocated halfway between all-4 and all-8 bits, calibrated and saved."""
    model = small_model()
    recipe = make_recipe("ptq4ris-deploy", "w4a8", search="none", text_groups=4, pwam_groups=2)
    batch = calibration_batch(open_split(refer_root, "shapesref", "unc", "train", model.config), 4)
    low, high = check_budget(model, recipe, 10**12)
    budget = (low + high) // 2
    chunks = batch.chunks(4, "cpu")
    mixed_recipe, allocation = allocate_weight_bits(model, recipe, chunks, budget)
    quantized, _ = calibrate(model, mixed_recipe, batch)
    out = tmp_path_factory.mktemp("mixed") / "w4-8a8"
    extra = {"bit_allocation": allocation.to_dict()}
    save_quantized(quantized, mixed_recipe, out, "small-test", extra, calibration_inputs=batch)
    return out, allocation, budget, (model, recipe, chunks)


def test_allocation_fits_the_budget_and_keeps_the_costliest_errors_out(mixed):
    out, allocation, budget, (model, recipe, chunks) = mixed
    assert allocation.low_program_bytes <= allocation.estimated_bytes <= budget
    layers = {entry["name"]: entry for entry in allocation.layers}
    high = set(allocation.high_layers)
    # Every layer whose 8 bits are free (convolutions) keeps them; some paid layers do, some do not.
    assert all(layers[n]["bits"] == 8 for n in layers if layers[n]["extra_bytes_at_high_bits"] <= 0)
    paid = [n for n in layers if layers[n]["extra_bytes_at_high_bits"] > 0]
    assert 0 < len(high & set(paid)) < len(paid)
    # The layer that costs the logits most per byte is kept at 8 bits.
    worst = max(paid, key=lambda n: layers[n]["logit_mse_at_low_bits"] / layers[n]["extra_bytes_at_high_bits"])
    assert worst in high
    # Nothing left to choose: a budget below all-8 but at all-4 keeps only the free layers; at all-8, everything.
    at_low, _ = allocate_weight_bits(model, recipe, chunks, allocation.low_program_bytes)
    assert {n for n, _ in at_low.layer_weight_bits} == {n for n in layers if n not in paid}
    at_high, _ = allocate_weight_bits(model, recipe, chunks, 10**12)
    assert {n for n, _ in at_high.layer_weight_bits} == set(layers)
    # The artifact records the choice and rebuilds the same mixed quantizers.
    quantized, loaded, config = load_quantized(out)
    assert loaded.mixed and config["bit_allocation"]["high_layers"] == allocation.high_layers
    bits = {s.info.name: s.weight_quantizer.bits for s in quantized_sites(quantized) if hasattr(s, "weight_quantizer")}
    assert {n for n, b in bits.items() if b == 8} == high


def test_mixed_artifact_lowers_both_widths_at_the_estimated_size(mixed, tmp_path, capsys):
    out, _, _, _ = mixed
    pte = tmp_path / "mixed.pte"
    argv = ["export-pte", "--quantized", str(out), "--out", str(pte), "--stages", "full", "--no-float", "--json"]
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)["programs"]["full"]
    assert full["kernels"].get("Fully Connected (NC, QS8, QC4W) GEMM", 0) > 0, full["kernels"]
    assert full["kernels"].get("Fully Connected (NC, QS8, QC8W) GEMM", 0) > 0, full["kernels"]
    quantized, recipe, _ = load_quantized(out)
    estimate = program_bytes(quantized, recipe)
    # The size model counts weights, scales and constants; the program adds its structure (a few percent).
    assert estimate <= pte.stat().st_size <= 1.15 * estimate, (estimate, pte.stat().st_size)


def test_mixed_artifact_converts_to_core_ml_with_both_widths(mixed, tmp_path, capsys):
    from coremltools.converters.mil.mil import types

    from ios_export.mil_interpreter import load_program

    out, _, _, _ = mixed
    package = tmp_path / "mixed.mlpackage"
    argv = ["export-coreml", "--quantized", str(out), "--out", str(package), "--stages", "full", "--no-float", "--json"]
    assert main(argv) == 0
    dtypes = set()
    for op in load_program(package).functions["main"].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            meta = op.data.val.dtype.metadata  # sub-byte types ride on an int8/uint8 numpy dtype
            dtypes.add(types.builtin_to_string(meta["true_dtype"]) if meta else str(op.data.val.dtype))
    assert {"int4", "int8"} <= dtypes, dtypes  # the 4-bit layers (and table) in int4, the 8-bit ones in int8


def test_sensitivity_pairs_are_spread_over_split_and_everyday_pairs():
    from quantize.calibration.calibrate import CalibrationBatch

    n = 64
    batch = CalibrationBatch(torch.zeros(n, 3, 2, 2), torch.arange(n)[:, None], torch.ones(n, 1), "pairs", everyday=32)
    sample = batch.spread(16)
    ids = sample.input_ids[:, 0].tolist()
    assert len(sample) == 16 and ids[0] == 0 and ids[-1] == n - 1 and ids == sorted(set(ids))
    assert sample.everyday == sum(i >= 32 for i in ids) == 8
    assert batch.spread(100) is batch
