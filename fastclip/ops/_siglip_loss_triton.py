"""Triton kernels of the SigLIP loss: the ``triton`` engine of ``fastclip.ops.siglip_loss``.

Imported lazily by ``siglip_loss.TritonSweep``.  The launcher has the contract of
``chunked_siglip_sweep``:

    siglip_sweep(a, b, scale, bias, need_grads) -> (total, ga, gb, sig_sum)
        z = scale * a @ b.T + bias          a: [M, D], b: [K, D], fp32/fp16/bf16, any strides
        total   = sum_ij softplus(z_ij)                  fp32 0-dim
        ga      = sigmoid(z) @ b          [M, D] fp32    (None unless need_grads)
        gb      = sigmoid(z).T @ a        [K, D] fp32    (None unless need_grads)
        sig_sum = sum_ij sigmoid(z_ij)           fp32 0-dim (None unless need_grads)

Design
------
One kernel, ``_siglip_sweep_kernel``, over row blocks of x, sweeping all column blocks of y and
recomputing each z tile from a K-loop over D (masked BLOCK_D chunks, fp32 accumulation):

* S1 = kernel(x=a, y=b) with the sums: per row, sum softplus(z) and sum sigmoid(z), written to two
  [M] fp32 vectors that torch sums (deterministic, no atomics, pairwise-summed by torch); with
  need_grads it also accumulates sigmoid(z) @ b into the program's own rows of ga.
* S2 = kernel(x=b, y=a) without the sums: sigmoid(z.T) @ a = gb, since z.T = scale * b @ a.T + bias.
  Only launched when gradients are needed.

The gradient accumulation (register accumulator when D <= BLOCK_DO, else read-modify-write of
the program's own fp32 output rows in BLOCK_DO chunks) and the logits tile are the helpers of
``_clip_loss_triton``; see its docstring for why.  One exp per element serves both functions:
e = exp(-|z|), softplus = max(z, 0) + log1p(e), sigmoid = (z >= 0 ? 1 : e) / (1 + e).  log1p is
not available under the interpreter (libdevice), so it uses the exact-rounding identity
log1p(e) = log(u) * e / (u - 1), u = 1 + e.

FLOPs: loss only 2*M*K*D; with gradients S1 4*M*K*D + S2 4*M*K*D = 8*M*K*D (the algorithm needs 6:
the z tile is recomputed by S2, the price of each program owning its output rows).
Memory: fp32 outputs O((M+K)*D) and two [M] fp32 vectors; nothing of size M x K.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._clip_loss_triton import check_pair, default_config
from ._triton_utils import (
    INTERPRET,
    LaunchConfig,
    accumulate_pv,
    device_ctx,
    dot_precision,
    logits_tile,
    store_acc,
)

__all__ = ["siglip_sweep"]

_LOG2E = 1.4426950408889634


@triton.jit
def _log2_1p(e):
    """log2(1 + e) for e in [0, 1], accurate for tiny e (log(u) * e / (u - 1), u = fl(1 + e))."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e * 1.4426950408889634, tl.log2(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _siglip_sweep_kernel(x_ptr, y_ptr, out_ptr, row_sp_ptr, row_sig_ptr,
                         M, K, D, stride_xm, stride_xd, stride_ym, stride_yd, stride_om, stride_od,
                         scale_log2, bias_log2,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, COMPUTE_SUMS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                         ACC_IN_REGS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Rows of x in this program: softplus/sigmoid row sums (COMPUTE_SUMS), sigmoid(z) @ y (COMPUTE_GRAD).

    Works in base 2: z2 = z * log2(e), so exp(-|z|) = exp2(-|z2|) and
    softplus = ln2 * (max(z2, 0) + log2(1 + e)).
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    sp_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sig_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    num_col_blocks = tl.cdiv(K, BLOCK_N)
    for cb in range(num_col_blocks):
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K
        z2 = logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
                          stride_xm, stride_xd, stride_ym, stride_yd,
                          BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION) * scale_log2 + bias_log2
        valid = mask_m[:, None] & mask_n[None, :]
        e = tl.exp2(-tl.abs(z2))
        if COMPUTE_SUMS:
            sp = tl.maximum(z2, 0.0) + _log2_1p(e)
            sp_rows += tl.sum(tl.where(valid, sp, 0.0), axis=1)
        if COMPUTE_GRAD:
            sig = tl.where(z2 >= 0.0, 1.0, e) / (1.0 + e)
            sig = tl.where(valid, sig, 0.0)
            if COMPUTE_SUMS:
                sig_rows += tl.sum(sig, axis=1)
            if not UPCAST:
                sig = sig.to(y_ptr.dtype.element_ty)  # tensor-core operand, as the chunked backend does
            acc = accumulate_pv(sig, y_ptr, out_ptr, acc, offs_m, offs_n, mask_m, mask_n, D,
                                 stride_ym, stride_yd, stride_om, stride_od,
                                 BLOCK_DO, ACC_IN_REGS, UPCAST, DOT_PRECISION)
    if COMPUTE_SUMS:
        tl.store(row_sp_ptr + offs_m, sp_rows * 0.6931471805599453, mask=mask_m)
        if COMPUTE_GRAD:
            tl.store(row_sig_ptr + offs_m, sig_rows, mask=mask_m)
    if COMPUTE_GRAD and ACC_IN_REGS:
        store_acc(out_ptr, acc, offs_m, mask_m, D, stride_om, stride_od, BLOCK_DO)


def _launch(x, y, out, row_sp, row_sig, scale, bias, cfg, sums: bool, grad: bool) -> None:
    M, D = x.shape
    K = y.shape[0]
    o = out if out is not None else row_sp  # unused pointer when not grad
    with device_ctx(x):
        _siglip_sweep_kernel[(triton.cdiv(M, cfg.block_m),)](
            x, y, o, row_sp, row_sig if row_sig is not None else row_sp,
            M, K, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            o.stride(0), o.stride(-1),
            float(scale) * _LOG2E, float(bias) * _LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
            COMPUTE_SUMS=sums, COMPUTE_GRAD=grad, ACC_IN_REGS=D <= cfg.block_do,
            UPCAST=INTERPRET, DOT_PRECISION=dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def siglip_sweep(a: torch.Tensor, b: torch.Tensor, scale: float, bias: float, need_grads: bool, *,
                 config: Optional[LaunchConfig] = None):
    """One sweep over z = scale * a @ b.T + bias (the contract of ``chunked_siglip_sweep``).

    Returns (sum softplus(z), sigmoid(z) @ b or None, sigmoid(z).T @ a or None, sum sigmoid(z) or
    None), all fp32.
    """
    check_pair(a, b, "siglip_sweep")
    M, D = a.shape
    K = b.shape[0]
    dev = a.device
    f32 = torch.float32
    if M == 0 or K == 0:
        zero = torch.zeros((), device=dev, dtype=f32)
        if not need_grads:
            return zero, None, None, None
        return (zero, torch.zeros((M, D), device=dev, dtype=f32), torch.zeros((K, D), device=dev, dtype=f32),
                zero.clone())
    cfg = config or default_config("siglip", M, K, D, a.dtype)
    in_regs = D <= cfg.block_do
    alloc = torch.empty if in_regs else torch.zeros  # the global read-modify-write path needs zeros
    row_sp = torch.empty(M, device=dev, dtype=f32)
    row_sig = torch.empty(M, device=dev, dtype=f32) if need_grads else None
    ga = alloc((M, D), device=dev, dtype=f32) if need_grads else None
    _launch(a, b, ga, row_sp, row_sig, scale, bias, cfg, sums=True, grad=need_grads)
    total = row_sp.sum()
    if not need_grads:
        return total, None, None, None
    gb = alloc((K, D), device=dev, dtype=f32)
    # z.T = scale * b @ a.T + bias: the same kernel over rows of b gives sigmoid(z).T @ a.
    _launch(b, a, gb, row_sp, None, scale, bias, cfg, sums=False, grad=True)
    return total, ga, gb, row_sig.sum()
