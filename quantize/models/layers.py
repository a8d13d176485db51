"""Export-friendly building blocks shared by the Swin, PWAM and BERT modules.

Each one computes the same function as its textbook PyTorch form (tests hold them within 1e-5) but in ops that the
mobile backends take as they are:

- XNNPACK does not delegate ``native_layer_norm`` nor a mean over the last dim of a 3-D tensor, but does delegate a
  4-D mean over the last two dims; so LayerNorm and InstanceNorm are written as 4-D means, rsqrt and mul.
- ``torch.roll`` is not delegated and breaks Core ML's default decompositions: a cyclic shift is two slices + cat.
- Core ML rejects rank-6 tensors next to quantize/dequantize ops: window partitioning stays at rank <= 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchedAttention",
    "InstanceNorm1d",
    "LayerNorm",
    "MatMul",
    "batched_attention",
    "cyclic_shift",
    "window_partition",
    "window_reverse",
]


def _normalize_last_dim(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dim, computed on a 4-D view."""
    shape = x.shape
    x4 = x.reshape(1, -1, 1, shape[-1])
    mean = x4.mean(dim=(-2, -1), keepdim=True)
    centered = x4 - mean
    var = (centered * centered).mean(dim=(-2, -1), keepdim=True)
    return (centered * torch.rsqrt(var + eps)).reshape(shape)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, with the same parameters, written as delegable 4-D means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm supports one normalised dim, got {tuple(self.normalized_shape)}")
        y = _normalize_last_dim(x, self.eps)
        if self.elementwise_affine:
            y = y * self.weight
            if self.bias is not None:
                y = y + self.bias
        return y


class InstanceNorm1d(nn.InstanceNorm1d):
    """Affine-free ``nn.InstanceNorm1d`` on (B, C, L): normalises each channel over L, as 4-D means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.affine or self.track_running_stats:
            raise ValueError("this InstanceNorm1d implements the affine-free, statistics-free form only")
        return _normalize_last_dim(x, self.eps)


def cyclic_shift(x: torch.Tensor, shift: int, dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """``torch.roll(x, (shift, shift), dims)`` as slices + cat."""
    for dim in dims:
        size = x.shape[dim]
        s = shift % size
        if s:
            x = torch.cat([x.narrow(dim, size - s, s), x.narrow(dim, 0, size - s)], dim=dim)
    return x


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C), windows in row-major order, never above rank 5."""
    B, H, W, C = x.shape
    x = x.reshape(B * H // window_size, window_size, W // window_size, window_size, C)
    x = x.permute(0, 2, 1, 3, 4)  # B*H/ws, W/ws, ws, ws, C
    return x.reshape(-1, window_size * window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, W // window_size, window_size, window_size, C)  # B*H/ws, W/ws, ws, ws, C
    x = x.permute(0, 2, 1, 3, 4)
    return x.reshape(-1, H, W, C)


def batched_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    batch: int = 1,
    qk: nn.Module | None = None,
    pv: nn.Module | None = None,
) -> torch.Tensor:
    """softmax(q @ kᵀ + bias) @ v with 3-D ``bmm`` (XNNPACK has no 4-D broadcast matmul).

    The bias is added with the scores viewed as (batch, rows, M), so a bias shared by heads or windows broadcasts
    without an ``expand`` (which would not be delegated).

    Args:
        q: (batch*G, N, d), already scaled; G is heads, or windows x heads.
        k: (batch*G, M, d).
        v: (batch*G, M, dv).
        bias: additive, broadcastable to (batch, G*N, M): e.g. (batch, 1, M) for a padding mask, or (G*N, M).
        batch: leading size of the bias view.
        qk, pv: modules computing the two batched matmuls (default ``torch.bmm``).
    Returns:
        (batch*G, N, dv).
    """
    BG, N, M = q.shape[0], q.shape[1], k.shape[1]
    attn = (qk or torch.bmm)(q, k.transpose(1, 2))
    if bias is not None:
        attn = (attn.reshape(batch, -1, M) + bias).reshape(BG, N, M)
    attn = F.softmax(attn, dim=-1)
    return (pv or torch.bmm)(attn, v)


class MatMul(nn.Module):
    """``torch.bmm`` as a named module, so that quantizers can be attached to the attention matmuls of a model."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)


class BatchedAttention(nn.Module):
    """:func:`batched_attention` with its two matmuls as submodules ``qk`` (q @ kᵀ) and ``pv`` (probs @ v).

    Parameter-free: adding it to a module leaves the state dict unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.qk = MatMul()
        self.pv = MatMul()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, batch: int = 1
    ) -> torch.Tensor:
        return batched_attention(q, k, v, bias, batch, qk=self.qk, pv=self.pv)
