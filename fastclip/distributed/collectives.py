"""Moving row blocks between ranks: broadcasts, an all-gather whose backward returns gradients to
their owners, and the reduce that sums gradient shares onto them.

Blocks may have different row counts per rank (a :class:`~fastclip.distributed.group.Layout`);
everything works on gloo, which has no reduce-scatter and no uneven all-gather.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .group import Layout, global_rank, group_rank_and_size

__all__ = ["broadcast_block", "gather_blocks", "BlockReducer", "GatherWithGrad", "all_gather_with_grad",
           "all_reduce_scalars"]


def broadcast_block(blocks: list, q: int, x: torch.Tensor, layout: Layout, group):
    """Start the broadcast of group rank q's block; returns the Work (the buffer goes into blocks[q])."""
    if q == layout.rank:
        buf = x
    else:
        buf = torch.empty((layout.counts[q], x.shape[1]), dtype=x.dtype, device=x.device)
    blocks[q] = buf
    return dist.broadcast(buf, src=global_rank(group, q), group=group, async_op=True)


def gather_blocks(x: torch.Tensor, layout: Layout, group) -> list:
    """Every rank's block of x (no autograd), own block being x.detach() itself."""
    x = x.detach().contiguous()
    blocks = [None] * layout.world
    works = [broadcast_block(blocks, q, x, layout, group) for q in range(layout.world)]
    for w in works:
        w.wait()
    return blocks


class BlockReducer:
    """Sums per-block gradient shares onto their owners: one async ``reduce`` per block.  At most
    ``depth`` shares are alive (depth 2: one transferring while the caller computes the next)."""

    def __init__(self, layout: Layout, group, depth: int = 2):
        self.layout, self.group, self.depth = layout, group, depth
        self.pending = []
        self.own = None

    def add(self, q: int, part: torch.Tensor) -> None:
        part = part.contiguous()
        work = dist.reduce(part, dst=global_rank(self.group, q), group=self.group, async_op=True)
        self.pending.append((q, part, work))
        while len(self.pending) >= self.depth:
            self._retire()

    def _retire(self) -> None:
        q, part, work = self.pending.pop(0)
        work.wait()
        if q == self.layout.rank:
            self.own = part  # the sum over ranks lands in the owner's buffer

    def finish(self) -> torch.Tensor:
        while self.pending:
            self._retire()
        return self.own


class GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient onto the owner (torch.distributed.nn's
    all_gather, as open_clip uses it, but for uneven blocks and any group)."""

    @staticmethod
    def forward(ctx, x, layout, group):
        ctx.layout, ctx.group = layout, group
        return torch.cat(gather_blocks(x, layout, group), dim=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        layout = ctx.layout
        red = BlockReducer(layout, ctx.group)
        for q in range(layout.world):
            red.add(q, grad[layout.rows(q)].clone())
        return red.finish(), None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's rows of ``x`` [n, D] concatenated in group-rank order, [world * n, D], with a
    backward that sums every rank's gradient of the result onto the owner's rows (the gather the
    losses use; works on gloo, which has no reduce-scatter).  Every rank passes the same n."""
    rank, size = group_rank_and_size(group)
    if size == 1:
        return x
    return GatherWithGrad.apply(x, Layout(rank, (x.shape[0],) * size), group)


def all_reduce_scalars(values: Sequence, group, device, dtype: torch.dtype = torch.float64) -> list:
    """The sums over ranks of a few scalars, in one all-reduce (returned as 0-dim tensors)."""
    t = torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values])
    dist.all_reduce(t, group=group)
    return list(t.unbind(0))
