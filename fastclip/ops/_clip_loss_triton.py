"""Triton kernels of the CLIP (InfoNCE) loss: the ``triton`` engine of ``fastclip.ops.clip_loss``.

Imported lazily by ``clip_loss._TritonEngine`` (importing fastclip never imports Triton).  The two
launchers have exactly the contracts of ``chunked_lse`` and ``chunked_softmax_grads``:

    clip_lse(a, b, scale)                                   -> (row_lse [M], col_lse [K])   fp32
    clip_softmax_grads(a, b, scale, row_lse, col_lse, ...)  -> (P @ b [M, D], P.T @ a [K, D]) fp32
        z = scale * a @ b.T,   P_ij = exp(z_ij - row_lse_i) + exp(z_ij - col_lse_j)

a: [M, D], b: [K, D], fp32/fp16/bf16, any strides (the kernels take explicit strides; nothing is
made contiguous).  The M x K logits are never stored: every kernel recomputes its z tile from a
K-loop over D in BLOCK_D chunks (masked, so D = 257 works) with fp32 accumulation.

Design
------
K1 ``_clip_lse_kernel`` (forward, 2*M*K*D FLOPs).  A fixed number P of persistent programs
   (P = min(#row blocks, 2 x SM count) on a GPU, at most 2 under the interpreter) take row blocks
   pid, pid + P, ...; each sweeps all column blocks.  Row statistics are an online (max, sum) in
   registers, stored once per row block.  Column statistics go to a private row ``pid`` of two
   [P, K] fp32 buffers (running max, running sum) that the program read-modify-writes; no other
   program touches that row, so there are no atomics and the result is deterministic.  Torch
   merges the P partial rows at the end (O(P*K) work).  Everything runs in base 2 (z is
   multiplied by scale*log2(e) once, exp2/log2 are the hardware instructions).
K2/K3 ``_softmax_grad_kernel`` (backward, 2 x 4*M*K*D FLOPs).  P is symmetric under swapping
   (a, row_lse) <-> (b, col_lse), so one kernel computes out = P(x, y) @ y over row blocks of x:
   launched with (a, b) it gives ga (K2), with (b, a) it gives gb (K3).  Each program owns its
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

Memory per call: inputs + fp32 outputs (O((M+K)*D)), K1's partials 2*P*K fp32 (P <= 2 x SMs, a
constant independent of N) and O(M + K) statistics.  Nothing of size M x K is allocated.

Numerics: fp32 accumulation everywhere; under the interpreter every load is cast to fp32 right
away (numpy has no bf16 arithmetic); on GPU fp16/bf16 operands go to tl.dot unconverted (fp32
accumulate) and fp32 operands use ``tf32x3`` (about fp32 accuracy; plain tf32 would put a ~1e-3
relative error on logits that logit_scale = 100 amplifies).  With fp16 inputs the P tile is cast
to fp16 before the second product; for very large N its entries (<= 1/N after the caller's shift)
fall into the fp16 subnormal range, exactly as in the chunked backend; use bf16 for large N.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["clip_lse", "clip_softmax_grads", "LaunchConfig"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Shared device helpers (also used by _siglip_loss_triton)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_xm, stride_xd, stride_ym, stride_yd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x[offs_m] @ y[offs_n].T as a [BLOCK_M, BLOCK_N] fp32 tile (masked rows/cols/D read as 0)."""
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    y_cols = y_ptr + offs_n[None, :].to(tl.int64) * stride_ym
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        mask_d = dd < D
        x = tl.load(x_rows + dd[None, :] * stride_xd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        yt = tl.load(y_cols + dd[:, None] * stride_yd, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(x, yt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _accumulate_pv(p, y_ptr, out_ptr, acc, offs_m, offs_n, mask_m, mask_n, D,
                   stride_ym, stride_yd, stride_om, stride_od,
                   BLOCK_DO: tl.constexpr, ACC_IN_REGS: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add p [BLOCK_M, BLOCK_N] @ y[offs_n] to the program's own output rows.

    ACC_IN_REGS (D <= BLOCK_DO): into the register accumulator ``acc``, returned.
    Otherwise: read-modify-write of the fp32 output rows in global memory, BLOCK_DO columns at a
    time (``acc`` is returned untouched).
    """
    offs_d = tl.arange(0, BLOCK_DO)
    y_rows = y_ptr + offs_n[:, None].to(tl.int64) * stride_ym
    if ACC_IN_REGS:
        y = tl.load(y_rows + offs_d[None, :] * stride_yd, mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
        if UPCAST:
            y = y.to(tl.float32)
        acc = tl.dot(p, y, acc, input_precision=DOT_PRECISION)
    else:
        o_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_om
        for d0 in range(0, D, BLOCK_DO):
            dd = d0 + offs_d
            mask_d = dd < D
            y = tl.load(y_rows + dd[None, :] * stride_yd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if UPCAST:
                y = y.to(tl.float32)
            o_ptrs = o_rows + dd[None, :] * stride_od
            o_mask = mask_m[:, None] & mask_d[None, :]
            o = tl.load(o_ptrs, mask=o_mask, other=0.0)
            o = tl.dot(p, y, o, input_precision=DOT_PRECISION)
            tl.store(o_ptrs, o, mask=o_mask)
        # The next column block re-reads these rows, possibly from other threads of this program.
        tl.debug_barrier()
    return acc


@triton.jit
def _store_acc(out_ptr, acc, offs_m, mask_m, D, stride_om, stride_od, BLOCK_DO: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_DO)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od
    tl.store(ptrs, acc, mask=mask_m[:, None] & (offs_d < D)[None, :])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _clip_lse_kernel(a_ptr, b_ptr, row_lse_ptr, col_max_ptr, col_sum_ptr,
                     M, K, D, stride_am, stride_ad, stride_bm, stride_bd, stride_part,
                     scale_log2,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """K1: row log-sum-exp of z = scale * a @ b.T, and per-program column (max, sum) partials.

    Program pid handles row blocks pid, pid + P, ... (P = number of programs) and owns row pid of
    the [P, K] partial buffers (base-2 running max and the sum of exp2(z2 - max)).
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
        for cb in range(0, num_col_blocks):
            offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < K
            z = _logits_tile(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, D,
                             stride_am, stride_ad, stride_bm, stride_bd,
                             BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION) * scale_log2
            # Rows: every block has >= 1 valid column, so m_new is finite and exp2(-inf) = 0.
            zr = tl.where(mask_n[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(zr, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(zr - m_new[:, None]), axis=1)
            m_i = m_new
            # Columns: merge this tile's (max, sum) into the program's private partial row.
            zc = tl.where(mask_m[:, None], z, float("-inf"))
            t_max = tl.max(zc, axis=0)
            t_sum = tl.sum(tl.exp2(zc - t_max[None, :]), axis=0)
            p_max = tl.load(part_max + offs_n, mask=mask_n, other=0.0)
            p_sum = tl.load(part_sum + offs_n, mask=mask_n, other=0.0)
            n_max = tl.maximum(p_max, t_max)
            n_sum = p_sum * tl.exp2(p_max - n_max) + t_sum * tl.exp2(t_max - n_max)
            tl.store(part_max + offs_n, n_max, mask=mask_n)
            tl.store(part_sum + offs_n, n_sum, mask=mask_n)
        tl.store(row_lse_ptr + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)
        # Row pid of the partials is re-read in the next row block, possibly by other threads.
        tl.debug_barrier()


@triton.jit
def _softmax_grad_kernel(x_ptr, y_ptr, lse_x_ptr, lse_y_ptr, out_ptr,
                         M, K, D, stride_xm, stride_xd, stride_ym, stride_yd, stride_om, stride_od,
                         scale_log2,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, ACC_IN_REGS: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """K2/K3: out[rows of this program] = P @ y, P_ij = exp(z_ij - lse_x_i) + exp(z_ij - lse_y_j).

    z = scale * x @ y.T.  (x, y, lse_x, lse_y) = (a, b, row, col) gives P @ b; the swap gives P.T @ a.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    lx = tl.load(lse_x_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32) * 1.4426950408889634
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    num_col_blocks = tl.cdiv(K, BLOCK_N)
    for cb in range(0, num_col_blocks):
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K
        z = _logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D,
                         stride_xm, stride_xd, stride_ym, stride_yd,
                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION) * scale_log2
        ly = tl.load(lse_y_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) * 1.4426950408889634
        p = tl.exp2(z - lx[:, None]) + tl.exp2(z - ly[None, :])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        if not UPCAST:
            p = p.to(y_ptr.dtype.element_ty)  # tensor-core operand, as the chunked backend does
        acc = _accumulate_pv(p, y_ptr, out_ptr, acc, offs_m, offs_n, mask_m, mask_n, D,
                             stride_ym, stride_yd, stride_om, stride_od,
                             BLOCK_DO, ACC_IN_REGS, UPCAST, DOT_PRECISION)
    if ACC_IN_REGS:
        _store_acc(out_ptr, acc, offs_m, mask_m, D, stride_om, stride_od, BLOCK_DO)


# ----------------------------------------------------------------------------------------------
# Host side: launch configuration
# ----------------------------------------------------------------------------------------------
INTERPRET = type(_clip_lse_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch parameters (``None`` launchers pick them; tests force small ones).

    block_m/block_n: tile of z; block_d: reduction chunk of the logits product; block_do: output
    chunk of the gradient kernels (D <= block_do keeps the accumulator in registers); max_programs:
    cap on K1's persistent programs (0: automatic).
    """

    block_m: int
    block_n: int
    block_d: int
    block_do: int
    num_warps: int = 4
    num_stages: int = 2
    max_programs: int = 0


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def default_config(kind: str, M: int, K: int, D: int, dtype: torch.dtype) -> LaunchConfig:
    """kind: "lse" or "grad" (the SigLIP kernel uses "grad").

    Interpreter: one large-block config (each tile costs a few numpy calls, so few big tiles are
    fastest).  GPU: no autotuning (do_bench needs a GPU at import of the tuner, and the batch size
    would be a poor key); 128 x 128 x 64 tiles for the logits, 8 warps.  See the module notes.
    """
    if INTERPRET:
        bmn = _pow2_clamp(max(M, K), 16, 64)
        bd = _pow2_clamp(D, 16, 256)
        return LaunchConfig(bmn, bmn, bd, bd, max_programs=2)
    small = dtype == torch.float32  # fp32 operands take twice the shared memory per element
    if kind == "lse":
        return LaunchConfig(128, 128, 32 if small else 64, 0, num_warps=8, num_stages=3)
    return LaunchConfig(128, 64, 32 if small else 64, 128, num_warps=8, num_stages=2)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_persistent(n_row_blocks: int, device: torch.device, cfg: LaunchConfig) -> int:
    if cfg.max_programs:
        cap = cfg.max_programs
    elif device.type == "cuda":
        cap = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = 2
    return max(1, min(n_row_blocks, cap))


def _dot_precision(dtype: torch.dtype) -> str:
    # Ignored for fp16/bf16 operands; fp32 operands: tf32x3 keeps ~fp32 accuracy on tensor cores.
    return "tf32x3" if dtype == torch.float32 and not INTERPRET else "ieee"


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


def check_pair(a: torch.Tensor, b: torch.Tensor, fn: str) -> None:
    """Validate the two feature matrices of a launcher (the public API has checked them already)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{fn}: a and b must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: a and b must have the same feature dim D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _DTYPES:
        raise TypeError(f"{fn}: a and b must share a dtype among float32/float16/bfloat16, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: a and b must be on the same device, got {a.device} and {b.device}")
    if a.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{fn}: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before "
                           "triton is first imported")


def _check_vec(v: torch.Tensor, n: int, name: str, fn: str, like: torch.Tensor) -> None:
    if v.shape != (n,) or v.dtype != torch.float32 or v.device != like.device:
        raise ValueError(f"{fn}: {name} must be a float32 [{n}] tensor on {like.device}, "
                         f"got {v.dtype} {tuple(v.shape)} on {v.device}")


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def clip_lse(a: torch.Tensor, b: torch.Tensor, scale: float, *,
             config: Optional[LaunchConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of z = scale * a @ b.T (the contract of ``chunked_lse``).

    a: [M, D], b: [K, D] (M may differ from K), fp32/fp16/bf16, any strides.
    Returns (row_lse [M], col_lse [K]) in fp32; col_lse covers only the M rows given.
    """
    check_pair(a, b, "clip_lse")
    M, D = a.shape
    K = b.shape[0]
    dev = a.device
    if M == 0 or K == 0:
        return (torch.full((M,), -math.inf, device=dev, dtype=torch.float32),
                torch.full((K,), -math.inf, device=dev, dtype=torch.float32))
    cfg = config or default_config("lse", M, K, D, a.dtype)
    n_prog = _num_persistent(triton.cdiv(M, cfg.block_m), dev, cfg)
    row_lse = torch.empty(M, device=dev, dtype=torch.float32)
    col_max = torch.full((n_prog, K), -math.inf, device=dev, dtype=torch.float32)
    col_sum = torch.zeros((n_prog, K), device=dev, dtype=torch.float32)
    with _device_ctx(a):
        _clip_lse_kernel[(n_prog,)](
            a, b, row_lse, col_max, col_sum,
            M, K, D, a.stride(0), a.stride(1), b.stride(0), b.stride(1), col_max.stride(0),
            float(scale) * _LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(a.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # Merge the P partial rows (base 2): every program swept every column, so each max is finite.
    g_max = col_max.amax(dim=0)
    col_sum.mul_(torch.exp2(col_max.sub_(g_max)))
    col_lse = (g_max + torch.log2(col_sum.sum(dim=0))).mul_(_LN2)
    return row_lse, col_lse


def _launch_grad(x, y, lse_x, lse_y, scale, cfg: LaunchConfig) -> torch.Tensor:
    M, D = x.shape
    K = y.shape[0]
    in_regs = D <= cfg.block_do
    # The global read-modify-write path accumulates into ``out``, so it must start at zero.
    out = (torch.empty if in_regs else torch.zeros)((M, D), device=x.device, dtype=torch.float32)
    if M == 0 or K == 0:
        return out.zero_()
    with _device_ctx(x):
        _softmax_grad_kernel[(triton.cdiv(M, cfg.block_m),)](
            x, y, lse_x, lse_y, out,
            M, K, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
            float(scale) * _LOG2E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_DO=cfg.block_do,
            ACC_IN_REGS=in_regs, UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def clip_softmax_grads(a: torch.Tensor, b: torch.Tensor, scale: float, row_lse: torch.Tensor,
                       col_lse: torch.Tensor, *, need_a: bool = True, need_b: bool = True,
                       config: Optional[LaunchConfig] = None
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(P @ b, P.T @ a) with P = exp(z - row_lse[:, None]) + exp(z - col_lse[None, :]), z = scale * a @ b.T.

    The contract of ``chunked_softmax_grads``: row_lse [M] and col_lse [K] are fp32 and already
    carry the caller's weights; returns fp32 [M, D] / [K, D] (None where not needed).
    """
    check_pair(a, b, "clip_softmax_grads")
    M, D = a.shape
    K = b.shape[0]
    _check_vec(row_lse, M, "row_lse", "clip_softmax_grads", a)
    _check_vec(col_lse, K, "col_lse", "clip_softmax_grads", a)
    cfg = config or default_config("grad", M, K, D, a.dtype)
    ga = _launch_grad(a, b, row_lse, col_lse, scale, cfg) if need_a else None
    gb = _launch_grad(b, a, col_lse, row_lse, scale, cfg) if need_b else None
    return ga, gb
