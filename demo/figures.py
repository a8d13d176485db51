"""The report's pictures: what DRQ and RORQ do to real activations, and masks side by side.

The activation figures are drawn from the calibrated model's own quantizers on real pairs: each compares the
calibrated quantizer with the single uniform grid of the same bits (the min-max grid a naive flow would use) on the
same values, and prints the error of both, so the figure shows the gain rather than asserting it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantize.calibration.placement import quantized_sites
from quantize.calibration.quantizers import DrqGeluQuantizer, DrqSoftmaxQuantizer, GroupQuantizer

__all__ = ["ActivationSample", "activation_figures", "capture_activations", "png_bytes", "text_streams_label"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


class ActivationSample:
    """The input one quantizer saw on real pairs, with the quantizer and the layer it feeds."""

    def __init__(self, layer: str, quantizer: nn.Module, values: torch.Tensor) -> None:
        self.layer, self.quantizer, self.values = layer, quantizer, values


@torch.no_grad()
def capture_activations(model: nn.Module, images, input_ids, attention_mask) -> dict[str, list[ActivationSample]]:
    """Inputs of every quantizer of ``model`` (a calibrated model from
    :func:`~quantize.calibration.artifact.load_quantized`) that PTQ4RIS treats specially, on the given pairs, by kind:
    ``post_softmax`` and ``post_gelu`` (DRQ), ``text_channels`` (RORQ channel groups). A kind the recipe does not use
    is absent."""
    wanted = {DrqSoftmaxQuantizer: "post_softmax", DrqGeluQuantizer: "post_gelu", GroupQuantizer: "text_channels"}
    seen: dict[str, list[ActivationSample]] = {}
    hooks = []
    for site in quantized_sites(model):
        for q in site.modules():
            kind = wanted.get(type(q))
            if kind is None or (kind == "text_channels" and site.info.modality != "text"):
                continue

            def hook(module, args, kind=kind, layer=site.info.name):
                seen.setdefault(kind, []).append(ActivationSample(layer, module, args[0].detach().float().cpu()))

            hooks.append(q.register_forward_pre_hook(hook))
    try:
        model.eval()
        model(images, input_ids, attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _uniform(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The naive baseline: one asymmetric min-max grid over all values."""
    lo, hi = float(x.min()), float(x.max())
    scale = max(hi - lo, 1e-12) / (2**bits - 1)
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def _histogram_png(fig, ax, xlabel: str, title: str) -> bytes:
    """Shared finish of the histogram figures: counts on a log axis, legend, PNG."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("values")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _softmax_figure(sample: ActivationSample) -> tuple[bytes, dict]:
    plt = _plt()
    q: DrqSoftmaxQuantizer = sample.quantizer
    x = sample.values.flatten()
    split = 2.0 ** -int(q.split_exponent)
    drq, naive = q.fake_quant(x), _uniform(x, q.bits)
    nonzero = x > 0
    stats = {
        "layer": sample.layer,
        "bits": q.bits,
        "split": split,
        "below_split_%": 100.0 * float((x < split).float().mean()),
        "zeroed_by_uniform_%": 100.0 * float((naive[nonzero] == 0).float().mean()),
        "zeroed_by_drq_%": 100.0 * float((drq[nonzero] == 0).float().mean()),
        "mse_uniform": _mse(naive, x),
        "mse_drq": _mse(drq, x),
    }
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    positive = x[nonzero].clamp(min=1e-8).log10().numpy()
    ax.hist(positive, bins=120, color="tab:blue", alpha=0.8)
    ax.axvline(np.log10(split), color="tab:red", lw=2, label=f"DRQ split 2^-{int(q.split_exponent)}")
    ax.axvline(np.log10(1.0 / (2**q.bits - 1)), color="0.3", ls="--", label="one uniform grid's first step")
    title = (
        f"post-softmax, {sample.layer}\nrounded to 0: one {q.bits}-bit grid {stats['zeroed_by_uniform_%']:.1f}%, "
        f"DRQ {stats['zeroed_by_drq_%']:.1f}%"
    )
    return _histogram_png(fig, ax, "log10(attention probability)", title), stats


def _gelu_figure(sample: ActivationSample) -> tuple[bytes, dict]:
    plt = _plt()
    q: DrqGeluQuantizer = sample.quantizer
    x = sample.values.flatten()
    drq, naive = q.fake_quant(x), _uniform(x, q.bits)
    stats = {
        "layer": sample.layer,
        "bits": q.bits,
        "step_negative": q.delta_neg,
        "step_positive": float(q.delta_pos),
        "step_uniform": float(x.max() - x.min()) / (2**q.bits - 1),
        "negative_%": 100.0 * float((x < 0).float().mean()),
        "mse_uniform": _mse(naive, x),
        "mse_drq": _mse(drq, x),
    }
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.hist(x.numpy(), bins=200, color="tab:green", alpha=0.8)
    ax.axvspan(float(x.min()), 0, color="tab:orange", alpha=0.15, label=f"negative region, step {q.delta_neg:.2g}")
    ax.axvspan(
        0, float(x.max()), color="tab:green", alpha=0.08, label=f"positive region, step {float(q.delta_pos):.2g}"
    )
    title = (
        f"post-GELU, {sample.layer}\none grid's step {stats['step_uniform']:.2g}: MSE {stats['mse_uniform']:.2e}; "
        f"DRQ: {stats['mse_drq']:.2e}"
    )
    return _histogram_png(fig, ax, "post-GELU value", title), stats


def text_streams_label(stats: dict) -> str:
    """'8 channel groups' or '8 channel groups + 2 tier slices': the int8 streams of a text input."""
    slices = stats.get("tier_slices", 0)
    return f"{stats['groups']} channel groups" + (f" + {slices} tier slices" if slices else "")


def _channels_figure(sample: ActivationSample) -> tuple[bytes, dict]:
    plt = _plt()
    q: GroupQuantizer = sample.quantizer
    x = sample.values.reshape(-1, q.channels)
    grouped, naive = q.fake_quant(x, axis=1), _uniform(x, q.bits)
    peak = x.abs().amax(0).numpy()
    width = q.channels // q.groups
    stats = {
        "layer": sample.layer,
        "bits": q.bits,
        "channels": q.channels,
        "groups": q.groups,
        "tier_slices": int(q.thresholds.numel()),
        "widest_to_median_channel": float(peak.max() / max(np.median(peak), 1e-12)),
        "mse_uniform": _mse(naive, x),
        "mse_groups": _mse(grouped, x),
    }
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    colours = plt.get_cmap("tab10")
    for g in range(q.groups):
        span = slice(g * width, (g + 1) * width)
        ax.bar(np.arange(q.channels)[span], peak[span], width=1.0, color=colours(g % 10))
    ax.set_yscale("log")
    ax.set_xlabel("input channel (range order, folded into the weights)")
    ax.set_ylabel("max |activation|")
    ax.set_title(
        f"text-encoder input, {sample.layer}\n{text_streams_label(stats)}: MSE {stats['mse_groups']:.2e}; "
        f"one grid: {stats['mse_uniform']:.2e}",
        fontsize=9,
    )
    return png_bytes(fig), stats


_FIGURES = {"post_softmax": _softmax_figure, "post_gelu": _gelu_figure, "text_channels": _channels_figure}


def _errors(kind: str, sample: ActivationSample) -> tuple[float, float]:
    """(MSE of one uniform grid, MSE of the calibrated quantizer) on the sample."""
    q, x = sample.quantizer, sample.values
    if kind == "text_channels":
        x = x.reshape(-1, q.channels)
        return _mse(_uniform(x, q.bits), x), _mse(q.fake_quant(x, axis=1), x)
    return _mse(_uniform(x, q.bits), x), _mse(q.fake_quant(x), x)


def activation_figures(samples: dict[str, list[ActivationSample]]) -> dict[str, tuple[bytes, dict]]:
    """PNG and statistics per activation kind, drawn at the site where the calibrated quantizer gains most over one
    uniform grid; the statistics also count the sites where it gains at all (``better_at`` of ``sites``)."""
    out = {}
    for kind, found in samples.items():
        errors = [_errors(kind, s) for s in found]
        best = max(range(len(found)), key=lambda i: errors[i][0] / max(errors[i][1], 1e-30))
        png, stats = _FIGURES[kind](found[best])
        stats.update(sites=len(found), better_at=sum(u > c for u, c in errors))
        out[kind] = (png, stats)
    return out


def save_png(data: bytes, path: str | Path) -> Path:
    from quantize.atomic import write_atomic

    path = Path(path)
    write_atomic(path, data)
    return path
