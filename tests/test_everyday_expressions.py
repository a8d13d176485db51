"""Everyday referring expressions in the calibration pairs: how they join the batch, what the artifact records,
that export rebuilds the same pairs, and that they keep typed sentences inside the text encoder's grids."""

from __future__ import annotations

import copy

import pytest
import torch

from quantize.calibration.calibrate import (
    CalibrationReport,
    calibrate,
    calibration_batch,
    calibration_record,
    default_everyday,
)
from quantize.calibration.everyday_expressions import EVERYDAY_EXPRESSIONS
from quantize.calibration.placement import quantized_sites, set_quantization
from quantize.calibration.recipe import make_recipe
from quantize.data import open_split
from quantize.data.shapesref import write_shapesref
from quantize.deploy.graph import calibration_inputs
from quantize.deploy.parity_stats import NATURAL_PHOTOS
from quantize.models.registry import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model("lavt-tiny").eval()


@pytest.fixture(scope="module")
def train(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_shapesref(root, seed=0, split_scenes={"train": 8})
    return open_split(root, "shapesref", "unc", "train", tiny.config)


def test_everyday_expressions_follow_the_split_pairs(train):
    plain = calibration_batch(train, 4)
    batch = calibration_batch(train, 4, everyday=6)
    assert len(batch) == 10 and batch.everyday == 6
    assert torch.equal(batch.input_ids[:4], plain.input_ids) and torch.equal(batch.images[:4], plain.images)
    for i, sentence in enumerate(EVERYDAY_EXPRESSIONS[:6]):
        ids, mask = train.tokenizer(sentence)
        assert torch.equal(batch.input_ids[4 + i], ids) and torch.equal(batch.attention_mask[4 + i], mask)
        assert torch.equal(batch.images[4 + i], plain.images[i % 4])
    assert "6 everyday expressions" in batch.description
    record = calibration_record(train, batch, CalibrationReport(make_recipe("minmax", "w8a8")))
    assert record["pairs"] == 4 and record["everyday_expressions"] == 6
    with pytest.raises(ValueError, match=f"between 0 and {len(EVERYDAY_EXPRESSIONS)}"):
        calibration_batch(train, 4, everyday=len(EVERYDAY_EXPRESSIONS) + 1)


def test_everyday_expressions_by_default_only_at_8_bit_activations():
    assert default_everyday(make_recipe("ptq4ris-deploy", "w8a8")) == len(EVERYDAY_EXPRESSIONS)
    assert default_everyday(make_recipe("ptq4ris-deploy", "w4a8")) == len(EVERYDAY_EXPRESSIONS)
    assert default_everyday(make_recipe("ptq4ris-deploy", "w4a4")) == 0
    assert default_everyday(make_recipe("ptq4ris", "w6a6")) == 0


def test_export_observes_output_ranges_on_the_same_pairs(tiny, train, tmp_path):
    """Export reads the pairs stored in the artifact: the split pairs first (at most ``pairs`` of them), then every
    everyday expression, each exactly as calibration saw it."""
    from quantize.calibration.artifact import save_quantized
    from quantize.calibration.placement import place_quantizers

    batch = calibration_batch(train, 4, everyday=3)
    model = copy.deepcopy(tiny)
    recipe = make_recipe("minmax", "w8a8")
    place_quantizers(model, recipe)
    record = {"calibration": {"dataset": "shapesref", "split": "train", "pairs": 4, "everyday_expressions": 3}}
    artifact = save_quantized(model, recipe, tmp_path / "art", "lavt-tiny", record, calibration_inputs=batch)
    pairs = calibration_inputs(tiny, artifact, 4)
    assert len(pairs) == 7
    for i, (image, ids, mask) in enumerate(pairs):
        assert torch.equal(image[0], batch.images[i]) and torch.equal(ids[0], batch.input_ids[i])
        assert torch.equal(mask[0], batch.attention_mask[i])
    fewer = calibration_inputs(tiny, artifact, 2)  # the first 2 split pairs, then the 3 everyday ones
    assert [torch.equal(p[1][0], batch.input_ids[i]) for p, i in zip(fewer, (0, 1, 4, 5, 6))] == [True] * 5


def _ffn_input_error(model, sentences, tokenizer) -> float:
    """Relative error of the quantized inputs of the text FFN output projections (post-GELU, the sites where
    words outside the calibration vocabulary excite channels beyond their calibrated range)."""
    ids, mask = tokenizer.batch(sentences)
    sites = {
        id(s): s
        for s in quantized_sites(model)
        if s.info.name.endswith("output.dense") and "attention" not in s.info.name
    }
    inputs = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: inputs.append((sites[id(module)], args[0])) if id(module) in sites else None
    )
    set_quantization(model, False)
    try:
        with torch.no_grad():
            model.encode_text(ids, mask)
    finally:
        hook.remove()
        set_quantization(model, True)
    valid = mask.bool()
    errors = []
    with torch.no_grad():
        for site, x in inputs:
            x = x[valid]
            errors.append(float((site.input_quantizer(x) - x).norm() / x.norm()))
    return sum(errors) / len(errors)


def test_everyday_expressions_keep_typed_sentences_in_range(tiny, train):
    recipe = make_recipe("ptq4ris-deploy", "w8a8", search="none")
    narrow, _ = calibrate(tiny, recipe, calibration_batch(train, 8))
    covered, _ = calibrate(tiny, recipe, calibration_batch(train, 8, everyday=len(EVERYDAY_EXPRESSIONS)))
    typed = [sentence for _, sentence in NATURAL_PHOTOS]  # none of them is an everyday expression
    assert not set(typed) & set(EVERYDAY_EXPRESSIONS)
    before, after = _ffn_input_error(narrow, typed, train.tokenizer), _ffn_input_error(covered, typed, train.tokenizer)
    assert after < 0.8 * before, (before, after)
