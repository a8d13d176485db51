"""Weight bits per layer under a size budget: which layers keep 8-bit weights when the rest store 4.

The size is the Android program's, counted the way it stores weights (:func:`stored_bytes`): XNNPACK packs 4-bit
weights two to a byte only for Linears (QC4W); a convolution keeps any width below 8 in an int8 container, so giving
it 8 bits costs nothing. A layer's sensitivity is measured on the float model with only that layer's weights on the
low grid (per output channel, the clipping ratio of least weight error): the mean squared error it causes in the
mask logits of the calibration pairs. Errors of different layers are taken as additive (the usual assumption of
mixed-precision search, e.g. HAWQ), so the choice is a 0/1 knapsack: keep at 8 bits the layers whose error removed
is largest for the bytes the budget has left above the all-low program, solved exactly by dynamic programming over
kilobytes.

The recipe that comes out names every layer kept at 8 bits (``Recipe.layer_weight_bits``); calibration then runs
as for any recipe, so the scales, GPTQ rounding and activation ranges see the mixed weights, and the artifact
records the choice with the allocation's own record (bytes, errors, budget).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..progress import progress_bar
from .placement import float_sites
from .quantizers import DrqGeluQuantizer, GroupQuantizer
from .recipe import Recipe

__all__ = [
    "HIGH_BITS",
    "SENSITIVITY_PAIRS",
    "Allocation",
    "allocate_weight_bits",
    "budget_bytes",
    "check_budget",
    "float_program_bytes",
    "parse_budget",
    "program_bytes",
    "stored_bytes",
    "stored_value_bits",
    "weight_sensitivity",
]

HIGH_BITS = 8
# Pairs the sensitivity is measured on, spread over the calibration pairs: one forward per layer is the cost, and on
# lavt-tiny 16 of the 64 W4A8 pairs rank its 110 layers as all 64 do (Spearman 0.993) in a quarter of the time.
SENSITIVITY_PAIRS = 16
SCALE_BYTES = 4  # one float32 scale per output channel and stream
KB = 1024


def stored_value_bits(op: str, bits: int) -> int:
    """The bits one weight value takes in the ``.pte``: XNNPACK packs 4-bit Linear weights (QC4W); every other
    layer, and every other width below 8, is stored in an int8 container."""
    return 4 if op == "linear" and bits == 4 else 8


def _streams(quantizer: nn.Module | None) -> tuple[float, int]:
    """(weight copies, streams) of a deployed layer: every stream stores its own per-channel scales; DRQ post-GELU
    stores the whole weight twice (its two regions), RORQ channel groups split it, and each tier slice stores the
    columns from its first channel on (known once calibrated; none before)."""
    if isinstance(quantizer, DrqGeluQuantizer):
        return 2.0, 2
    if isinstance(quantizer, GroupQuantizer):
        channels = quantizer.channels
        starts = [int(start) for start in quantizer.slice_start.tolist()]
        return 1.0 + sum((channels - start) / channels for start in starts), quantizer.groups + len(starts)
    return 1.0, 1


def stored_bytes(op: str, weight_shape: torch.Size, bits: int, copies: float = 1.0, streams: int = 1) -> int:
    """Bytes of one layer's weights and per-channel scales as the ``.pte`` stores them at ``bits``."""
    rows = weight_shape[0]
    values = rows * int(np.prod(weight_shape[1:]))
    return round(copies * values * stored_value_bits(op, bits) / 8) + streams * rows * SCALE_BYTES


def _table_bytes(table: nn.Embedding, recipe: Recipe) -> int:
    """The word table as exported (quantize.deploy.graph): torchao int4 groups, 4-bit values and a float32 scale per
    ``table_group`` values (symmetric: no zero points once fused); or int8 values with a float32 scale per row."""
    n = table.weight.numel()
    if recipe.table_bits == 4:
        return n // 2 + (n // recipe.table_group) * SCALE_BYTES
    return n + table.weight.shape[0] * SCALE_BYTES


def _weight_layers(model: nn.Module, recipe: Recipe) -> list[tuple[str, nn.Module, Any]]:
    return [(name, m, info) for name, m, info in float_sites(model, recipe) if hasattr(m, "weight")]


def _placed(model: nn.Module, recipe: Recipe) -> list[nn.Module]:
    """The quantized sites of ``model``: its own once calibrated, else those ``recipe`` places on a copy."""
    import copy

    from .placement import place_quantizers, quantized_sites

    return quantized_sites(model) or place_quantizers(copy.deepcopy(model), recipe)


def _stored_values(name: str, parameter: torch.Tensor, model: nn.Module) -> int:
    """Values of a float parameter the program stores: of the position table (the model's layer roles name it), the
    rows of the program's token positions only, which constant propagation keeps."""
    from ..models import layer_roles

    table = layer_roles(model).position_table
    if table and name == f"{table}.weight":
        return min(parameter.shape[0], model.config.preprocess.max_tokens) * parameter.shape[1]
    return parameter.numel()


def program_bytes(model: nn.Module, recipe: Recipe, bits: dict[str, int] | None = None) -> int:
    """The weight bytes of ``model``'s Android program under ``recipe``: quantized layers as :func:`stored_bytes`
    (``bits``: layer → weight bits, overriding the recipe's), the word table at the recipe's table width, every other
    parameter (norms, biases, the reachable position rows, a float head) in float32. ``model`` is the float model, or
    a calibrated one, whose stored copies (tier slices) are then exact.

    The program adds its structure (operators, delegate graphs) and the constants that constant propagation expands
    (Swin's relative position bias tables become one bias per token pair), which this does not count (lavt-tiny:
    about 0.7 MB; docs/results.md)."""
    from ..models import layer_roles

    bits = bits or {}
    sites = {s.info.name: s for s in _placed(model, recipe) if hasattr(s, "weight_quantizer")}
    total = 0
    for name, site in sites.items():
        copies, streams = _streams(site.input_quantizer)
        own = site.weight_quantizer.bits
        total += stored_bytes(site.info.op, site.weight.shape, bits.get(name, own), copies, streams)
    table_name = layer_roles(model).word_table
    weights = {f"{name}.weight" for name in sites} | {f"{table_name}.weight"}
    total += _table_bytes(model.get_submodule(table_name), recipe)
    total += sum(4 * _stored_values(n, p, model) for n, p in model.named_parameters() if n not in weights)
    # Float buffers (Swin's shifted-window masks) are constants of the program too; quantizer buffers are not.
    site_buffers = {id(b) for s in sites.values() for b in s.buffers()}
    total += sum(b.numel() * 4 for b in model.buffers() if b.is_floating_point() and id(b) not in site_buffers)
    return total


def float_program_bytes(model: nn.Module) -> int:
    """The weight bytes of the float program, counted as :func:`program_bytes` counts them: every parameter (the
    reachable position rows) and float buffer in float32."""
    params = sum(4 * _stored_values(n, p, model) for n, p in model.named_parameters())
    return params + sum(b.numel() * 4 for b in model.buffers() if b.is_floating_point())


def _low_grid(weight: torch.Tensor, bits: int, ratios: int = 20) -> torch.Tensor:
    """``weight`` on a symmetric per-output-channel ``bits`` grid, each channel clipped at the ratio of its max (1.0
    down to 0.5) with the least squared weight error."""
    w = weight.reshape(weight.shape[0], -1).double()
    qmax = 2 ** (bits - 1) - 1
    peak = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best, best_err = w, torch.full_like(peak, float("inf"))
    for r in torch.linspace(1.0, 0.5, ratios, dtype=torch.float64):
        scale = peak * r / qmax
        q = (w / scale).round().clamp(-qmax, qmax) * scale
        err = ((q - w) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best = torch.where(better, q, best)
        best_err = torch.where(better, err, best_err)
    return best.to(weight.dtype).reshape(weight.shape)


@torch.no_grad()
def weight_sensitivity(
    model: nn.Module,
    recipe: Recipe,
    chunks: list[tuple[torch.Tensor, ...]],
    bits: int,
    progress: bool = False,
) -> dict[str, float]:
    """Per quantizable layer of the float ``model``: the mean squared error of the mask logits on ``chunks`` when
    only that layer's weights are on the ``bits`` grid."""
    model.eval()

    def logits() -> torch.Tensor:
        return torch.cat([model(*c) for c in chunks])

    reference = logits()
    layers = _weight_layers(model, recipe)
    out = {}
    with progress_bar(progress, total=len(layers), desc=f"weight sensitivity at {bits} bits", unit="layer") as bar:
        for name, module, _ in layers:
            kept = module.weight.detach().clone()
            module.weight.copy_(_low_grid(kept, bits))
            out[name] = float(((logits() - reference) ** 2).mean())
            module.weight.copy_(kept)
            bar.update(1)
    return out


@dataclass
class Allocation:
    """The result of :func:`allocate_weight_bits`, recorded in the artifact."""

    budget_bytes: int
    low_bits: int
    high_bits: int
    low_program_bytes: int
    high_program_bytes: int
    estimated_bytes: int
    high_layers: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def knapsack(costs: list[int], gains: list[float], capacity: int) -> list[int]:
    """Indices of the items of greatest total gain whose costs (in units) fit ``capacity`` units (0/1, exact)."""
    best = np.zeros(capacity + 1)
    took = np.zeros((len(costs), capacity + 1), dtype=bool)
    for i, (c, g) in enumerate(zip(costs, gains)):
        if c > capacity:
            continue
        candidate = best[: capacity + 1 - c] + g
        better = candidate > best[c:]
        took[i, c:] = better
        best[c:] = np.where(better, candidate, best[c:])
    chosen, room = [], capacity
    for i in range(len(costs) - 1, -1, -1):
        if took[i, room]:
            chosen.append(i)
            room -= costs[i]
    return sorted(chosen)


def parse_budget(text: str) -> tuple[float, str]:
    """``17.5`` (megabytes) or ``0.16x`` (a fraction of the float program) as (value, "MB" | "x"); ValueError
    otherwise."""
    unit = "x" if text.lower().endswith("x") else "MB"
    try:
        value = float(text[:-1] if unit == "x" else text)
    except ValueError:
        raise ValueError(f"expected megabytes (16.2) or a fraction of float (0.15x), got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a positive size, got {text!r}")
    return value, unit


def budget_bytes(budget: tuple[float, str], model: nn.Module, recipe: Recipe) -> int:
    """A parsed budget in bytes (a fraction is of :func:`float_program_bytes`), checked by :func:`check_budget`
    against the programs ``recipe`` can give ``model`` (before any work)."""
    value, unit = budget
    size = int(value * (float_program_bytes(model) if unit == "x" else 1e6))
    check_budget(model, recipe, size)
    return size


def check_budget(model: nn.Module, recipe: Recipe, budget_bytes: int) -> tuple[int, int]:
    """(all-low, all-high) program bytes; refuses a budget below the all-low program or a recipe without low weight
    bits, before any work."""
    if recipe.text == "tiers":
        raise UserError(
            f"--budget-size sizes the Android program, and {recipe.method}'s element-wise RORQ tiers have no integer "
            "lowering: use --method ptq4ris-deploy"
        )
    if recipe.weight_bits >= HIGH_BITS:
        raise UserError(
            f"--budget-size chooses which layers keep {HIGH_BITS}-bit weights over {recipe.bits}'s: give a setting "
            "with 4-bit weights (--bits w4a8 or w4a4)"
        )
    layers = _weight_layers(model, recipe)
    low = program_bytes(model, recipe, {name: recipe.weight_bits for name, _, _ in layers})
    high = program_bytes(model, recipe, {name: HIGH_BITS for name, _, _ in layers})
    if budget_bytes < low:
        raise UserError(
            f"--budget-size {budget_bytes / 1e6:.2f} MB: the smallest {recipe.bits} program of this model is "
            f"{low / 1e6:.2f} MB (every layer at {recipe.weight_bits} bits); give at least that"
        )
    return low, high


def allocate_weight_bits(
    model: nn.Module,
    recipe: Recipe,
    chunks: list[tuple[torch.Tensor, ...]],
    budget_bytes: int,
    progress: bool = False,
) -> tuple[Recipe, Allocation]:
    """The recipe with ``layer_weight_bits`` set: every layer whose 8 bits cost no bytes, and the knapsack's choice
    of the others within ``budget_bytes`` of program weights. ``model`` is the float model; ``chunks`` the
    calibration pairs as model inputs."""
    import copy
    import time

    from .placement import fold_batch_norms

    start = time.perf_counter()
    low, high = check_budget(model, recipe, budget_bytes)
    model = copy.deepcopy(model).eval().to(chunks[0][0].device)  # where the calibration pairs are (--device)
    fold_batch_norms(model)  # the weights as deployed, BatchNorm folded in
    layers = _weight_layers(model, recipe)
    noise = weight_sensitivity(model, recipe, chunks, recipe.weight_bits, progress)
    placed = {s.info.name: s for s in _placed(model, recipe)}
    extra, free, candidates = {}, [], []
    for name, module, info in layers:
        copies, streams = _streams(placed[name].input_quantizer)
        cost = stored_bytes(info.op, module.weight.shape, HIGH_BITS, copies, streams) - stored_bytes(
            info.op, module.weight.shape, recipe.weight_bits, copies, streams
        )
        extra[name] = cost
        (free if cost <= 0 else candidates).append(name)
    if budget_bytes >= high:
        chosen = candidates
    else:
        units = [-(-extra[n] // KB) for n in candidates]  # rounded up: the choice never exceeds the budget
        chosen = [candidates[i] for i in knapsack(units, [noise[n] for n in candidates], (budget_bytes - low) // KB)]
    high_layers = sorted(free + chosen)
    bits = {name: (HIGH_BITS if name in high_layers else recipe.weight_bits) for name, _, _ in layers}
    allocation = Allocation(
        budget_bytes=budget_bytes,
        low_bits=recipe.weight_bits,
        high_bits=HIGH_BITS,
        low_program_bytes=low,
        high_program_bytes=high,
        estimated_bytes=program_bytes(model, recipe, bits),
        high_layers=high_layers,
        layers=[
            {"name": n, "bits": bits[n], "logit_mse_at_low_bits": noise[n], "extra_bytes_at_high_bits": extra[n]}
            for n, _, _ in layers
        ],
        seconds=round(time.perf_counter() - start, 1),
    )
    mixed = dataclasses.replace(recipe, layer_weight_bits=tuple((n, HIGH_BITS) for n in high_layers))
    return mixed, allocation
