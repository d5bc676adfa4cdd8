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

Layers in this file: reference twin -> chunked engine (PyTorch tiles, ``fastclip.ops.tiles``) /
triton engine (kernels in ``_clip_loss_triton``, imported lazily so that importing fastclip never
imports Triton) -> ``ClipLossFunction`` -> ``clip_loss`` (functional API).  The module lives in
``fastclip.nn.loss``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import as_scalar_tensor, check_chunk_size, check_features, check_label_smoothing
from .tiles import (STAT_DTYPE, acc_dtype, chunked_lse, chunked_softmax_grads, default_chunk_size,
                    finish_clip_grads, mm_dtype, register_loss_backends, rowdot_sum)

__all__ = [
    "clip_loss",
    "clip_loss_reference",
    "ClipLossFunction",
    "ChunkedEngine",
    "TritonEngine",
    "run_engine",
    "STAT_DTYPE",
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
# Engines: PyTorch tiles (fastclip.ops.tiles) or the Triton kernels (_clip_loss_triton)
# ----------------------------------------------------------------------------------------------
class ChunkedEngine:
    """The two passes on PyTorch tiles (CPU and CUDA)."""

    name = "chunked"

    @staticmethod
    def lse(a, b, scale, chunk):
        return chunked_lse(a, b, scale, chunk)

    @staticmethod
    def softmax_grads(a, b, scale, row_lse, col_lse, chunk, need_a, need_b):
        return chunked_softmax_grads(a, b, scale, row_lse, col_lse, chunk, need_a=need_a, need_b=need_b)


class TritonEngine:
    """The two passes as Triton kernels (imported on first use)."""

    name = "triton"

    @staticmethod
    def lse(a, b, scale, chunk):
        from . import _clip_loss_triton as k
        return k.clip_lse(a, b, scale)

    @staticmethod
    def softmax_grads(a, b, scale, row_lse, col_lse, chunk, need_a, need_b):
        from . import _clip_loss_triton as k
        return k.clip_softmax_grads(a, b, scale, row_lse, col_lse, need_a=need_a, need_b=need_b)


def _target_terms(a, b, eps, acc, chunk):
    """(sum_i a_i.b_i, sum a, sum b) in accumulation precision."""
    diag = rowdot_sum(a, b, acc, chunk)
    sa = a.sum(dim=0, dtype=acc) if eps else None
    sb = b.sum(dim=0, dtype=acc) if eps else None
    return diag, sa, sb


# ----------------------------------------------------------------------------------------------
# Autograd Function (shared by the chunked and triton engines)
# ----------------------------------------------------------------------------------------------
class ClipLossFunction(torch.autograd.Function):
    """forward(image_features, text_features, logit_scale (0-dim fp32 tensor), label_smoothing,
    chunk, engine) -> 0-dim loss.  Only pass 1 runs in forward; pass 2 runs in backward."""

    @staticmethod
    def forward(ctx, a, b, scale_t, eps, chunk, engine):
        n = a.shape[0]
        acc = acc_dtype(a)
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
        acc = acc_dtype(a)
        s = float(scale_t)
        g = grad_out.to(acc)
        shift = math.log(2 * n)  # folds the 1/(2N) of the two means into the exponent
        ga, gb = engine.softmax_grads(a, b, s, row_lse + shift, col_lse + shift, chunk,
                                      need_a or need_s, need_b)
        ds = rowdot_sum(a, ga, acc, chunk) - lin_raw / n if need_s else None
        grads = finish_clip_grads(ga if need_a else None, gb, ds, a, b, scale_t.dtype, g=g, coef=g * s,
                              w=(1.0 - eps) / n, smooth=eps / n / n, sa=sa, sb=sb)
        return (*grads, None, None, None)


# ----------------------------------------------------------------------------------------------
# Backends and the functional API
# ----------------------------------------------------------------------------------------------
def _run_reference(a, b, scale_t, bias_t, eps, chunk):
    return clip_loss_reference(a, b, scale_t.to(a.dtype), None if bias_t is None else bias_t.to(a.dtype), eps)


def run_engine(engine, a, b, scale_t, bias_t, eps: float, chunk: Optional[int]) -> torch.Tensor:
    """The loss of (a, b) on ``engine`` (ChunkedEngine or TritonEngine) with checked scalars: the
    0-dim logit_scale tensor ``scale_t`` and optional ``bias_t`` (as ``as_scalar_tensor`` makes them)."""
    loss = ClipLossFunction.apply(a, b, scale_t, eps, chunk or default_chunk_size(a.device), engine)
    if bias_t is not None and bias_t.requires_grad:
        loss = loss + 0.0 * bias_t  # cross-entropy is shift-invariant: d loss / d bias = 0
    return loss


register_loss_backends("clip_loss", run_engine, _run_reference, triton=TritonEngine, chunked=ChunkedEngine,
                       chunked_doc="PyTorch tiles (fp32 CPU tiles' elementwise work in fastclip._C when it "
                                   "loaded), two passes, O(N*D + tile) memory; CPU and CUDA")


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
    chosen = dispatch.select("clip_loss", backend, device=image_features.device, dtype=image_features.dtype,
                             shapes=(image_features.shape, text_features.shape))
    return chosen.fn(image_features, text_features, scale_t, bias_t, eps, chunk)
