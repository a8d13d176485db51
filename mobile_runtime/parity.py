"""Host-runtime parity: does the ``.pte`` compute what calibration simulated?

The ``.pte`` runs on this machine's ExecuTorch runtime; the inputs and statistics are the backend-neutral ones of
:mod:`quantize.deploy.parity_stats`.
"""

from __future__ import annotations

from typing import Any

import torch

from quantize.deploy.parity_stats import parity_report
from quantize.distributed import Shard

__all__ = ["run_parity"]


def run_parity(
    simulated: torch.nn.Module,
    pte: str,
    dataset,
    limit: int | None = None,
    photos: bool = True,
    progress: bool = False,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Parity of a full-model ``.pte`` (or, when only they were exported, its text and visual programs chained)
    against ``simulated`` on ``dataset`` and (optionally) natural photographs. Under torchrun (``shard``) every rank
    loads its own runtime and runs its share of the pairs."""
    from .runtime import load_full_model

    program = load_full_model(pte)
    return parity_report(simulated, program, dataset, program.input_shapes[0][-1], limit, photos, progress, shard)
