"""GPTQ weight rounding and bias correction: on their own, and as a calibration stage whose weights stay on the grid
every backend exports."""

from __future__ import annotations

import pytest
import torch

from quantize.calibration.calibrate import calibrate
from quantize.calibration.placement import QuantMatMul, quantized_sites
from quantize.calibration.recipe import make_recipe
from quantize.calibration.weight_rounding import bias_correction, gptq_round

from .test_calibration import FAST, batch, tiny  # noqa: F401 (fixtures)


def _correlated_rows(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated, as a layer's real inputs are (GPTQ gains nothing on white
    noise, where H is a multiple of the identity)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns**0.5
    return (
        torch.randn(rows, 8, generator=g) @ torch.randn(8, columns, generator=g)
        + 0.1 * torch.randn(rows, columns, generator=g) @ mixing
    )


def _output_error(w: torch.Tensor, rounded: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x.double() @ (w - rounded).double().T) ** 2).mean())


def _nearest(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[:, None]), qmin, qmax) * scale[:, None]


@pytest.mark.parametrize("per_row", [True, False])
def test_gptq_beats_rounding_to_nearest_and_lands_on_its_grid(per_row):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g)
    x = _correlated_rows(1024, 96)
    qmin, qmax = -8, 7
    scale = w.abs().amax(1) / qmax * 0.8  # clips each row's largest weights, as a searched grid may
    rounded, chosen = gptq_round(w, scale, qmin, qmax, x, per_row=per_row)
    assert rounded.dtype == w.dtype and chosen.shape == scale.shape
    if not per_row:
        assert torch.equal(chosen, scale)  # a per-tensor grid is shared: GPTQ keeps it
    # On the grid: the fake quantizer gives the same values back, so the exported integers are the simulated ones.
    levels = rounded / chosen[:, None]
    assert (
        (levels - torch.round(levels)).abs().max() < 1e-4
        and levels.min() >= qmin - 1e-4
        and levels.max() <= qmax + 1e-4
    )
    assert torch.equal(_nearest(rounded, chosen, qmin, qmax), rounded)
    nearest = _output_error(w, _nearest(w, scale, qmin, qmax), x)
    assert _output_error(w, rounded, x) < 0.7 * nearest, (_output_error(w, rounded, x), nearest)


def test_gptq_is_deterministic_and_survives_dead_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 40, generator=g)
    x = _correlated_rows(256, 40)
    x[:, 5] = 0  # an input channel that never fires (a padding channel): H is singular there
    scale = w.abs().amax(1) / 7
    first = gptq_round(w, scale, -8, 7, x)
    again = gptq_round(w, scale, -8, 7, x.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.isfinite(first[0]).all()


def test_bias_correction_cancels_the_mean_output_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 32, generator=g)
    x = torch.randn(512, 32, generator=g) + 1.0
    xq = torch.round(x * 2) / 2  # a coarse activation grid: a systematic error in the outputs
    wq = _nearest(w, w.abs().amax(1) / 7, -8, 7)
    shift = bias_correction(w, wq, x, xq)
    error = (x @ w.T) - (xq @ wq.T + shift)
    assert error.mean(0).abs().max() < 1e-5
    assert (x @ w.T - xq @ wq.T).mean(0).abs().max() > 1e-2  # there was a shift to correct


def test_recipe_rounds_by_bits_under_auto():
    assert make_recipe("ptq4ris-deploy", "w4a8").weight_rounding == "gptq"
    assert make_recipe("ptq4ris-deploy", "w8a8").weight_rounding == "nearest"
    assert make_recipe("ptq4ris", "w4a4").weight_rounding == "nearest"  # the paper's method as published
    assert make_recipe("minmax", "w4a4", weights="gptq").weight_rounding == "gptq"


def _off_grid(model) -> list[str]:
    """Sites whose float weights are not on their weight grid."""
    return [
        site.info.name
        for site in quantized_sites(model)
        if not isinstance(site, QuantMatMul)
        and not torch.equal(site.weight_quantizer.fake_quant(site.weight), site.weight)
    ]


@pytest.mark.parametrize(
    "method, bits, overrides",
    [
        ("ptq4ris-deploy", "w4a4", FAST),  # searched grids, GPTQ by the preset
        ("minmax", "w4a8", {"weights": "gptq", "bias_correction": True}),  # no search, per-tensor grids
    ],
)
def test_calibration_leaves_weights_on_their_grids(tiny, batch, method, bits, overrides):  # noqa: F811
    recipe = make_recipe(method, bits, **overrides)
    first, _ = calibrate(tiny, recipe, batch, chunk_size=2)
    again, _ = calibrate(tiny, recipe, batch, chunk_size=2)
    assert not _off_grid(first)
    s1, s2 = first.state_dict(), again.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    name = "text_encoder.encoder.layer.0.attention.self.query"
    # The float weights themselves moved onto the grid (rounding to nearest leaves them float).
    assert not torch.equal(first.get_submodule(name).weight, tiny.get_submodule(name).weight)
    nearest, _ = calibrate(tiny, make_recipe(method, bits, **{**overrides, "weights": "nearest"}), batch, chunk_size=2)
    assert _off_grid(nearest)
