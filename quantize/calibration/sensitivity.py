"""Where quantization error comes from: per layer and per modality (vision / text / fusion / decoder).

For each layer, only that layer is quantized (the rest float) and the SQNR of the mask logits against the float model
is measured on a fixed set of pairs; for each modality, only its layers are quantized and both the logit SQNR and the
mIoU lost on the evaluation split are measured. The same calibrated qparams are used throughout: this attributes the
error of one artifact, it does not recalibrate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..progress import progress_bar
from .placement import quantized_sites, quantizers_of, set_quantization

__all__ = ["MODALITIES", "analyze", "format_sensitivity", "plot_sensitivity", "sqnr_db"]

MODALITIES = ("vision", "text", "fusion", "decoder")


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − test‖²); infinite when identical."""
    noise = float(((reference - test) ** 2).sum())
    signal = float((reference**2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(signal / noise)).item()


def _only(model: nn.Module, names: set[str]) -> None:
    for site in quantized_sites(model):
        for q in quantizers_of(site).values():
            q.enabled = site.info.name in names


@torch.no_grad()
def analyze(
    model: nn.Module,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dataset=None,
    limit: int | None = 1000,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Sensitivity of a fake-quantized model (from :func:`~quantize.calibration.artifact.load_quantized`).

    Args:
        pairs: (images, input_ids, attention_mask) on which logit SQNR is measured.
        dataset: a ReferDataset for the mIoU columns (skipped when None); ``limit`` pairs of it.
    """
    from ..evaluate import evaluate

    images, ids, mask = pairs
    sites = quantized_sites(model)

    def logits() -> torch.Tensor:
        return torch.cat(
            [
                model(images[i : i + batch_size], ids[i : i + batch_size], mask[i : i + batch_size])
                for i in range(0, len(images), batch_size)
            ]
        )

    def miou() -> float | None:
        if dataset is None:
            return None
        return evaluate(model, dataset, batch_size=batch_size, limit=limit)["mIoU"]

    set_quantization(model, False)
    reference = logits()
    float_miou = miou()
    layers = []
    with progress_bar(progress, total=len(sites), desc="per-layer SQNR", unit="layer") as bar:
        for site in sites:
            _only(model, {site.info.name})
            layers.append(
                {"name": site.info.name, "modality": site.info.modality, "sqnr_db": sqnr_db(reference, logits())}
            )
            bar.update(1)
    modalities = {}
    for modality in MODALITIES:
        names = {s.info.name for s in sites if s.info.modality == modality}
        if not names:
            continue
        _only(model, names)
        m = miou()
        modalities[modality] = {
            "layers": len(names),
            "sqnr_db": sqnr_db(reference, logits()),
            "mIoU": m,
            "mIoU_lost": None if m is None else float_miou - m,
        }
    set_quantization(model, True)
    full = miou()
    return {
        "pairs_for_sqnr": len(images),
        "pairs_for_miou": None if dataset is None else min(limit or len(dataset), len(dataset)),
        "float_mIoU": float_miou,
        "quantized_mIoU": full,
        "all_sqnr_db": sqnr_db(reference, logits()),
        "modalities": modalities,
        "layers": layers,
    }


def format_sensitivity(result: dict[str, Any], worst: int = 10) -> str:
    lines = [f"{'part':<10} {'layers':>6} {'logit SQNR dB':>14} {'mIoU':>7} {'mIoU lost':>10}"]
    for name, m in result["modalities"].items():
        miou = "–" if m["mIoU"] is None else f"{m['mIoU']:.2f}"
        lost = "–" if m["mIoU_lost"] is None else f"{m['mIoU_lost']:.2f}"
        lines.append(f"{name:<10} {m['layers']:>6} {m['sqnr_db']:>14.1f} {miou:>7} {lost:>10}")
    full = "–" if result["quantized_mIoU"] is None else f"{result['quantized_mIoU']:.2f}"
    lines.append(f"{'all':<10} {len(result['layers']):>6} {result['all_sqnr_db']:>14.1f} {full:>7}")
    lines.append(f"\nthe {worst} layers with the lowest logit SQNR when quantized alone:")
    for layer in sorted(result["layers"], key=lambda r: r["sqnr_db"])[:worst]:
        lines.append(f"  {layer['sqnr_db']:6.1f} dB  {layer['modality']:<8} {layer['name']}")
    return "\n".join(lines)


def plot_sensitivity(result: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Bar chart of per-layer SQNR (coloured by modality) beside per-modality mIoU lost, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vision": "tab:blue", "text": "tab:orange", "fusion": "tab:green", "decoder": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [4, 1]})
    layers = result["layers"]
    finite = [min(r["sqnr_db"], 99.0) for r in layers]
    ax1.bar(range(len(layers)), finite, color=[colors[r["modality"]] for r in layers], width=1.0)
    ax1.set_xlabel("quantized layer (data-flow order)")
    ax1.set_ylabel("mask-logit SQNR, only this layer quantized (dB)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax1.legend(handles, list(colors), loc="upper left", ncols=4)
    mods = list(result["modalities"])
    lost = [result["modalities"][m]["mIoU_lost"] or 0.0 for m in mods]
    ax2.bar(mods, lost, color=[colors[m] for m in mods])
    ax2.set_ylabel("mIoU lost, only this part quantized")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def save_json(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
