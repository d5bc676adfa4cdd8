"""SimCLR / NT-Xent loss (SLIP's image-image term) with memory linear in the batch.

Two augmented views of the same N images give features view1 [N, D] and view2 [N, D].  Stack
them, Z = cat([view1, view2]) [M, D] with M = 2N, and score every pair of rows:

    z_ij = s * Z_i . Z_j,   s = 1 / temperature,   self-pairs (i == j) excluded
    pos(i) = (i + N) mod M          (row k of view1 and row k of view2 are each other's positive)
    loss = (1/M) * sum_i [ r_i - z_{i,pos(i)} ],   r_i = log sum_{j != i} exp(z_ij)

i.e. the mean over the M rows of the cross-entropy, as SLIP's ``SIMCLRLoss`` computes it
(CE([ab, aa masked]) + CE([ba, bb masked])) / 2.

Algorithm (``chunked`` backend): the M x M logits are never stored.  They are symmetric
(z_ij = z_ji), so a row's log-sum-exp is also its column's, and only the tiles (I, J) with J >= I
are computed; an off-diagonal tile contributes to the statistics (and gradients) of both its row
block and its column block, a diagonal tile to its own block once, with its diagonal masked.

* forward: r merged online over the upper-triangle tiles, ~M^2 * D = 4 N^2 D FLOPs (half a full
  sweep); r is kept in fp64 (M numbers), tiles in fp32 (fp64 for fp64 inputs).
* backward: with Q_ij = exp(z_ij - r_i) + exp(z_ij - r_j) for j != i (Q_ii = 0), Q is
  symmetric and

      dL/dZ = (s/M) * ( Q @ Z - 2 * Z[pos] )

  (the positive logit z_{i,pos(i)} sits in row i and in row pos(i), hence the 2).  Each tile
  J > I is recomputed once and gives Q_IJ @ Z_J to block I and Q_IJ.T @ Z_I to block J:
  ~3 M^2 D = 12 N^2 D FLOPs.  Gradients accumulate in fp32 (fp64 for fp64 inputs).

So fwd+bwd costs ~16 N^2 D FLOPs and O(N*D + tile^2) memory, against 24 N^2 D and O(N^2) for the
materialised reference.  Exactly, with S = sum of the squared block sizes (~ M * chunk): forward
D * (M^2 + S), backward D * (3 M^2 + S), as diagonal tiles are computed whole; the saving needs
chunk << M (a chunk >= M is one diagonal tile, a full sweep).  The temperature is a fixed hyper-parameter here: no gradient flows to it.

Layers in this file: reference twin -> chunked engine (PyTorch tiles) -> ``SimCLRLossFunction``
-> ``simclr_loss`` (functional API).  The module ``SimCLRLoss`` lives in ``fastclip.nn.loss``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import ANY_DEVICE, FLOATS, check_chunk_size, check_float_tensor
from .tiles import (
    STAT_DTYPE,
    acc_dtype,
    accumulate_mm,
    default_chunk_size,
    mm_dtype,
    rowdot_sum,
    softmax_pair,
    tile_logits,
    tile_lse,
    tile_lse_pair,
)

__all__ = [
    "simclr_loss",
    "simclr_loss_reference",
    "SimCLRLossFunction",
    "simclr_lse",
    "simclr_grads",
    "check_temperature",
    "check_views",
]


# ----------------------------------------------------------------------------------------------
# Reference twin: the materialised-logits formula (test oracle and slowest backend).
# ----------------------------------------------------------------------------------------------
def simclr_loss_reference(view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The NT-Xent loss with the 2N x 2N logits materialised (O(N^2) memory), in the inputs' dtype."""
    n = view1.shape[0]
    z = torch.cat([view1, view2])
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, -math.inf)
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------------------
# Chunked engine: PyTorch tiles over the upper triangle (CPU and CUDA).
# ----------------------------------------------------------------------------------------------
def _masked_tile(zi: torch.Tensor, zj: torch.Tensor, scale: float, acc: torch.dtype, diagonal: bool) -> torch.Tensor:
    """scale * zi @ zj.T in ``acc``; on a diagonal tile (zi is zj) the self-pairs are -inf."""
    t = tile_logits(zi, zj, scale, acc)
    if diagonal:
        t.diagonal().fill_(-math.inf)
    return t


def simclr_lse(z: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """r_i = log sum_{j != i} exp(scale * Z_i . Z_j) for z = Z [M, D], in fp64.

    Visits only the tiles (I, J >= I); an off-diagonal tile feeds its row lse to block I and its
    column lse (the same numbers, by symmetry) to block J."""
    acc, mmd = acc_dtype(z), mm_dtype(z)
    m = z.shape[0]
    r = torch.full((m,), -math.inf, device=z.device, dtype=STAT_DTYPE)
    work = torch.empty(min(chunk, m) ** 2, device=z.device, dtype=acc)
    for i in range(0, m, chunk):
        zi = z[i:i + chunk].to(mmd)
        ri = r[i:i + chunk]
        for j in range(i, m, chunk):
            diagonal = j == i
            zj = zi if diagonal else z[j:j + chunk].to(mmd)
            t = _masked_tile(zi, zj, scale, acc, diagonal)
            e = work[: t.numel()].view_as(t)
            if diagonal:
                torch.logaddexp(ri, tile_lse(t, 1, e), out=ri)
            else:
                row, col = tile_lse_pair(t, e)
                torch.logaddexp(ri, row, out=ri)
                rj = r[j:j + chunk]
                torch.logaddexp(rj, col, out=rj)
    return r


def simclr_grads(z: torch.Tensor, scale: float, r: torch.Tensor, chunk: int,
                 rows: tuple[int, int]) -> torch.Tensor:
    """Q @ Z for Q_ij = exp(z_ij - r_i) + exp(z_ij - r_j) (i != j), Q_ii = 0, z_ij = scale Z_i.Z_j.

    Only rows ``rows`` = (lo, hi) of the result are wanted (one view may need no gradient): tiles
    with neither block overlapping them are skipped, and only overlapping blocks accumulate.
    Returns a [M, D] tensor in fp32 (fp64 for fp64 inputs); rows outside (lo, hi) are undefined
    (zero or partial).  ``r`` may be fp64; it is applied to the fp32 tiles in two steps.

    Q's entries are (sums of two) softmax probabilities, at most 2; the 1/M of the mean is applied
    by the caller afterwards, not folded into r, so that Q cast to fp16 for a GPU's tensor cores
    does not fall into fp16's subnormal range (below 6e-5) at large batches.
    """
    acc, mmd = acc_dtype(z), mm_dtype(z)
    m = z.shape[0]
    lo, hi = rows
    g = torch.zeros(z.shape, device=z.device, dtype=acc)
    work = torch.empty(min(chunk, m) ** 2, device=z.device, dtype=acc)

    def wanted(start):
        return start < hi and start + chunk > lo

    for i in range(0, m, chunk):
        zi = z[i:i + chunk].to(mmd)
        ri = r[i:i + chunk]
        want_i = wanted(i)
        for j in range(i, m, chunk):
            want_j = wanted(j)
            if not (want_i or want_j):
                continue
            diagonal = j == i
            zj = zi if diagonal else z[j:j + chunk].to(mmd)
            t = _masked_tile(zi, zj, scale, acc, diagonal)
            q = work[: t.numel()].view_as(t)
            softmax_pair(t, ri, r[j:j + chunk], q)
            qm = q.to(mmd)  # once per tile, for both products (q itself when mmd == acc)
            if want_i:
                accumulate_mm(g[i:i + chunk], qm, zj)
            if want_j and not diagonal:
                accumulate_mm(g[j:j + chunk], qm.T, zi)
    return g


# ----------------------------------------------------------------------------------------------
# Autograd Function
# ----------------------------------------------------------------------------------------------
class SimCLRLossFunction(torch.autograd.Function):
    """forward(view1, view2, temperature (float), chunk (int)) -> 0-dim loss.

    Forward computes r (and saves Z and r); backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, view1, view2, temperature, chunk):
        n = view1.shape[0]
        m = 2 * n
        acc = acc_dtype(view1)
        s = 1.0 / temperature
        z = torch.cat([view1, view2])
        r = simclr_lse(z, s, chunk)
        # sum_i z_{i,pos(i)} = 2 s sum_k view1_k . view2_k (each positive pair appears twice)
        pos = rowdot_sum(view1, view2, acc, chunk)
        loss = r.sum().to(acc) / m - (2.0 * s / m) * pos
        ctx.save_for_backward(z, r)
        ctx.extra = (n, s, chunk)
        return loss.to(torch.promote_types(view1.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need1, need2 = ctx.needs_input_grad[:2]
        if not (need1 or need2):
            return None, None, None, None
        z, r = ctx.saved_tensors
        n, s, chunk = ctx.extra
        m = 2 * n
        acc = acc_dtype(z)
        rows = (0 if need1 else n, m if need2 else n)
        g = simclr_grads(z, s, r, chunk, rows)
        coef = grad_out.to(acc) * (s / m)
        grad1 = grad2 = None
        # dL/dZ_i = (s/M) * (g_i - 2 Z_pos(i)): view1's positives are view2's rows and vice versa.
        if need1:
            grad1 = g[:n].sub_(z[n:].to(acc), alpha=2.0).mul_(coef).to(z.dtype)
        if need2:
            grad2 = g[n:].sub_(z[:n].to(acc), alpha=2.0).mul_(coef).to(z.dtype)
        return grad1, grad2, None, None


# ----------------------------------------------------------------------------------------------
# Backends and the functional API
# ----------------------------------------------------------------------------------------------
def _run_reference(view1, view2, temperature, chunk):
    return simclr_loss_reference(view1, view2, temperature)


def _run_chunked(view1, view2, temperature, chunk):
    return SimCLRLossFunction.apply(view1, view2, temperature, chunk or default_chunk_size(view1.device))


dispatch.register("simclr_loss", dispatch.Backend(
    "chunked", _run_chunked, devices=("cpu", "cuda"), dtypes=FLOATS,
    doc="PyTorch tiles over the symmetric upper triangle (fp32 CPU tiles' elementwise work in "
        "fastclip._C when it loaded), O(N*D + tile) memory; CPU and CUDA"))
dispatch.register("simclr_loss", dispatch.Backend(
    "reference", _run_reference, devices=ANY_DEVICE, auto_devices=(), dtypes=FLOATS,
    doc="materialised 2N x 2N logits (O(N^2) memory); the test oracle"))

def check_temperature(temperature) -> float:
    """``temperature`` as a Python float; it must be a finite real number > 0 (no tensors: the
    loss gives it no gradient, so a learnable temperature would silently stay fixed)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        hint = "; pass float(t) for a fixed value" if isinstance(temperature, torch.Tensor) else ""
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}{hint}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")
    return value


def check_views(view1, view2) -> None:
    """view1 and view2: 2-D [N, D] floating tensors of one shape, dtype and device, N and D >= 1."""
    for name, t in (("view1", view1), ("view2", view2)):
        check_float_tensor(name, t, "[N, D]")
    if view1.device != view2.device:
        raise ValueError(f"view1 and view2 must be on the same device, got {view1.device} and {view2.device}")
    if view1.dtype != view2.dtype:
        raise TypeError(f"view1 and view2 must have the same dtype, got {view1.dtype} and {view2.dtype}")
    if view1.shape != view2.shape:
        raise ValueError(f"view1 and view2 must have the same shape, got {tuple(view1.shape)} and "
                         f"{tuple(view2.shape)}")
    if view1.shape[0] == 0:
        raise ValueError(f"view1 and view2 need at least one row (N >= 1), got shape {tuple(view1.shape)}")
    if view1.shape[1] == 0:
        raise ValueError(f"view1 and view2 need a feature dimension D >= 1, got shape {tuple(view1.shape)}")


def simclr_loss(view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.1, *,
                backend: str = "auto", chunk_size: Optional[int] = None) -> torch.Tensor:
    """SimCLR (NT-Xent) loss of two views of the same N samples, without the 2N x 2N logits.

    With Z = cat([view1, view2]) ([2N, D]) and s = 1 / temperature, every row i of Z is scored
    against every other row j != i by z_ij = s * Z_i . Z_j; its positive is the other view of the
    same sample, row (i + N) mod 2N, and every remaining row is a negative.  The loss is the mean
    over the 2N rows of the cross-entropy:

        loss = 1/(2N) * sum_i [ log sum_{j != i} exp(z_ij) - z_{i, (i+N) mod 2N} ]

    which is SLIP's SIMCLRLoss, (CE([ab, aa]) + CE([ba, bb])) / 2 with aa/bb's diagonals masked.
    With N = 1 each row's only candidate is its positive and the loss is 0.

    Args:
        view1: [N, D] float32/float16/bfloat16/float64 features of the first view.  Used as
            given: normalise them first for the usual cosine similarity (``fastclip.nn.SimCLRLoss``
            does).
        view2: [N, D], same dtype and device; row k is the second view of view1's row k.
        temperature: a finite Python float > 0 (SLIP uses 0.1).  Fixed: it gets no gradient.
        backend: "auto" (default: "chunked"), "chunked" or "reference"; the ``FASTCLIP_BACKEND``
            environment variable applies when this is "auto".  See ``python -m fastclip.info``.
        chunk_size: tile edge of the chunked backend (default 1024 on CPU, 4096 on GPU); any
            value >= 1 works, N need not be a multiple of it.

    Returns:
        0-dim tensor.  The chunked backend returns float32 for float16/bfloat16 inputs (it
        accumulates in fp32) and float64 for float64; the reference computes in the inputs' dtype.
        Gradients flow to view1 and view2 (in their dtypes).

    Cost (chunked): forward ~4 N^2 D FLOPs, backward ~12 N^2 D (symmetry halves each sweep);
    memory O(N * D + chunk_size^2).
    """
    check_views(view1, view2)
    temperature = check_temperature(temperature)
    chunk = check_chunk_size(chunk_size)
    chosen = dispatch.select("simclr_loss", backend, device=view1.device, dtype=view1.dtype,
                             shapes=(view1.shape, view2.shape))
    return chosen.fn(view1, view2, temperature, chunk)
