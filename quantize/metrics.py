"""RIS metrics exactly as LAVT's ``test.py`` computes them.

Per (object, sentence) pair at the model resolution: I = |pred ∧ gt|, U = |pred ∨ gt|, IoU = I/U (0 when U = 0).
mIoU = mean IoU over pairs; oIoU = ΣI / ΣU; Prec@X = share of pairs with IoU ≥ X, X in 0.5…0.9.
CRIS-family papers call mIoU "IoU"; this module always names both.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["RisMetrics", "PREC_THRESHOLDS", "intersection_union"]

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target (B, H, W) binary -> I, U per sample (B,) int64."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    return (p & t).sum(1), (p | t).sum(1)


@dataclass
class RisMetrics:
    """Accumulates I and U per pair; ``summary()`` gives mIoU, oIoU, Prec@X (all in %) and per-kind mIoU."""

    intersections: list[int] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def update(self, pred: torch.Tensor, target: torch.Tensor, kinds: list[str] | None = None) -> torch.Tensor:
        """Add a batch; returns its per-pair IoU."""
        inter, union = intersection_union(pred, target)
        self.intersections.extend(inter.tolist())
        self.unions.extend(union.tolist())
        self.kinds.extend(kinds if kinds is not None else [""] * len(inter))
        return torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros_like(inter).double())

    def add(self, intersection: int, union: int, kind: str = "") -> float:
        """Add one pair's I and U (e.g. gathered from other processes); returns its IoU, as :meth:`update` does."""
        self.intersections.append(intersection)
        self.unions.append(union)
        self.kinds.append(kind or "")
        return intersection / union if union > 0 else 0.0

    @property
    def ious(self) -> np.ndarray:
        i, u = np.asarray(self.intersections, float), np.asarray(self.unions, float)
        return np.where(u > 0, i / np.maximum(u, 1), 0.0)

    def summary(self) -> dict:
        if not self.unions:
            raise ValueError("no pairs were evaluated")
        ious = self.ious
        out = {
            "pairs": len(ious),
            "mIoU": 100 * float(ious.mean()),
            "oIoU": 100 * float(np.sum(self.intersections) / max(np.sum(self.unions), 1)),
        }
        for x in PREC_THRESHOLDS:
            out[f"Prec@{x}"] = 100 * float((ious >= x).mean())
        by_kind: dict[str, list[float]] = defaultdict(list)
        for kind, iou in zip(self.kinds, ious):
            if kind:
                by_kind[kind].append(iou)
        if by_kind:
            out["mIoU_by_kind"] = {k: 100 * float(np.mean(v)) for k, v in sorted(by_kind.items())}
            out["pairs_by_kind"] = {k: len(v) for k, v in sorted(by_kind.items())}
        return out
