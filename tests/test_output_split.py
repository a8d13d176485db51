"""GEMMs with a few massive output channels: those channels get their own int8 output range, exactly."""

from __future__ import annotations

import pytest
import torch

from quantize.calibration.calibrate import CalibrationBatch, calibrate
from quantize.calibration.recipe import make_recipe
from quantize.data.preprocess import Tokenizer
from quantize.deploy.deploy_form import ActGrid, QuantStream, WeightGrid, simulate_streams, to_deploy_form
from quantize.deploy.graph import calibrated_graph
from quantize.deploy.output_split import OutputSplitStream, outlier_output_channels
from quantize.deploy.stages import Stage
from quantize.models import build_model, text_encoder_dir

SENTENCES = [
    "the red circle left of the blue square",
    "big green triangle",
    "second square from the left",
    "the astronaut in the white suit",
    "the cat",
    "a small yellow star at the bottom right",
]


def test_outlier_channels_are_the_ones_far_above_the_rest():
    g = torch.Generator().manual_seed(0)
    amax = 1 + torch.rand(384, generator=g)
    amax[[7, 99, 300]] = torch.tensor([60.0, 12.0, 130.0])
    assert outlier_output_channels(amax).tolist() == [7, 99, 300]
    # A spread that is merely wide, and layers too narrow to split, stay whole.
    assert outlier_output_channels(torch.linspace(0.5, 3.0, 384)).numel() == 0
    small = torch.ones(32)
    small[0] = 100
    assert outlier_output_channels(small).numel() == 0


@pytest.mark.parametrize("simulate", [False, True])
def test_split_stream_computes_the_stream(simulate):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=g) * 0.05
    weight[[3, 50]] *= 40
    bias = torch.randn(96, generator=g)
    grid = ActGrid(0.02, 3, -128, 127, 8)
    wg = WeightGrid(weight.abs().amax(1) / 127, -127, 127, 8)
    stream = QuantStream("linear", weight, bias, grid, wg)
    split = OutputSplitStream(stream, torch.tensor([3, 50]))
    stream.simulate = split.ordinary.simulate = split.outliers.simulate = simulate
    x = torch.randn(2, 5, 64, generator=g)
    torch.testing.assert_close(split(x), stream(x), rtol=1e-5, atol=1e-5)
    # The ordinary GEMM's outlier outputs are exactly zero, whatever the input.
    assert split.ordinary(x)[..., [3, 50]].abs().max() == 0
    assert split.outliers.weight_grid.scale.tolist() == wg.scale[[3, 50]].tolist()


@pytest.fixture(scope="module")
def text_encoder_graphs():
    """lavt-tiny's MiniLM text encoder at W8A8 (ptq4ris-deploy), converted with and without the split, and the stream
    form computing in float on the same grids (what the integer graph computes minus its output re-quantization)."""
    model = build_model("lavt-tiny").eval()
    ids, mask = Tokenizer(text_encoder_dir(), 20).batch(SENTENCES)
    side = model.config.swin.img_size
    images = torch.zeros(len(SENTENCES), 3, side, side)
    quantized, _ = calibrate(
        model, make_recipe("ptq4ris-deploy", "w8a8", search="none"), CalibrationBatch(images, ids, mask)
    )
    pairs = [(ids[i : i + 1], mask[i : i + 1]) for i in range(len(SENTENCES))]
    split, split_sites, _ = calibrated_graph(quantized, "text", pairs[0], pairs)
    whole, _, _ = calibrated_graph(quantized, "text", pairs[0], pairs, split_outputs=False)
    deploy, _ = to_deploy_form(quantized)
    simulate_streams(deploy)
    return Stage(deploy, "text").eval(), split, whole, split_sites, pairs


@torch.no_grad()
def test_split_brings_the_integer_text_encoder_closer_to_the_simulation(text_encoder_graphs):
    reference, split, whole, _, pairs = text_encoder_graphs

    def error(graph):
        num = den = 0.0
        for ids, mask in pairs:
            ref, out = reference(ids, mask), graph(ids, mask)
            keep = mask[0].bool()
            num += float((ref[0][:, keep] - out[0][:, keep]).pow(2).sum())
            den += float(ref[0][:, keep].pow(2).sum())
        return (num / den) ** 0.5

    e_split, e_whole = error(split), error(whole)
    assert e_split < 0.75 * e_whole, (e_split, e_whole)


def test_split_sites_are_named_in_the_lowering_records(text_encoder_graphs):
    *_, sites, _ = text_encoder_graphs
    split = [s.site for s in sites if "outlier output channels" in s.lowered_as]
    # MiniLM's FFN output projections write the residual stream's massive channels.
    assert any(name.endswith("output.dense") and "attention" not in name for name in split), split
    assert all(s.streams >= 2 for s in sites if s.site in split)
