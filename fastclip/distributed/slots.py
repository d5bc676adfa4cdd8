"""Which share of a stream a reader takes: its slot among all the readers of all the ranks.

A data reader inside rank r's DataLoader worker w of W workers, in a group of P ranks, is slot
``r * W + w`` of ``P * W`` slots; the shard reader hands slot k every (P * W)-th shard (or sample),
so that no two readers deliver the same sample and together they deliver all of them.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["split_slots"]


def split_slots(rank: Optional[int] = None, world_size: Optional[int] = None, worker: Optional[int] = None,
                num_workers: Optional[int] = None) -> tuple[int, int]:
    """(slot, slots) of this reader: ranks from torch.distributed when initialised, workers from a
    torch DataLoader worker's info when inside one; explicit arguments win."""
    if rank is None or world_size is None:
        try:
            import torch.distributed as dist
            ok = dist.is_available() and dist.is_initialized()
        except Exception:  # a torch without distributed support
            ok = False
        rank = rank if rank is not None else (dist.get_rank() if ok else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if ok else 1)
    if worker is None or num_workers is None:
        from torch.utils.data import get_worker_info
        info = get_worker_info()
        worker = worker if worker is not None else (info.id if info else 0)
        num_workers = num_workers if num_workers is not None else (info.num_workers if info else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, num_workers={num_workers}), got {worker}")
    return rank * num_workers + worker, world_size * num_workers
