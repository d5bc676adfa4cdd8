"""The chunked engine shared by the contrastive losses: tiles of z = scale * A @ B.T in PyTorch.

``clip_loss``, ``siglip_loss``, ``simclr_loss`` and the distributed losses never materialise their
N x N logits.  They walk the matrix tile by tile with the pieces here, so that the precision rules
are written once:

* Matrix products run in :func:`mm_dtype` (fp32 on CPU, where BLAS is fastest and exact enough;
  the input dtype on GPUs, where fp16/bf16 use the tensor cores; fp64 for fp64 inputs).
* Tiles and gradients accumulate in :func:`acc_dtype` (fp32; fp64 for fp64 inputs).  A chunked
  gradient is never accumulated in a low-precision dtype.
* Log-sum-exp statistics are kept in :data:`STAT_DTYPE` (fp64): an fp32 lse of magnitude ~400
  carries an ulp of 3e-5, which exp(z - lse) would turn into a 3e-5 relative error on every
  probability.  The statistic vectors are O(N), so the precision is free.  A tile's lse is its max
  (an exact logit) plus the small log(sum exp(z - max)), added in fp64 (:func:`tile_lse`); an fp64
  statistic is applied to an fp32 tile as a high then a low part (:func:`sub_stat`): z - hi is
  exact wherever it matters (Sterbenz: z within a factor 2 of hi) and lo is tiny, so the only
  rounding left on a probability is the logit's own.  The distributed losses exchange their
  statistics in the same dtype.

CLIP's two passes (see ``fastclip.ops.clip_loss`` for the derivation): :func:`chunked_lse` gives
row and column log-sum-exp, :func:`chunked_softmax_grads` recomputes every tile and accumulates
P @ B and P.T @ A with P = exp(z - r) + exp(z - c), and :func:`finish_clip_grads` turns those
into the gradients of the inputs (the target terms, label smoothing, the incoming gradient).

A tile's elementwise work (both log-sum-exps: :func:`tile_lse_pair`; P: :func:`softmax_pair`)
runs in ``fastclip._C`` (``csrc/loss_tiles_cpu.cpp``: two fused passes forward, one backward, on
:data:`NATIVE_THREADS` threads) for CPU float32 tiles when the extension loads, with the same
precision rules; everything else, ``FASTCLIP_NATIVE=0`` or :data:`NATIVE_TILES` = False runs the
torch code below.  The gain is measured by ``benchmarks/profile_step.py`` (figures in
benchmarks/RESULTS.md): largest at small batches, where the torch code's per-call overhead
dominates, and a few percent at N=4096, where the matmuls are ~87% of the loss.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

from .. import extension
from . import dispatch
from ._checks import ANY_DEVICE, FLOATS

__all__ = ["register_loss_backends", "STAT_DTYPE", "default_chunk_size", "mm_dtype", "acc_dtype", "tile_logits", "tile_lse", "sub_stat",
           "NATIVE_TILES", "NATIVE_THREADS", "native_tiles", "tile_lse_pair", "softmax_pair",
           "accumulate_mm", "rowdot_sum", "chunked_lse", "chunked_softmax_grads", "finish_clip_grads"]

STAT_DTYPE = torch.float64
NATIVE_TILES = True  # False: the torch code for every tile (benchmarks compare both in one process)
# Threads of the native tile kernels.  1, not torch.get_num_threads(): each kernel runs right after a
# torch matmul, whose OpenMP workers keep spinning on the other cores for milliseconds, longer than a
# tile's elementwise work (~1 ms); two threads there made the loss slower than one (2 cores, N=1024
# and 4096; benchmarks/RESULTS.md).
NATIVE_THREADS = 1


def default_chunk_size(device: torch.device) -> int:
    """The default tile edge: 1024 on CPU (square tiles keep BLAS near its peak and the fp32 tile,
    4 MB, in cache); 4096 on GPUs (larger tiles amortise launches; memory stays O(tile))."""
    return 1024 if device.type == "cpu" else 4096


def mm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the tiles' matrix products run in."""
    if t.dtype == torch.float64:
        return torch.float64
    return torch.float32 if t.device.type == "cpu" else t.dtype


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype tiles and gradients accumulate in (fp32; fp64 for fp64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tile_logits(a_blk: torch.Tensor, b_blk: torch.Tensor, scale: float, acc: torch.dtype) -> torch.Tensor:
    """scale * a_blk @ b_blk.T in ``acc`` (a new tensor the caller may modify in place)."""
    z = torch.mm(a_blk, b_blk.T)
    z = z.to(acc) if z.dtype != acc else z
    return z.mul_(scale)


def tile_lse(z: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of tile ``z`` along ``dim`` in STAT_DTYPE; ``work`` is scratch of z's size.

    A line that is all -inf (a masked self-pair tile of one row) gives -inf, not NaN."""
    m = z.amax(dim=dim, keepdim=True)
    m = m.masked_fill(m == -math.inf, 0.0)
    s = torch.sub(z, m, out=work).exp_().sum(dim=dim).log_()
    return m.squeeze(dim).to(STAT_DTYPE) + s.to(STAT_DTYPE)


def sub_stat(z: torch.Tensor, stat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = z - stat, with an fp64 ``stat`` applied to an fp32 tile as a high then a low part."""
    if stat.dtype == z.dtype:
        return torch.sub(z, stat, out=out)
    hi = stat.to(z.dtype)
    lo = (stat - hi.to(stat.dtype)).to(z.dtype)
    return torch.sub(z, hi, out=out).sub_(lo)


def native_tiles(z: torch.Tensor):
    """``fastclip._C`` when it does tile ``z``'s elementwise work (a contiguous CPU float32 tile,
    :data:`NATIVE_TILES` on, the extension loaded), else None."""
    if not NATIVE_TILES or z.dtype != torch.float32 or z.device.type != "cpu" or not z.is_contiguous():
        return None
    return extension.load()[0]


def tile_lse_pair(z: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_lse(z, 1, work), tile_lse(z, 0, work)): the row and column log-sum-exp in STAT_DTYPE."""
    ext = native_tiles(z)
    if ext is None or z.shape[1] == 0:
        return tile_lse(z, 1, work), tile_lse(z, 0, work)
    row = torch.empty(z.shape[0], dtype=STAT_DTYPE)
    col = torch.empty(z.shape[1], dtype=STAT_DTYPE)
    ext.tile_lse_rows_cols(z.detach().numpy(), row.numpy(), col.numpy(), threads=NATIVE_THREADS)
    return row, col


def softmax_pair(z: torch.Tensor, row_stat: torch.Tensor, col_stat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = exp(z - row_stat[:, None]) + exp(z - col_stat[None, :]), each statistic applied with
    :func:`sub_stat`; row_stat [m], col_stat [k]; ``z`` may be overwritten (``out`` must not be z)."""
    ext = native_tiles(z)
    if (ext is None or not out.is_contiguous() or out.dtype != z.dtype
            or row_stat.dtype not in (torch.float32, torch.float64) or col_stat.dtype != row_stat.dtype):
        sub_stat(z, row_stat.unsqueeze(1), out).exp_()
        return out.add_(sub_stat(z, col_stat, z).exp_())
    ext.tile_softmax_pair(z.detach().numpy(), row_stat.detach().numpy(), col_stat.detach().numpy(), out.numpy(),
                          threads=NATIVE_THREADS)
    return out


def accumulate_mm(dst: torch.Tensor, p: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst += p @ src, in place; ``dst`` in the accumulation dtype, ``p`` and ``src`` in the mm dtype.

    When the two dtypes agree, one ``addmm_``; otherwise (fp16/bf16 products on a GPU) the product
    runs in the mm dtype and is cast up before it is added, so nothing accumulates in low
    precision.  Callers cast a tile to the mm dtype once (``p.to(mmd)``) and pass it (or its ``.T``)
    to every product it feeds."""
    if p.dtype == dst.dtype:
        return dst.addmm_(p, src)
    return dst.add_(torch.mm(p, src).to(dst.dtype))


def rowdot_sum(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, chunk: int) -> torch.Tensor:
    """sum_i a_i . b_i in ``acc``, blockwise so low-precision inputs are never copied whole."""
    total = torch.zeros((), device=a.device, dtype=acc)
    for i in range(0, a.shape[0], chunk):
        total += (a[i:i + chunk].to(acc) * b[i:i + chunk].to(acc)).sum()
    return total


def chunked_lse(a: torch.Tensor, b: torch.Tensor, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of z = scale * a @ b.T, tile by tile.

    a: [M, D], b: [K, D] (M and K may differ: the distributed loss passes local rows against all
    columns).  Returns (row_lse [M], col_lse [K]) in fp64; col_lse covers only the M rows given
    (merge partials with a logsumexp).  2*M*K*D FLOPs, O((M + K) * D + chunk^2) memory.
    """
    acc, mmd = acc_dtype(a), mm_dtype(a)
    M, K = a.shape[0], b.shape[0]
    row_lse = torch.empty(M, device=a.device, dtype=STAT_DTYPE)
    col_lse = torch.full((K,), -math.inf, device=a.device, dtype=STAT_DTYPE)
    buf = torch.empty(min(chunk, M) * min(chunk, K), device=a.device, dtype=acc)
    for i in range(0, M, chunk):
        a_blk = a[i:i + chunk].to(mmd)
        row_parts = []
        for j in range(0, K, chunk):
            z = tile_logits(a_blk, b[j:j + chunk].to(mmd), scale, acc)
            e = buf[: z.numel()].view_as(z)
            row, col = tile_lse_pair(z, e)
            row_parts.append(row)
            torch.logaddexp(col_lse[j:j + chunk], col, out=col_lse[j:j + chunk])
        row_lse[i:i + chunk] = torch.logsumexp(torch.stack(row_parts), dim=0)
    return row_lse, col_lse


def chunked_softmax_grads(a: torch.Tensor, b: torch.Tensor, scale: float, row_lse: torch.Tensor,
                          col_lse: torch.Tensor, chunk: int, *, need_a: bool = True,
                          need_b: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(P @ b, P.T @ a) with P = exp(z - row_lse[:, None]) + exp(z - col_lse[None, :]).

    z = scale * a @ b.T recomputed tile by tile; accumulation in acc_dtype (None where not
    needed).  Callers fold the loss's averaging weights into row_lse/col_lse (lse + log(1/weight)).
    The statistics may be fp64 (as chunked_lse returns them); they are applied with sub_stat.
    2*M*K*D FLOPs for the recompute plus 2*M*K*D per requested output.
    """
    acc, mmd = acc_dtype(a), mm_dtype(a)
    M, K = a.shape[0], b.shape[0]
    ga = torch.zeros(a.shape, device=a.device, dtype=acc) if need_a else None
    gb = torch.zeros(b.shape, device=a.device, dtype=acc) if need_b else None
    buf = torch.empty(min(chunk, M) * min(chunk, K), device=a.device, dtype=acc)
    for i in range(0, M, chunk):
        a_blk = a[i:i + chunk].to(mmd)
        r = row_lse[i:i + chunk]
        for j in range(0, K, chunk):
            b_blk = b[j:j + chunk].to(mmd)
            z = tile_logits(a_blk, b_blk, scale, acc)
            p = buf[: z.numel()].view_as(z)
            softmax_pair(z, r, col_lse[j:j + chunk], p)
            pm = p.to(mmd)  # once per tile, for both products (p itself when mmd == acc)
            if need_a:
                accumulate_mm(ga[i:i + chunk], pm, b_blk)
            if need_b:
                accumulate_mm(gb[j:j + chunk], pm.T, a_blk)
    return ga, gb


def finish_clip_grads(ga, gb, ds, a, b, scale_dtype, *, g, coef, w, smooth, sa, sb, rows: slice = slice(None)):
    """(grad_a, grad_b, grad_s): the last step of every CLIP backward, single-process and distributed.

    ga = P @ b [M, D] and gb = P.T @ a [K, D] in accumulation precision, finished in place (None
    where that input needs no gradient); ds = sum_i a_i.(P @ b)_i - lin / M, the raw dL/ds (None
    where logit_scale needs none).  Row i of a is paired with row ``rows``[i] of b (``rows`` is a
    slice, so that ``gb[rows]`` is a view written in place).  Subtracts the
    target terms, w * b[rows] from ga and w * a from gb[rows] (w = (1 - eps) / M), and with label
    smoothing (sa, sb given) smooth * sum b and smooth * sum a from every row; multiplies the
    feature gradients by ``coef`` (the incoming gradient times s) and ds by ``g`` (the incoming
    gradient), and casts each to its input's dtype.  w, smooth, coef and ds come from the callers,
    which compute them in different precisions (the distributed losses hold fp64 statistics).
    """
    if not isinstance(rows, slice):
        raise TypeError(f"rows must be a slice (gb[rows] is updated in place), got {type(rows).__name__}")
    acc = acc_dtype(a)
    grad_a = grad_b = grad_s = None
    if ds is not None:
        grad_s = (g * ds).to(scale_dtype)
    if ga is not None:
        ga.sub_(b[rows].to(acc), alpha=w)
        if sb is not None:
            ga.sub_((sb * smooth).to(acc))
        grad_a = ga.mul_(coef).to(a.dtype)
    if gb is not None:
        gb[rows].sub_(a.to(acc), alpha=w)
        if sa is not None:
            gb.sub_((sa * smooth).to(acc))
        grad_b = gb.mul_(coef).to(b.dtype)
    return grad_a, grad_b, grad_s


def register_loss_backends(op: str, run: Callable, reference: Callable, *, triton, chunked, chunked_doc: str) -> None:
    """Register a tiled loss's three backends, in automatic priority: ``triton`` (its engine; picked
    automatically on CUDA only, since on CPU it runs through the test interpreter), ``chunked``
    (its engine; CPU and CUDA) and ``reference`` (the materialised twin, explicit use only).

    ``run(engine, *inputs)`` runs the loss on an engine; ``reference(*inputs)`` the twin.  Each backend carries its engine in
    ``extra["engine"]`` (None for the reference): the distributed loss runs exactly that engine
    across ranks, so the table here is the only one.
    """
    dispatch.register(op, dispatch.triton_backend(
        functools.partial(run, triton), faster="chunked",
        doc="fused Triton kernels; CPU only through TRITON_INTERPRET=1 (tests)", extra={"engine": triton}))
    dispatch.register(op, dispatch.Backend(
        "chunked", functools.partial(run, chunked), devices=("cpu", "cuda"), dtypes=FLOATS, doc=chunked_doc,
        extra={"engine": chunked}))
    dispatch.register(op, dispatch.Backend(
        "reference", reference, devices=ANY_DEVICE, auto_devices=(), dtypes=FLOATS,
        doc="materialised N x N logits (O(N^2) memory); the test oracle", extra={"engine": None}))
