"""Quantizer primitives: grids hold their error bounds; DRQ and RORQ beat plain uniform grids on real activations of
the all-MiniLM-L6-v2 text encoder (softmax probabilities, GELU outputs, LayerNorm outputs with outlier channels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantize.calibration.primitives import (
    UniformSpec,
    calibrate_channel_groups,
    calibrate_tiers,
    drq_gelu_fake_quant,
    drq_softmax_fake_quant,
    fake_quantize,
    minmax_qparams,
    qrange,
    search_drq_gelu,
    search_drq_softmax,
)
from quantize.calibration.primitives.drq import GELU_MIN
from quantize.calibration.quantizers import GroupQuantizer


def mse(a, b):
    return torch.mean((a - b) ** 2).item()


@pytest.fixture(scope="module")
def minilm_activations():
    """Real activations: LayerNorm outputs (inputs of every BERT Linear), post-GELU and post-softmax tensors."""
    from quantize.data.preprocess import Tokenizer
    from quantize.models.bert import BertModel
    from quantize.models.checkpoint import load_text_encoder_weights
    from quantize.models.registry import model_config, text_encoder_dir

    bert = BertModel(model_config("lavt-tiny").bert_config).eval()
    load_text_encoder_weights(bert, text_encoder_dir())
    tok = Tokenizer(text_encoder_dir(), 20)
    ids, mask = tok.batch([
        "the small red circle", "the shape to the left of the blue square", "the man in the white shirt on the left",
        "second banana from the right", "a dog lying next to the sofa", "the tallest building",
    ])
    seen = {"ln": [], "gelu": [], "softmax": []}
    hooks = [
        bert.encoder.layer[i].attention.output.LayerNorm.register_forward_hook(lambda m, a, o: seen["ln"].append(o))
        for i in range(len(bert.encoder.layer))
    ] + [
        layer.intermediate.register_forward_hook(lambda m, a, o: seen["gelu"].append(o)) for layer in bert.encoder.layer
    ]
    orig = F.softmax

    def spy(x, dim=None, **kw):
        y = orig(x, dim=dim, **kw)
        seen["softmax"].append(y)
        return y

    F.softmax = spy
    try:
        with torch.no_grad():
            bert(ids, mask)
    finally:
        F.softmax = orig
        for h in hooks:
            h.remove()
    return {k: torch.cat([t.flatten(0, -2) if t.dim() > 2 else t for t in v]) for k, v in seen.items()}


# ---- uniform grids -----------------------------------------------------------------------------------------------
def test_qrange_and_spec_validation():
    assert qrange(8, True) == (-128, 127) and qrange(4, False) == (0, 15)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        UniformSpec(bits=9)
    with pytest.raises(ValueError, match="needs an axis"):
        UniformSpec(groups=3)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_symmetric_per_channel_error_is_at_most_half_a_step(bits):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 5, 16)[:, None]
    spec = UniformSpec(bits, symmetric=True, axis=0)
    scale, zp = minmax_qparams(w, spec)
    assert scale.shape == (16, 1) and torch.all(zp == 0)
    err = (fake_quantize(w, scale, zp, spec.qmin, spec.qmax) - w).abs()
    assert torch.all(err <= scale / 2 + 1e-6)


def test_grouped_scales_are_shared_within_a_block():
    w = torch.randn(12, 8)
    w[4:8] *= 10  # the k block of a fused qkv
    scale, _ = minmax_qparams(w, UniformSpec(8, True, axis=0, groups=3))
    assert torch.unique(scale[:4]).numel() == 1 and torch.unique(scale[4:8]).numel() == 1
    assert scale[5] > 5 * scale[0]
    with pytest.raises(ValueError, match="not divisible into 5 groups"):
        minmax_qparams(w, UniformSpec(8, True, axis=0, groups=5))


def test_asymmetric_grid_covers_min_and_max():
    x = torch.rand(1000) * 3 - 0.5
    spec = UniformSpec(8, symmetric=False)
    scale, zp = minmax_qparams(x, spec)
    xq = fake_quantize(x, scale, zp, spec.qmin, spec.qmax)
    assert (xq - x).abs().max() <= scale.item() / 2 + 1e-6


# ---- DRQ ---------------------------------------------------------------------------------------------------------
def test_drq_softmax_regions():
    x = torch.tensor([0.9, 0.5, 0.2, 0.01, 0.003])
    xq = drq_softmax_fake_quant(x, bits=8, m=3)  # split 1/8
    hi, lo = 1 / 127, 1 / 127 / 8
    assert torch.allclose(xq[:2], torch.round(x[:2] / hi) * hi)
    assert torch.allclose(xq[3:], torch.round(x[3:] / lo) * lo)
    with pytest.raises(ValueError, match="0..19"):
        drq_softmax_fake_quant(x, 8, 20)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_drq_softmax_beats_uniform_on_real_attention(minilm_activations, bits):
    p = minilm_activations["softmax"]
    m, loss = search_drq_softmax(p, bits)
    levels = 2**bits - 1
    uniform = torch.clamp(torch.round(p * levels), 0, levels) / levels  # b-bit uniform over [0, 1]
    assert loss < mse(uniform, p)
    assert m > 0  # real attention maps have most mass near 0: a split below 1 helps


def test_drq_gelu_negative_region_and_pow2(minilm_activations):
    g = minilm_activations["gelu"]
    assert g.min() >= -GELU_MIN - 1e-4
    step, loss = search_drq_gelu(g, 6, pow2_ratio=True)
    ratio = step / (GELU_MIN / 2**5)
    assert abs(ratio - 2 ** round(torch.log2(torch.tensor(ratio)).item())) < 1e-9
    neg = g[g < 0]
    assert (drq_gelu_fake_quant(neg, 6, step) - neg).abs().max() <= GELU_MIN / 2**5 / 2 + 1e-6


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_drq_gelu_beats_uniform_on_real_gelu_outputs(minilm_activations, bits):
    g = minilm_activations["gelu"]
    _, loss = search_drq_gelu(g, bits)
    spec = UniformSpec(bits, symmetric=False)
    scale, zp = minmax_qparams(g, spec)
    assert loss < mse(fake_quantize(g, scale, zp, spec.qmin, spec.qmax), g)


# ---- RORQ --------------------------------------------------------------------------------------------------------
def test_rorq_tiers_keep_outliers_and_beat_per_tensor(minilm_activations):
    x = minilm_activations["ln"]
    tiers = calibrate_tiers(x, bits=4)
    assert 2 <= len(tiers.grids) <= 10
    xq = tiers.fake_quant(x)
    spec = UniformSpec(4, symmetric=False)
    scale, zp = minmax_qparams(x, spec)
    assert mse(xq, x) < 0.5 * mse(fake_quant_per_tensor := fake_quantize(x, scale, zp, spec.qmin, spec.qmax), x)
    big = x.abs() > tiers.thresholds[0]
    assert (xq[big] - x[big]).abs().max() < (fake_quant_per_tensor[~big] - x[~big]).abs().max() * 20
    with pytest.raises(ValueError, match="max_tiers"):
        calibrate_tiers(x, 4, max_tiers=0)


def test_rorq_tiers_on_gaussian_data_stay_few():
    tiers = calibrate_tiers(torch.randn(10000), bits=8)
    assert len(tiers.thresholds) <= 3


def test_channel_groups_sort_outlier_channels_last_and_beat_per_tensor(minilm_activations):
    x = minilm_activations["ln"]
    groups = calibrate_channel_groups(x, bits=8, groups=4)
    ranges = x.abs().amax(0)
    assert ranges[list(groups.perm[-3:])].min() >= torch.topk(ranges, 3).values.min()  # outliers in the last group
    xq = groups.fake_quant(x)
    spec = UniformSpec(8, symmetric=False)
    scale, zp = minmax_qparams(x, spec)
    assert mse(xq, x) < 0.5 * mse(fake_quantize(x, scale, zp, spec.qmin, spec.qmax), x)
    with pytest.raises(ValueError, match="equal groups"):
        calibrate_channel_groups(x, 8, 5)


def test_tier_slices_exact_grid_values():
    """Bulk on its channel-group grids, the slice beyond ±t on its own: values worked out by hand."""
    q = GroupQuantizer(4, channels=4, groups=2, axis=-1, max_tiers=2)
    q.set_thresholds((1.0,))
    q.scale.fill_(0.25), q.zero_point.fill_(8)  # bulk grid [-2, 1.75]
    q.slice_scale.fill_(0.5), q.slice_zero_point.fill_(8)  # slice grid [-4, 3.5]
    x = torch.tensor([[0.6, -0.3, 3.3, -5.2]])
    bulk, beyond = q.split(x)
    assert bulk.tolist() == [[0.6000000238418579, -0.30000001192092896, 1.0, -1.0]]
    torch.testing.assert_close(beyond, torch.tensor([[0.0, 0.0, 2.3, -4.2]]))
    # 0.6 → 0.5 and −0.3 → −0.25 on the bulk grid; the slices 2.3 → 2.5 and −4.2 → −4 (clipped at the grid's end).
    torch.testing.assert_close(q.fake_quant(x), torch.tensor([[0.5, -0.25, 3.5, -5.0]]))
    # A slice starting at channel 3 leaves channel 2 to the bulk, which clips it at t = 1.
    q.slice_start[0] = 3
    torch.testing.assert_close(q.split(x)[1], torch.tensor([[0.0, 0.0, 0.0, -4.2]]))
    torch.testing.assert_close(q.fake_quant(x), torch.tensor([[0.5, -0.25, 1.0, -5.0]]))
    with pytest.raises(ValueError, match="at most 1 ascending"):
        q.set_thresholds((1.0, 2.0))


def test_tier_slices_sum_to_the_input_and_beat_more_groups(minilm_activations):
    """On real LayerNorm outputs at 4 bits: the parts add up to the input, slices vanish below their threshold, and 4
    groups with tier slices (a handful of GEMMs) beat 96 groups without."""
    from quantize.calibration.recipe import make_recipe
    from quantize.calibration.search import init_activation

    x = minilm_activations["ln"]
    order = torch.argsort(x.abs().amax(0))
    x = x[:, order]  # the range-sorting permutation calibration folds into the weights
    extremes = torch.stack([x.amin(0), x.amax(0)])
    recipe = make_recipe("ptq4ris-deploy", "w4a4")

    def calibrated(groups, tiers):
        q = GroupQuantizer(4, x.shape[1], groups, axis=-1, max_tiers=tiers)
        init_activation(q, extremes, float(x.min()), float(x.max()), recipe, sample=x)
        return q

    tiered, many = calibrated(4, 10), calibrated(96, 1)
    assert 1 <= len(tiered.thresholds) <= 9 and len(many.thresholds) == 0
    parts = tiered.split(x)
    torch.testing.assert_close(sum(parts), x, rtol=0, atol=1e-6)
    for t, start, part in zip(tiered.thresholds, tiered.slice_start, parts[1:]):
        assert bool((part[x.abs() <= t] == 0).all())
        # The slice's stream covers only channels that reach t: a narrow GEMM over the outlier channels.
        assert bool((x[:, :start].abs() <= t).all()) and bool((x[:, start].abs() > t).any())
        assert start > x.shape[1] // 4
    assert mse(tiered.fake_quant(x), x) < 0.7 * mse(many.fake_quant(x), x)
    assert mse(tiered.fake_quant(x), x) < 0.5 * mse(calibrated(4, 1).fake_quant(x), x)
