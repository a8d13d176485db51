"""The search's discrete choices (scale candidate by loss, screening, DRQ split, channel order of RORQ/PWAM groups)
do not flip on float noise: each decision rule is checked against jitter. Two machines differ in the last bits of
their float arithmetic (SIMD width, BLAS blocking); whole calibrations under perturbed inputs and thread counts were
measured by hand (`ptq4ris calibrate --float64`, compare the manifests' qparams_digest), not in CI, for time.
"""
from __future__ import annotations

import torch

from quantize.calibration.primitives.rorq import channel_group_order
from quantize.calibration.primitives.stable import (
    LOSS_RTOL,
    range_order_key,
    snap,
    stable_argmin,
    stable_smallest,
)
from quantize.calibration.quantizers import DrqSoftmaxQuantizer
from quantize.calibration.search import init_activation


def _jitter(x: torch.Tensor, rel: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x * (1 + rel * torch.randn(x.shape, generator=g, dtype=torch.float64)).to(x.dtype)


# ------------------------------------------------------------------------------------------------ decision rules
def test_losses_within_rtol_go_to_the_lower_index_in_any_order():
    near = 1.0 - LOSS_RTOL / 2  # better, but by less than the tolerance
    assert int(stable_argmin(torch.tensor([1.0, near], dtype=torch.float64))) == 0
    assert int(stable_argmin(torch.tensor([near, 1.0], dtype=torch.float64))) == 0
    # Clearly better (by 10 rtol) wins wherever it stands.
    assert int(stable_argmin(torch.tensor([1.0, 1.0, 1.0 - 10 * LOSS_RTOL]))) == 2
    assert int(stable_argmin(torch.tensor([5.0, 1.0 - 10 * LOSS_RTOL, 1.0]))) == 1
    # NaN loses, an all-zero column goes to the first candidate, columns decide independently.
    assert int(stable_argmin(torch.tensor([float("nan"), 2.0, 3.0]))) == 1
    cols = torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.0, 0.5 * (1 - LOSS_RTOL / 3)]])
    assert stable_argmin(cols).tolist() == [0, 1]


def test_loss_decisions_do_not_move_under_relative_noise():
    """Per-channel loss curves (100 candidates) whose bottom is a plateau of near-equal losses (1e-8 apart, as
    candidates that quantize a channel alike) and whose sides step by 1e-3: under the 1e-6 relative jitter of float32
    arithmetic plain argmin wanders over the plateau, the rule keeps its first candidate, and the screening keeps its
    16 candidates."""
    g = torch.Generator().manual_seed(0)
    k = torch.arange(100, dtype=torch.float64)[:, None]
    centre = torch.randint(20, 80, (1, 256), generator=g)
    scale = 10.0 ** torch.randint(-12, 3, (1, 256), generator=g).double()  # vanishing and large losses alike
    steps = ((k - centre).abs() - 2).clamp(min=0)  # a plateau of 5 candidates around the centre
    wobble = 1e-8 * torch.rand(100, 256, generator=g, dtype=torch.float64)
    loss = scale * (1 + 1e-3 * steps) * (1 + wobble)
    best = stable_argmin(loss)
    assert torch.equal(best, (centre - 2).flatten())  # the plateau's first candidate
    screen = stable_smallest(loss.sum(1), 16)
    flipped = 0
    for seed in range(20):
        noisy = _jitter(loss, 1e-6, seed)
        assert torch.equal(stable_argmin(noisy), best)
        assert torch.equal(stable_smallest(noisy.sum(1), 16), screen)
        flipped += int((noisy.argmin(0) != loss.argmin(0)).sum())
    assert flipped > 100  # plain argmin on the same noise


def test_screening_keeps_the_lowest_losses_ties_by_index():
    losses = torch.tensor([3.0, 1.0, 1.0 + 1e-9, 2.0, 1.0 - 1e-9, 0.5])
    assert stable_smallest(losses, 3).tolist() == [1, 2, 5]  # 1.0 ± 1e-9 tie: the first two indices
    assert stable_smallest(losses.flip(0), 3).tolist() == [0, 1, 3]


def test_group_boundaries_survive_jittered_ranges():
    """Channel ranges with near-ties (many text channels sit at GELU's minimum 0.16997): the range order, hence the
    contiguous groups, does not change when the ranges move by 1e-6 relative."""
    g = torch.Generator().manual_seed(1)
    ranges = torch.cat(
        [
            0.16997 - 1e-5 * torch.rand(300, generator=g),  # the GELU-minimum cluster
            torch.rand(193, generator=g) * 3,
            torch.tensor([12.0, 30.0, 30.000001]),  # outliers, two of them tied
        ]
    )[torch.randperm(496, generator=g)]
    order = channel_group_order(ranges)
    groups = [set(order[i * 62 : (i + 1) * 62].tolist()) for i in range(8)]
    for seed in range(20):
        jittered = channel_group_order(_jitter(ranges, 1e-6, seed))
        assert torch.equal(jittered, order)
        assert [set(jittered[i * 62 : (i + 1) * 62].tolist()) for i in range(8)] == groups
    # Still a range order: outliers last, a coarse key never inverts channels that differ by more than a step.
    key = range_order_key(ranges)
    assert bool((key[order][1:] >= key[order][:-1]).all())
    assert ranges[order[-1]] == ranges.max()


def test_snapped_statistics_absorb_noise_and_never_shrink_a_range():
    values = torch.tensor([0.3, -2.7, 1.0, 123.4, -0.0071])
    out = snap(values, mode="out")
    assert bool((out.abs() >= values.abs() * (1 - 2.0**-8 / 8)).all())  # widened, or clipped by < SNAP_SLACK cell
    assert snap(1.0, mode="out") == 1.0 and snap(0.0) == 0.0  # grid points and zero stay
    for seed in range(10):
        assert torch.equal(snap(_jitter(values, 1e-6, seed), mode="out"), out)
        assert torch.equal(snap(_jitter(values, 1e-6, seed)), snap(values))


def test_drq_split_choice_survives_jitter():
    """The DRQ softmax split is chosen on float64 MSE with the tolerance: a softmax whose split exponents tie."""
    g = torch.Generator().manual_seed(3)
    x = torch.softmax(torch.randn(64, 49, generator=g) * 4, -1)

    def split(data):
        q = DrqSoftmaxQuantizer(8)
        init_activation(q, data, 0.0, 1.0, None)
        return int(q.split_exponent)

    m = split(x)
    assert all(split(_jitter(x, 1e-6, s).clamp(max=1)) == m for s in range(5))
