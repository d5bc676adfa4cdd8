"""Triton row gather / scatter: the ``triton`` backend of ``fastclip.ops.patch_mask``.

Imported lazily by ``PatchGatherFunction`` (importing fastclip never imports Triton).

    gather_rows(x [B, T, C], src [B, R] int64)      -> y [B, R, C],  y[b, r] = x[b, src[b, r]]
    scatter_rows(dy [B, R, C], src [B, R], T)       -> dx [B, T, C], dx[b, src[b, r]] = dy[b, r], 0 elsewhere

Rows of ``src`` are distinct within a sample (patch_mask's ids come from a sort), so the scatter is a
plain store into a zeroed buffer: no atomics, deterministic, exact.

One program moves a [BLOCK_R, BLOCK_C] tile: BLOCK_R output rows (flattened over B x R) by BLOCK_C
channels, with masked tails (C = 768 or R = 50 need not divide the block).  Loads and stores keep
the tensor's dtype (a pure copy: no arithmetic, so no fp32 detour is needed under the interpreter,
where bf16 is moved as its 16-bit pattern).  The gather is bandwidth-bound: it reads and writes
(P + K) * C elements per sample and no more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import INTERPRET, check_runnable, device_ctx

__all__ = ["gather_rows", "scatter_rows"]


@triton.jit
def _row_copy_kernel(src_ptr, idx_ptr, dst_ptr, R, C, total_rows,
                     stride_sb, stride_sr, stride_sc, stride_ib, stride_ir, stride_db, stride_dr, stride_dc,
                     SCATTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gather: dst[b, r] = src[b, idx[b, r]].   Scatter: dst[b, idx[b, r]] = src[b, r]."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)            # flattened (b, r)
    mask_r = rows < total_rows
    b = (rows // R).to(tl.int64)
    r = (rows % R).to(tl.int64)
    idx = tl.load(idx_ptr + b * stride_ib + r * stride_ir, mask=mask_r, other=0).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = mask_r[:, None] & (cols < C)[None, :]
    if SCATTER:
        src_row = r
        dst_row = idx
    else:
        src_row = idx
        dst_row = r
    vals = tl.load(src_ptr + (b * stride_sb + src_row * stride_sr)[:, None] + cols[None, :] * stride_sc,
                   mask=mask, other=0.0)
    tl.store(dst_ptr + (b * stride_db + dst_row * stride_dr)[:, None] + cols[None, :] * stride_dc, vals, mask=mask)


def _blocks(total_rows: int, C: int) -> tuple[int, int, int]:
    if INTERPRET:  # few, large tiles: each costs a few numpy calls
        return min(256, triton.next_power_of_2(max(total_rows, 1))), min(1024, triton.next_power_of_2(C)), 4
    # 16 rows x 256 channels (bf16: 8 KB per tile); 4 warps move 16-byte vectors.
    return 16, min(256, triton.next_power_of_2(C)), 4


def _check(x: torch.Tensor, src: torch.Tensor, fn: str) -> None:
    if x.dim() != 3 or src.dim() != 2 or src.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: expected x [B, T, C] and src [B, R], got {tuple(x.shape)} and {tuple(src.shape)}")
    if src.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: src must be int64 or int32, got {src.dtype}")
    if src.device != x.device:
        raise ValueError(f"{fn}: src must be on x's device {x.device}, got {src.device}")
    check_runnable(x, fn)


def _launch(src_t, idx, dst, R, C, scatter):
    B = idx.shape[0]
    total = B * R
    if total == 0 or C == 0:
        return
    br, bc, warps = _blocks(total, C)
    grid = (triton.cdiv(total, br), triton.cdiv(C, bc))
    args = (src_t, idx, dst, R, C, total, *src_t.stride(), *idx.stride(), *dst.stride())
    with device_ctx(dst):
        _row_copy_kernel[grid](*args, SCATTER=scatter, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)


def gather_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """y[b, r] = x[b, src[b, r]]: [B, R, C] in x's dtype (x may have any strides)."""
    _check(x, src, "gather_rows")
    B, _, C = x.shape
    R = src.shape[1]
    y = torch.empty((B, R, C), device=x.device, dtype=x.dtype)
    _launch(x, src, y, R, C, scatter=False)
    return y


def scatter_rows(dy: torch.Tensor, src: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """dx [B, num_tokens, C], zeros except dx[b, src[b, r]] = dy[b, r] (src rows distinct per sample)."""
    _check(dy, src, "scatter_rows")
    B, R, C = dy.shape
    if src.shape[1] != R:
        raise ValueError(f"scatter_rows: dy has {R} rows per sample but src has {src.shape[1]}")
    dx = torch.zeros((B, num_tokens, C), device=dy.device, dtype=dy.dtype)
    _launch(dy, src, dx, R, C, scatter=True)
    return dx
