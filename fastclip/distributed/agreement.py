"""The rank-agreement protocol: every rank learns whether every rank's inputs are valid and the
same where they must be, before any data moves.

A collective op that some ranks enter and others refuse leaves the others waiting forever.  So
each rank checks its inputs locally, then all ranks all-reduce one small table: per rank an error
flag, its row count and a fixed number of numeric fields (shapes, dtype codes, flags, scale
values).  If any rank flagged an error, every rank takes part in a second exchange of the error
texts (at most MSG_BYTES each) and raises :class:`DistributedInputError` naming every bad rank;
else every field is compared across ranks (exactly, or within a relative 1e-6 for values such as
a logit scale) and a disagreement raises on every rank naming the field and each rank's value.
Cost: one all-reduce of P x (2 + fields) float64 when all is well.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .group import collective_device, group_rank_and_size

__all__ = ["DistributedInputError", "AgreementField", "agree_inputs", "DEVICE_CODES"]


class DistributedInputError(ValueError):
    """Raised on every rank of the group when any rank's inputs are invalid or the ranks disagree."""


DEVICE_CODES = {"cpu": 1, "cuda": 2}
MSG_BYTES = 480


@dataclass
class AgreementField:
    """One numeric fact every rank must share (``show``: names for the codes, used in messages)."""

    name: str
    value: float
    exact: bool = True  # False: compare with a relative tolerance (logit_scale, logit_bias)
    show: Optional[Sequence[str]] = None  # decode codes for the message


def _show(field: AgreementField, v: float) -> str:
    if field.show is not None:
        k = round(v)
        return field.show[k] if 0 <= k < len(field.show) else str(k)
    return f"{v:g}" if not float(v).is_integer() or field.exact is False else str(int(v))


def agree_inputs(op: str, group, error: Optional[BaseException], n: int, fields: Sequence[AgreementField],
                 width: int) -> tuple:
    """All-reduce every rank's (error flag, rows, fields); raise on every rank if any rank is invalid
    or the ranks disagree.  Returns the per-rank row counts.

    ``width`` (the number of fields) is fixed per op: a rank whose inputs failed its local checks
    has no fields to send but must still send a table of the same size."""
    rank, size = group_rank_and_size(group)
    dev = collective_device(group)
    if error is None and len(fields) != width:
        raise AssertionError(f"{op}: {len(fields)} agreement fields, expected {width}")
    table = torch.zeros(size, 2 + width, dtype=torch.float64, device=dev)
    if error is None:
        table[rank, 1] = n
        table[rank, 2:] = torch.tensor([f.value for f in fields], dtype=torch.float64)
    else:
        table[rank, 0] = 1.0
    dist.all_reduce(table, group=group)
    table = table.cpu()
    bad = [q for q in range(size) if table[q, 0] > 0]
    if bad:
        # Every rank saw the same flags, so every rank takes part in this second exchange.
        msg = torch.zeros(size, MSG_BYTES, dtype=torch.int32, device=dev)
        if error is not None:
            raw = f"{type(error).__name__}: {error}".encode()[:MSG_BYTES]
            msg[rank, :len(raw)] = torch.tensor(list(raw), dtype=torch.int32)
        dist.all_reduce(msg, group=group)
        msg = msg.cpu()
        lines = []
        for q in bad:
            text = bytes(int(x) for x in msg[q] if x != 0).decode("utf-8", errors="replace")
            lines.append(f"  rank {q}: {text}")
        exc = DistributedInputError(
            f"{op}: invalid inputs on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
            f"of {size}; every rank raises this error and no data was exchanged:\n" + "\n".join(lines))
        raise exc from error
    for k, f in enumerate(fields):
        col = table[:, 2 + k]
        ref = col[0].item()
        if f.exact:
            same = bool((col == ref).all())
        else:
            same = bool(((col - ref).abs() <= 1e-6 * max(abs(ref), 1.0)).all())
        if not same:
            vals = ", ".join(f"rank {q}: {_show(f, col[q].item())}" for q in range(size))
            raise DistributedInputError(
                f"{op}: {f.name} must be the same on every rank of the group, got {vals}; every rank "
                "raises this error and no data was exchanged")
    return tuple(round(c) for c in table[:, 1].tolist())
