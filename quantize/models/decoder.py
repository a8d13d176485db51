"""LAVT's ``SimpleDecoding`` mask head (github ``yz93/LAVT-RIS``, ``lib/mask_predictor.py``, MIT).

Three top-down steps: upsample the coarser map to the finer one (bilinear, ``align_corners=True``), concatenate,
two (conv3x3 → BatchNorm → ReLU); then ``conv1_1`` to two classes at 1/4 of the input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig

__all__ = ["SimpleDecoding"]


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class SimpleDecoding(nn.Module):
    def __init__(self, c4_dims: int, cfg: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        f = cfg.factor
        hidden = c4_dims // f
        c4, c3, c2, c1 = c4_dims, c4_dims // f, c4_dims // f**2, c4_dims // f**3
        eps = cfg.batch_norm_eps
        # Names follow the official file: convX_Y / bnX_Y / reluX_Y, Y = the stage being fused in.
        self.conv1_4 = nn.Conv2d(c4 + c3, hidden, 3, padding=1, bias=False)
        self.bn1_4 = nn.BatchNorm2d(hidden, eps=eps)
        self.relu1_4 = nn.ReLU()
        self.conv2_4 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2_4 = nn.BatchNorm2d(hidden, eps=eps)
        self.relu2_4 = nn.ReLU()
        self.conv1_3 = nn.Conv2d(hidden + c2, hidden, 3, padding=1, bias=False)
        self.bn1_3 = nn.BatchNorm2d(hidden, eps=eps)
        self.relu1_3 = nn.ReLU()
        self.conv2_3 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2_3 = nn.BatchNorm2d(hidden, eps=eps)
        self.relu2_3 = nn.ReLU()
        self.conv1_2 = nn.Conv2d(hidden + c1, hidden, 3, padding=1, bias=False)
        self.bn1_2 = nn.BatchNorm2d(hidden, eps=eps)
        self.relu1_2 = nn.ReLU()
        self.conv2_2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn2_2 = nn.BatchNorm2d(hidden, eps=eps)
        self.relu2_2 = nn.ReLU()
        self.conv1_1 = nn.Conv2d(hidden, cfg.num_classes, 1)

    def forward(self, x_c4: torch.Tensor, x_c3: torch.Tensor, x_c2: torch.Tensor, x_c1: torch.Tensor) -> torch.Tensor:
        """Stage features, coarsest first (NCHW) -> class logits (B, 2, H/4, W/4)."""
        x = torch.cat([_upsample_to(x_c4, x_c3), x_c3], dim=1)
        x = self.relu1_4(self.bn1_4(self.conv1_4(x)))
        x = self.relu2_4(self.bn2_4(self.conv2_4(x)))
        x = torch.cat([_upsample_to(x, x_c2), x_c2], dim=1)
        x = self.relu1_3(self.bn1_3(self.conv1_3(x)))
        x = self.relu2_3(self.bn2_3(self.conv2_3(x)))
        x = torch.cat([_upsample_to(x, x_c1), x_c1], dim=1)
        x = self.relu1_2(self.bn1_2(self.conv1_2(x)))
        x = self.relu2_2(self.bn2_2(self.conv2_2(x)))
        return self.conv1_1(x)
