"""Triton kernels of the CLIP (InfoNCE) loss: the ``triton`` engine of ``fastclip.ops.clip_loss``.

Imported lazily by ``clip_loss.TritonEngine`` (importing fastclip never imports Triton).  The two
launchers have the contracts of ``chunked_lse`` and ``chunked_softmax_grads``:

    clip_lse(a, b, scale)                                   -> (row_lse [M], col_lse [K])  fp64
    clip_softmax_grads(a, b, scale, row_lse, col_lse, ...)  -> (P @ b [M, D], P.T @ a [K, D]) fp32
        z = scale * a @ b.T,   P_ij = exp(z_ij - row_lse_i) + exp(z_ij - col_lse_j)

a: [M, D], b: [K, D], fp32/fp16/bf16, any strides (the kernels take explicit strides; nothing is
made contiguous).  The M x K logits are never stored: every kernel recomputes its z tile from a
K-loop over D in BLOCK_D chunks (masked, so D = 257 works) with fp32 accumulation.

Design
------
K1 ``_clip_lse_kernel`` (forward, 2*M*K*D FLOPs).  A fixed number P of persistent programs
   (P = min(#row blocks, SM count) on a GPU, at most 2 under the interpreter) take row blocks
   pid, pid + P, ...; each sweeps all column blocks.  Row statistics are an online (max, sum of
   exp(z - max)) in registers, stored once per row block.  Column statistics go to a private row
   ``pid`` of two [P, K] fp32 buffers (running max, running sum) that the program
   read-modify-writes; no other program touches that row, so there are no atomics and the result
   is deterministic.  Torch merges the P partial rows and forms lse = max + log(sum) in fp64
   (O(P*K) work).
K2/K3 ``_softmax_grad_kernel`` (backward, 2 x 4*M*K*D FLOPs).  P is symmetric under swapping
   (a, row_lse) <-> (b, col_lse), so one kernel computes out = P(x, y) @ y over row blocks of x:
   launched with (a, b) it gives ga (K2), with (b, a) it gives gb (K3; it still computes its tile
   as a_blk @ b_blk.T, like K1, and transposes P, so that the recomputed logits round exactly as
   those behind the statistics, see the kernel's docstring).  Each program owns its
   output rows, so no atomics are needed.  Per column block it recomputes the z tile, forms P in
   registers (cast to the input dtype for the tensor cores on GPU, as the chunked backend does),
   and adds P @ y_j to its output rows.  The output width D is handled in BLOCK_DO chunks:
     - D <= BLOCK_DO: the [BLOCK_M, BLOCK_DO] fp32 accumulator lives in registers across the
       whole column loop and is stored once;
     - D >  BLOCK_DO: the program accumulates into its own fp32 output rows in global memory
       (load chunk, += P @ y_chunk, store), chunk by chunk.  Keeping a [BLOCK_M, D] accumulator
       in registers is impossible for D = 768/1024 (384 KB+ for BLOCK_M = 128), and recomputing
       the z tile once per output chunk would multiply the recompute FLOPs by D/BLOCK_DO.  The
       extra traffic is 8*BLOCK_M*D bytes per tile against 4*BLOCK_M*BLOCK_N*D FLOPs, i.e.
       2/BLOCK_N bytes/FLOP, served mostly from L2 (a program revisits the same rows).
   The recompute is done by both K2 and K3, so the backward executes 8*M*K*D FLOPs for the
   6*M*K*D the algorithm needs (the price of owning outputs without atomics).

FLOPs per call: clip_lse 2*M*K*D; clip_softmax_grads 4*M*K*D per requested output (8*M*K*D for
both); a fwd+bwd CLIP step runs 10*M*K*D for the 8*M*K*D of the algorithm.
Memory per call: inputs + fp32 outputs (O((M+K)*D)), K1's partials 2*P*K fp32 (P <= SM count,
a constant independent of N) and O(M + K) statistics.  Nothing of size M x K is allocated.

Numerics: fp32 accumulation everywhere; under the interpreter every load of a/b is cast to fp32
right away (numpy has no bf16 arithmetic); on GPU fp16/bf16 operands go to tl.dot unconverted
(fp32 accumulate) and fp32 operands use ``tf32x3`` (about fp32 accuracy; plain tf32 would put a
~1e-3 relative error on logits that logit_scale = 100 amplifies).  Statistics follow the chunked
engine: maxima are exact fp32 logits and z - max is exact near the max (Sterbenz), lse is
assembled in fp64, and the backward applies an fp64 lse as an fp32 (hi, lo) pair, so the only
rounding left on a probability is that of the logit itself.  With fp16 inputs the P tile is cast
to fp16 before the second product; for very large N its entries (<= 1/N after the caller's shift)
fall into the fp16 subnormal range, exactly as in the chunked backend; use bf16 for large N.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import (
    DTYPES,
    INTERPRET,
    LaunchConfig,
    accumulate_pv,
    check_runnable,
    device_ctx,
    dot_precision,
    logits_tile,
    pow2_clamp,
    store_acc,
)

__all__ = ["LaunchConfig", "clip_lse", "clip_softmax_grads", "check_pair", "default_config"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _clip_lse_kernel(a_ptr, b_ptr, row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr,
                     M, K, D, stride_am, stride_ad, stride_bm, stride_bd, stride_part,
                     scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """K1: per row of z = scale * a @ b.T its max and sum exp(z - max); per program column partials.

    Program pid handles row blocks pid, pid + P, ... (P = number of programs) and owns row pid of
    the [P, K] column partials (running max, sum of exp(z - max)).  Maxima are exact fp32 logits,
    so the host forms lse = max + log(sum) in fp64 (see ``clip_lse``).
    """
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    num_col_blocks = tl.cdiv(K, BLOCK_N)
    part_max = col_max_ptr + pid.to(tl.int64) * stride_part
    part_sum = col_sum_ptr + pid.to(tl.int64) * stride_part
    for rb in range(pid, num_row_blocks, num_progs):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for cb in range(num_col_blocks):
            offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < K
            z = logits_tile(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D,
                             stride_am, stride_ad, stride_bm, stride_bd,
                             BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION) * scale
            # z - max is exact near the max (Sterbenz); only then is it scaled to base 2 for exp2.
            # Rows: every block has >= 1 valid column, so m_new is finite and exp2(-inf) = 0.
            zr = tl.where(mask_n[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(zr, axis=1))
            l_i = (l_i * tl.exp2((m_i - m_new) * 1.4426950408889634)
                   + tl.sum(tl.exp2((zr - m_new[:, None]) * 1.4426950408889634), axis=1))
            m_i = m_new
            # Columns: merge this tile's (max, sum) into the program's private partial row.
            zc = tl.where(mask_m[:, None], z, float("-inf"))
            t_max = tl.max(zc, axis=0)
            t_sum = tl.sum(tl.exp2((zc - t_max[None, :]) * 1.4426950408889634), axis=0)
            p_max = tl.load(part_max + offs_n, mask=mask_n, other=0.0)
            p_sum = tl.load(part_sum + offs_n, mask=mask_n, other=0.0)
            n_max = tl.maximum(p_max, t_max)
            n_sum = (p_sum * tl.exp2((p_max - n_max) * 1.4426950408889634)
                     + t_sum * tl.exp2((t_max - n_max) * 1.4426950408889634))
            tl.store(part_max + offs_n, n_max, mask=mask_n)
            tl.store(part_sum + offs_n, n_sum, mask=mask_n)
        tl.store(row_max_ptr + offs_m, m_i, mask=mask_m)
        tl.store(row_sum_ptr + offs_m, l_i, mask=mask_m)
        # Row pid of the partials is re-read in the next row block, possibly by other threads.
        tl.debug_barrier()


@triton.jit
def _two_sided_p(z, h_r, l_r, h_c, l_c, mask):
    """exp(z - lse_r[:, None]) + exp(z - lse_c[None, :]), each lse given as fp32 hi + lo parts (the
    hi subtraction is exact where it matters); zero outside ``mask``.  The one copy of the
    numerically delicate formula, for both orientations of the gradient kernel."""
    p = (tl.exp2(((z - h_r[:, None]) - l_r[:, None]) * 1.4426950408889634)
         + tl.exp2(((z - h_c[None, :]) - l_c[None, :]) * 1.4426950408889634))
    return tl.where(mask, p, 0.0)


@triton.jit
def _softmax_grad_kernel(x_ptr, y_ptr, hi_x_ptr, lo_x_ptr, hi_y_ptr, lo_y_ptr, out_ptr,
                         M, K, D, stride_xm, stride_xd, stride_ym, stride_yd, stride_om, stride_od,
                         scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, ACC_IN_REGS: tl.constexpr, TRANSPOSED: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """K2/K3: out[rows of this program] = P @ y, P_ij = exp(z_ij - lse_x_i) + exp(z_ij - lse_y_j).

    z = scale * x @ y.T.  (x, y, lse_x, lse_y) = (a, b, row, col) gives P @ b (K2); the swap gives
    P.T @ a (K3, TRANSPOSED).  K3 still computes its tile as a_blk @ b_blk.T, exactly as K1 did,
    and transposes P: z.T computed as b @ a.T would round differently from the z behind col_lse,
    and at large logits that inconsistency shows up in the (cancelling) gradient P.T @ a - a / N.
    Each statistic comes as an fp32 (hi, lo) pair, lse = hi + lo: z - hi is exact where it matters
    (Sterbenz), so an fp64 statistic loses nothing (zeros for lo when the caller passed fp32).
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    hx = tl.load(hi_x_ptr + offs_m, mask=mask_m, other=0.0)
    lx = tl.load(lo_x_ptr + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    num_col_blocks = tl.cdiv(K, BLOCK_N)
    for cb in range(num_col_blocks):
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K
        hy = tl.load(hi_y_ptr + offs_n, mask=mask_n, other=0.0)
        ly = tl.load(lo_y_ptr + offs_n, mask=mask_n, other=0.0)
        if TRANSPOSED:
            zt = logits_tile(y_ptr, x_ptr, offs_n, offs_m, mask_n, mask_m, D,
                              stride_ym, stride_yd, stride_xm, stride_xd,
                              BLOCK_N, BLOCK_M, BLOCK_D, UPCAST, DOT_PRECISION) * scale
            pt = _two_sided_p(zt, hy, ly, hx, lx, mask_n[:, None] & mask_m[None, :])
            if not UPCAST:
                pt = pt.to(y_ptr.dtype.element_ty)  # tensor-core operand, as the chunked backend does
            p = tl.trans(pt)
        else:
            z = logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
                             stride_xm, stride_xd, stride_ym, stride_yd,
                             BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION) * scale
            p = _two_sided_p(z, hx, lx, hy, ly, mask_m[:, None] & mask_n[None, :])
            if not UPCAST:
                p = p.to(y_ptr.dtype.element_ty)
        acc = accumulate_pv(p, y_ptr, out_ptr, acc, offs_m, offs_n, mask_m, mask_n, D,
                             stride_ym, stride_yd, stride_om, stride_od,
                             BLOCK_DO, ACC_IN_REGS, UPCAST, DOT_PRECISION)
    if ACC_IN_REGS:
        store_acc(out_ptr, acc, offs_m, mask_m, D, stride_om, stride_od, BLOCK_DO)


# ----------------------------------------------------------------------------------------------
# Host side: launch configuration
# ----------------------------------------------------------------------------------------------
def default_config(kind: str, M: int, K: int, D: int, dtype: torch.dtype) -> LaunchConfig:
    """Launch configuration for kind "lse" (K1), "grad" (K2/K3) or "siglip".

    Interpreter: one large-block config (each tile costs a few numpy calls, so few big tiles are
    fastest).  GPU: fixed configs, no autotuning (it needs a GPU at tuning time and the batch size
    would be a poor key); each fits sm_90's shared memory (<= 112 KB) without register spills.
    "lse" and "grad" keep the same block_d per dtype so that K1 and K2/K3 sum each logit in the
    same order (the statistics then match the recomputed tiles).
    """
    if INTERPRET:
        bmn = pow2_clamp(max(M, K), 16, 64)
        bd = pow2_clamp(D, 16, 256)
        return LaunchConfig(bmn, bmn, bd, bd, max_programs=2)
    lowp = dtype != torch.float32  # fp32 tiles take twice the shared memory and registers
    if kind == "lse":
        return LaunchConfig(128, 128, 64, 0, 8, 2) if lowp else LaunchConfig(128, 128, 32, 0, 8, 3)
    if not lowp:
        return LaunchConfig(128, 64, 32, 64, 8, 3)
    if D <= 128:  # register accumulator
        return LaunchConfig(128, 64, 64, 64 if D <= 64 else 128, 8, 2)
    # Global read-modify-write of the output: its traffic is 2/BLOCK_N bytes per FLOP, so the
    # column block is as wide as registers allow (SigLIP's softplus temporaries spill at 64 x 256).
    if kind == "grad":
        return LaunchConfig(64, 256, 64, 64, 8, 2)
    return LaunchConfig(128, 128, 64, 64, 8, 2)


# K1's default config uses ~255 registers x 256 threads, so one program fits per SM: more persistent
# programs than SMs would only add [P, K] partial rows.  Raise it with a smaller config.
_PROGRAMS_PER_SM = 1


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_persistent(n_row_blocks: int, device: torch.device, cfg: LaunchConfig) -> int:
    if cfg.max_programs:
        cap = cfg.max_programs
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _PROGRAMS_PER_SM * _sm_count(index)
    else:
        cap = 2
    return max(1, min(n_row_blocks, cap))


def check_pair(a: torch.Tensor, b: torch.Tensor, fn: str) -> None:
    """Validate the two feature matrices of a launcher (the public API has checked them already)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{fn}: a and b must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: a and b must have the same feature dim D, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in DTYPES:
        raise TypeError(f"{fn}: a and b must share a dtype among float32/float16/bfloat16, "
                        f"got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: a and b must be on the same device, got {a.device} and {b.device}")
    check_runnable(a, fn)


def _check_vec(v: torch.Tensor, n: int, name: str, fn: str, like: torch.Tensor) -> None:
    if v.shape != (n,) or v.dtype not in (torch.float32, torch.float64) or v.device != like.device:
        raise ValueError(f"{fn}: {name} must be a float32 or float64 [{n}] tensor on {like.device}, "
                         f"got {v.dtype} {tuple(v.shape)} on {v.device}")


def _hi_lo(stat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp64 (or fp32) statistic as fp32 hi + lo with hi + lo == stat to ~fp64 precision."""
    hi = stat.to(torch.float32).contiguous()
    if stat.dtype == torch.float32:
        return hi, torch.zeros_like(hi)
    return hi, (stat - hi.to(stat.dtype)).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def clip_lse(a: torch.Tensor, b: torch.Tensor, scale: float, *,
             config: Optional[LaunchConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of z = scale * a @ b.T (the contract of ``chunked_lse``).

    a: [M, D], b: [K, D] (M may differ from K), fp32/fp16/bf16, any strides.
    Returns (row_lse [M], col_lse [K]) in fp64, as ``chunked_lse``: the kernel gives each row's
    (and column's) exact fp32 max logit and fp32 sum of exp(z - max), and lse = max + log(sum) is
    formed here in fp64 (O(M + K) work), so the statistic adds no rounding of its own.
    col_lse covers only the M rows given.
    """
    check_pair(a, b, "clip_lse")
    M, D = a.shape
    K = b.shape[0]
    dev = a.device
    f32, f64 = torch.float32, torch.float64
    if M == 0 or K == 0:
        return (torch.full((M,), -math.inf, device=dev, dtype=f64),
                torch.full((K,), -math.inf, device=dev, dtype=f64))
    cfg = config or default_config("lse", M, K, D, a.dtype)
    n_prog = _num_persistent(triton.cdiv(M, cfg.block_m), dev, cfg)
    row_max = torch.empty(M, device=dev, dtype=f32)
    row_sum = torch.empty(M, device=dev, dtype=f32)
    col_max = torch.full((n_prog, K), -math.inf, device=dev, dtype=f32)
    col_sum = torch.zeros((n_prog, K), device=dev, dtype=f32)
    with device_ctx(a):
        _clip_lse_kernel[(n_prog,)](
            a, b, row_max, row_sum, col_max, col_sum,
            M, K, D, a.stride(0), a.stride(1), b.stride(0), b.stride(1), col_max.stride(0),
            float(scale),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            UPCAST=INTERPRET, DOT_PRECISION=dot_precision(a.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # Merge the P partial rows: every program swept every column, so each max is finite, and
    # partial max - global max is exact where the term matters.
    g_max = col_max.amax(dim=0)
    c_sum = col_sum.mul_(torch.exp(col_max.sub_(g_max))).sum(dim=0)
    row_lse = row_max.to(f64) + row_sum.to(f64).log()
    col_lse = g_max.to(f64) + c_sum.to(f64).log()
    return row_lse, col_lse


def _launch_grad(x, y, stat_x, stat_y, scale, cfg: LaunchConfig, transposed: bool) -> torch.Tensor:
    M, D = x.shape
    K = y.shape[0]
    in_regs = D <= cfg.block_do
    # The global read-modify-write path accumulates into ``out``, so it must start at zero.
    out = (torch.empty if in_regs else torch.zeros)((M, D), device=x.device, dtype=torch.float32)
    if M == 0 or K == 0:
        return out.zero_()
    hi_x, lo_x = _hi_lo(stat_x)
    hi_y, lo_y = _hi_lo(stat_y)
    with device_ctx(x):
        _softmax_grad_kernel[(triton.cdiv(M, cfg.block_m),)](
            x, y, hi_x, lo_x, hi_y, lo_y, out,
            M, K, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
            float(scale),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
            ACC_IN_REGS=in_regs, TRANSPOSED=transposed,
            UPCAST=INTERPRET, DOT_PRECISION=dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def clip_softmax_grads(a: torch.Tensor, b: torch.Tensor, scale: float, row_lse: torch.Tensor,
                       col_lse: torch.Tensor, *, need_a: bool = True, need_b: bool = True,
                       config: Optional[LaunchConfig] = None
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(P @ b, P.T @ a) with P = exp(z - row_lse[:, None]) + exp(z - col_lse[None, :]), z = scale * a @ b.T.

    The contract of ``chunked_softmax_grads``: row_lse [M] and col_lse [K] (fp32 or fp64, e.g. as
    ``clip_lse`` returns them, plus the caller's weights) are applied as fp32 hi + lo pairs;
    returns fp32 [M, D] / [K, D] (None where not needed).
    """
    check_pair(a, b, "clip_softmax_grads")
    M, D = a.shape
    K = b.shape[0]
    _check_vec(row_lse, M, "row_lse", "clip_softmax_grads", a)
    _check_vec(col_lse, K, "col_lse", "clip_softmax_grads", a)
    cfg = config or default_config("grad", M, K, D, a.dtype)
    ga = _launch_grad(a, b, row_lse, col_lse, scale, cfg, transposed=False) if need_a else None
    gb = _launch_grad(b, a, col_lse, row_lse, scale, cfg, transposed=True) if need_b else None
    return ga, gb
