"""Masks side by side: the same pairs through the float model, the simulated quantized models and the ``.pte``.

Rows are the pairs where the ``.pte`` departs most from the simulated model (parity's worst pairs) first, then
natural photographs; every cell is the model-resolution image with the mask tinted, captioned with its IoU against
the ground truth where there is one.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .segment import overlay

__all__ = ["GalleryRow", "gallery_rows"]

# Displayed cell size: the model's 128² masks are enlarged (nearest) so their pixels stay visible.
CELL = 176


@dataclass
class GalleryRow:
    """One pair: its caption and one PNG (with a caption) per column."""

    caption: str
    kind: str
    cells: list[tuple[str, bytes, str]] = field(default_factory=list)  # (column, png, caption)


def _png(pixels: np.ndarray, mask: np.ndarray | None) -> bytes:
    image = Image.fromarray(pixels)
    if mask is not None:
        image = overlay(image, mask)
    image = image.resize((CELL, CELL), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _iou(mask: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(mask, target).sum()
    return float(np.logical_and(mask, target).sum() / union) if union else 1.0


@torch.no_grad()
def gallery_rows(
    models: dict[str, Callable], dataset, indices: list[int], photos: list[tuple[str, torch.Tensor, ...]] = ()
) -> list[GalleryRow]:
    """Rows for the val pairs ``indices`` of ``dataset`` and the ``(name, image, ids, mask)`` ``photos``.

    ``models``: column name → callable(image, ids, mask) → (1, 2, S, S) logits (a torch model or a program).
    """
    from quantize.models.config import PreprocessConfig

    rows = []
    inputs = []
    for index in indices:
        sample, item = dataset.samples[index], dataset[index]
        pixels = dataset._pixels(sample.image_id).permute(1, 2, 0).numpy()
        target = item["target"].numpy().astype(bool)
        inputs.append((sample.sentence, sample.kind, pixels, target, item["image"][None], item["input_ids"][None],
                       item["attention_mask"][None]))  # fmt: skip
    cfg = PreprocessConfig()
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for name, image, ids, attention in photos:
        pixels = ((image[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        inputs.append((name, "photograph", pixels, None, image, ids, attention))
    for sentence, kind, pixels, target, image, ids, attention in inputs:
        row = GalleryRow(sentence, kind)
        row.cells.append(("input", _png(pixels, target), "ground truth" if target is not None else "no ground truth"))
        for column, run in models.items():
            mask = (run(image, ids, attention).argmax(1)[0] == 1).numpy()
            caption = (
                f"IoU {100 * _iou(mask, target):.1f}" if target is not None else f"{100 * mask.mean():.1f}% of image"
            )
            row.cells.append((column, _png(pixels, mask), caption))
        rows.append(row)
    return rows
