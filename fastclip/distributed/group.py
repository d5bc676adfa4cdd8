"""Process groups: who is who, where their collectives run, which rows each rank holds.

``group=None`` means the default (WORLD) group everywhere; ranks are ranks within the group and
:func:`global_rank` converts them for the collectives, which address ranks globally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["Layout", "group_rank_and_size", "global_rank", "backend_name", "collective_device",
           "check_group_device"]


@dataclass(frozen=True)
class Layout:
    """Who holds which global rows: counts[q] rows on group rank q, in rank order (sizes may
    differ); the global batch is their concatenation."""

    rank: int
    counts: tuple

    @property
    def world(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def offset(self, q: int) -> int:
        return sum(self.counts[:q])

    def rows(self, q: int) -> slice:
        o = self.offset(q)
        return slice(o, o + self.counts[q])


def group_rank_and_size(group=None) -> tuple[int, int]:
    """(rank, size) of this process in ``group`` (None: the default group); refuses an
    uninitialised torch.distributed or a process outside the group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("this needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the process group passed as `group`")
    return rank, size


def global_rank(group, q: int) -> int:
    """Global rank of group rank q (collectives address ranks globally)."""
    return q if group is None or group is dist.group.WORLD else dist.get_global_rank(group, q)


def backend_name(group=None) -> str:
    """The group's backend name, lower case ("gloo", "nccl", "cpu:gloo,cuda:nccl", ...)."""
    return str(dist.get_backend(group)).lower()


def collective_device(group=None) -> torch.device:
    """Where small tensors for this group's collectives live (NCCL needs CUDA tensors).

    Chosen from the group's backend alone, never from this rank's inputs: in a mixed group
    ("cpu:gloo,cuda:nccl") a rank given CPU features and one given CUDA features would otherwise
    enter the agreement through different backends and wait for each other forever."""
    backend = backend_name(group)
    if "gloo" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_group_device(a: torch.Tensor, group=None, expect: Optional[tuple] = None) -> None:
    """Refuse features ``a`` that this group's backend cannot move (gloo: CPU, NCCL: CUDA), and a
    caller that believes it is another (rank, world_size) than it is (``expect``)."""
    rank, size = group_rank_and_size(group)
    if expect is not None:
        exp_rank, exp_world = expect
        if exp_world != size or exp_rank != rank:
            raise ValueError(f"the caller was built with rank={exp_rank}, world_size={exp_world}, but this "
                             f"process is rank {rank} of a group of {size}")
    backend = backend_name(group)
    if backend == "nccl" and a.device.type != "cuda":
        raise ValueError(f"an NCCL process group needs CUDA features, got them on {a.device}")
    if backend == "gloo" and a.device.type != "cpu":
        # gloo's reduce (the gradient path) takes CPU tensors only
        raise ValueError(f"a gloo process group needs CPU features, got them on {a.device}; use NCCL for "
                         "CUDA tensors (or init_process_group(backend='cpu:gloo,cuda:nccl'))")
