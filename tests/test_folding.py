"""Channel-permutation folding (deployable RORQ): folding a permutation leaves lavt-tiny's float function unchanged, on
real tokenized sentences (with padding) and on both a drawn image and noise; invalid permutations are refused.

Exactness is checked in float64: in float32 a permutation changes the order of every channel sum, and lavt-tiny's own
float32 rounding (float32 vs float64 of the unfolded model) is already ~5e-5 on the logits and text features, so a
1e-5 bound there would test the summation order, not the folding. One float32 test holds the folded model to that
rounding floor instead.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from quantize.calibration.folding import (
    head_preserving_order,
    permute_bert_context,
    permute_bert_intermediate,
    permute_pwam_product,
    permute_text_hidden,
)
from quantize.calibration.primitives.rorq import channel_group_order
from quantize.data.preprocess import Tokenizer, image_to_tensor
from quantize.models import build_model, text_encoder_dir

ATOL = 1e-5
SENTENCES = ["the red circle left of the blue square", "big green triangle", "small yellow square at the bottom right"]


def _drawn_image(size: int) -> Image.Image:
    """A smooth gradient background with a few flat shapes, like a ShapesRef scene."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack([200 * xx + 30, 180 * yy + 40, 120 * (1 - xx * yy) + 60], axis=-1).astype(np.uint8)
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    draw.ellipse([0.1 * size, 0.3 * size, 0.4 * size, 0.6 * size], fill=(220, 30, 30))
    draw.rectangle([0.55 * size, 0.3 * size, 0.85 * size, 0.6 * size], fill=(30, 40, 210))
    draw.polygon([(0.2 * size, 0.95 * size), (0.35 * size, 0.7 * size), (0.5 * size, 0.95 * size)], fill=(40, 190, 60))
    return im


@pytest.fixture(scope="module")
def model():
    return build_model("lavt-tiny").eval()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def inputs(model):
    cfg = model.config
    ids, mask = Tokenizer(text_encoder_dir(), cfg.preprocess.max_tokens).batch(SENTENCES)
    assert (mask == 0).any(dim=1).all(), "every sentence should be padded, so that masking is exercised"
    size = cfg.swin.img_size
    drawn = image_to_tensor(_drawn_image(size), size, cfg.preprocess)
    flipped = image_to_tensor(_drawn_image(size).transpose(Image.Transpose.FLIP_LEFT_RIGHT), size, cfg.preprocess)
    noise = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.stack([drawn, noise, flipped]).double(), ids, mask


@pytest.fixture(scope="module")
def reference(model64, inputs):
    """Original float64 outputs, and the per-channel ranges (max |x|) of every activation that gets permuted."""
    model = model64
    image, ids, mask = inputs
    bert_layers = model.text_encoder.encoder.layer
    ranges = {"intermediate": {}, "context": {}, "product": {}}

    def keep(kind, key, dims):
        def hook(module, args, out=None):
            x = args[0] if out is None else out
            ranges[kind][key] = x.detach().abs().amax(dim=dims)

        return hook

    handles = [
        layer.intermediate.register_forward_hook(keep("intermediate", i, (0, 1))) for i, layer in enumerate(bert_layers)
    ]
    handles += [
        layer.attention.output.dense.register_forward_pre_hook(keep("context", i, (0, 1)))
        for i, layer in enumerate(bert_layers)
    ]
    handles += [
        layer.fusion.project_mm[0].register_forward_pre_hook(keep("product", i, (0, 2)))
        for i, layer in enumerate(model.backbone.layers)
    ]
    try:
        with torch.no_grad():
            out = model(image, ids, mask)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        text = model.encode_text(ids, mask)
    ranges["text"] = text.abs().amax(dim=(0, 2))
    return {"out": out, "text": text, "ranges": ranges}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run(model, inputs):
    image, ids, mask = inputs
    with torch.no_grad():
        return model(image, ids, mask), model.encode_text(ids, mask)


def _random_perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _range_sorted(channel_range: torch.Tensor) -> torch.Tensor:
    perm = channel_group_order(channel_range)
    assert not torch.equal(perm, torch.arange(len(perm))), "real ranges should not already be sorted"
    return perm


def _random_head_perm(num_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    heads = torch.randperm(num_heads, generator=g)
    return torch.cat([h * head_dim + torch.randperm(head_dim, generator=g) for h in heads.tolist()])


@pytest.mark.parametrize("kind", ["random", "sorted"])
def test_text_hidden_fold_is_exact(model64, inputs, reference, kind):
    hidden = model64.text_encoder.config.hidden_size
    perm = _random_perm(hidden, 1) if kind == "random" else _range_sorted(reference["ranges"]["text"])
    folded = copy.deepcopy(model64)
    permute_text_hidden(folded, perm)
    out, text = _run(folded, inputs)
    assert _max_diff(text, reference["text"][:, perm]) < ATOL
    assert _max_diff(out, reference["out"]) < ATOL


@pytest.mark.parametrize("kind", ["random", "sorted"])
def test_bert_intermediate_fold_is_exact(model64, inputs, reference, kind):
    folded = copy.deepcopy(model64)
    for i, layer in enumerate(folded.text_encoder.encoder.layer):
        n = layer.intermediate.dense.out_features
        perm = _random_perm(n, 10 + i) if kind == "random" else _range_sorted(reference["ranges"]["intermediate"][i])
        permute_bert_intermediate(folded, i, perm)
    out, text = _run(folded, inputs)
    assert _max_diff(text, reference["text"]) < ATOL
    assert _max_diff(out, reference["out"]) < ATOL


@pytest.mark.parametrize("kind", ["random", "sorted"])
def test_bert_context_fold_is_exact(model64, inputs, reference, kind):
    folded = copy.deepcopy(model64)
    for i, layer in enumerate(folded.text_encoder.encoder.layer):
        sa = layer.attention.self
        if kind == "random":
            perm = _random_head_perm(sa.num_heads, sa.head_dim, 20 + i)
        else:
            perm = head_preserving_order(reference["ranges"]["context"][i], sa.num_heads)
            assert not torch.equal(perm[:: sa.head_dim] // sa.head_dim, torch.arange(sa.num_heads)), "heads not moved"
        permute_bert_context(folded, i, perm)
    out, text = _run(folded, inputs)
    assert _max_diff(text, reference["text"]) < ATOL
    assert _max_diff(out, reference["out"]) < ATOL


@pytest.mark.parametrize("kind", ["random", "sorted"])
def test_pwam_product_fold_is_exact(model64, inputs, reference, kind):
    folded = copy.deepcopy(model64)
    for stage, layer in enumerate(folded.backbone.layers):
        n = layer.fusion.project_mm[0].in_channels
        perm = _random_perm(n, 30 + stage) if kind == "random" else _range_sorted(reference["ranges"]["product"][stage])
        permute_pwam_product(folded, stage, perm)
    out, _ = _run(folded, inputs)
    assert _max_diff(out, reference["out"]) < ATOL


def _fold_all_range_sorted(folded, ranges) -> torch.Tensor:
    """Every fold the deployable model uses, each with its range-sorted order; returns the text hidden perm."""
    perm = _range_sorted(ranges["text"])
    permute_text_hidden(folded, perm)
    for i, layer in enumerate(folded.text_encoder.encoder.layer):
        permute_bert_intermediate(folded, i, _range_sorted(ranges["intermediate"][i]))
        permute_bert_context(folded, i, head_preserving_order(ranges["context"][i], layer.attention.self.num_heads))
    for stage in range(len(folded.backbone.layers)):
        permute_pwam_product(folded, stage, _range_sorted(ranges["product"][stage]))
    return perm


def test_all_folds_compose(model64, inputs, reference):
    """The deployable model folds every permutation at once; they touch shared weights (e.g. value rows and
    output.dense columns) and must still compose exactly."""
    folded = copy.deepcopy(model64)
    perm = _fold_all_range_sorted(folded, reference["ranges"])
    out, text = _run(folded, inputs)
    assert _max_diff(text, reference["text"][:, perm]) < ATOL
    assert _max_diff(out, reference["out"]) < ATOL


def test_folding_is_not_a_no_op(model64, inputs, reference):
    """Most exactness tests would also pass if folding did nothing; here the permuted activations must really move."""
    image, ids, mask = inputs
    folded = copy.deepcopy(model64)
    query = folded.text_encoder.encoder.layer[0].attention.self.query.weight
    product_conv = folded.backbone.layers[1].fusion.project_mm[0].weight
    before = {"query": query.detach().clone(), "product": product_conv.detach().clone()}
    hidden = folded.text_encoder.config.hidden_size
    perm = _random_perm(hidden, 1)
    permute_text_hidden(folded, perm)
    product_perm = _random_perm(product_conv.shape[1], 2)
    permute_pwam_product(folded, 1, product_perm)

    # Same Parameter objects, new values.
    assert folded.text_encoder.encoder.layer[0].attention.self.query.weight is query
    assert torch.equal(query, before["query"][:, perm]) and not torch.equal(query, before["query"])
    assert torch.equal(product_conv, before["product"][:, product_perm])
    assert not torch.equal(product_conv, before["product"])

    _, text = _run(folded, inputs)
    assert _max_diff(text, reference["text"][:, perm]) < ATOL
    assert _max_diff(text, reference["text"]) > 0.1

    seen = {}

    def grab(name):
        return lambda module, args: seen.__setitem__(name, args[0].detach())

    handles = [
        m.fusion.project_mm[0].register_forward_pre_hook(grab(n))
        for n, m in (("old", model64.backbone.layers[1]), ("new", folded.backbone.layers[1]))
    ]
    try:
        with torch.no_grad():
            model64(image, ids, mask)
            folded(image, ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert _max_diff(seen["new"], seen["old"][:, product_perm]) < ATOL
    assert _max_diff(seen["new"], seen["old"]) > 0.1


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_invalid_perms_raise_and_leave_the_model_unchanged(model):
    folded = copy.deepcopy(model)
    before = _state(folded)
    hidden = folded.text_encoder.config.hidden_size
    inter = folded.text_encoder.encoder.layer[0].intermediate.dense.out_features
    stage_dim = folded.backbone.layers[2].fusion.project_mm[0].in_channels
    calls = {
        "hidden": (lambda p: permute_text_hidden(folded, p), hidden),
        "intermediate": (lambda p: permute_bert_intermediate(folded, 3, p), inter),
        "context": (lambda p: permute_bert_context(folded, 3, p), hidden),
        "product": (lambda p: permute_pwam_product(folded, 2, p), stage_dim),
    }
    for name, (call, n) in calls.items():
        duplicate = torch.arange(n)
        duplicate[-1] = 0
        out_of_range = torch.arange(n)
        out_of_range[0] = n
        bad = {
            "too short": torch.arange(n - 1),
            "too long": torch.arange(n + 1),
            "duplicate": duplicate,
            "out of range": out_of_range,
            "negative": torch.arange(n) - 1,
            "2-D": torch.arange(n).reshape(1, n),
            "float": torch.arange(n, dtype=torch.float32),
        }
        for what, perm in bad.items():
            with pytest.raises(ValueError, match="perm"):
                call(perm)
                pytest.fail(f"{name}: {what} perm accepted")
    sa = folded.text_encoder.encoder.layer[3].attention.self
    d = sa.head_dim
    # A valid permutation of all channels that moves one channel of head 0 into head 1's block.
    splitting = torch.arange(hidden)
    splitting[[0, d]] = splitting[[d, 0]]
    with pytest.raises(ValueError, match="contiguous"):
        permute_bert_context(folded, 3, splitting)
    # Shifting by half a head keeps blocks contiguous in index but straddles two heads.
    with pytest.raises(ValueError, match="contiguous"):
        permute_bert_context(folded, 3, torch.roll(torch.arange(hidden), d // 2))
    with pytest.raises(ValueError, match="layer_index"):
        permute_bert_intermediate(folded, len(folded.text_encoder.encoder.layer), torch.arange(inter))
    with pytest.raises(ValueError, match="stage"):
        permute_pwam_product(folded, -1, torch.arange(stage_dim))
    after = folded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused perm modified the model"


def test_identity_and_list_perms_are_accepted(model64, inputs, reference):
    folded = copy.deepcopy(model64)
    hidden = folded.text_encoder.config.hidden_size
    permute_text_hidden(folded, list(range(hidden)))
    permute_bert_context(folded, 0, list(range(hidden)))
    out, _ = _run(folded, inputs)
    assert _max_diff(out, reference["out"]) == 0.0


def test_head_preserving_order_hand_made():
    # 3 heads of 3 channels. Head maxima 5, 0.9, 7 -> heads 1, 0, 2. Head 0 has a tie (1, 1): stable keeps 1 before 2.
    ranges = torch.tensor([5.0, 1.0, 1.0, 0.5, 0.2, 0.9, 2.0, 7.0, 1.5])
    perm = head_preserving_order(ranges, 3)
    assert perm.dtype == torch.long
    assert perm.tolist() == [4, 3, 5, 1, 2, 0, 8, 6, 7]
    # Heads with equal maxima keep their order; one head is a plain stable sort.
    assert head_preserving_order(torch.tensor([3.0, 1.0, 1.0, 3.0]), 2).tolist() == [1, 0, 2, 3]
    assert head_preserving_order(torch.tensor([2.0, 0.0, 2.0, 1.0]), 1).tolist() == [1, 3, 0, 2]


def test_head_preserving_order_validation():
    with pytest.raises(ValueError, match="heads"):
        head_preserving_order(torch.ones(10), 3)
    with pytest.raises(ValueError, match="heads"):
        head_preserving_order(torch.ones(10), 0)
    with pytest.raises(ValueError, match="1-D"):
        head_preserving_order(torch.ones(2, 6), 2)
    with pytest.raises(ValueError, match="NaN"):
        head_preserving_order(torch.tensor([1.0, float("nan")]), 1)


def test_float32_fold_stays_at_the_rounding_floor(model, model64, inputs, reference):
    """The deployed model is float32: folding every permutation may change it only as much as float32 rounding
    already does (measured as float32 vs float64 of the unfolded model)."""
    image, ids, mask = inputs
    image32 = image.float()
    with torch.no_grad():
        out32, text32 = model(image32, ids, mask), model.encode_text(ids, mask)
    floor_out = _max_diff(out32.double(), reference["out"])
    floor_text = _max_diff(text32.double(), reference["text"])
    folded = copy.deepcopy(model)
    perm = _fold_all_range_sorted(folded, reference["ranges"])
    with torch.no_grad():
        out, text = folded(image32, ids, mask), folded.encode_text(ids, mask)
    assert _max_diff(out, out32) <= 10 * floor_out
    assert _max_diff(text, text32[:, perm]) <= 10 * floor_text
