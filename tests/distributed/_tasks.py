"""Tasks the 2-process gloo pool runs for the fastclip.distributed tests (every rank calls each)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastclip.distributed import (
    AgreementField,
    BlockReducer,
    DistInfo,
    DistributedInputError,
    GatherWithGrad,
    Layout,
    agree_inputs,
    all_gather_with_grad,
    all_reduce_scalars,
    backend_name,
    check_group_device,
    collective_device,
    gather_blocks,
    gather_objects,
    global_rank,
    group_rank_and_size,
    rank0_decisions,
)


def group_facts() -> dict:
    rank, size = group_rank_and_size()
    out = {"rank": rank, "size": size, "backend": backend_name(), "device": str(collective_device()),
           "global_of_1": global_rank(None, 1)}
    check_group_device(torch.zeros(2, 3), None, expect=(rank, size))
    try:
        check_group_device(torch.zeros(2, 3), None, expect=(rank, size + 1))
    except ValueError as exc:
        out["expect_error"] = str(exc)
    return out


def agreement(counts: list, values: list, bad_rank: int = -1) -> object:
    """agree_inputs with this rank's row count, one exact and one tolerant field from ``values``;
    ``bad_rank`` passes a local error instead.  Returns the counts, or the error's message."""
    rank = dist.get_rank()
    error = ValueError(f"image_features must be 2-D, got rank {rank}'s 3-D") if rank == bad_rank else None
    fields = [] if error else [AgreementField("feature dimension D", values[rank][0]),
                               AgreementField("logit_scale", values[rank][1], exact=False),
                               AgreementField("dtype", values[rank][2], show=["float32", "float16"])]
    try:
        return agree_inputs("test_op", None, error, counts[rank], fields, 3)
    except DistributedInputError as exc:
        return f"DistributedInputError: {exc}"


def collectives(counts: list) -> dict:
    """Uneven blocks: gather, the gather with gradient, the reducer and scalar sums."""
    rank, size = group_rank_and_size()
    layout = Layout(rank, tuple(counts))
    x = torch.arange(counts[rank] * 2, dtype=torch.float64).reshape(-1, 2) + 100 * rank
    blocks = [b.clone() for b in gather_blocks(x, layout, None)]
    leaf = x.clone().requires_grad_()
    full = GatherWithGrad.apply(leaf, layout, None)
    weights = torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape) * (rank + 1)
    (full * weights).sum().backward()
    red = BlockReducer(layout, None)
    for q in range(size):
        red.add(q, torch.full((counts[q], 2), float(rank + 1), dtype=torch.float64))
    own = red.finish()
    sums = [float(t) for t in all_reduce_scalars([rank + 1.0, 2.0 * rank], None, torch.device("cpu"))]
    even = all_gather_with_grad(torch.full((2, 1), float(rank)), None)
    return {"blocks": blocks, "grad": leaf.grad, "own": own, "sums": sums, "even": even}


def process_helpers() -> dict:
    rank, size = group_rank_and_size()
    info = DistInfo(rank, size, 0, "gloo", device=torch.device("cpu"))
    return {"decisions": rank0_decisions([rank == 0, rank != 0], info),
            "objects": gather_objects({"rank": rank}, info)}
