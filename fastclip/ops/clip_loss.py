"""Symmetric InfoNCE (CLIP) loss with memory linear in the batch.

    loss = ( CE(logits, arange(N)) + CE(logits.T, arange(N)) ) / 2,   logits = s * A @ B.T (+ bias)

exactly as open_clip's ``ClipLoss`` defines it (``s`` = logit_scale, already exponentiated).

Algorithm (shared by the ``chunked`` and ``triton`` backends): the N x N logits are never stored.
Both directions come from the same similarity tile z = s * A_i @ B_j.T.

* pass 1 (forward): row log-sum-exp r_i and column log-sum-exp c_j, merged online over tiles
  (2*N^2*D FLOPs);
* pass 2 (backward): recompute each tile, form P = exp(z - r') + exp(z - c') (r', c' are the
  statistics shifted by log(2N), which folds in the 1/(2N) of the mean) and accumulate
  P @ B and P.T @ A (6*N^2*D FLOPs).

So fwd+bwd costs 8*N^2*D FLOPs and O(N*D + tile) memory.  The target (diagonal) terms and
label smoothing are rank-one and cost O(N*D):

    loss    = (sum_i r_i + sum_j c_j) / (2N) - lin / N
    lin     = s * [ (1-eps) * sum_i A_i.B_i + eps/N * (sum A).(sum B) ]
    dL/dA   = s * (P @ B  - ((1-eps) * B + eps/N * sum B) / N)
    dL/dB   = s * (P.T @ A - ((1-eps) * A + eps/N * sum A) / N)
    dL/ds   = sum_i A_i.(P @ B)_i - lin / (N s)   (computed without dividing by s)

A logit bias shifts every logit equally; cross-entropy is invariant to it, so it changes neither
the loss nor any gradient (its own gradient is zero).  It is accepted for API symmetry with SigLIP.

Layers in this file: reference twin -> chunked engine (PyTorch tiles) / triton engine (kernels in
``_clip_loss_triton``, imported lazily so that importing fastclip never imports Triton) ->
``ClipLossFunction`` -> ``clip_loss`` (functional API).  The module lives in ``fastclip.nn.loss``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import as_scalar_tensor, check_chunk_size, check_features, check_label_smoothing

__all__ = [
    "clip_loss",
    "clip_loss_reference",
    "ClipLossFunction",
    "chunked_lse",
    "chunked_softmax_grads",
    "default_chunk_size",
    "mm_dtype",
    "acc_dtype",
]


# ----------------------------------------------------------------------------------------------
# Reference twin: the plain materialised-logits formula (test oracle and slowest backend).
# ----------------------------------------------------------------------------------------------
def clip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                        logit_bias=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """open_clip's ClipLoss formula with the N x N logits materialised (O(N^2) memory)."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


# ----------------------------------------------------------------------------------------------
# Chunked engine: PyTorch tiles (CPU and CUDA).
# ----------------------------------------------------------------------------------------------
def default_chunk_size(device: torch.device) -> int:
    # CPU: square 1024-tiles keep BLAS near its peak (a 512 x 16384 slab runs ~40% slower) and the
    # fp32 tiles (4 MB each) in cache.  GPU: larger tiles amortise launches; memory stays O(tile).
    return 1024 if device.type == "cpu" else 4096


def mm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the tiles' matrix products run in."""
    # CPU BLAS is fastest (and exact enough) in fp32; on GPUs low precision uses the tensor cores.
    if t.dtype == torch.float64:
        return torch.float64
    return torch.float32 if t.device.type == "cpu" else t.dtype


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype tiles and gradients accumulate in (fp32; fp64 for fp64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_mm_dtype, _acc_dtype = mm_dtype, acc_dtype  # the names the other loss files import today


def _tile_logits(a_blk: torch.Tensor, b_blk: torch.Tensor, scale: float, acc: torch.dtype) -> torch.Tensor:
    z = torch.mm(a_blk, b_blk.T)
    z = z.to(acc) if z.dtype != acc else z
    return z.mul_(scale)


# Log-sum-exp statistics are kept in fp64: an fp32 lse of size ~400 carries an ulp of 3e-5, which
# exp(z - lse) would turn into a 3e-5 relative error on every probability.  The vectors are O(N),
# so the precision is free; the tiles stay in fp32 (see _sub_stat).  The distributed loss exchanges
# its cross-rank statistics in the same dtype.
STAT_DTYPE = torch.float64


def _sub_stat(z: torch.Tensor, stat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = z - stat with an fp64 ``stat`` applied to an fp32 tile as hi then lo part.

    z - hi is exact wherever it matters (Sterbenz: z within a factor 2 of hi), and lo is tiny."""
    if stat.dtype == z.dtype:
        return torch.sub(z, stat, out=out)
    hi = stat.to(z.dtype)
    lo = (stat - hi.to(stat.dtype)).to(z.dtype)
    return torch.sub(z, hi, out=out).sub_(lo)


def chunked_lse(a: torch.Tensor, b: torch.Tensor, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of z = scale * a @ b.T, tile by tile.

    a: [M, D], b: [K, D] (M and K may differ: the distributed loss passes local rows against all
    columns).  Returns (row_lse [M], col_lse [K]) in fp64; col_lse covers only the M rows given
    (merge partials with a logsumexp).
    """
    acc, mmd, st = _acc_dtype(a), _mm_dtype(a), STAT_DTYPE
    M, K = a.shape[0], b.shape[0]
    row_lse = torch.empty(M, device=a.device, dtype=st)
    col_lse = torch.full((K,), -math.inf, device=a.device, dtype=st)
    buf = torch.empty(min(chunk, M) * min(chunk, K), device=a.device, dtype=acc)
    for i in range(0, M, chunk):
        a_blk = a[i:i + chunk].to(mmd)
        row_parts = []
        for j in range(0, K, chunk):
            z = _tile_logits(a_blk, b[j:j + chunk].to(mmd), scale, acc)
            e = buf[: z.numel()].view_as(z)
            # max (an exact logit) + log(sum exp(z - max)) (small), added in fp64
            m_r = z.amax(dim=1, keepdim=True)
            row_parts.append(m_r.squeeze(1).to(st) + torch.sub(z, m_r, out=e).exp_().sum(dim=1).log_().to(st))
            m_c = z.amax(dim=0, keepdim=True)
            tile_c = m_c.squeeze(0).to(st) + torch.sub(z, m_c, out=e).exp_().sum(dim=0).log_().to(st)
            torch.logaddexp(col_lse[j:j + chunk], tile_c, out=col_lse[j:j + chunk])
        row_lse[i:i + chunk] = torch.logsumexp(torch.stack(row_parts), dim=0)
    return row_lse, col_lse


def chunked_softmax_grads(a: torch.Tensor, b: torch.Tensor, scale: float, row_lse: torch.Tensor,
                          col_lse: torch.Tensor, chunk: int, *, need_a: bool = True,
                          need_b: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(P @ b, P.T @ a) with P = exp(z - row_lse[:, None]) + exp(z - col_lse[None, :]).

    z = scale * a @ b.T recomputed tile by tile; accumulation in fp32 (fp64 for fp64 inputs).
    Callers fold the loss's averaging weights into row_lse/col_lse (lse + log(1/weight)).
    The statistics may be fp64 (as chunked_lse returns them); they are applied in two fp32 steps.
    """
    acc, mmd = _acc_dtype(a), _mm_dtype(a)
    M, K = a.shape[0], b.shape[0]
    ga = torch.zeros(a.shape, device=a.device, dtype=acc) if need_a else None
    gb = torch.zeros(b.shape, device=a.device, dtype=acc) if need_b else None
    buf = torch.empty(min(chunk, M) * min(chunk, K), device=a.device, dtype=acc)
    for i in range(0, M, chunk):
        a_blk = a[i:i + chunk].to(mmd)
        r = row_lse[i:i + chunk].unsqueeze(1)
        for j in range(0, K, chunk):
            b_blk = b[j:j + chunk].to(mmd)
            z = _tile_logits(a_blk, b_blk, scale, acc)
            p = buf[: z.numel()].view_as(z)
            _sub_stat(z, r, p).exp_()
            p.add_(_sub_stat(z, col_lse[j:j + chunk], z).exp_())
            pm = p if mmd == acc else p.to(mmd)
            if need_a:
                if mmd == acc:
                    ga[i:i + chunk].addmm_(pm, b_blk)
                else:
                    ga[i:i + chunk] += torch.mm(pm, b_blk).to(acc)
            if need_b:
                if mmd == acc:
                    gb[j:j + chunk].addmm_(pm.T, a_blk)
                else:
                    gb[j:j + chunk] += torch.mm(pm.T, a_blk).to(acc)
    return ga, gb


class _ChunkedEngine:
    name = "chunked"

    @staticmethod
    def lse(a, b, scale, chunk):
        return chunked_lse(a, b, scale, chunk)

    @staticmethod
    def softmax_grads(a, b, scale, row_lse, col_lse, chunk, need_a, need_b):
        return chunked_softmax_grads(a, b, scale, row_lse, col_lse, chunk, need_a=need_a, need_b=need_b)


class _TritonEngine:
    name = "triton"

    @staticmethod
    def lse(a, b, scale, chunk):
        from . import _clip_loss_triton as k
        return k.clip_lse(a, b, scale)

    @staticmethod
    def softmax_grads(a, b, scale, row_lse, col_lse, chunk, need_a, need_b):
        from . import _clip_loss_triton as k
        return k.clip_softmax_grads(a, b, scale, row_lse, col_lse, need_a=need_a, need_b=need_b)


def _rowdot_sum(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, chunk: int) -> torch.Tensor:
    """sum_i a_i . b_i in ``acc`` precision, blockwise so low-precision inputs are never copied whole."""
    total = torch.zeros((), device=a.device, dtype=acc)
    for i in range(0, a.shape[0], chunk):
        total += (a[i:i + chunk].to(acc) * b[i:i + chunk].to(acc)).sum()
    return total


def _target_terms(a, b, eps, acc, chunk):
    """(sum_i a_i.b_i, sum a, sum b) in accumulation precision."""
    diag = _rowdot_sum(a, b, acc, chunk)
    sa = a.sum(dim=0, dtype=acc) if eps else None
    sb = b.sum(dim=0, dtype=acc) if eps else None
    return diag, sa, sb


def _finish_grads(ga, gb, ds, a, b, scale_dtype, *, g, coef, w, smooth, sa, sb, rows=slice(None)):
    """(grad_a, grad_b, grad_s): the last step of every CLIP backward, here and in distributed_loss.

    ga = P @ b [M, D] and gb = P.T @ a [K, D] in accumulation precision, finished in place (None
    where that input needs no gradient); ds = sum_i a_i.(P @ b)_i - lin / M, the raw dL/ds (None
    where logit_scale needs none).  Row i of a is paired with row ``rows``[i] of b.  Subtracts the
    target terms, w * b[rows] from ga and w * a from gb[rows] (w = (1 - eps) / M), and with label
    smoothing (sa, sb given) smooth * sum b and smooth * sum a from every row; multiplies the
    feature gradients by ``coef`` (the incoming gradient times s) and ds by ``g`` (the incoming
    gradient), and casts each to its input's dtype.  w, smooth, coef and ds come from the callers,
    which compute them in different precisions (the distributed losses hold fp64 statistics).
    """
    acc = _acc_dtype(a)
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


# ----------------------------------------------------------------------------------------------
# Autograd Function (shared by the chunked and triton engines)
# ----------------------------------------------------------------------------------------------
class ClipLossFunction(torch.autograd.Function):
    """forward(image_features, text_features, logit_scale (0-dim fp32 tensor), label_smoothing,
    chunk, engine) -> 0-dim loss.  Only pass 1 runs in forward; pass 2 runs in backward."""

    @staticmethod
    def forward(ctx, a, b, scale_t, eps, chunk, engine):
        n = a.shape[0]
        acc = _acc_dtype(a)
        s = float(scale_t)
        row_lse, col_lse = engine.lse(a, b, s, chunk)
        diag, sa, sb = _target_terms(a, b, eps, acc, chunk)
        lin_raw = (1.0 - eps) * diag + ((eps / n) * torch.dot(sa, sb) if eps else 0.0)
        loss = (row_lse.sum().to(acc) + col_lse.sum().to(acc)) / (2 * n) - s * lin_raw / n
        ctx.save_for_backward(a, b, scale_t, row_lse, col_lse)
        ctx.extra = (eps, chunk, engine, lin_raw, sa, sb)
        out_dtype = torch.promote_types(a.dtype, torch.float32)
        return loss.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a, b, scale_t, row_lse, col_lse = ctx.saved_tensors
        eps, chunk, engine, lin_raw, sa, sb = ctx.extra
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        if not (need_a or need_b or need_s):
            return None, None, None, None, None, None
        n = a.shape[0]
        acc = _acc_dtype(a)
        s = float(scale_t)
        g = grad_out.to(acc)
        shift = math.log(2 * n)  # folds the 1/(2N) of the two means into the exponent
        ga, gb = engine.softmax_grads(a, b, s, row_lse + shift, col_lse + shift, chunk,
                                      need_a or need_s, need_b)
        ds = _rowdot_sum(a, ga, acc, chunk) - lin_raw / n if need_s else None
        grads = _finish_grads(ga if need_a else None, gb, ds, a, b, scale_t.dtype, g=g, coef=g * s,
                              w=(1.0 - eps) / n, smooth=eps / n / n, sa=sa, sb=sb)
        return (*grads, None, None, None)


# ----------------------------------------------------------------------------------------------
# Backends and the functional API
# ----------------------------------------------------------------------------------------------
def _run_reference(a, b, scale_t, bias_t, eps, chunk):
    return clip_loss_reference(a, b, scale_t.to(a.dtype), None if bias_t is None else bias_t.to(a.dtype), eps)


def _run_engine(engine):
    def run(a, b, scale_t, bias_t, eps, chunk):
        chunk = chunk or default_chunk_size(a.device)
        loss = ClipLossFunction.apply(a, b, scale_t, eps, chunk, engine)
        if bias_t is not None and bias_t.requires_grad:
            loss = loss + 0.0 * bias_t  # cross-entropy is shift-invariant: d loss / d bias = 0
        return loss
    return run


def _triton_check(device=None, dtype=None, **_):
    return dispatch.triton_device_reasons(device, faster="chunked")


dispatch.register("clip_loss", dispatch.Backend(
    "triton", _run_engine(_TritonEngine), devices=("cuda", "cpu"), packages=("triton",),
    check=_triton_check, doc="fused Triton kernels; CPU only through TRITON_INTERPRET=1 (tests)",
    extra={"engine": _TritonEngine}))
dispatch.register("clip_loss", dispatch.Backend(
    "chunked", _run_engine(_ChunkedEngine), devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
    doc="PyTorch tiles, two passes, O(N*D + tile) memory; CPU and CUDA",
    extra={"engine": _ChunkedEngine}))
dispatch.register("clip_loss", dispatch.Backend(
    "reference", _run_reference, devices=("cpu", "cuda", "mps", "xpu"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
    doc="materialised N x N logits (O(N^2) memory); the test oracle",
    extra={"engine": None}))  # the distributed loss runs the materialised oracle

def _auto_skip(device: torch.device) -> tuple:
    # Automatic selection never picks the O(N^2) oracle, nor the Triton interpreter on CPU.
    return ("reference",) + (("triton",) if device.type != "cuda" else ())


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
              logit_bias=None, *, backend: str = "auto", chunk_size: Optional[int] = None,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE loss of paired features, without materialising the N x N logits.

    Args:
        image_features: [N, D] float32/float16/bfloat16 (float64 on chunked/reference).
        text_features: [N, D], same dtype and device.  Row i of each is a positive pair.
        logit_scale: the already-exponentiated temperature, a float or a one-element tensor
            (gradients flow to it when it requires grad).
        logit_bias: optional additive bias; the loss is invariant to it (gradient zero).
        backend: "auto" (default), "triton", "chunked" or "reference"; see ``fastclip.info``.
        chunk_size: tile edge of the chunked backend (default 1024 on CPU, 4096 on GPU).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``, applied to both directions.

    Returns:
        0-dim tensor, (CE(logits) + CE(logits.T)) / 2 with logits = logit_scale * I @ T.T, in
        float32 for low-precision inputs on the chunked and triton backends (statistics are
        accumulated in fp32); the reference backend computes in the input dtype, as open_clip does.
    """
    check_features(image_features, text_features)
    chunk = check_chunk_size(chunk_size)
    eps = check_label_smoothing(label_smoothing)
    scale_t = as_scalar_tensor(logit_scale, "logit_scale", image_features, required=True)
    bias_t = as_scalar_tensor(logit_bias, "logit_bias", image_features, required=False)
    chosen = dispatch.select("clip_loss", backend, device=image_features.device,
                             dtype=image_features.dtype, auto_skip=_auto_skip(image_features.device))
    return chosen.fn(image_features, text_features, scale_t, bias_t, eps, chunk)
