"""Multi-modal Swin Transformer, the visual encoder of LAVT (``backbone``).

Swin: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al., ICCV 2021), github
``microsoft/Swin-Transformer`` (MIT); the multi-modal variant with a PWAM and a language gate after every stage is
LAVT's ``MultiModalSwinTransformer`` (github ``yz93/LAVT-RIS``, MIT). Names equal the official state-dict keys.

Differences from the official code, all numerically equivalent (tests hold them within 1e-5): cyclic shifts are
slices + cat instead of ``torch.roll``; q/k/v are last-dim slices, attention runs as 3-D ``bmm``; window partition
stays at rank 5; LayerNorm is the 4-D-mean form of :class:`~quantize.models.layers.LayerNorm`; the shift mask is a
non-persistent buffer built for the configured input size (the official code rebuilds it in every forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LavtConfig, SwinConfig
from .layers import (
    BatchedAttention,
    LayerNorm,
    cyclic_shift,
    window_partition,
    window_reverse,
)
from .pwam import PWAM, LanguageGate

__all__ = ["MultiModalSwinTransformer"]


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws², ws²) int64: index into the (2ws-1)² bias table for every pair of positions inside a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, ws*ws
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # ws², ws², 2
    rel = rel + (window_size - 1)
    return rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> torch.Tensor:
    """(nW, ws², ws²) additive mask, -100 between tokens that the cyclic shift brought from different regions."""
    img = torch.zeros(1, height, width, 1)
    cnt = 0
    for hs in (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None)):
        for ws in (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    windows = window_partition(img, window_size).squeeze(-1)  # nW, ws*ws
    mask = windows[:, None, :] - windows[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent: the official checkpoints store it (int64), so strict loading expects it.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.core = BatchedAttention()

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, ws², ws²)."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: windows (B*nW, N, C), N = ws².
            mask: (nW, N, N) additive shift mask, or None.
        Returns:
            (B*nW, N, C).
        """
        B_, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        qkv = self.qkv(x)  # B_, N, 3C
        q = qkv[..., :C] * self.scale
        k = qkv[..., C : 2 * C]
        v = qkv[..., 2 * C :]
        q = q.reshape(B_, N, h, d).transpose(1, 2).reshape(B_ * h, N, d)
        k = k.reshape(B_, N, h, d).transpose(1, 2).reshape(B_ * h, N, d)
        v = v.reshape(B_, N, h, d).transpose(1, 2).reshape(B_ * h, N, d)
        bias = self.relative_position_bias()  # h, N, N
        if mask is not None:
            bias = mask[:, None] + bias[None]  # nW, h, N, N
        # (nW*)h*N, N: shared by every image of the batch, broadcast over it without an expand.
        bias = bias.reshape(-1, N)
        out = self.core(q, k, v, bias, batch=B_ * h * N // bias.shape[0])  # B_*h, N, d
        out = out.reshape(B_, h, N, d).transpose(1, 2).reshape(B_, N, C)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    """x += W-MSA(LN x) (shifted when ``shift_size`` > 0), x += MLP(LN x), on an (H, W) token grid."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.shift_size = shift_size
        self.padded = -(-resolution // window_size) * window_size
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift_size > 0:
            mask = shifted_window_mask(self.padded, self.padded, window_size, shift_size)
            self.register_buffer("attn_mask", mask, persistent=False)
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = W = self.resolution
        if L != H * W:
            raise ValueError(f"expected {H}x{W}={H * W} tokens, got {L}: the model is built for a fixed input size")
        shortcut = x
        x = self.norm1(x).reshape(B, H, W, C)
        pad = self.padded - H
        if pad:
            # Swin pads after the norm and lets padded tokens take part in attention; kept as is for fidelity.
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        if self.shift_size:
            x = cyclic_shift(x, -self.shift_size)
        windows = window_partition(x, self.window_size)  # B*nW, ws*ws, C
        windows = self.attn(windows, self.attn_mask)
        x = window_reverse(windows, self.window_size, self.padded, self.padded)  # B, Hp, Wp, C
        if self.shift_size:
            x = cyclic_shift(x, self.shift_size)
        if pad:
            x = x[:, :H, :W, :]
        x = shortcut + x.reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (order x00, x10, x01, x11), LayerNorm(4C), Linear 4C -> 2C without bias."""

    def __init__(self, dim: int, resolution: int, eps: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = LayerNorm(4 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = W = self.resolution
        x = x.reshape(B, H, W, C)
        if H % 2:
            x = F.pad(x, (0, 0, 0, 1, 0, 1))
            H, W = H + 1, W + 1
        # Row pairs and column pairs as reshapes + last-dim slices instead of strided slicing.
        x = x.reshape(B * H // 2, 2, W // 2, 2 * C)  # [..., :C] even column, [..., C:] odd column
        even_rows = x[:, 0:1].reshape(B, H // 2 * W // 2, 2 * C)
        odd_rows = x[:, 1:2].reshape(B, H // 2 * W // 2, 2 * C)
        x = torch.cat([even_rows[..., :C], odd_rows[..., :C], even_rows[..., C:], odd_rows[..., C:]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/p, W/p)."""
        x = self.proj(x)
        B, C, Wh, Ww = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(B, C, Wh, Ww)


class MMBasicLayer(nn.Module):
    """One stage: Swin blocks → PWAM → language gate → (PatchMerging)."""

    def __init__(self, cfg: LavtConfig, stage: int) -> None:
        super().__init__()
        s: SwinConfig = cfg.swin
        dim, res = s.stage_dim(stage), s.stage_resolution(stage)
        # LAVT's (detection-style) Swin keeps the window size on small maps and pads, unlike the classification Swin.
        ws = s.window_size
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim,
                    res,
                    s.num_heads[stage],
                    ws,
                    0 if j % 2 == 0 else ws // 2,
                    s.mlp_ratio,
                    s.qkv_bias,
                    s.layer_norm_eps,
                )
                for j in range(s.depths[stage])
            ]
        )
        self.fusion = PWAM(
            dim,
            dim,
            cfg.text_dim,
            dim,
            dim,
            num_heads=cfg.pwam.num_heads[stage],
            mask_value=cfg.pwam.mask_value,
            eps=cfg.pwam.instance_norm_eps,
        )
        self.res_gate = LanguageGate(dim)
        self.downsample = PatchMerging(dim, res, s.layer_norm_eps) if stage < s.num_stages - 1 else None

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (multi-modal feature of this stage (B, HW, C), input of the next stage)."""
        for blk in self.blocks:
            x = blk(x)
        x_residual = self.fusion(x, l, l_mask)
        x = x + self.res_gate(x_residual) * x_residual
        if self.downsample is not None:
            x = self.downsample(x)
        return x_residual, x


class MultiModalSwinTransformer(nn.Module):
    """Swin with a PWAM and a language gate after each stage; returns the four normalised multi-modal features."""

    def __init__(self, cfg: LavtConfig) -> None:
        super().__init__()
        s = cfg.swin
        self.config = s
        self.patch_embed = PatchEmbed(s.patch_size, s.in_chans, s.embed_dim, s.layer_norm_eps)
        if s.ape:
            side = s.stage_resolution(0)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, s.embed_dim, side, side))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.layers = nn.ModuleList([MMBasicLayer(cfg, i) for i in range(s.num_stages)])
        for i in range(s.num_stages):
            self.add_module(f"norm{i}", LayerNorm(s.stage_dim(i), eps=s.layer_norm_eps))

    def forward_intermediates(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            x: normalised images (B, 3, H, W) at the configured size.
            l: word features (B, C_text, N).
            l_mask: (B, N, 1) float, 1 on real tokens.
        Returns:
            per stage i, (B, embed_dim * 2**i, H_i, W_i), NCHW.
        """
        s = self.config
        if x.shape[-2:] != (s.img_size, s.img_size):
            raise ValueError(f"expected images of {s.img_size}x{s.img_size}, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        if s.ape:
            x = x + self.absolute_pos_embed
        x = x.flatten(2).transpose(1, 2)  # B, HW, C
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, x = layer(x, l, l_mask)
            side = s.stage_resolution(i)
            x_out = getattr(self, f"norm{i}")(x_out)
            outs.append(x_out.transpose(1, 2).reshape(x_out.shape[0], -1, side, side))
        return outs

    forward = forward_intermediates
