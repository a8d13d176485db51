"""Weight rounding beyond round-to-nearest, on a layer's fixed weight grid: GPTQ, and bias correction.

Both run after a layer's grids are chosen (scale search) and change only the float weights and bias, so they fold
exactly into what every backend exports:

- **GPTQ** (Frantar et al., 2023, "OPTQ: Accurate Quantization for Generative Pre-trained Transformers") rounds the
  weight column by column, each time spreading the rounding error over the columns not yet rounded through the
  inverse of H = XᵀX, the second moment of the layer's (quantized) inputs. This minimises ‖W X − Ŵ X‖² far better
  than rounding every weight to its nearest level, at the cost of one Cholesky factorisation per layer: seconds for
  all of lavt-tiny, where AdaRound's gradient descent would take minutes per layer on a CPU. Columns are taken in
  decreasing order of H's diagonal (the paper's ``act_order``): the inputs with most energy are rounded first,
  while the most columns remain to absorb their error. The result lies on the layer's grid (``q · scale``, exactly
  what its fake quantizer computes), so the exported integer weights are the simulated ones. torchao's GPTQ
  (``torchao.prototype.gptq``) computes its own group scales for its int4/int8 tensor subclasses on CUDA only; here
  the grid is the searched per-channel one and H is taken on the quantized inputs the deployed layer sees.
- **Bias correction** (Nagel et al., 2019, empirical form) adds to the bias the mean output error over the
  calibration rows, E[W x] − E[Ŵ Q(x)], which removes the systematic shift that rounding and activation clipping
  leave in each output channel.
"""

from __future__ import annotations

import torch

__all__ = ["bias_correction", "gptq_round"]

# Damping of H's diagonal, as a fraction of its mean: the paper's 1 %. Convolution rows (C·k·k wide) can outnumber
# the sampled rows, which leaves H singular without it.
DAMPING = 0.01
# Columns per lazy-update block (the paper's B = 128): the update of the columns beyond a block is one GEMM.
BLOCK = 128


# Grids GPTQ tries per output channel, besides the searched one: fractions of the channel's min-max step. The scale
# search picks its grid for rounding to nearest, often clipping a channel's largest weights; GPTQ spreads each
# column's error over the others, so a clipped weight's large error would spread too. Each row picks the grid (and
# rounding) with the least output error on the calibration inputs.
MINMAX_FRACTIONS = (1.0, 0.9, 0.8)


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    inputs: torch.Tensor,
    per_row: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (C_out, K) rounded by GPTQ onto symmetric grids ``scale`` · [qmin, qmax], given the layer's
    quantized input rows ``inputs`` (R, K). With ``per_row`` (per-channel weight scales), each row also tries
    :data:`MINMAX_FRACTIONS` of its min-max step and rounding to nearest on ``scale``, and keeps whichever gives the
    least output error ‖(w − ŵ) X‖². Returns the grid weights (C_out, K) and their scales (C_out,), in ``weight``'s
    dtype.

    Computes in float64: H's inverse is ill-conditioned, and every decision is a rounding that float noise must not
    flip."""
    out_dtype, out_device = weight.dtype, weight.device
    if out_device.type == "mps":  # no float64 there: round on the CPU, a few seconds per model
        weight, scale, inputs = weight.cpu(), scale.cpu(), inputs.cpu()
    w = weight.to(torch.float64)
    rows = w.shape[0]
    searched = scale.to(torch.float64).reshape(-1)
    candidates = [searched]
    if per_row:
        step = w.abs().amax(1) / qmax
        step = torch.where(step > 0, step, searched)
        candidates += [step * f for f in MINMAX_FRACTIONS]
    scales = torch.cat(candidates)
    x = inputs.to(torch.float64)
    h = x.T @ x / max(1, x.shape[0])
    rounded = torch.cat([_gptq(w, s, qmin, qmax, h) for s in candidates])
    nearest = torch.clamp(torch.round(w / searched[:, None]), qmin, qmax) * searched[:, None]
    rounded, scales = torch.cat([rounded, nearest]), torch.cat([scales, searched])
    error = rounded - w.repeat(len(candidates) + 1, 1)
    loss = ((error @ h) * error).sum(1).reshape(-1, rows)
    # Ties to the earlier candidate (the searched grid first): float noise cannot swap equal losses' order.
    best = torch.sort(loss, dim=0, stable=True).indices[0]
    pick = best * rows + torch.arange(rows, device=w.device)
    chosen = scales[pick].to(out_dtype)
    # Integers times the scale as stored, as the fake quantizer computes them, so re-quantizing gives them back.
    levels = torch.round(rounded[pick] / scales[pick, None]).to(out_dtype)
    return (levels * chosen[:, None]).to(out_device), chosen.to(out_device)


def _gptq(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, h: torch.Tensor) -> torch.Tensor:
    """GPTQ (the paper's Algorithm 1, lazy batch updates) of ``w`` (C_out, K) on the grids ``scale`` (C_out,), with
    input second moment ``h`` (K, K); returns the rounded weights in float64."""
    h = h.clone()
    w = w.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0  # an input that is always zero: its weights change nothing, round them to nearest
    # Decreasing energy, ties by column index (stable), so equal diagonals cannot swap on float noise.
    order = torch.sort(torch.diagonal(h), descending=True, stable=True).indices
    w, h = w[:, order], h[order][:, order]
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    # The upper Cholesky factor of H⁻¹: row i holds the update of the columns after i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scale[:, None]
    q = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = block[:, i : i + 1]
            rounded = torch.clamp(torch.round(col / s), qmin, qmax) * s
            q[:, start + i : start + i + 1] = rounded
            err = (col - rounded) / hinv[start + i, start + i]
            block[:, i:] -= err * hinv[start + i, start + i : end][None, :]
            errors[:, i : i + 1] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    out = torch.empty_like(q)
    out[:, order] = q
    return out


@torch.no_grad()
def bias_correction(
    weight: torch.Tensor, quantized_weight: torch.Tensor, inputs: torch.Tensor, quantized_inputs: torch.Tensor
) -> torch.Tensor:
    """The per-output-channel mean error E[x Wᵀ] − E[Q(x) Ŵᵀ] over the rows (R, K): add it to the bias."""
    wide = torch.float32 if weight.device.type == "mps" else torch.float64  # MPS has no float64
    mean_x = inputs.to(wide).mean(0)
    mean_q = quantized_inputs.to(wide).mean(0)
    shift = weight.to(wide) @ mean_x - quantized_weight.to(wide) @ mean_q
    return shift.to(weight.dtype)
