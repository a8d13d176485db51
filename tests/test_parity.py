"""Parity statistics: agreement, logit differences in LSBs, IoU deltas — on hand-made logits."""

from __future__ import annotations

import math

import torch

from quantize.deploy.parity_stats import ParityAccumulator, format_parity


def _logits(mask: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    fg = mask.float() * 2 - 1
    return torch.stack([-fg * margin, fg * margin])


def test_identical_outputs_agree_fully():
    acc = ParityAccumulator()
    target = torch.zeros(8, 8, dtype=torch.long)
    target[2:6, 2:6] = 1
    acc.update(0, _logits(target), _logits(target), target, "attribute")
    s = acc.summary()
    assert s["mask_agreement"] == 100 and s["max_abs_logit_diff"] == 0
    assert s["simulated"]["mIoU"] == s["deployed"]["mIoU"] == 100 and s["mean_iou_delta"] == 0


def test_disagreement_and_lsb_are_measured():
    acc = ParityAccumulator()
    target = torch.zeros(8, 8, dtype=torch.long)
    target[2:6, 2:6] = 1  # 16 pixels
    deployed = target.clone()
    deployed[2, 2:6] = 0  # 4 of 64 pixels flip
    sim, dep = _logits(target), _logits(deployed)
    acc.update("pair", sim, dep, target, "relation")
    s = acc.summary()
    assert s["mask_agreement"] == 100 * 60 / 64
    assert s["max_abs_logit_diff"] == 4.0
    assert abs(s["max_logit_diff_lsb"] - 4.0 / (4.0 / 255)) < 1e-6  # the logits span 4 → one LSB is 4/255
    assert abs(s["deployed"]["mIoU"] - 75.0) < 1e-9 and abs(s["mean_iou_delta"] + 25.0) < 1e-9
    assert s["worst_pairs"][0] == {"pair": "pair", "mask_iou_vs_simulated": 0.75}
    text = format_parity({"sets": {"shapesref val": s}, "pte": "m.pte", "quantized": "q"})
    assert "93.750" in text and "worst shapesref val: pair (0.750)" in text


def test_confident_agreement_leaves_out_pixels_near_the_boundary_and_sqnr_measures_the_noise():
    acc = ParityAccumulator()
    target = torch.zeros(8, 8, dtype=torch.long)
    target[2:6, 2:6] = 1
    sim = _logits(target)  # margin 4 everywhere; the logits span 4, one LSB is 4/255
    sim[:, 0, :] = sim[:, 0, :] * 0.01  # row 0: margin 0.04, under 4 LSB (0.063)
    dep = sim.clone()
    dep[:, 0, :] = -dep[:, 0, :]  # the uncertain row flips: 8 pixels
    acc.update("pair", sim, dep)
    s = acc.summary()
    assert s["mask_agreement"] == 100 * 56 / 64
    assert s["confident_pixels"] == 100 * 56 / 64 and s["confident_agreement"] == 100
    noise = float((sim - dep).square().sum())
    assert abs(s["logit_sqnr_db"] - 10 * math.log10(float(sim.square().sum()) / noise)) < 1e-4
    dep[1, 3, 3], dep[0, 3, 3] = -5.0, 5.0  # a confident pixel flips: it counts now
    acc2 = ParityAccumulator()
    acc2.update("pair", sim, dep)
    assert acc2.summary()["confident_agreement"] == 100 * 55 / 56
    text = format_parity({"sets": {"natural photographs": acc2.summary()}, "pte": "m.pte", "quantized": "q"})
    assert "on the 87.5% of pixels whose simulated margin exceeds 4 LSB" in text and "SQNR" in text
