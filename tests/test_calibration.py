"""Quantizer modules, placement over LAVT, the scale search, the calibration pass and the artifact."""

from __future__ import annotations

import json

import pytest
import torch

from quantize.calibration.artifact import (
    QuantizedArtifactError,
    load_calibration_inputs,
    load_quantized,
    save_quantized,
)
from quantize.calibration.calibrate import CalibrationBatch, calibrate
from quantize.calibration.placement import (
    QuantMatMul,
    classify_site,
    place_quantizers,
    quantized_sites,
    quantizers_of,
    set_quantization,
)
from quantize.calibration.quantizers import (
    DrqGeluQuantizer,
    DrqSoftmaxQuantizer,
    GroupQuantizer,
    TierQuantizer,
    UniformQuantizer,
)
from quantize.calibration.recipe import METHODS, Recipe, make_recipe
from quantize.calibration.search import LinearCapture, search_linear
from quantize.data.preprocess import Tokenizer
from quantize.models import build_model, text_encoder_dir

SENTENCES = ["the red circle left of the blue square", "big green triangle", "second square from the left", "it"]


@pytest.fixture(scope="module")
def tiny():
    return build_model("lavt-tiny").eval()


@pytest.fixture(scope="module")
def batch(tiny):
    """Four pairs of real sentences and smooth drawn images (shapes on gradients), ImageNet-normalised."""
    tok = Tokenizer(text_encoder_dir(), tiny.config.preprocess.max_tokens)
    ids, mask = tok.batch(SENTENCES)
    side = tiny.config.swin.img_size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    images = []
    for i in range(4):
        img = torch.stack([xx, yy, (xx + yy) / 2]) * 0.6
        cy, cx = 30 + 20 * i, 90 - 15 * i
        disk = ((yy * side - cy) ** 2 + (xx * side - cx) ** 2) < 15**2
        img[i % 3][disk] = 1.0
        images.append((img - 0.45) / 0.25)
    return CalibrationBatch(torch.stack(images), ids, mask)


# ------------------------------------------------------------------------------------------------ quantizers
def test_uniform_quantizer_exact_grid():
    q = UniformQuantizer(4, symmetric=False)
    q.set_qparams(torch.tensor(0.5), torch.tensor(3.0))
    x = torch.tensor([-2.0, -1.4, 0.26, 5.9, 100.0])
    # levels (q - 3) * 0.5 for q in 0..15: [-1.5, 6.0]
    assert q.fake_quant(x).tolist() == [-1.5, -1.5, 0.5, 6.0, 6.0]
    sym = UniformQuantizer(8, symmetric=True)
    with pytest.raises(ValueError, match="zero points of 0"):
        sym.set_qparams(torch.tensor(0.1), torch.tensor(1.0))


def test_drq_softmax_regions_and_split():
    q = DrqSoftmaxQuantizer(4)  # 3 bits per region: 7 levels
    q.split_exponent.fill_(2)  # split at 0.25, low step (1/7)/4
    x = torch.tensor([0.3, 0.1, 0.26, 0.24, 1.0, 0.0])
    expected = [2 / 7, 3 / 28, 2 / 7, 7 / 28, 1.0, 0.0]
    assert torch.allclose(q.fake_quant(x), torch.tensor(expected))
    # A larger m moves the split down: 0.1 now falls in the high region.
    q.split_exponent.fill_(4)
    assert torch.isclose(q.fake_quant(torch.tensor([0.1])), torch.tensor([1 / 7]))


def test_drq_gelu_regions():
    q = DrqGeluQuantizer(4)
    q.delta_pos.fill_(0.5)
    delta_neg = 0.16997 / 8
    x = torch.tensor([-0.17, -0.05, 0.2, 0.8, 10.0])
    expected = [-8 * delta_neg, -2 * delta_neg, 0.0, 1.0, 3.5]  # positive region clips at 7 levels
    assert torch.allclose(q.fake_quant(x), torch.tensor(expected), atol=1e-7)


def test_tier_quantizer_keeps_outliers():
    x = torch.cat([torch.randn(4000, generator=torch.Generator().manual_seed(0)), torch.tensor([40.0, -35.0])])
    q = TierQuantizer(4)
    from quantize.calibration.primitives.rorq import calibrate_tiers

    tiers = calibrate_tiers(x, 4)
    q.set_tiers(tiers.thresholds, tiers.grids)
    assert q.thresholds.numel() >= 1
    out = q.fake_quant(x)
    # Outliers are kept within half a step of their own tier's grid, not clipped to the inliers' range...
    assert float((out[-2:] - x[-2:]).abs().max()) <= float(q.scale[-1]) / 2 + 1e-5
    # ...and the inliers keep a fine grid (one 4-bit grid over [-35, 40] would have steps of 5).
    inliers = x.abs() <= q.thresholds[0]
    assert float(q.scale[0]) < 0.6
    assert float((out - x)[inliers].abs().max()) <= float(q.scale[0]) / 2 + 1e-5
    assert not torch.equal(out, x)


def test_group_quantizer_per_group_scales():
    q = GroupQuantizer(8, channels=4, groups=2, axis=-1)
    q.scale.copy_(torch.tensor([0.1, 1.0]))
    q.zero_point.copy_(torch.tensor([128.0, 128.0]))
    x = torch.tensor([[0.26, 0.26, 2.6, 2.6]])
    assert torch.allclose(q.fake_quant(x), torch.tensor([[0.3, 0.3, 3.0, 3.0]]))
    with pytest.raises(ValueError, match="equal groups"):
        GroupQuantizer(8, channels=5, groups=2, axis=-1)


def test_quantizers_pass_gradients_straight_through():
    q = UniformQuantizer(8, symmetric=True)
    q.set_qparams(torch.tensor(0.1))
    x = torch.tensor([0.123, -0.456], requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2)) and not torch.equal(y.detach(), x.detach())


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes_validate():
    assert make_recipe("ptq4ris", "w4a4").bits == "w4a4"
    with pytest.raises(ValueError, match="unknown bit setting"):
        make_recipe("ptq4ris", "w3a3")
    with pytest.raises(ValueError, match="unknown method"):
        make_recipe("gptq", "w8a8")
    with pytest.raises(ValueError, match="not one of"):
        Recipe(text="rotate")
    with pytest.raises(ValueError, match="drq_min_bits must be at least 3"):
        Recipe(drq_min_bits=2)
    assert Recipe.from_dict(METHODS["ptq4vit"].to_dict()) == METHODS["ptq4vit"]


def test_drq_only_from_its_minimum_bits():
    # PTQ4RIS keeps DRQ from A5 up; at A4 softmax/GELU get the searched uniform grid. The drq-only ablation keeps it.
    assert make_recipe("ptq4ris", "w8a8").softmax_drq and make_recipe("ptq4ris", "w6a6").gelu_drq
    w4a4 = make_recipe("ptq4ris", "w4a4")
    assert not w4a4.softmax_drq and not w4a4.gelu_drq
    assert make_recipe("drq-only", "w4a4").softmax_drq and not make_recipe("ptq4ris-deploy", "w4a4").gelu_drq
    assert not make_recipe("rorq-only", "w8a8").softmax_drq


def test_text_tier_slices_follow_the_activation_bits():
    for bits, groups, tiers in (("w8a8", 2, 1), ("w4a8", 2, 1), ("w6a6", 8, 10), ("w4a4", 8, 10)):
        recipe = make_recipe("ptq4ris-deploy", bits)
        assert (recipe.text_group_count, recipe.text_tier_count) == (groups, tiers), bits
    assert make_recipe("ptq4ris-deploy", "w8a8", text_groups=32).text_group_count == 32
    assert make_recipe("ptq4ris-deploy", "w4a4", text_tiers=1).text_tier_count == 1
    with pytest.raises(ValueError, match="text_groups"):
        make_recipe("ptq4ris-deploy", "w8a8", text_groups=-1)
    with pytest.raises(ValueError, match="text_tiers"):
        make_recipe("ptq4ris-deploy", "w8a8", text_tiers=11)


def _quantizer_kinds(recipe):
    sites = place_quantizers(build_model("lavt-tiny").eval(), recipe)
    return {type(q).__name__ for s in sites for q in quantizers_of(s).values()}


def test_placement_follows_the_drq_bit_rule():
    assert {"DrqSoftmaxQuantizer", "DrqGeluQuantizer"} <= _quantizer_kinds(make_recipe("ptq4ris", "w4a8"))
    assert not {"DrqSoftmaxQuantizer", "DrqGeluQuantizer"} & _quantizer_kinds(make_recipe("ptq4ris", "w4a4"))


# ------------------------------------------------------------------------------------------------ placement
def test_placement_covers_the_paper_sites(tiny, batch):
    model = build_model("lavt-tiny").eval()
    float_out = tiny(batch.images, batch.input_ids, batch.attention_mask)
    sites = place_quantizers(model, make_recipe("ptq4ris", "w8a8"))
    names = {s.info.name for s in sites}
    linears = [n for n, m in tiny.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
    assert set(linears) - names == {"classifier.conv1_1"}  # the final 2-class conv stays float
    matmuls = [s for s in sites if isinstance(s, QuantMatMul)]
    assert len(matmuls) == 2 * (8 + 4 + 6)  # Swin blocks, PWAMs, BERT layers
    kinds = {type(q).__name__ for s in sites for q in quantizers_of(s).values()}
    assert {"DrqSoftmaxQuantizer", "DrqGeluQuantizer", "TierQuantizer", "GroupQuantizer"} <= kinds
    # Parameter names are unchanged: a quantized state dict is the float one (BN folded) plus quantizer buffers.
    assert all(k.split(".")[-1] in {"weight", "bias"} or "quantizer" in k for k in model.state_dict() if "bn" in k)
    set_quantization(model, False)
    with torch.no_grad():
        assert torch.allclose(model(batch.images, batch.input_ids, batch.attention_mask), float_out, atol=1e-4)


def test_site_roles():
    assert classify_site("backbone.layers.0.blocks.1.mlp.fc2", torch.nn.Linear(2, 2)).role == "post_gelu"
    assert classify_site("backbone.layers.2.fusion.project_mm.0", torch.nn.Conv1d(2, 2, 1)).role == "pwam_product"
    assert classify_site("text_encoder.encoder.layer.3.output.dense", torch.nn.Linear(2, 2)).role == "text"
    assert classify_site("backbone.norm0", torch.nn.LayerNorm(2)) is None


# ------------------------------------------------------------------------------------------------ search
def test_hessian_search_clips_where_the_gradient_says_so():
    """A layer whose input has one huge outlier row that the loss does not care about (zero gradient): the search
    must shrink the input grid below min-max to resolve the rows that matter."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    x[0] = 200.0
    w = torch.randn(8, 16, generator=g) * 0.1
    grad = torch.ones(512, 8)
    grad[0] = 0.0
    recipe = make_recipe("ptq4vit", "w4a4", act_symmetric=False)
    iq, wq = UniformQuantizer(4, symmetric=False), UniformQuantizer(4, True, (8, 1))
    cap = LinearCapture(x, grad, w, None, float(x.min()), float(x.max()))
    iq.set_qparams(torch.tensor((float(x.max()) - float(x.min())) / 15), torch.tensor(1.0))
    wq.set_qparams(w.abs().amax(1) / 7.5)

    def loss():
        out = iq.fake_quant(x) @ wq.fake_quant(w).T
        return float((((out - x @ w.T) * grad) ** 2).mean())

    before = loss()
    search_linear(cap, iq, wq, recipe)
    assert loss() < before / 10
    assert float(iq.scale) < (float(x.max()) - float(x.min())) / 15 / 5


# ------------------------------------------------------------------------------------------------ calibration
FAST = {"candidates": 12, "max_rows": 256, "screen_rows": 64, "refine": 4, "rounds": 2}


def _qparams(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}


def test_channel_groups_are_sized_by_activation_bits():
    deploy8, deploy4 = make_recipe("ptq4ris-deploy", "w8a8"), make_recipe("ptq4ris-deploy", "w4a4")
    assert (deploy8.text_group_count, deploy8.pwam_group_count, deploy8.pwam_grouped) == (2, 1, False)
    assert (deploy4.text_group_count, deploy4.pwam_group_count, deploy4.pwam_grouped) == (8, 16, True)
    assert make_recipe("ptq4ris-deploy", "w4a8").pwam_group_count == 16  # 4-bit weights: the groups pay at A8
    assert make_recipe("ptq4ris", "w8a8").pwam_group_count == 16
    assert make_recipe("ptq4ris-deploy", "w8a8", pwam_groups=4).pwam_group_count == 4
    assert make_recipe("ptq4ris-deploy", "w4a4", pwam="plain").pwam_group_count == 1
    with pytest.raises(ValueError, match="pwam_groups must be >= 0"):
        make_recipe("ptq4ris-deploy", "w8a8", pwam_groups=-1)


def test_calibration_is_deterministic_and_round_trips(tiny, batch, tmp_path):
    # PWAM groups and text tier slices forced at A8 (the preset uses neither there) so that their folding and their
    # calibrated number of slices are covered too.
    recipe = make_recipe("ptq4ris-deploy", "w8a8", pwam_groups=16, text_tiers=3, **FAST)
    q1, report = calibrate(tiny, recipe, batch, chunk_size=2)
    q2, _ = calibrate(tiny, recipe, batch, chunk_size=2)
    p1, p2 = _qparams(q1), _qparams(q2)
    assert p1.keys() == p2.keys() and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert report.folded == {"text_hidden": 1, "text_intermediate": 6, "text_context": 6, "pwam_product": 4}
    with torch.no_grad():
        float_logits = tiny(batch.images, batch.input_ids, batch.attention_mask)
        q_logits = q1(batch.images, batch.input_ids, batch.attention_mask)
    assert not torch.equal(float_logits, q_logits)
    agreement = (float_logits.argmax(1) == q_logits.argmax(1)).float().mean()
    assert agreement > 0.97

    out = tmp_path / "w8a8"
    save_quantized(q1, recipe, out, "lavt-tiny", {"calibration": {"pairs": 4}}, calibration_inputs=batch)
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration_inputs.safetensors",
        "config.json",
        "model.safetensors",
        "ptq4ris-manifest.json",
        "qparams.json",
    ]
    stored = load_calibration_inputs(out, tiny.config)
    assert all(torch.equal(stored[k], getattr(batch, k)) for k in ("images", "input_ids", "attention_mask"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded, loaded_recipe, config = load_quantized(out)
    assert loaded_recipe == recipe and config["calibration"]["pairs"] == 4
    with torch.no_grad():
        assert torch.equal(loaded(batch.images, batch.input_ids, batch.attention_mask), q_logits)
    readable = json.loads((out / "qparams.json").read_text())
    assert readable["backbone.layers.0.blocks.0.attn.core.pv"]["a_quantizer"]["kind"] == "drq_softmax"
    text = readable["text_encoder.encoder.layer.0.attention.self.query"]["input_quantizer"]
    assert text["max_tiers"] == 3 and text["slices"] in (1, 2), text


def test_calibration_searched_beats_minmax_at_w4a4(tiny, batch):
    with torch.no_grad():
        ref = tiny(batch.images, batch.input_ids, batch.attention_mask)

    def kl(model):
        with torch.no_grad():
            out = model(batch.images, batch.input_ids, batch.attention_mask)
        return float(torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="sum"))

    naive, _ = calibrate(tiny, make_recipe("minmax", "w4a4"), batch, chunk_size=4)
    searched, _ = calibrate(tiny, make_recipe("ptq4ris", "w4a4", **FAST), batch, chunk_size=4)
    assert kl(searched) < kl(naive)


def test_artifact_errors(tmp_path):
    with pytest.raises(QuantizedArtifactError, match="ptq4ris calibrate"):
        load_quantized(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(QuantizedArtifactError, match="no ptq4ris-manifest.json"):
        load_quantized(tmp_path / "half")


def test_quantized_sites_in_data_flow_order(tiny):
    model = build_model("lavt-tiny").eval()
    place_quantizers(model, make_recipe("minmax", "w8a8"))
    modalities = [s.info.modality for s in quantized_sites(model)]
    assert modalities[0] == "text" and modalities[-1] == "decoder"
    assert modalities.index("vision") > max(i for i, m in enumerate(modalities) if m == "text")
