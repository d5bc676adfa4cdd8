"""Joining and leaving the process group torchrun describes, and the small collectives of a loop.

``torchrun --nproc_per_node=P -m fastclip.cli train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init_distributed` then joins the process group (NCCL with CUDA, gloo on CPU).  Without those
variables training runs in one process.  The loss across ranks is fastclip's distributed loss
(``fastclip.ClipLoss(rank=, world_size=)``); the model's gradients are averaged by DDP.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "rank0_decisions", "gather_objects", "barrier", "shutdown"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    group: Any = None
    owned: bool = False  # this module initialised the process group (and so destroys it)
    device: torch.device = torch.device("cpu")  # where small collectives run (NCCL needs CUDA tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes; one process without ``WORLD_SIZE`` > 1."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend,
                    owned=True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owned and dist.is_initialized():
        dist.destroy_process_group()


def rank0_decisions(flags: list, info: DistInfo) -> list:
    """Rank 0's values of ``flags`` (bools) on every rank, in one broadcast: decisions taken on the
    clock (stop at a time limit, checkpoint every M minutes) must be the same everywhere."""
    if info.world_size <= 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=info.device)
    dist.broadcast(t, 0, group=info.group)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if info.world_size <= 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.group)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.world_size > 1:
        dist.barrier(group=info.group)
