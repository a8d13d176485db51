"""Evaluate a LAVT model on a refer-layout split with LAVT's metrics."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .devices import resolve_device
from .distributed import Shard
from .metrics import RisMetrics, intersection_union
from .progress import progress_bar

__all__ = ["evaluate", "format_table"]


class _ShuffledExpressions(Dataset):
    """Each image paired with the expression of the sample half the split away (a different image): a control that
    shows how much the model relies on the language."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        other = self.base.samples[(i + len(self.base) // 2) % len(self.base)]
        item["input_ids"], item["attention_mask"] = self.base.tokenizer(other.sentence)
        return item


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    shuffled_expressions: bool = False,
    limit: int | None = None,
    progress: bool = False,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """mIoU / oIoU / Prec@X (and per-kind mIoU where the data records kinds) of ``model`` on ``dataset``.

    Args:
        dataset: a :class:`~quantize.data.refer.ReferDataset`.
        shuffled_expressions: pair every image with another sample's expression (language-reliance control).
        limit: evaluate the first ``limit`` pairs only.
        shard: this process's share under torchrun (:mod:`.distributed`); every rank returns the whole split's
            figures, equal to one process's.
    """
    shard = shard or Shard()
    # Two statements: an exported PT2E module's eval() returns None instead of the module.
    device = shard.device(resolve_device(device))
    model.eval()
    model.to(device)
    data = _ShuffledExpressions(dataset) if shuffled_expressions else dataset
    n = len(data) if limit is None else min(limit, len(data))
    data = torch.utils.data.Subset(data, shard.batch_indices(n, batch_size))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    pairs: list[tuple[int, int, int, str]] = []  # (index, I, U, kind) per pair
    start = time.perf_counter()
    with progress_bar(progress and shard.is_main, total=len(data), desc="evaluate", unit="pair") as bar:
        for batch in loader:
            logits = model(batch["image"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device))
            inter, union = intersection_union(logits.argmax(1).cpu(), batch["target"])
            for index, i, u in zip(batch["index"].tolist(), inter.tolist(), union.tolist()):
                pairs.append((index, i, u, dataset.samples[index].kind))
            bar.update(len(inter))
    metrics = RisMetrics()
    for _, i, u, kind in shard.gather_ordered(pairs):
        metrics.add(i, u, kind)
    elapsed = time.perf_counter() - start
    out = metrics.summary()
    out["seconds"] = elapsed
    if shard.world > 1:
        out["processes"] = shard.world
    out["pairs_per_second"] = out["pairs"] / elapsed if elapsed > 0 else float("inf")
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of one evaluation result."""
    lines = [
        f"pairs {results['pairs']}",
        f"{'mIoU':>8} {'oIoU':>8} "
        + " ".join(f"{'P@' + k.split('@')[1]:>7}" for k in results if k.startswith("Prec@")),
        f"{results['mIoU']:8.2f} {results['oIoU']:8.2f} "
        + " ".join(f"{v:7.2f}" for k, v in results.items() if k.startswith("Prec@")),
    ]
    if "mIoU_by_kind" in results:
        lines.append("mIoU by expression kind:")
        for kind, v in results["mIoU_by_kind"].items():
            lines.append(f"  {kind:<10} {v:6.2f}  ({results['pairs_by_kind'][kind]} pairs)")
    if "pairs_per_second" in results:
        lines.append(f"throughput {results['pairs_per_second']:.1f} pairs/s")
    return "\n".join(lines)
