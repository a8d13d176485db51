"""Parity statistics, whatever the backend: does a deployed program compute what calibration simulated?

Both the simulated (fake-quant) model and the deployed program (a ``.pte`` on the ExecuTorch runtime, an
``.mlpackage`` in the MIL interpreter) run on the same real inputs — every pair of a refer split,
and natural photographs with typed expressions — and the report gives, for each input set: mask-pixel agreement,
agreement on the confident pixels (those whose simulated class margin exceeds :data:`MARGIN_LSB` LSBs), the logit
SQNR, the largest logit difference (absolute, and in LSBs of an 8-bit grid over the simulated logits' range), the IoU
delta per pair, and, where there is ground truth, both models' mIoU / oIoU.

Why the confident pixels: a model trained on shapes leaves most pixels of a photograph near its decision boundary,
where any two correct int8 programs may pick different classes; raw agreement there is bounded by that margin, not by
the lowering. Agreement where the simulated margin is clear of the output grid's rounding is what a lowering must hold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from quantize.distributed import Shard
from quantize.metrics import RisMetrics, intersection_union
from quantize.progress import progress_bar

__all__ = [
    "MARGIN_LSB",
    "NATURAL_PHOTOS",
    "PairParity",
    "ParityAccumulator",
    "format_parity",
    "lsb",
    "natural_photo_pairs",
    "pair_parity",
    "parity_on_dataset",
    "parity_on_pairs",
    "parity_report",
]

# Photographs that scikit-image ships (real scenes, not random tensors), with expressions a user would type.
NATURAL_PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "the astronaut in the white suit"),
    ("astronaut", "the flag on the left"),
    ("coffee", "the cup of coffee"),
    ("chelsea", "the cat"),
    ("rocket", "the rocket on the launch pad"),
    ("camera", "the man with the camera"),
    ("hubble_deep_field", "the bright galaxy in the middle"),
    ("immunohistochemistry", "the dark round cell"),
)


# A pixel is confident when its simulated class margin exceeds this many LSBs of the output grid.
MARGIN_LSB = 4


def lsb(reference: torch.Tensor) -> float:
    """One step of an 8-bit grid over ``reference``'s range: the unit logit differences are reported in."""
    return max(float(reference.max() - reference.min()), 1e-12) / 255


@dataclass(frozen=True)
class PairParity:
    """One pair's parity figures: what :class:`ParityAccumulator` sums, small enough to gather across processes."""

    key: Any
    pixels: int
    agree: int
    max_abs: float
    max_lsb: float
    confident: int
    confident_agree: int
    signal: float  # Σ sim², for the logit SQNR
    noise: float  # Σ (sim − dep)²
    iou_between: float  # IoU of the deployed mask against the simulated one (1 when they agree)
    truth: tuple[str, int, int, int, int] | None = None  # (kind, I, U of simulated, I, U of deployed) vs ground truth


def pair_parity(
    key: Any, sim: torch.Tensor, dep: torch.Tensor, target: torch.Tensor | None = None, kind: str | None = None
) -> PairParity:
    """``sim``/``dep``: (2, H, W) logits of one pair; ``target``: (H, W) ground truth or None."""
    sim_mask, dep_mask = sim.argmax(0), dep.argmax(0)
    diff = float((sim - dep).abs().max())
    step = lsb(sim)
    confident = (sim[1] - sim[0]).abs() > MARGIN_LSB * step
    inter, union = intersection_union(dep_mask[None], sim_mask[None])
    truth = None
    if target is not None:
        (si, su), (di, du) = (
            (int(i[0]), int(u[0])) for i, u in (intersection_union(m[None], target[None]) for m in (sim_mask, dep_mask))
        )
        truth = (kind or "", si, su, di, du)
    return PairParity(
        key=key,
        pixels=sim_mask.numel(),
        agree=int((sim_mask == dep_mask).sum()),
        max_abs=diff,
        max_lsb=diff / step,
        confident=int(confident.sum()),
        confident_agree=int(((sim_mask == dep_mask) & confident).sum()),
        signal=float(sim.double().square().sum()),
        noise=float((sim.double() - dep.double()).square().sum()),
        iou_between=float(inter[0]) / float(union[0]) if float(union[0]) > 0 else 1.0,
        truth=truth,
    )


@dataclass
class ParityAccumulator:
    """Running parity statistics over pairs (logits of both models, optional ground truth)."""

    pixels: int = 0
    agree: int = 0
    pairs: int = 0
    max_abs: float = 0.0
    max_lsb: float = 0.0
    sum_iou_delta: float = 0.0
    max_iou_delta: float = 0.0
    confident: int = 0
    confident_agree: int = 0
    signal: float = 0.0
    noise: float = 0.0
    worst: list = field(default_factory=list)
    sim_metrics: RisMetrics = field(default_factory=RisMetrics)
    dep_metrics: RisMetrics = field(default_factory=RisMetrics)

    def update(
        self,
        key: Any,
        sim: torch.Tensor,
        dep: torch.Tensor,
        target: torch.Tensor | None = None,
        kind: str | None = None,
    ) -> None:
        """``sim``/``dep``: (2, H, W) logits of one pair; ``target``: (H, W) ground truth or None."""
        self.add(pair_parity(key, sim, dep, target, kind))

    def add(self, r: PairParity) -> None:
        """Fold one pair in (in the order pairs are meant to be summed: the report's floats depend on it)."""
        self.pixels += r.pixels
        self.agree += r.agree
        self.pairs += 1
        self.max_abs = max(self.max_abs, r.max_abs)
        self.max_lsb = max(self.max_lsb, r.max_lsb)
        self.confident += r.confident
        self.confident_agree += r.confident_agree
        self.signal += r.signal
        self.noise += r.noise
        self.worst.append((r.iou_between, r.key))
        if r.truth is not None:
            kind, si, su, di, du = r.truth
            iou_s, iou_d = self.sim_metrics.add(si, su, kind), self.dep_metrics.add(di, du, kind)
            self.sum_iou_delta += iou_d - iou_s
            self.max_iou_delta = max(self.max_iou_delta, abs(iou_d - iou_s))

    def summary(self) -> dict[str, Any]:
        out = {
            "pairs": self.pairs,
            "mask_agreement": 100.0 * self.agree / max(self.pixels, 1),
            "confident_pixels": 100.0 * self.confident / max(self.pixels, 1),
            "confident_agreement": 100.0 * self.confident_agree / max(self.confident, 1),
            "logit_sqnr_db": 10 * math.log10(self.signal / self.noise) if self.noise > 0 else math.inf,
            "max_abs_logit_diff": self.max_abs,
            "max_logit_diff_lsb": self.max_lsb,
            "worst_pairs": [{"pair": k, "mask_iou_vs_simulated": round(v, 4)} for v, k in sorted(self.worst)[:5]],
        }
        if self.sim_metrics.unions:
            sim, dep = self.sim_metrics.summary(), self.dep_metrics.summary()
            out.update(
                {
                    # Full summaries (Prec@X, per-kind mIoU), both on the same pairs.
                    "simulated": sim,
                    "deployed": dep,
                    "mean_iou_delta": 100.0 * self.sum_iou_delta / self.pairs,
                    "max_abs_iou_delta": 100.0 * self.max_iou_delta,
                }
            )
        return out


@torch.no_grad()
def parity_on_dataset(
    simulated: torch.nn.Module,
    deployed: Callable,
    dataset,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Parity over the pairs of a :class:`~quantize.data.refer.ReferDataset` (``deployed`` runs one pair at a
    time: ``.pte`` programs have a fixed batch of 1). Under torchrun (``shard``) each rank runs its batches and every
    rank returns the whole split's report, equal to one process's."""
    from torch.utils.data import DataLoader, Subset

    shard = shard or Shard()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    data = Subset(dataset, shard.batch_indices(n, batch_size))
    records: list[PairParity] = []
    start = time.perf_counter()
    simulated.eval()
    with progress_bar(progress and shard.is_main, total=len(data), desc="parity", unit="pair") as bar:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0):
            sim = simulated(batch["image"], batch["input_ids"], batch["attention_mask"])
            for j, index in enumerate(batch["index"].tolist()):
                dep = deployed(
                    batch["image"][j : j + 1], batch["input_ids"][j : j + 1], batch["attention_mask"][j : j + 1]
                )
                sample = dataset.samples[index]
                records.append(pair_parity(index, sim[j], dep[0], batch["target"][j], sample.kind))
            bar.update(len(batch["index"]))
    acc = ParityAccumulator()
    for record in shard.gather_ordered(records, key=lambda r: r.key):
        acc.add(record)
    out = acc.summary()
    out["seconds"] = time.perf_counter() - start
    return out


def natural_photo_pairs(tokenizer, size: int) -> Iterable[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, image, input_ids, attention_mask) for scikit-image's photographs and typed expressions, preprocessed
    the way the refer loader does (resize to ``size``, ImageNet normalisation)."""
    try:
        from skimage import data as photos
    except ImportError as e:  # declared in pyproject; a clear message if the environment lacks it
        raise RuntimeError("natural-photo parity needs scikit-image: pip install scikit-image") from e
    from PIL import Image

    from quantize.data.preprocess import image_to_tensor

    for name, sentence in NATURAL_PHOTOS:
        array = getattr(photos, name)()
        image = Image.fromarray(array).convert("RGB")
        ids, mask = tokenizer(sentence)
        yield f"{name}: {sentence}", image_to_tensor(image, size)[None], ids[None], mask[None]


@torch.no_grad()
def parity_on_pairs(simulated: torch.nn.Module, deployed: Callable, pairs, shard: Shard | None = None) -> dict[str, Any]:
    """Parity over (key, image, input_ids, attention_mask) pairs without ground truth (pair i runs on rank i mod N
    under torchrun; every rank returns the report of all pairs)."""
    shard = shard or Shard()
    simulated.eval()
    records = [
        (position, pair_parity(key, simulated(image, ids, mask)[0], deployed(image, ids, mask)[0]))
        for position, (key, image, ids, mask) in shard.items(list(pairs))
    ]
    acc = ParityAccumulator()
    for _, record in shard.gather_ordered(records, key=lambda r: r[0]):
        acc.add(record)
    return acc.summary()


def parity_report(
    simulated: torch.nn.Module,
    deployed: Callable,
    dataset,
    image_size: int,
    limit: int | None = None,
    photos: bool = True,
    progress: bool = False,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Parity of any full-model ``deployed(image, ids, mask) -> logits`` against ``simulated`` on ``dataset`` and
    (optionally) natural photographs resized to ``image_size``; ``shard`` splits both over torchrun's processes."""
    sets = {
        f"{dataset.dataset} {dataset.split}": parity_on_dataset(
            simulated, deployed, dataset, limit, progress=progress, shard=shard
        )
    }
    if photos:
        pairs = natural_photo_pairs(dataset.tokenizer, image_size)
        sets["natural photographs"] = parity_on_pairs(simulated, deployed, pairs, shard=shard)
    return {"sets": sets}


def format_parity(report: dict[str, Any], label: str = "pte") -> str:
    """The parity report as a plain-text table; ``label`` names the deployed backend's columns."""
    deployed = report.get(label) or report.get("pte") or report.get("coreml", "?")
    lines = [f"parity of {deployed} against the simulated model {report.get('quantized', '?')}", ""]
    width = max(9, len(label) + 5)  # the deployed columns fit their label
    header = (
        f"{'inputs':<22} {'pairs':>6} {'mask agree %':>13} {'max |Δlogit|':>13} {'(LSB)':>7} "
        f"{'sim mIoU':>9} {label + ' mIoU':>{width}} {'sim oIoU':>9} {label + ' oIoU':>{width}}"
    )
    lines.append(header)
    for name, r in report["sets"].items():
        sim, dep = r.get("simulated"), r.get("deployed")
        metric = (
            f"{sim['mIoU']:9.2f} {dep['mIoU']:{width}.2f} {sim['oIoU']:9.2f} {dep['oIoU']:{width}.2f}"
            if sim
            else f"{'–':>9} {'–':>{width}} {'–':>9} {'–':>{width}}"
        )
        lines.append(
            f"{name:<22} {r['pairs']:>6} {r['mask_agreement']:13.3f} {r['max_abs_logit_diff']:13.3f} "
            f"{r['max_logit_diff_lsb']:7.1f} {metric}"
        )
    for name, r in report["sets"].items():
        if "confident_agreement" in r:
            lines.append(
                f"{name}: agreement {r['confident_agreement']:.3f}% on the {r['confident_pixels']:.1f}% of pixels whose "
                f"simulated margin exceeds {MARGIN_LSB} LSB; logit SQNR {r['logit_sqnr_db']:.1f} dB"
            )
    for name, r in report["sets"].items():
        worst = ", ".join(f"{w['pair']} ({w['mask_iou_vs_simulated']:.3f})" for w in r["worst_pairs"][:3])
        lines.append(f"worst {name}: {worst}")
    return "\n".join(lines)
