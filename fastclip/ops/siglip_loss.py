"""Sigmoid (SigLIP) loss with memory linear in the batch.

    loss = -sum_ij log sigmoid(y_ij * z_ij) / N,   z = s * A @ B.T + bias,   y = 2 * eye(N) - 1

exactly as open_clip's ``SigLipLoss`` defines it (sum over all pairs divided by N).

Since log sigmoid(-z) = -softplus(z) and softplus(-z) - softplus(z) = -z, the positives are a
rank-one correction and every tile is treated alike:

    loss  = ( sum_ij softplus(z_ij) - sum_i z_ii ) / N
    dL/dz = ( sigmoid(z) - eye ) / N

No statistic couples the tiles, so one sweep yields the loss and, when gradients are needed, the
accumulated sigmoid(z) @ B and sigmoid(z).T @ A (6*N^2*D FLOPs, O(N*D + tile) memory).  The
gradients are formed in forward and scaled by the incoming gradient in backward.

Layers: reference twin -> chunked sweep (PyTorch tiles) / triton sweep (``_siglip_loss_triton``,
imported lazily) -> ``SigLipLossFunction`` -> ``siglip_loss``.  The module is fastclip.nn.SigLipLoss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import as_scalar_tensor, check_chunk_size, check_features
from .tiles import (
    acc_dtype,
    accumulate_mm,
    default_chunk_size,
    mm_dtype,
    register_loss_backends,
    rowdot_sum,
    tile_logits,
)

__all__ = ["siglip_loss", "siglip_loss_reference", "SigLipLossFunction", "chunked_siglip_sweep", "ChunkedSweep",
           "TritonSweep", "run_engine"]


def siglip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias) -> torch.Tensor:
    """open_clip's SigLipLoss formula with the N x N logits materialised."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def chunked_siglip_sweep(a: torch.Tensor, b: torch.Tensor, scale: float, bias: float, chunk: int,
                         need_grads: bool):
    """One pass over z = scale * a @ b.T + bias (a: [M, D], b: [K, D]).

    Returns (sum softplus(z), sigmoid(z) @ b or None, sigmoid(z).T @ a or None, sum sigmoid(z) or
    None), accumulated in fp32 (fp64 for fp64 inputs).
    """
    acc, mmd = acc_dtype(a), mm_dtype(a)
    M, K = a.shape[0], b.shape[0]
    total = torch.zeros((), device=a.device, dtype=acc)
    ga = torch.zeros(a.shape, device=a.device, dtype=acc) if need_grads else None
    gb = torch.zeros(b.shape, device=a.device, dtype=acc) if need_grads else None
    sig_sum = torch.zeros((), device=a.device, dtype=acc) if need_grads else None
    buf = torch.empty(min(chunk, M) * min(chunk, K), device=a.device, dtype=acc)
    for i in range(0, M, chunk):
        a_blk = a[i:i + chunk].to(mmd)
        for j in range(0, K, chunk):
            b_blk = b[j:j + chunk].to(mmd)
            z = tile_logits(a_blk, b_blk, scale, acc).add_(bias)
            t = buf[: z.numel()].view_as(z)
            # softplus returns z itself above `threshold`; exp(-20) is below fp32 resolution, fp64 needs 40.
            total += F.softplus(z, threshold=40.0 if acc == torch.float64 else 20.0).sum()
            if need_grads:
                torch.sigmoid(z, out=t)
                sig_sum += t.sum()
                pm = t.to(mmd)  # once per tile, for both products (t itself when mmd == acc)
                accumulate_mm(ga[i:i + chunk], pm, b_blk)
                accumulate_mm(gb[j:j + chunk], pm.T, a_blk)
    return total, ga, gb, sig_sum


class ChunkedSweep:
    """The sweep on PyTorch tiles (CPU and CUDA)."""

    name = "chunked"

    @staticmethod
    def sweep(a, b, scale, bias, chunk, need_grads):
        return chunked_siglip_sweep(a, b, scale, bias, chunk, need_grads)


class TritonSweep:
    """The sweep as a Triton kernel (imported on first use)."""

    name = "triton"

    @staticmethod
    def sweep(a, b, scale, bias, chunk, need_grads):
        from . import _siglip_loss_triton as k
        return k.siglip_sweep(a, b, scale, bias, need_grads)


class SigLipLossFunction(torch.autograd.Function):
    """forward(a, b, logit_scale (0-dim fp32), logit_bias (0-dim fp32), chunk, engine, needs) -> loss.

    ``needs``: which of the four inputs need a gradient, computed by the caller where grad mode is
    visible (inside forward, ``ctx.needs_input_grad`` ignores ``torch.no_grad()``)."""

    @staticmethod
    def forward(ctx, a, b, scale_t, bias_t, chunk, engine, needs):
        n = a.shape[0]
        acc = acc_dtype(a)
        s, c = float(scale_t), float(bias_t)
        need = any(needs)
        total, ga, gb, sig_sum = engine.sweep(a, b, s, c, chunk, need)
        diag = rowdot_sum(a, b, acc, chunk)
        loss = (total - s * diag - n * c) / n
        if need:
            grads = [None] * 4
            if needs[2]:
                grads[2] = ((rowdot_sum(a, ga, acc, chunk) - diag) / n).to(scale_t.dtype)
            if needs[3]:
                grads[3] = ((sig_sum - n) / n).to(bias_t.dtype)
            if needs[0]:
                grads[0] = ga.sub_(b.to(acc)).mul_(s / n)
            if needs[1]:
                grads[1] = gb.sub_(a.to(acc)).mul_(s / n)
            ctx.grads = grads
            ctx.dtypes = (a.dtype, b.dtype)
        return loss.to(torch.promote_types(a.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # Out of place: the stored gradients must survive a second backward (retain_graph=True).
        out = [None if grad is None else grad * grad_out.to(grad.dtype) for grad in ctx.grads]
        out[:2] = [None if x is None else x.to(dt) for x, dt in zip(out[:2], ctx.dtypes)]
        return (*out, None, None, None)


def _run_reference(a, b, scale_t, bias_t, chunk):
    return siglip_loss_reference(a, b, scale_t.to(a.dtype), bias_t.to(a.dtype))


def run_engine(engine, a, b, scale_t, bias_t, chunk: Optional[int]) -> torch.Tensor:
    """The loss of (a, b) on ``engine`` (ChunkedSweep or TritonSweep) with checked 0-dim scalars."""
    needs = tuple(torch.is_grad_enabled() and t.requires_grad for t in (a, b, scale_t, bias_t))
    return SigLipLossFunction.apply(a, b, scale_t, bias_t, chunk or default_chunk_size(a.device), engine, needs)


register_loss_backends("siglip_loss", run_engine, _run_reference, triton=TritonSweep, chunked=ChunkedSweep,
                       chunked_doc="PyTorch tiles, one sweep, O(N*D + tile) memory; CPU and CUDA")


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                backend: str = "auto", chunk_size: Optional[int] = None) -> torch.Tensor:
    """Sigmoid loss of paired features, without materialising the N x N logits.

    Args:
        image_features, text_features: [N, D], same dtype and device; row i of each is a pair.
        logit_scale: already-exponentiated scale, a float or one-element tensor.
        logit_bias: additive bias, a float or one-element tensor (required, as in open_clip).
        backend: "auto", "triton", "chunked" or "reference".
        chunk_size: tile edge of the chunked backend.

    Returns:
        0-dim tensor: -sum_ij log sigmoid(y_ij * logits_ij) / N, y = +1 on the diagonal, -1 off it.
    """
    check_features(image_features, text_features)
    chunk = check_chunk_size(chunk_size)
    scale_t = as_scalar_tensor(logit_scale, "logit_scale", image_features, required=True)
    bias_t = as_scalar_tensor(logit_bias, "logit_bias", image_features, required=True)
    chosen = dispatch.select("siglip_loss", backend, device=image_features.device, dtype=image_features.dtype,
                             shapes=(image_features.shape, text_features.shape))
    return chosen.fn(image_features, text_features, scale_t, bias_t, chunk)
