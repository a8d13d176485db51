"""The calibration pass: float LAVT + calibration pairs + recipe → fake-quantized LAVT with tuned qparams.

Steps (data flows one way):
1. RORQ/PWAM channel groups: measure channel ranges on the float model and fold range-sorting permutations into the
   weights (the float function is unchanged), so outlier channels share contiguous groups.
2. Place the quantizers (:mod:`.placement`) and initialise them from the float model's activations (min-max or
   percentile ranges, DRQ defaults, RORQ tiers and groups).
3. Unless the recipe says ``search="none"``: for each block in data-flow order, switch that block's quantizers off,
   keep every other layer quantized (searched ones with their searched grids, later ones with their initial grids),
   run the calibration pairs forward and the KL between the float and this partially quantized model's class
   distributions backward, record each layer's inputs and output gradients, and search the layer's grids
   (:mod:`.search`). Quantizing the rest of the model is what makes the gradients informative: with everything
   float the KL is at its minimum and its gradient is zero (the defect of the official code).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import resolve_device
from ..errors import UserError
from ..models.roles import FoldGroup, layer_roles
from ..progress import progress_bar
from . import folding
from .everyday_expressions import EVERYDAY_EXPRESSIONS
from .placement import (
    QuantConv1d,
    QuantLinear,
    QuantMatMul,
    fold_batch_norms,
    place_quantizers,
    quantizers_of,
)
from .primitives.rorq import channel_group_order
from .primitives.stable import range_order_key
from .quantizers import DrqSoftmaxQuantizer, GroupQuantizer, TierQuantizer
from .recipe import Recipe
from .search import (
    LinearCapture,
    MatMulCapture,
    _drop_dead_rows,
    _fq_rows,
    _fq_weight_rows,
    _weight_delta0,
    init_activation,
    search_linear,
    search_matmul,
)
from .weight_rounding import bias_correction, gptq_round

__all__ = ["CalibrationBatch", "CalibrationReport", "calibrate", "calibration_batch", "default_everyday"]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationBatch:
    """The calibration pairs, stacked: images (P, 3, S, S), input_ids (P, N), attention_mask (P, N)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: str = ""
    everyday: int = 0  # how many of the pairs are everyday expressions (the last ones)

    def __len__(self) -> int:
        return self.images.shape[0]

    def spread(self, count: int) -> CalibrationBatch:
        """At most ``count`` of the pairs, evenly spaced over all of them (split pairs and everyday expressions
        alike)."""
        if count >= len(self):
            return self
        index = torch.linspace(0, len(self) - 1, count).round().long().unique()
        everyday = int((index >= len(self) - self.everyday).sum())
        picked = (self.images[index], self.input_ids[index], self.attention_mask[index])
        return CalibrationBatch(*picked, description=f"{len(index)} of: {self.description}", everyday=everyday)

    def chunks(self, size: int, device, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, ...]]:
        """(images, input_ids, attention_mask) per ``size`` pairs, on ``device``; images in ``dtype`` if given."""
        out = []
        for start in range(0, len(self), size):
            sl = slice(start, start + size)
            images = self.images[sl].to(device, dtype)
            out.append((images, self.input_ids[sl].to(device), self.attention_mask[sl].to(device)))
        return out


def default_everyday(recipe: Recipe, requested: int | None = None) -> int:
    """How many everyday expressions join the calibration pairs: ``requested`` when given, else all of them at 8-bit
    activations and none below, where the wider text ranges cost more than they cover (lavt-tiny W4A4: 90.19 vs
    92.21 mIoU on ShapesRef val)."""
    if requested is not None:
        return requested
    return len(EVERYDAY_EXPRESSIONS) if recipe.act_bits >= 8 else 0


def calibration_batch(dataset, size: int = 32, everyday: int = 0) -> CalibrationBatch:
    """The first expression of each of the first ``size`` refs of ``dataset`` (a ReferDataset of one split) —
    deterministic, so the same split gives the same pairs — followed by the first ``everyday`` of
    :data:`~.everyday_expressions.EVERYDAY_EXPRESSIONS`, each paired with one of those images in turn."""
    if size < 1:
        raise UserError(f"calibration size must be positive, got {size}")
    if not 0 <= everyday <= len(EVERYDAY_EXPRESSIONS):
        raise UserError(f"everyday expressions must be between 0 and {len(EVERYDAY_EXPRESSIONS)}, got {everyday}")
    picked, seen = [], set()
    for index, sample in enumerate(dataset.samples):
        if sample.ref_id not in seen:
            seen.add(sample.ref_id)
            picked.append(index)
            if len(picked) == size:
                break
    if len(picked) < size:
        raise UserError(
            f"the split has only {len(picked)} refs, fewer than the {size} calibration pairs asked for: lower "
            f"--calib-size to {len(picked)} or less"
        )
    items = [dataset[i] for i in picked]
    images = [it["image"] for it in items]
    tokens = [(it["input_ids"], it["attention_mask"]) for it in items]
    for i, sentence in enumerate(EVERYDAY_EXPRESSIONS[:everyday]):
        images.append(images[i % size])
        tokens.append(dataset.tokenizer(sentence))
    description = f"first expression of the first {size} refs"
    if everyday:
        description += f" + {everyday} everyday expressions on the same images"
    return CalibrationBatch(
        torch.stack(images),
        torch.stack([ids for ids, _ in tokens]),
        torch.stack([mask for _, mask in tokens]),
        description,
        everyday,
    )


@dataclass
class CalibrationReport:
    recipe: Recipe
    seconds: float = 0.0
    blocks: int = 0
    sites: int = 0
    folded: dict[str, int] = field(default_factory=dict)


def calibration_record(dataset, batch: CalibrationBatch, report: CalibrationReport) -> dict[str, Any]:
    """What an artifact records of its calibration (``config.json``'s ``calibration``): the split the pairs came from,
    so that export can observe its GEMM output ranges on the same pairs, and what calibration did."""
    return {
        "dataset": dataset.dataset,
        "split_by": dataset.split_by,
        "split": dataset.split,
        "pairs": len(batch) - batch.everyday,
        "everyday_expressions": batch.everyday,
        "selection": batch.description,
        "seconds": round(report.seconds, 2),
        "folded": report.folded,
    }


# Calibration can compute in float64 (and returns the model in its own dtype). In float32 the search is chaotic under
# float noise: an ulp of difference in one GEMM (another CPU's SIMD width or BLAS blocking) moves inputs across the
# rounding edges of the fake quantizers downstream, which moves the KL gradient that weighs every candidate by
# percents (measured: up to 40 % on a channel's loss for a 1e-6 relative change of the inputs), far beyond any
# tolerance a decision rule can afford. In float64 the same noise is ~1e-16 relative, rounding edges are almost never
# crossed, and the tolerances of .primitives.stable absorb what is left. Qparams end as float32 values computed
# identically on every machine; float weights round-trip float32 -> float64 -> float32 exactly. The default stays
# float32 because float64 is several times slower on CPU (it would put the demo's calibrations past their budget);
# ``ptq4ris calibrate --float64`` (``dtype=torch.float64``) is the machine-independent mode.
CALIBRATION_DTYPE = torch.float32
REPRODUCIBLE_DTYPE = torch.float64


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# ---------------------------------------------------------------------------------------------------- folding
def _channel_ranges(model: nn.Module, batch: CalibrationBatch, names: dict[str, int], chunk: int, device):
    """max |input| per channel of the named float modules (name → channel axis of their input)."""
    ranges: dict[str, torch.Tensor] = {}
    hooks = []
    for name, axis in names.items():

        def hook(mod, args, name=name, axis=axis):
            x = args[0].detach()
            r = x.abs().movedim(axis, -1).reshape(-1, x.shape[axis]).amax(0)
            ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for images, ids, mask in batch.chunks(chunk, device, _dtype(model)):
            model(images, ids, mask)
    for h in hooks:
        h.remove()
    return ranges


def _fold_channel_orders(model: nn.Module, recipe: Recipe, batch: CalibrationBatch, chunk: int, device) -> dict:
    """Fold range-sorting permutations for the channel-grouped quantizers the recipe uses. Ranges are compared on a
    grid of 2^-8 of the largest one, ties by channel index (:func:`.primitives.stable.range_order_key`): near-equal
    ranges (many text channels sit at GELU's minimum) would otherwise swap places on float noise."""
    roles = layer_roles(model)
    wanted = {"text"} if recipe.text == "groups" else set()
    wanted |= {"pwam"} if recipe.pwam_grouped else set()
    folded = {}
    for wave in _fold_waves([g for g in roles.fold_groups if wanted & set(g.quantizers)]):
        # One forward pass measures every group of a wave, on the model the earlier waves left.
        measured = {
            name: _channel_axis(model.get_submodule(name))
            for g in wave
            for pattern in g.measured
            for name in roles.find(model, pattern)
        }
        ranges = _channel_ranges(model, batch, measured, chunk, device)
        for g in wave:
            indices = [None] if g.per is None else roles.indices(model, g.patterns[0], g.per)
            for index in indices:
                fields = {} if index is None else {g.per: index}
                names = [n for pattern in g.measured for n in roles.find(model, pattern, **fields)]
                # Readers of the same activation see the same channels: the group's range is their max.
                channel_range = torch.stack([ranges[n] for n in names]).amax(0).cpu()
                if g.heads is None:
                    order = channel_group_order(channel_range)
                else:
                    (attention,) = [model.get_submodule(n) for n in roles.find(model, g.heads, **fields)]
                    order = folding.head_preserving_order(range_order_key(channel_range), attention.num_heads)
                folding.permute_group(model, g, order, index)
            folded[g.name] = len(indices)
    return folded


def _fold_waves(groups: list[FoldGroup]) -> list[list[FoldGroup]]:
    """``groups`` (in folding order) in waves: a group is measured after every group it names in ``after`` is folded,
    and groups without such a dependency between them share a forward pass."""
    level: dict[str, int] = {}
    for g in groups:
        level[g.name] = 1 + max((level[d] for d in g.after if d in level), default=-1)
    return [[g for g in groups if level[g.name] == n] for n in sorted(set(level.values()))]


def _channel_axis(module: nn.Module) -> int:
    """The channel axis of a module's input: last for Linear (B, N, C), 1 for convolutions (B, C, L)."""
    return -1 if isinstance(module, nn.Linear) else 1


# ---------------------------------------------------------------------------------------------------- capture
def _rows(site: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear/Conv input as matmul rows (im2col for 2-D convs), matching ``weight.reshape(C_out, -1)``."""
    if isinstance(site, QuantLinear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(site, QuantConv1d):
        return x.transpose(1, 2).reshape(-1, x.shape[1])
    cols = F.unfold(x, site.kernel_size, site.dilation, site.padding, site.stride)  # B, C*kh*kw, L
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _out_rows(site: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if isinstance(site, QuantLinear):
        return out.reshape(-1, out.shape[-1])
    return out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1])


class _Recorder:
    """Capture callback: keeps a seeded sample of each site's input rows (or matmul slices) and, through a tensor
    hook, the output gradient at the same rows; also tracks each input's min and max over all data."""

    def __init__(self, rows_per_chunk: int, seed: int, keep: set[str], grads: bool) -> None:
        self.rows_per_chunk = rows_per_chunk
        self.generator = torch.Generator().manual_seed(seed)
        self.keep = keep  # sites whose inputs are stored (others: only ranges)
        self.grads = grads
        self.data: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.ranges: dict[str, list[float]] = {}
        self.channel_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _range(self, key: str, t: torch.Tensor) -> None:
        lo, hi = float(t.detach().min()), float(t.detach().max())
        r = self.ranges.setdefault(key, [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    def _channel_range(self, key: str, rows: torch.Tensor) -> None:
        # Per-channel extremes over every row, not the sample: RORQ groups retain outliers, so a rare extreme
        # must widen its group's grid rather than be clipped.
        lo, hi = rows.amin(0), rows.amax(0)
        if key in self.channel_ranges:
            old_lo, old_hi = self.channel_ranges[key]
            lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
        self.channel_ranges[key] = (lo, hi)

    def _sample(self, n: int, budget: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)[: max(1, budget)]

    def __call__(self, site: nn.Module, x, out: torch.Tensor) -> torch.Tensor:
        name = site.info.name
        if isinstance(site, QuantMatMul):
            a, b = x
            self._range(name + ":a", a)
            self._range(name + ":b", b)
            if name not in self.keep:
                return out
            idx = self._sample(a.shape[0], self.rows_per_chunk // a.shape[1]).to(a.device)
            store = self.data.setdefault(name, {})
            store.setdefault("a", []).append(a.detach()[idx])
            store.setdefault("b", []).append(b.detach()[idx])
            view = lambda g: g[idx]
        else:
            self._range(name, x)
            if isinstance(site.input_quantizer, GroupQuantizer):
                self._channel_range(name, _rows(site, x.detach()))
            if name not in self.keep:
                return out
            rows = _rows(site, x.detach())
            idx = self._sample(rows.shape[0], self.rows_per_chunk).to(rows.device)
            store = self.data.setdefault(name, {})
            store.setdefault("x", []).append(rows[idx])
            view = lambda g: _out_rows(site, g)[idx]
        if self.grads:
            if not out.requires_grad:
                out = out.detach().requires_grad_()
            out.register_hook(lambda g: store.setdefault("grad", []).append(view(g).detach()))
        return out

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.data.get(name, {}).items()}


def _run(model, batch, chunk, device, recorder, sites, reference=None) -> None:
    """Forward (and, with gradients, backward of the KL to ``reference`` logits) over the calibration pairs."""
    for s in sites:
        s.capture = recorder
    try:
        for i, (images, ids, mask) in enumerate(batch.chunks(chunk, device, _dtype(model))):
            if recorder.grads:
                logits = model(images, ids, mask)
                target = reference[i * chunk : i * chunk + images.shape[0]]
                # KL(p_float || p_quant) over the class axis, averaged over pixels.
                kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target, 1), log_target=True, reduction="none")
                (kl.sum(1).mean() * images.shape[0] / len(batch)).backward()
            else:
                with torch.no_grad():
                    model(images, ids, mask)
    finally:
        for s in sites:
            s.capture = None


# ---------------------------------------------------------------------------------------------------- init
def _needs_data(q) -> bool:
    return isinstance(q, (DrqSoftmaxQuantizer, TierQuantizer, GroupQuantizer))


@torch.no_grad()
def _init_weights(site: nn.Module, recipe: Recipe) -> None:
    if isinstance(site, QuantMatMul):
        return
    w = site.weight.reshape(site.weight.shape[0], -1)
    q = site.weight_quantizer
    q.set_qparams(_weight_delta0(w, q, recipe.weight_granularity == "per_channel", _weight_blocks(site)))


def _weight_blocks(site: nn.Module) -> int:
    """Fused q/k/v Linears get one scale per block with per-tensor weights (PTQ4ViT); the layer roles say which."""
    return site.info.weight_blocks


def _init_activations(model, sites, recipe, batch, chunk, device) -> dict[str, list[float]]:
    keep = {
        s.info.name
        for s in sites
        if recipe.act_init == "percentile" or any(_needs_data(q) for q in quantizers_of(s).values())
    }
    # More rows than the search keeps: tier thresholds and percentiles are tail statistics.
    rows = math.ceil(4 * recipe.max_rows / math.ceil(len(batch) / chunk))
    recorder = _Recorder(rows, recipe.seed, keep, grads=False)
    _run(model, batch, chunk, device, recorder, sites)
    for site in sites:
        name = site.info.name
        data = recorder.tensors(name)
        with torch.no_grad():
            if isinstance(site, QuantMatMul):
                a_lo, a_hi = recorder.ranges[name + ":a"]
                b_lo, b_hi = recorder.ranges[name + ":b"]
                init_activation(site.a_quantizer, data.get("a", torch.zeros(1)), a_lo, a_hi, recipe)
                init_activation(site.b_quantizer, data.get("b", torch.zeros(1)), b_lo, b_hi, recipe)
            else:
                lo, hi = recorder.ranges[name]
                x = sample = data.get("x", torch.zeros(1, site.weight.shape[1]))
                if name in recorder.channel_ranges:
                    # The two rows of per-channel extremes give each group the min-max of all data.
                    x = torch.stack(recorder.channel_ranges[name])
                # Recorded rows put channels last; a GroupQuantizer's own axis applies to the model's tensors.
                init_activation(site.input_quantizer, x, lo, hi, recipe, axis=-1, sample=sample)
    return recorder.ranges


# ---------------------------------------------------------------------------------------------------- search
def _blocks(sites, recipe: Recipe) -> list[list[nn.Module]]:
    if recipe.refresh == "layer":
        return [[s] for s in sites]
    groups: dict[str, list[nn.Module]] = {}
    for s in sites:
        groups.setdefault(s.info.block, []).append(s)
    return list(groups.values())


def _set_enabled(site: nn.Module, on: bool) -> None:
    for q in quantizers_of(site).values():
        q.enabled = on


def _search_block(block, recorder: _Recorder, ranges, recipe: Recipe) -> None:
    for site in block:
        name = site.info.name
        data = recorder.tensors(name)
        grad = data.get("grad")
        site_recipe = recipe
        if recipe.search == "hessian" and grad is None:
            # The output never reaches the mask (LAVT's last language gate feeds nothing): no gradient to weigh
            # by, so the layer output's MSE decides.
            site_recipe = dataclasses.replace(recipe, search="mse")
        with torch.no_grad():
            if isinstance(site, QuantMatMul):
                if recipe.search != "none":
                    cap = MatMulCapture(data["a"], data["b"], grad, *ranges[name + ":a"], *ranges[name + ":b"])
                    search_matmul(cap, site.a_quantizer, site.b_quantizer, site_recipe)
            else:
                x = data["x"]
                w = site.weight.reshape(site.weight.shape[0], -1)
                cap = LinearCapture(x, grad, w, site.bias, *ranges[name])
                if recipe.search != "none":
                    if isinstance(site.input_quantizer, TierQuantizer):
                        init_activation(site.input_quantizer, x, *ranges[name], recipe, axis=-1)
                    elif isinstance(site.input_quantizer, GroupQuantizer):
                        extremes = torch.stack(recorder.channel_ranges[name])
                        init_activation(site.input_quantizer, extremes, *ranges[name], recipe, axis=-1, sample=x)
                    search_linear(cap, site.input_quantizer, site.weight_quantizer, site_recipe, _weight_blocks(site))
                _round_weights(site, _drop_dead_rows(cap).x, recipe)
        _set_enabled(site, True)


def _round_weights(site: nn.Module, x: torch.Tensor, recipe: Recipe) -> None:
    """GPTQ rounding and bias correction of one Linear/Conv on its grids, from its captured input rows ``x`` (rows
    that reach no output were dropped): the weights become grid values, the bias absorbs the mean output error."""
    q = site.weight_quantizer
    rounding = recipe.rounding_at(q.bits)
    if rounding == "nearest" and not recipe.bias_correction:
        return
    xq = _fq_rows(site.input_quantizer, x)
    w = site.weight.reshape(site.weight.shape[0], -1)
    if rounding == "gptq":
        per_row = recipe.weight_granularity == "per_channel"
        rounded, scale = gptq_round(w, q.scale.reshape(-1), q.qmin, q.qmax, xq, per_row=per_row)
    else:
        rounded, scale = _fq_weight_rows(q, w), None
    if recipe.bias_correction and site.bias is not None:
        site.bias.add_(bias_correction(w, rounded, x, xq))
    if scale is not None:
        site.weight.copy_(rounded.reshape(site.weight.shape))
        q.set_qparams(scale)


def calibrate(
    model: nn.Module,
    recipe: Recipe,
    batch: CalibrationBatch,
    chunk_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, CalibrationReport]:
    """A fake-quantized copy of ``model`` calibrated by ``recipe`` on ``batch``.

    Args:
        chunk_size: calibration pairs per forward/backward (lower it for big models on small memory).
        device: where calibration runs; the result stays there.
        dtype: what calibration computes in (default :data:`CALIBRATION_DTYPE`, float32; :data:`REPRODUCIBLE_DTYPE`,
            float64, gives the same qparams on every machine at several times the time); the result is returned in
            the model's own dtype.
    """
    device = resolve_device(device)
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = copy.deepcopy(model).eval().to(device)
    model.requires_grad_(False)
    own_dtype = _dtype(model)
    fold_batch_norms(model)  # in the model's own dtype, as deployment folds them
    compute = dtype or CALIBRATION_DTYPE
    if compute == torch.float64 and torch.device(device).type == "mps":
        logger.warning("MPS has no float64: calibrating in float32, so the qparams may differ between machines")
        compute = torch.float32
    model.to(compute)
    report = CalibrationReport(recipe)
    report.folded = _fold_channel_orders(model, recipe, batch, chunk_size, device)
    sites = place_quantizers(model, recipe)
    report.sites = len(sites)
    for s in sites:
        _set_enabled(s, False)
        _init_weights(s, recipe)
    ranges = _init_activations(model, sites, recipe, batch, chunk_size, device)
    rounds_weights = recipe.rounding_at(recipe.min_weight_bits) != "nearest" or recipe.bias_correction
    if recipe.search == "none" and not rounds_weights:
        for s in sites:
            _set_enabled(s, True)
    else:
        with torch.no_grad():
            reference = torch.cat([model(*c) for c in batch.chunks(chunk_size, device, _dtype(model))])
        for s in sites:
            _set_enabled(s, True)
        blocks = _blocks(sites, recipe)
        report.blocks = len(blocks)
        n_chunks = math.ceil(len(batch) / chunk_size)
        with progress_bar(
            progress, total=len(blocks), desc=f"calibrate {recipe.method} {recipe.bits}", unit="block"
        ) as bar:
            for block in blocks:
                for s in block:
                    _set_enabled(s, False)
                recorder = _Recorder(
                    math.ceil(recipe.max_rows / n_chunks),
                    recipe.seed,
                    {s.info.name for s in block},
                    grads=recipe.search == "hessian",
                )
                _run(model, batch, chunk_size, device, recorder, block, reference)
                _search_block(block, recorder, ranges, recipe)
                bar.update(1)
    model.to(own_dtype).eval()
    report.seconds = time.perf_counter() - start
    return model, report
