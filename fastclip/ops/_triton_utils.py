"""What fastclip's Triton kernel files share: launch configuration, host-side helpers and the tile
device functions of the contrastive losses.

Imported only by the ``_*_triton`` kernel modules, which the ops import lazily (importing fastclip
never imports Triton).

Host side
---------
``INTERPRET``: whether ``@triton.jit`` produced interpreted functions in this process.  It is
decided when Triton first decorates a kernel (by ``TRITON_INTERPRET`` at that moment), so the
probe below asks the decorator rather than the environment, which may have changed since.
Under the interpreter kernels get few, large tiles (each tile costs a few numpy calls) and every
load is cast to fp32 right away (numpy has no bf16 arithmetic).

``dot_precision``: fp16/bf16 operands go to ``tl.dot`` as they are (fp32 accumulation); fp32
operands use ``tf32x3`` on a GPU, about fp32 accuracy (plain tf32 puts a ~1e-3 relative error on
logits, which a logit_scale of 100 amplifies); the interpreter computes in IEEE fp32.

Device side (the loss kernels)
------------------------------
``logits_tile`` computes x[rows] @ y[cols].T as an fp32 tile by a loop over D in BLOCK_D chunks
(masked, so any D works); ``accumulate_pv`` adds p @ y[cols] to a program's own output rows,
either in a register accumulator (D <= BLOCK_DO) or by read-modify-write of fp32 rows in global
memory, BLOCK_DO columns at a time (a [BLOCK_M, D] register accumulator does not fit for D = 768);
``store_acc`` writes a register accumulator.  Offsets are int64: N * D may exceed 2**31.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "DTYPES", "LaunchConfig", "pow2_clamp", "dot_precision", "device_ctx",
           "check_runnable", "logits_tile", "accumulate_pv", "store_acc"]

# The dtypes every Triton kernel of fastclip takes (fp64 has no tensor-core path).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _probe():
    pass


INTERPRET = type(_probe).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch parameters of one kernel launch (launchers pick them when given None;
    tests force small ones).

    block_m / block_n: the tile (rows x columns, or queries x keys for attention); block_d: the
    reduction chunk of a tile's product (0: the kernel's own choice); block_do: the output chunk of
    the loss-gradient kernels (D <= block_do keeps their accumulator in registers); max_programs:
    cap on persistent programs (0: automatic).
    """

    block_m: int
    block_n: int
    block_d: int = 0
    block_do: int = 0
    num_warps: int = 4
    num_stages: int = 2
    max_programs: int = 0


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype`` (see the module docstring)."""
    return "tf32x3" if dtype == torch.float32 and not INTERPRET else "ieee"


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context making it ``t``'s device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_runnable(t: torch.Tensor, fn: str) -> None:
    """Refuse CPU tensors unless this process runs Triton through the interpreter."""
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{fn}: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 before "
                           "triton is first imported")


@triton.jit
def logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_xm, stride_xd, stride_ym, stride_yd,
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
        x = tl.load(x_rows + dd[None, :].to(tl.int64) * stride_xd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        yt = tl.load(y_cols + dd[:, None].to(tl.int64) * stride_yd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(x, yt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def accumulate_pv(p, y_ptr, out_ptr, acc, offs_m, offs_n, mask_m, mask_n, D,
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
        y = tl.load(y_rows + offs_d[None, :].to(tl.int64) * stride_yd,
                    mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
        if UPCAST:
            y = y.to(tl.float32)
        acc = tl.dot(p, y, acc, input_precision=DOT_PRECISION)
    else:
        o_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_om
        for d0 in range(0, D, BLOCK_DO):
            dd = d0 + offs_d
            mask_d = dd < D
            y = tl.load(y_rows + dd[None, :].to(tl.int64) * stride_yd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
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
def store_acc(out_ptr, acc, offs_m, mask_m, D, stride_om, stride_od, BLOCK_DO: tl.constexpr):
    """Store a [BLOCK_M, BLOCK_DO] accumulator into the rows offs_m of out (columns < D)."""
    offs_d = tl.arange(0, BLOCK_DO)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od
    tl.store(ptrs, acc, mask=mask_m[:, None] & (offs_d < D)[None, :])
