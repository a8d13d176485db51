"""A digest of a calibrated model's qparams alone, so two machines (or two runs) can tell whether they calibrated the
same grids without comparing weights files byte by byte."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .placement import quantized_sites, quantizers_of

__all__ = ["qparams_digest"]


def qparams_digest(model: nn.Module) -> str:
    """sha256 over every quantizer's buffers (site, slot, buffer name, dtype, shape, bytes), in sorted order."""
    digest = hashlib.sha256()
    entries = []
    for site in quantized_sites(model):
        for slot, quantizer in quantizers_of(site).items():
            for name, buf in quantizer.named_buffers():
                entries.append((f"{site.info.name}/{slot}/{name}", buf.detach().cpu().contiguous()))
    for key, buf in sorted(entries, key=lambda e: e[0]):
        digest.update(f"{key}:{buf.dtype}:{tuple(buf.shape)}:".encode())
        digest.update((buf.float() if buf.dtype == torch.bfloat16 else buf).numpy().tobytes())
    return digest.hexdigest()
