"""Triton flash attention (forward + FA2 backward): the ``triton`` backend of ``fastclip.ops.attention``.

Imported lazily by the custom ops in ``attention.py`` (importing fastclip never imports Triton).

    attention_fwd(q, k, v, causal, scale)                  -> (out [B, H, Lq, hd], lse [B, H, Lq] fp32)
    attention_bwd(do, q, k, v, out, lse, causal, scale)    -> (dq, dk, dv)

q/k/v/out/do: [B, H, L, hd], fp32/fp16/bf16, any strides (explicit strides are passed; the strided
views of a fused qkv projection are read in place).  ``lse`` is the base-2 log-sum-exp of the
scaled scores (internal; only the backward reads it).

Design
------
Forward ``_attn_fwd_kernel``: one program per (query block, batch*head).  The query tile stays in
registers; key/value blocks stream through an online softmax in base 2 (scores are multiplied by
scale*log2(e) once, exp2 is the hardware instruction) with an fp32 [BLOCK_M, hd] accumulator.  The
key loop is split in two: blocks that need no mask at all (fully inside Lk and, when causal, fully
at or below the diagonal of every row of the tile) run without any ``where``; the remaining blocks
(the tail beyond Lk, which is never assumed to be a multiple of the block, and the diagonal
blocks) apply the masks.  Causal tiles stop at their last row, so causal costs about half.
Rows always have key 0 available (top-left causal, Lk >= 1), so the running max is finite after
the first block and no NaN can appear.

Backward (FlashAttention-2):
  1. ``_attn_bwd_preprocess``: delta = rowsum(dO * O) per query row (fp32).
  2. ``_attn_bwd_dkdv_kernel``: one program per (key block, batch*head) keeps k, v and fp32 dk, dv
     accumulators in registers and loops over query blocks (causal: from the block holding the
     first row that can see these keys): P^T = exp2(k q^T * c - lse), dV += P^T dO,
     dP^T = v dO^T, dS^T = P^T (dP^T - delta), dK += dS^T q.
  3. ``_attn_bwd_dq_kernel``: one program per (query block, batch*head) loops over key blocks:
     dQ += dS k.
  Each program owns its outputs: no atomics, deterministic.  The recomputation of P costs one
  extra q k^T product per kernel (the usual FA2 trade: 2.5x forward FLOPs instead of O(L^2) memory).

Head dims: the head dim is padded to BLOCK_D = next power of two >= 16 with masked loads/stores,
so 32/64/128 run unpadded and anything <= 128 (e.g. 40, 80, 96) works.

Numerics: fp32 accumulation and softmax statistics everywhere.  On a GPU fp16/bf16 operands go to
tl.dot unconverted (P is cast to v's dtype for P @ V, as flash-attention does) and fp32 operands use
``tf32x3`` (about fp32 accuracy).  Under the interpreter (TRITON_INTERPRET=1) every load is cast to
fp32 right away (numpy has no bf16 arithmetic) and outputs are written to fp32 buffers that torch
casts back (so rounding to bf16 is torch's round-to-nearest-even).

Launch sizes: GPU forward 128 x 64 tiles, 4 warps for hd <= 64 else 8; backward 64 x 64; fp32
inputs (tf32x3 dots need more shared memory) 64 x 32 / 32 x 32.  Each fits sm86/sm89's 99 KB of
shared memory per block (the largest, fp32 hd 128 dq, needs 96 KB), so all kernels compile for
sm80/sm86/sm90.  No autotuning: ``do_bench`` needs a GPU at tuning time and a batch-size key would
retune every step.  Under the interpreter each tile costs a few numpy calls, so the blocks are as
large as the sequence allows (up to 256) and the grid is as small as possible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_utils import (DTYPES, INTERPRET, LaunchConfig, check_runnable, device_ctx, dot_precision,  # noqa: F401
                            pow2_clamp)

__all__ = ["attention_fwd", "attention_bwd", "LaunchConfig", "default_config"]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _program_block(pid, pid_bh, H, L, HEAD_DIM, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (pid, pid_bh)'s batch and head (int64), its rows pid*BLOCK.. of a length-L sequence
    and the head-dim lanes, with their masks: (b, h, start, offs, offs_d, mask, mask_d)."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return b, h, start, offs, offs_d, offs < L, offs_d < HEAD_DIM


@triton.jit
def _load_rows(base, offs, offs_d, mask_rows, mask_d, stride_row, stride_d, UPCAST: tl.constexpr):
    """Rows ``offs`` of an [L, head_dim] matrix at ``base`` as a [rows, BLOCK_D] block (rows past L
    and the head-dim padding read as 0), cast to fp32 under the interpreter."""
    x = tl.load(base + offs[:, None].to(tl.int64) * stride_row + offs_d[None, :] * stride_d,
                mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, offs_d, mask_d, Lk, lo, hi, qk_scale,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi).  MASKED: apply the Lk tail (and causal) masks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)            # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale              # base-2 scores
        if MASKED:
            valid = mask_n[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_base, offs_n, offs_d, mask_n, mask_d, stride_vn, stride_vd, UPCAST)  # [BLOCK_N, D]
        if not UPCAST:
            p = p.to(v.dtype)  # tensor-core operand, as flash-attention does
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     H, Lq, Lk, HEAD_DIM,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_om, stride_od,
                     qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h, start_m, offs_m, offs_d, mask_m, mask_d = _program_block(tl.program_id(0), pid_bh, H, Lq, HEAD_DIM,
                                                                   BLOCK_M, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh
    q = _load_rows(q_base, offs_m, offs_d, mask_m, mask_d, stride_qm, stride_qd, UPCAST)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        # Key block [n0, n0 + BLOCK_N) needs no causal mask iff n0 + BLOCK_N <= start_m + 1.
        hi = tl.minimum(start_m + BLOCK_M, Lk)
        full_end = (tl.minimum(start_m + 1, Lk) // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, offs_d, mask_d, Lk, 0, full_end, qk_scale,
                                    BLOCK_N, False, CAUSAL, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_m, offs_d, mask_d, Lk, full_end, hi, qk_scale,
                                    BLOCK_N, True, CAUSAL, UPCAST, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_i), mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(o_ptr, do_ptr, delta_ptr, H, Lq, HEAD_DIM,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[bh, m] = sum_d O[m, d] * dO[m, d] in fp32."""
    pid_bh = tl.program_id(1)
    b, h, _, offs_m, offs_d, mask_m, mask_d = _program_block(tl.program_id(0), pid_bh, H, Lq, HEAD_DIM,
                                                             BLOCK_M, BLOCK_D)
    o = _load_rows(o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, mask_m, mask_d, stride_om, stride_od,
                   True)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, mask_m, mask_d, stride_dom,
                    stride_dod, True)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          H, Lq, Lk, HEAD_DIM,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_dom, stride_dod,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          qk_scale, sm_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h, start_n, offs_n, offs_d, mask_n, mask_d = _program_block(tl.program_id(0), pid_bh, H, Lk, HEAD_DIM,
                                                                   BLOCK_N, BLOCK_D)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * Lq
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    k = _load_rows(k_base, offs_n, offs_d, mask_n, mask_d, stride_kn, stride_kd, UPCAST)
    v = _load_rows(v_base, offs_n, offs_d, mask_n, mask_d, stride_vn, stride_vd, UPCAST)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Causal: rows m < start_n cannot see any of these keys.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Lq
        q = _load_rows(q_base, offs_m, offs_d, mask_m, mask_d, stride_qm, stride_qd, UPCAST)
        do = _load_rows(do_base, offs_m, offs_d, mask_m, mask_d, stride_dom, stride_dod, UPCAST)
        lse = tl.load(lse_ptr + stat_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + stat_base + offs_m, mask=mask_m, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale     # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st - lse[None, :])
        valid = mask_m[None, :] & mask_n[:, None]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(valid, pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)              # [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        if not UPCAST:
            pt = pt.to(do.dtype)
            dst = dst.to(q.dtype)
        dv = tl.dot(pt, do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        H, Lq, Lk, HEAD_DIM,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                        qk_scale, sm_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h, start_m, offs_m, offs_d, mask_m, mask_d = _program_block(tl.program_id(0), pid_bh, H, Lq, HEAD_DIM,
                                                                   BLOCK_M, BLOCK_D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    q = _load_rows(q_base, offs_m, offs_d, mask_m, mask_d, stride_qm, stride_qd, UPCAST)
    do = _load_rows(do_base, offs_m, offs_d, mask_m, mask_d, stride_dom, stride_dod, UPCAST)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)
    else:
        hi = Lk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        k = _load_rows(k_base, offs_n, offs_d, mask_n, mask_d, stride_kn, stride_kd, UPCAST)
        v = _load_rows(v_base, offs_n, offs_d, mask_n, mask_d, stride_vn, stride_vd, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale        # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s - lse[:, None])
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if not UPCAST:
            ds = ds.to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def default_config(kind: str, Lq: int, Lk: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """kind: "fwd", "bwd_dkdv" or "bwd_dq"."""
    if INTERPRET:
        return LaunchConfig(pow2_clamp(Lq, 16, 256), pow2_clamp(Lk, 16, 256))
    bd = block_d(head_dim)
    small = dtype == torch.float32  # fp32 operands take twice the shared memory
    # Shared memory stays under sm86/sm89's 99 KB per block (fp32 tf32x3 dots need the most).
    if kind == "fwd":
        if small:
            return LaunchConfig(64 if bd <= 64 else 32, 32, num_warps=4, num_stages=2)
        return LaunchConfig(128, 64, num_warps=4 if bd <= 64 else 8, num_stages=3 if bd <= 64 else 2)
    if small:
        return LaunchConfig(32, 32, num_warps=4, num_stages=2)
    return LaunchConfig(64, 64, num_warps=4 if bd <= 64 else 8, num_stages=2)


def _check(q, k, v, fn: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D [B, H, L, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise TypeError(f"{fn}: q, k, v must share a dtype among float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"{fn}: shapes do not fit [B, H, Lq, hd], [B, H, Lk, hd], [B, H, Lk, hd]: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] > 128:
        raise ValueError(f"{fn}: head_dim must be <= 128, got {q.shape[3]}")
    check_runnable(q, fn)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    # Interpreter: write fp32 and let torch round (numpy has no bf16).
    return torch.float32 if INTERPRET else dtype


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  config: Optional[LaunchConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Lq, hd] in q's dtype, lse [B, H, Lq] fp32 base 2)."""
    _check(q, k, v, "attention_fwd")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), device=q.device, dtype=_out_dtype(q.dtype))
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out.to(q.dtype), lse
    cfg = config or default_config("fwd", Lq, Lk, D, q.dtype)
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)
    with device_ctx(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, H, Lq, Lk, D,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            float(scale) * _LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(D),
            CAUSAL=bool(causal), UPCAST=INTERPRET, DOT_PRECISION=dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(q.dtype), lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, *, causal: bool, scale: float,
                  config_dkdv: Optional[LaunchConfig] = None, config_dq: Optional[LaunchConfig] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtype, from the forward's out and base-2 lse."""
    _check(q, k, v, "attention_bwd")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if do.shape != out.shape or out.shape != q.shape:
        raise ValueError(f"attention_bwd: do and out must have q's shape {tuple(q.shape)}, got "
                         f"{tuple(do.shape)} and {tuple(out.shape)}")
    if lse.shape != (B, H, Lq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention_bwd: lse must be a contiguous float32 [{B}, {H}, {Lq}] tensor, got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    odt = _out_dtype(q.dtype)
    dq = torch.empty((B, H, Lq, D), device=q.device, dtype=odt)
    dk = torch.empty((B, H, Lk, D), device=q.device, dtype=odt)
    dv = torch.empty((B, H, Lk, D), device=q.device, dtype=odt)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_().to(q.dtype), dk.zero_().to(q.dtype), dv.zero_().to(q.dtype)
    bd = block_d(D)
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    c_kv = config_dkdv or default_config("bwd_dkdv", Lq, Lk, D, q.dtype)
    c_q = config_dq or default_config("bwd_dq", Lq, Lk, D, q.dtype)
    common = dict(UPCAST=INTERPRET, DOT_PRECISION=dot_precision(q.dtype), CAUSAL=bool(causal), BLOCK_D=bd)
    qk_scale, sm_scale = float(scale) * _LOG2E, float(scale)
    with device_ctx(q):
        _attn_bwd_preprocess[(triton.cdiv(Lq, c_q.block_m), B * H)](
            out, do, delta, H, Lq, D, *_strides(out), *_strides(do), BLOCK_M=c_q.block_m, BLOCK_D=bd)
        _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, c_kv.block_n), B * H)](
            q, k, v, do, lse, delta, dk, dv, H, Lq, Lk, D,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            qk_scale, sm_scale, BLOCK_M=c_kv.block_m, BLOCK_N=c_kv.block_n,
            num_warps=c_kv.num_warps, num_stages=c_kv.num_stages, **common)
        _attn_bwd_dq_kernel[(triton.cdiv(Lq, c_q.block_m), B * H)](
            q, k, v, do, lse, delta, dq, H, Lq, Lk, D,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            qk_scale, sm_scale, BLOCK_M=c_q.block_m, BLOCK_N=c_q.block_n,
            num_warps=c_q.num_warps, num_stages=c_q.num_stages, **common)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
