"""The stream form of calibrated quantizers: each site's integer-op streams compute what its fake quantizer did."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantize.calibration.calibrate import CalibrationBatch, calibrate
from quantize.calibration.placement import QuantMatMul, quantized_sites
from quantize.calibration.quantizers import DrqSoftmaxQuantizer
from quantize.calibration.recipe import make_recipe
from quantize.data.preprocess import Tokenizer
from quantize.deploy.deploy_form import (
    ActGrid,
    DrqSoftmaxForm,
    LoweringError,
    QuantStream,
    simulate_streams,
    to_deploy_form,
)
from quantize.models import build_model, text_encoder_dir

SENTENCES = ["the red circle left of the blue square", "big green triangle", "second square from the left", "it"]


@pytest.fixture(scope="module")
def batch():
    tiny = build_model("lavt-tiny")
    ids, mask = Tokenizer(text_encoder_dir(), 20).batch(SENTENCES)
    g = torch.Generator().manual_seed(0)
    side = tiny.config.swin.img_size
    images = torch.nn.functional.avg_pool2d(torch.randn(4, 3, side, side, generator=g), 9, 1, 4) * 3
    return CalibrationBatch(images, ids, mask)


def _calibrated(method: str, bits: str, batch):
    model, _ = calibrate(build_model("lavt-tiny").eval(), make_recipe(method, bits, search="none"), batch)
    return model


@pytest.fixture(scope="module", params=["w8a8", "w4a4"])
def deployable(request, batch):
    return _calibrated("ptq4ris-deploy", request.param, batch)


def _site_input(site, g):
    if isinstance(site, QuantMatMul):
        if site.info.role == "post_softmax":
            a = torch.randn(3, 16, 16, generator=g).mul(4).softmax(-1)
        else:
            a = torch.randn(3, 16, 8, generator=g) * 3
        return a, torch.randn(3, a.shape[-1], 8, generator=g) * 3
    c = site.weight.shape[1]
    shape = {"linear": (2, 5, c), "conv1d": (2, c, 7), "conv2d": (1, c, 6, 6)}[site.info.op]
    x = torch.randn(shape, generator=g) * 3
    return (F.gelu(x) if site.info.role == "post_gelu" else x,)


@torch.no_grad()
def test_every_site_streams_equal_its_fake_quantizer(deployable):
    """Uniform, RORQ-group and DRQ sites: the streams with their inputs on their grids give the simulated output,
    up to float summation order."""
    deploy, records = to_deploy_form(deployable)
    simulate_streams(deploy)
    kinds, act_bits = set(), set()
    g = torch.Generator().manual_seed(1)
    for site in quantized_sites(deployable):
        inputs = _site_input(site, g)
        expected = site(*inputs)
        got = deploy.get_submodule(site.info.name)(*inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6 * float(expected.abs().max()) + 1e-7)
        q = site.a_quantizer if isinstance(site, QuantMatMul) else site.input_quantizer
        kinds.add(type(q).__name__)
        act_bits.add(q.bits)
    ways = {r.lowered_as for r in records}
    assert {"GroupQuantizer", "UniformQuantizer"} <= kinds and any("RORQ channel groups" in w for w in ways)
    if act_bits == {8}:  # DRQ from A5 up
        assert {"DrqGeluQuantizer", "DrqSoftmaxQuantizer"} <= kinds and "2 int8 streams (DRQ regions)" in ways
    else:  # tier slices below A8
        assert any("magnitude tier slices" in w for w in ways), ways


@torch.no_grad()
def test_stream_form_is_not_the_float_model(deployable, batch):
    """Without rounding the stream form is (nearly) the float model; with it, the simulated one: the check above
    cannot pass on a form that ignores its grids."""
    deploy, _ = to_deploy_form(deployable)
    simulated = deployable(batch.images, batch.input_ids, batch.attention_mask)
    unrounded = deploy(batch.images, batch.input_ids, batch.attention_mask)
    simulate_streams(deploy)
    rounded = deploy(batch.images, batch.input_ids, batch.attention_mask)
    assert (rounded - simulated).abs().mean() < 0.5 * (unrounded - simulated).abs().mean()


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("m", [0, 3, 7, 12])
def test_drq_softmax_float_form_matches_the_quantizer(bits, m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(8, 64, 64, generator=g).mul(5).softmax(-1)
    q = DrqSoftmaxQuantizer(bits)
    q.split_exponent.fill_(m)
    torch.testing.assert_close(DrqSoftmaxForm(bits, m)(x), q.fake_quant(x), rtol=0, atol=1e-7)


def test_narrow_grid_clamps_like_the_simulated_grid():
    grid = ActGrid(scale=0.5, zero_point=-3, qmin=-8, qmax=7, bits=4)
    x = torch.tensor([-10.0, -2.6, 0.0, 0.74, 4.9, 100.0])
    # ints: clamp(round(x/0.5) - 3, -8, 7) -> values (q + 3) * 0.5
    assert torch.equal(grid.fake_quant(x), torch.tensor([-2.5, -2.5, 0.0, 0.5, 5.0, 5.0]))
    assert torch.equal(grid.clamp(x), torch.tensor([-2.5, -2.5, 0.0, 0.74, 4.9, 5.0]))


def test_element_wise_tiers_are_refused_with_the_fix(batch):
    with pytest.raises(LoweringError, match="ptq4ris-deploy"):
        to_deploy_form(_calibrated("ptq4ris", "w8a8", batch))


def test_weights_are_stored_on_their_grid(deployable):
    deploy, _ = to_deploy_form(deployable)
    for stream in (m for m in deploy.modules() if isinstance(m, QuantStream)):
        shape = (-1,) + (1,) * (stream.weight.dim() - 1)
        ints = stream.weight / stream.weight_grid.scale.reshape(shape)
        assert torch.allclose(ints, ints.round(), atol=1e-3)
        assert ints.round().min() >= stream.weight_grid.qmin and ints.round().max() <= stream.weight_grid.qmax


def test_odd_width_4bit_streams_are_refused(batch):
    """XNNPACK packs 4-bit weights two to a byte and silently miscomputes an odd input width: refused with the fix."""
    model, _ = calibrate(
        build_model("lavt-tiny").eval(), make_recipe("ptq4ris-deploy", "w4a4", search="none", text_groups=128), batch
    )
    with pytest.raises(LoweringError, match="odd input width 3"):
        to_deploy_form(model)


@torch.no_grad()
def test_tier_slice_streams_start_at_multiples_of_8(deployable):
    """Slice streams are as wide as 4-bit packing needs; the columns before the slice's first channel are zero, so the
    stream still computes the masked slice (checked against the quantizer in the test above)."""
    deploy, _ = to_deploy_form(deployable)
    seen, tiered = 0, False
    for site in quantized_sites(deployable):
        q = getattr(site, "input_quantizer", None)
        tiered |= getattr(q, "max_tiers", 1) > 1
        if q is None or not len(getattr(q, "thresholds", ())):
            continue
        layer = deploy.get_submodule(site.info.name)
        for start, aligned, stream in zip(q.slice_start.tolist(), layer.starts, layer.streams[layer.groups :]):
            assert aligned % 8 == 0 and 0 <= start - aligned < 8
            assert stream.weight.shape[1] == q.channels - aligned
            assert not stream.weight[:, : start - aligned].any() and stream.weight[:, start - aligned :].any()
            seen += 1
    assert (seen > 0) == tiered  # slices below A8 only
