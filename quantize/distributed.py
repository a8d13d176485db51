"""Work split over the processes ``torchrun`` launches, with results equal to one process's.

``torchrun --nproc-per-node N -m ptq4ris evaluate|parity ...`` (or ``-m quantize.results``) starts N copies of the
command; each reads its rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), works on
its shard, and rank 0 gathers and reports. Multi-node runs use torchrun's own rendezvous flags (``--nnodes``,
``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``); nothing here depends on them.

Equal to one process at the same thread count per process, exactly (torchrun sets ``OMP_NUM_THREADS=1``; large
GEMMs can round differently at another thread count):
- A split is sharded by whole batches of the single-process loader (batch b goes to rank b mod N), not pair by pair as
  ``DistributedSampler`` does: every pair is then computed in the same batch as in one process, so its logits are the
  same bits, and no pair is duplicated to even out the shards (``DistributedSampler`` pads by repeating pairs, which
  would count them twice).
- Ranks gather per-pair records (integers and the per-pair floats), and rank 0 folds them in the single-process
  order: sums of floats see the same operands in the same order.

The process group uses gloo for CPU tensors and, where CUDA is there, NCCL for GPU ones; what is gathered are small
Python objects, which travel over gloo either way.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

__all__ = ["Shard", "launched", "process_group"]


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: rank ``rank`` of ``world`` (``Shard()`` is the single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_indices(self, n: int, batch_size: int) -> list[int]:
        """Indices of the pairs of the batches of ``range(n)`` (cut in ``batch_size``) that fall to this rank."""
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        out: list[int] = []
        for b, start in enumerate(range(0, n, batch_size)):
            if b % self.world == self.rank:
                out.extend(range(start, min(start + batch_size, n)))
        return out

    def items(self, items: Sequence[Any]) -> list[tuple[int, Any]]:
        """(position, item) for the items that fall to this rank (item i to rank i mod N)."""
        return [(i, it) for i, it in enumerate(items) if i % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank); ``[obj]`` for a single process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_ordered(self, records: list[Any], key=None) -> list[Any]:
        """Every rank's ``records`` merged into one list sorted by ``key``: the order one process produces them in."""
        return sorted((r for part in self.gather(records) for r in part), key=key)

    def device(self, device: torch.device) -> torch.device:
        """``device``, with a bare ``cuda`` pinned to this process's GPU (``cuda:LOCAL_RANK``)."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device


def launched() -> Shard:
    """The shard the environment describes: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return Shard()
        shard = Shard(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise UserError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({e}): launch with torchrun, or unset them") from e
    if not 0 <= shard.rank < world:
        raise UserError(f"RANK={shard.rank} is outside WORLD_SIZE={world}: launch with torchrun, or unset them")
    return shard


@contextlib.contextmanager
def process_group(shard: Shard) -> Iterator[Shard]:
    """Join torchrun's process group for the duration (nothing for a single process)."""
    if shard.world == 1:
        yield shard
        return
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            # Ranks wait for each other only at the end (the gather), and results-grid cells are uneven: a rank may
            # finish its share long before the slowest one, far beyond the default 30-minute collective timeout.
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=24))
        except (ValueError, RuntimeError) as e:  # WORLD_SIZE set by hand, without torchrun's rendezvous variables
            raise UserError(
                f"WORLD_SIZE={shard.world} but the process group cannot start ({str(e).splitlines()[0]}): launch "
                "with torchrun, or unset WORLD_SIZE for one process"
            ) from e
    try:
        yield shard
    finally:
        if started:
            dist.destroy_process_group()
