"""Vectorised scale search for one layer (PTQ4ViT's Hessian-guided search, done as PTQ4RIS intends).

Given a layer's captured inputs X, its float output O = f(X) and the gradient G = ∂L/∂O of the task loss (KL over
the class axis between the float and the quantized model's mask logits, taken through the partially quantized
model), each candidate grid is scored by ``mean((G ⊙ (O − Ô))²)`` — the diagonal Fisher approximation of the loss
increase. All candidates of one quantizer are evaluated in a few batched matmuls (chunks of ``K`` candidates stacked
on a leading axis) instead of one forward each. Weight grids are searched per output channel at no extra cost: with
the input grid fixed, the objective is a sum of independent per-channel terms.

Every discrete choice is made so that float noise cannot flip it (:mod:`.primitives.stable`): losses are accumulated
in float64, the best candidate must beat the incumbent by more than ``LOSS_RTOL`` (relative; ties go to the smaller
α), the screening keeps its candidates by rounded loss with an index tie-break, the α grid is computed in float64,
and the data ranges that scale the grids are snapped to ``STAT_BITS`` significant bits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .primitives.rorq import calibrate_tiers
from .primitives.stable import LOSS_RTOL, snap, snap_range, stable_argmin, stable_smallest
from .primitives.uniform import UniformSpec, minmax_qparams
from .quantizers import (
    DrqGeluQuantizer,
    DrqSoftmaxQuantizer,
    FakeQuantizer,
    GroupQuantizer,
    TierQuantizer,
    UniformQuantizer,
)

__all__ = ["LOSS_RTOL", "LinearCapture", "MatMulCapture", "init_activation", "search_linear", "search_matmul"]

_CHUNK_BYTES = 1 << 27  # one candidate chunk's largest tensor (128 MB: 2^25 float32 or 2^24 float64 elements)


@dataclass
class LinearCapture:
    """A Linear/Conv site as a matmul over rows: ``out = x @ weight.T + bias``.

    x: (R, K_in) inputs (im2col rows for convs), grad: (R, C_out) ∂L/∂out at the same rows (None for MSE/cosine),
    weight: (C_out, K_in) float, bias: (C_out,) or None, lo/hi: the input range seen over all calibration data.
    """

    x: torch.Tensor
    grad: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    lo: float
    hi: float


@dataclass
class MatMulCapture:
    """An attention matmul ``out = a @ b`` over S sampled (batch·heads) slices: a (S, N, d), b (S, d, M),
    grad (S, N, M); a_lo/a_hi/b_lo/b_hi: operand ranges over all calibration data."""

    a: torch.Tensor
    b: torch.Tensor
    grad: torch.Tensor | None
    a_lo: float
    a_hi: float
    b_lo: float
    b_hi: float


def _objective(kind: str, ref: torch.Tensor, cand: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Per-candidate, per-output-channel loss, float64: (K, C_out) from ``cand`` (K, ..., C_out, consumed) and
    ``ref`` (..., C_out). Cosine is per row, not per channel: it returns (K, 1).

    Squares and sums are float64 whatever the calibration dtype (a float32 value squares exactly in float64), so that
    a loss does not depend on the machine's summation order (SIMD width, threads) beyond ~1e-16 relative."""
    if kind == "cosine":
        c64 = cand.to(torch.float64)
        cos = torch.nn.functional.cosine_similarity(c64, ref.to(torch.float64).expand_as(c64), dim=-1)
        return -cos.flatten(1).mean(1, keepdim=True)
    if kind not in ("hessian", "mse"):
        raise ValueError(f"unknown objective {kind!r}")
    # In place: these (K, rows, C) tensors are the largest of the search, and memory traffic is its cost.
    diff = cand.sub_(ref)
    if kind == "hessian":
        if grad is None:
            raise ValueError("the Hessian objective needs gradients")
        diff.mul_(grad)
    flat = diff.flatten(1, -2)
    return flat.to(torch.float64).square_().sum(1) / max(flat.shape[1], 1)


def _chunks(total: int, per_candidate_elements: int, element_size: int = 4):
    size = max(1, _CHUNK_BYTES // max(per_candidate_elements * element_size, 1))
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _evaluate(n: int, loss_fn, n_rows: int, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``n`` candidates. ``loss_fn(indices, rows)`` gives (len(indices), C) losses on a row slice. With many
    rows, all candidates are first screened on ``screen_rows`` rows (a random subset: rows were sampled at random)
    and the ``refine`` best are scored again on every row (kept by rounded loss, ties by index: see
    :func:`.primitives.stable.stable_smallest`). Returns (ascending indices scored on every row, their losses)."""
    everything = torch.arange(n)
    if n_rows > recipe.screen_rows and n > recipe.refine:
        screen = loss_fn(everything, slice(0, recipe.screen_rows)).sum(1)
        top = stable_smallest(screen, recipe.refine)
        return top, loss_fn(top, slice(None))
    return everything, loss_fn(everything, slice(None))


def _alphas(n: int, lo: float, hi: float, device) -> torch.Tensor:
    """The α grid in float64, each value computed by Python's IEEE arithmetic (no vectorised kernel whose rounding
    could depend on the CPU); grids derived from it are rounded to float32 once, at the end."""
    return torch.tensor([lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)], dtype=torch.float64, device=device)


def _uniform_candidates(q: UniformQuantizer, lo: float, hi: float, alphas: torch.Tensor):
    """(scales, zero points) of the activation grids for every α, shaped (K,): magnitudes clipped at α·max|x|
    (symmetric: Δ = α·Δ0; asymmetric: the grid spans [lo, hi] ∩ [−α·max|x|, α·max|x|], so a one-sided outlier
    does not drag the other side of the grid with it). The range is snapped outward to ``STAT_BITS`` significant
    bits and the grids computed in float64 (``alphas``), then rounded to float32: float noise in the observed range
    leaves the candidates unchanged."""
    lo, hi = snap_range(lo, hi)
    amax = max(abs(lo), abs(hi), 1e-8)
    alphas = alphas.to(torch.float64)
    if q.symmetric:
        return (alphas * amax / (q.qmax + 0.5)).float(), torch.zeros_like(alphas, dtype=torch.float32)
    lo_k = torch.clamp(-alphas * amax, min=min(lo, 0.0))
    hi_k = torch.clamp(alphas * amax, max=max(hi, 0.0))
    scales = ((hi_k - lo_k) / (q.qmax - q.qmin)).clamp(min=1e-8).float()
    zps = torch.clamp(torch.round(q.qmin - lo_k / scales.double()), q.qmin, q.qmax).float()
    return scales, zps


def _quantize_stack(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize ``x`` once per candidate: scale/zp (K,) → (K, *x.shape)."""
    shape = (-1,) + (1,) * x.dim()
    s, z = scale.reshape(shape), zp.reshape(shape)
    t = x / s
    return t.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def _act_candidates(q: FakeQuantizer, x: torch.Tensor, lo: float, hi: float, recipe) -> tuple[list, callable]:
    """Candidates of an activation quantizer and a function that fake-quantizes ``x`` for a slice of them."""
    alphas = _alphas(recipe.candidates, recipe.alpha_min, recipe.alpha_max, x.device)
    if isinstance(q, UniformQuantizer):
        scales, zps = _uniform_candidates(q, lo, hi, alphas)

        def apply(idx, rows=slice(None)):
            return _quantize_stack(x[rows], scales[idx], zps[idx], q.qmin, q.qmax)

        def commit(i):
            q.set_qparams(scales[i], zps[i])

        return len(scales), apply, commit
    if isinstance(q, DrqSoftmaxQuantizer):
        ms = torch.arange(20, device=x.device)

        def apply(idx, rows=slice(None)):
            return q.fake_quant(x[rows].unsqueeze(0), ms[idx].reshape((-1,) + (1,) * x.dim()))

        def commit(i):
            q.split_exponent.fill_(int(ms[i]))

        return len(ms), apply, commit
    if isinstance(q, DrqGeluQuantizer):
        delta0 = _gelu_delta0(q, hi)
        if recipe.gelu_pow2:
            k_lo = math.floor(math.log2(recipe.alpha_min * delta0 / q.delta_neg))
            k_hi = math.ceil(math.log2(recipe.alpha_max * delta0 / q.delta_neg))
            steps = torch.tensor([q.delta_neg * 2.0**k for k in range(k_lo, k_hi + 1)], device=x.device)
        else:
            steps = (alphas * delta0).float()

        def apply(idx, rows=slice(None)):
            return q.fake_quant(x[rows].unsqueeze(0), steps[idx].reshape((-1,) + (1,) * x.dim()))

        def commit(i):
            q.delta_pos.fill_(float(steps[i]))

        return len(steps), apply, commit
    raise TypeError(f"{type(q).__name__} has no searched parameters")


def _gelu_delta0(q: DrqGeluQuantizer, hi: float) -> float:
    """PTQ4ViT's Δ0 of the positive region from the (snapped) maximum of the data."""
    return snap(max(hi, 1e-8), mode="out") / (q.levels + 0.5)


def init_activation(
    q: FakeQuantizer, x: torch.Tensor, lo: float, hi: float, recipe, axis: int = -1, sample: torch.Tensor | None = None
) -> None:
    """First parameters of an activation quantizer from calibration data (min-max or percentile ranges, DRQ
    defaults, RORQ tiers/groups from ``x``). For channel groups ``x`` may be the per-channel extremes over all data;
    their magnitude tiers, a tail statistic, are then found on the rows ``sample``."""
    if isinstance(q, UniformQuantizer):
        if recipe.act_init == "percentile":
            flat = x.flatten().float()
            if flat.numel() > 1 << 24:
                flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
            p = recipe.percentile / 100
            lo, hi = float(torch.quantile(flat, 1 - p)), float(torch.quantile(flat, p))  # snapped by the grids
        scales, zps = _uniform_candidates(q, lo, hi, torch.ones(1, device=x.device))
        q.set_qparams(scales[0], zps[0])
    elif isinstance(q, DrqSoftmaxQuantizer):
        ms = torch.arange(20, device=x.device)
        x64 = x.double()
        errs = torch.stack([(q.fake_quant(x, m).double() - x64).square().mean() for m in ms])
        q.split_exponent.fill_(int(stable_argmin(errs)))
    elif isinstance(q, DrqGeluQuantizer):
        q.delta_pos.fill_(_gelu_delta0(q, hi))
    elif isinstance(q, TierQuantizer):
        tiers = calibrate_tiers(x, q.bits)
        q.set_tiers(tiers.thresholds, tiers.grids)
    elif isinstance(q, GroupQuantizer):
        # Channels were put in range order beforehand (a folded permutation): groups are contiguous blocks.
        rows = x.movedim(axis, -1).reshape(-1, q.channels)
        if q.max_tiers > 1:
            q.set_thresholds(calibrate_tiers(rows if sample is None else sample, q.bits, q.max_tiers).thresholds)
        lo, hi = snap_range(min(lo, float(rows.min())), max(hi, float(rows.max())))
        # Each slice starts at the first channel (range order) that passes its threshold: a narrow GEMM once deployed.
        # Extremes and thresholds are both snapped (STAT_BITS), so a channel at the threshold decides the same way
        # under float noise.
        extreme = snap(rows.abs().amax(0), mode="out")
        for i, t_i in enumerate(q.thresholds.tolist()):
            passing = torch.nonzero(extreme > t_i).flatten()
            q.slice_start[i] = int(passing[0]) if len(passing) else q.channels - 1
        bulk, *_ = q.split(rows, -1)
        size = q.channels // q.groups
        blocks = bulk.reshape(-1, q.groups, size).transpose(0, 1).reshape(q.groups, -1)
        block_lo, block_hi = snap(blocks.amin(1), mode="out"), snap(blocks.amax(1), mode="out")
        for buffer, value in zip((q.scale, q.zero_point), _asymmetric_grids(block_lo, block_hi, q)):
            buffer.copy_(value)
        # A slice's extremes are those of the whole input, clamped between its two thresholds.
        t = [*q.thresholds.tolist(), float("inf")]
        s_lo = q.slice_scale.new_tensor([min(0.0, max(lo, -t[i + 1]) + t[i]) for i in range(len(t) - 1)])
        s_hi = q.slice_scale.new_tensor([max(0.0, min(hi, t[i + 1]) - t[i]) for i in range(len(t) - 1)])
        for buffer, value in zip((q.slice_scale, q.slice_zero_point), _asymmetric_grids(s_lo, s_hi, q)):
            buffer.copy_(value)
    else:
        raise TypeError(f"cannot initialise {type(q).__name__}")


def _asymmetric_grids(lo: torch.Tensor, hi: torch.Tensor, q: GroupQuantizer):
    """(scale, zero point) of ``q``'s min-max grids, one per entry of [lo, hi]."""
    if not len(lo):
        return lo, lo
    scale, zero_point = minmax_qparams(torch.stack([lo, hi], 1), UniformSpec(q.bits, symmetric=False, axis=0))
    return scale.flatten(), zero_point.flatten()


def _weight_delta0(w: torch.Tensor, q: UniformQuantizer, per_channel: bool, blocks: int) -> torch.Tensor:
    """Δ0 per output channel (C_out,): max|W| over the channel, its block (fused q/k/v), or the tensor."""
    amax = w.abs().flatten(1).amax(1)
    if not per_channel:
        amax = amax.reshape(blocks, -1).amax(1, keepdim=True).expand(blocks, amax.numel() // blocks).reshape(-1)
    return amax.clamp(min=1e-8) / (q.qmax + 0.5)


def _fq_weight_stack(w: torch.Tensor, scales: torch.Tensor, q: UniformQuantizer) -> torch.Tensor:
    """w (C_out, K_in), scales (K, C_out) → (K, C_out, K_in)."""
    s = scales.unsqueeze(-1)
    return (w / s).round_().clamp_(q.qmin, q.qmax).mul_(s)  # in place: (K, C_out, K_in) is large


def search_weight(
    cap: LinearCapture, xq: torch.Tensor, ref: torch.Tensor, q: UniformQuantizer, recipe, blocks: int = 1
) -> None:
    """Per-channel (or per-tensor/per-block) α for the weight grid, with the input grid fixed (``xq``)."""
    per_channel = recipe.weight_granularity == "per_channel"
    w = cap.weight
    alphas = _alphas(recipe.candidates, recipe.alpha_min, recipe.alpha_max, w.device)
    delta0 = _weight_delta0(w, q, per_channel, blocks).double()

    def scales(idx):  # (len(idx), C_out) float32 candidate scales
        return (alphas[idx, None] * delta0).float()

    def loss_fn(indices, rows):
        x, r, g = xq[rows], ref[rows], None if cap.grad is None else cap.grad[rows]
        out = []
        for sl in _chunks(len(indices), r.numel(), r.element_size()):
            wk = _fq_weight_stack(w, scales(indices[sl]), q)
            o = torch.matmul(x, wk.transpose(1, 2))
            if cap.bias is not None:
                o += cap.bias
            out.append(_objective(recipe.search, r, o, g))
        return torch.cat(out)

    indices, loss = _evaluate(len(alphas), loss_fn, xq.shape[0], recipe)  # loss: k, C_out (or k, 1 for cosine)
    # Candidates (ascending α) replace the incumbent only when better by more than LOSS_RTOL: see .primitives.stable.
    if loss.shape[1] == 1:
        best = stable_argmin(loss[:, 0]).expand(w.shape[0])
    elif per_channel:
        best = stable_argmin(loss)
    else:
        block_loss = loss.reshape(loss.shape[0], blocks, -1).sum(-1)  # k, blocks (float64)
        best = stable_argmin(block_loss).repeat_interleave(w.shape[0] // blocks)
    chosen = alphas[indices[best]] * delta0  # the same float64 product, rounded once, as the scored candidate
    q.set_qparams(chosen.float().reshape(-1))


def search_input(cap: LinearCapture, wq: torch.Tensor, ref: torch.Tensor, q: FakeQuantizer, recipe) -> None:
    """The input grid (uniform α, DRQ split or positive step), with the weight grid fixed (``wq``)."""
    n, apply, commit = _act_candidates(q, cap.x, cap.lo, cap.hi, recipe)

    def loss_fn(indices, rows):
        r, g = ref[rows], None if cap.grad is None else cap.grad[rows]
        out = []
        for sl in _chunks(len(indices), max(cap.x[rows].numel(), r.numel()), r.element_size()):
            o = torch.matmul(apply(indices[sl], rows), wq.T)
            if cap.bias is not None:
                o += cap.bias
            out.append(_objective(recipe.search, r, o, g).sum(1, keepdim=True))
        return torch.cat(out)

    indices, loss = _evaluate(n, loss_fn, cap.x.shape[0], recipe)
    commit(int(indices[stable_argmin(loss[:, 0])]))


def _state(*quantizers: FakeQuantizer) -> list[torch.Tensor]:
    return [b.clone() for q in quantizers for b in q.buffers()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def search_linear(cap: LinearCapture, input_q: FakeQuantizer, weight_q: UniformQuantizer, recipe, blocks: int = 1):
    """Alternating weight / input rounds for one Linear or Conv (RORQ inputs are min-max per tier or group and are
    not searched). Stops early at a fixed point: a round that changes nothing would repeat itself."""
    cap = _drop_dead_rows(cap)
    ref = cap.x @ cap.weight.T
    if cap.bias is not None:
        ref = ref + cap.bias
    searched_input = isinstance(input_q, (UniformQuantizer, DrqSoftmaxQuantizer, DrqGeluQuantizer))
    for _ in range(recipe.rounds):
        before = _state(input_q, weight_q)
        search_weight(cap, _fq_rows(input_q, cap.x), ref, weight_q, recipe, blocks)
        if not searched_input:
            break
        search_input(cap, _fq_weight_rows(weight_q, cap.weight), ref, input_q, recipe)
        if _same(before, _state(input_q, weight_q)):
            break


def _drop_dead_rows(cap: LinearCapture) -> LinearCapture:
    """Rows whose output gradient is exactly zero (padding tokens masked out downstream) weigh nothing in the
    Hessian objective: drop them instead of computing them 100 times."""
    if cap.grad is None:
        return cap
    alive = cap.grad.abs().amax(1) > 0
    if bool(alive.all()) or not bool(alive.any()):
        return cap
    return LinearCapture(cap.x[alive], cap.grad[alive], cap.weight, cap.bias, cap.lo, cap.hi)


def _fq_weight_rows(q: UniformQuantizer, w: torch.Tensor) -> torch.Tensor:
    s = q.scale.reshape(-1, 1)
    return torch.clamp(torch.round(w / s), q.qmin, q.qmax) * s


def _fq_rows(q: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
    if isinstance(q, GroupQuantizer):
        return q.fake_quant(x, axis=-1)
    return q.fake_quant(x)


def search_matmul(cap: MatMulCapture, a_q: FakeQuantizer, b_q: FakeQuantizer, recipe) -> None:
    """Alternating rounds over the two operands of an attention matmul (one grid each, per tensor)."""
    if cap.grad is not None:
        alive = cap.grad.flatten(1).abs().amax(1) > 0
        if bool(alive.any()) and not bool(alive.all()):
            cap = MatMulCapture(cap.a[alive], cap.b[alive], cap.grad[alive], cap.a_lo, cap.a_hi, cap.b_lo, cap.b_hi)
    ref = torch.matmul(cap.a, cap.b)
    grad = cap.grad
    rows = cap.a.shape[0]
    screen = max(1, recipe.screen_rows // cap.a.shape[1])  # slices of N rows each

    def scored(q, x, other, left: bool, lo, hi):
        n, apply, commit = _act_candidates(q, x, lo, hi, recipe)

        def loss_fn(indices, sl_rows):
            r, g, o = ref[sl_rows], None if grad is None else grad[sl_rows], other[sl_rows]
            out = []
            for sl in _chunks(len(indices), max(x[sl_rows].numel(), r.numel()), r.element_size()):
                xs = apply(indices[sl], sl_rows)
                prod = torch.matmul(xs, o) if left else torch.matmul(o, xs)
                out.append(_objective(recipe.search, r, prod, g).sum(1, keepdim=True))
            return torch.cat(out)

        screened = dataclasses.replace(recipe, screen_rows=screen)
        indices, loss = _evaluate(n, loss_fn, rows, screened)
        commit(int(indices[stable_argmin(loss[:, 0])]))

    for _ in range(recipe.rounds):
        before = _state(a_q, b_q)
        scored(a_q, cap.a, b_q.fake_quant(cap.b), True, cap.a_lo, cap.a_hi)
        scored(b_q, cap.b, a_q.fake_quant(cap.a), False, cap.b_lo, cap.b_hi)
        if _same(before, _state(a_q, b_q)):
            break
