"""LAVT's pixel-word attention module (PWAM) and its language gate.

From "LAVT: Language-Aware Vision Transformer for Referring Image Segmentation" (Yang et al., CVPR 2022), official
code github ``yz93/LAVT-RIS`` (MIT). Attribute names equal the official ones (``vis_project``, ``image_lang_att``,
``f_key``/``f_query``/``f_value``/``W``, ``project_mm``, ``res_gate``) so checkpoints load strictly; the
``nn.Sequential`` indices (``.0`` conv, ``.1`` norm or GELU) are part of those names.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import BatchedAttention, InstanceNorm1d

__all__ = ["PWAM", "LanguageGate", "SpatialImageLanguageAttention"]


class SpatialImageLanguageAttention(nn.Module):
    """Every pixel attends over the words: softmax(q·kᵀ / sqrt(C) + word mask) @ v, then a 1x1 conv + InstanceNorm."""

    def __init__(
        self,
        v_in_channels: int,
        l_in_channels: int,
        key_channels: int,
        value_channels: int,
        out_channels: int | None = None,
        num_heads: int = 1,
        mask_value: float = 1e4,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        out_channels = out_channels or value_channels
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(
                f"key ({key_channels}) and value ({value_channels}) channels must be multiples of num_heads ({num_heads})"
            )
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        self.mask_value = mask_value
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, kernel_size=1, stride=1))
        self.f_query = nn.Sequential(
            nn.Conv1d(v_in_channels, key_channels, kernel_size=1, stride=1), InstanceNorm1d(key_channels, eps=eps)
        )
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, kernel_size=1, stride=1))
        self.W = nn.Sequential(
            nn.Conv1d(value_channels, out_channels, kernel_size=1, stride=1), InstanceNorm1d(out_channels, eps=eps)
        )
        self.core = BatchedAttention()

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: visual tokens (B, HW, Cv).
            l: word features (B, Cl, N).
            l_mask: 1 on real words, 0 on padding, (B, N, 1) float.
        Returns:
            (B, HW, C_out).
        """
        B, HW = x.shape[0], x.shape[1]
        n_l = l.shape[-1]
        h = self.num_heads
        dk, dv = self.key_channels // h, self.value_channels // h
        l_mask = l_mask.transpose(1, 2)  # B, 1, N
        query = self.f_query(x.transpose(1, 2))  # B, Ck, HW
        key = self.f_key(l) * l_mask  # B, Ck, N
        value = self.f_value(l) * l_mask  # B, Cv, N
        # The scale is folded into q (not applied to q·kᵀ as LAVT writes it): same function, and no scalar constant
        # next to the quantized matmul (coremltools 9.0 dequantizes such scalars in int8 and wraps around).
        query = query.reshape(B * h, dk, HW).transpose(1, 2) * (self.key_channels**-0.5)  # B*h, HW, dk
        key = key.reshape(B * h, dk, n_l).transpose(1, 2)  # B*h, N, dk
        value = value.reshape(B * h, dv, n_l).transpose(1, 2)  # B*h, N, dv
        bias = self.mask_value * l_mask - self.mask_value  # B, 1, N
        out = self.core(query, key, value, bias, batch=B)  # B*h, HW, dv
        out = out.reshape(B, h, HW, dv).permute(0, 1, 3, 2).reshape(B, self.value_channels, HW)
        return self.W(out).transpose(1, 2)  # B, HW, C_out


class PWAM(nn.Module):
    """mm = GELU(conv(vis_GELU(conv x) ⊙ attn(x, words))): the multi-modal feature of one stage."""

    def __init__(
        self,
        dim: int,
        v_in_channels: int,
        l_in_channels: int,
        key_channels: int,
        value_channels: int,
        num_heads: int = 1,
        mask_value: float = 1e4,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        # Index 1 is the GELU; LAVT's Dropout at index 2 has no parameters and p=0 at inference.
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1, 1), nn.GELU())
        self.image_lang_att = SpatialImageLanguageAttention(
            v_in_channels, l_in_channels, key_channels, value_channels, value_channels, num_heads, mask_value, eps
        )
        self.project_mm = nn.Sequential(nn.Conv1d(value_channels, value_channels, 1, 1), nn.GELU())

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        """x (B, HW, C), l (B, Cl, N), l_mask (B, N, 1) -> mm (B, HW, C)."""
        vis = self.vis_project(x.transpose(1, 2))  # B, C, HW
        lang = self.image_lang_att(x, l, l_mask).transpose(1, 2)  # B, C, HW
        return self.project_mm(vis * lang).transpose(1, 2)


class LanguageGate(nn.Sequential):
    """``res_gate``: tanh(W2 · ReLU(W1 · mm)), no biases, zero-initialised so training starts from plain Swin."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh())
        nn.init.zeros_(self[0].weight)
        nn.init.zeros_(self[2].weight)
