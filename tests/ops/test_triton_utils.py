"""fastclip.ops._triton_utils: LaunchConfig, pow2_clamp, dot_precision, checks, tile device functions."""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")
import triton.language as tl

from fastclip.ops import _triton_utils as tu
from fastclip.ops._triton_utils import accumulate_pv, logits_tile, store_acc
from fastclip.testing import assert_close

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
needs_interp_or_cuda = pytest.mark.skipif(
    not CUDA and not tu.INTERPRET,
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 set before triton is first imported")


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,lo,hi,want", [(1, 16, 256, 16), (16, 16, 256, 16), (17, 16, 256, 32), (77, 16, 256, 128),
                                          (257, 16, 256, 256), (0, 1, 8, 1), (-5, 1, 8, 1), (5, 1, 8, 8),
                                          (3, 4, 4, 4)])
def test_pow2_clamp(n, lo, hi, want):
    assert tu.pow2_clamp(n, lo, hi) == want


def test_launch_config_defaults_and_immutability():
    cfg = tu.LaunchConfig(64, 32)
    assert (cfg.block_m, cfg.block_n) == (64, 32)
    assert (cfg.block_d, cfg.block_do, cfg.num_warps, cfg.num_stages, cfg.max_programs) == (0, 0, 4, 2, 0)
    assert cfg == tu.LaunchConfig(64, 32, 0, 0, 4, 2, 0)  # a value: usable as a cache key
    assert hash(cfg) == hash(tu.LaunchConfig(64, 32))
    with pytest.raises(AttributeError):
        cfg.block_m = 128


def test_dtypes_are_the_tensor_core_floats():
    assert tu.DTYPES == (torch.float32, torch.float16, torch.bfloat16)


def test_dot_precision(monkeypatch):
    """IEEE fp32 under the interpreter; on a GPU tf32x3 for fp32 operands, fp16/bf16 as they are."""
    monkeypatch.setattr(tu, "INTERPRET", True)
    assert [tu.dot_precision(dt) for dt in tu.DTYPES] == ["ieee"] * 3
    monkeypatch.setattr(tu, "INTERPRET", False)
    assert [tu.dot_precision(dt) for dt in tu.DTYPES] == ["tf32x3", "ieee", "ieee"]


@pytest.mark.skipif(CUDA, reason="the interpreter flag of a CPU-only test process")
def test_interpret_reflects_how_triton_decorated_the_kernels():
    """This process imported triton after TRITON_INTERPRET=1 (here or in tests/conftest.py)."""
    assert tu.INTERPRET is (os.environ.get("TRITON_INTERPRET") == "1")


def test_check_runnable_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setattr(tu, "INTERPRET", True)
    tu.check_runnable(x, "some_launcher")  # runs through the interpreter
    monkeypatch.setattr(tu, "INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"some_launcher: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1"):
        tu.check_runnable(x, "some_launcher")
    tu.check_runnable(torch.zeros(2, device="meta"), "some_launcher")  # only CPU tensors are refused


def test_device_ctx_is_a_no_op_off_cuda():
    assert isinstance(tu.device_ctx(torch.zeros(1)), contextlib.nullcontext)


# ----------------------------------------------------------------------------------------------
# Device functions, through small test kernels (masked tails: sizes that are not block multiples)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _lanes(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program covers rows < M and columns < N of blocks that may be larger (masked tails)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _logits_kernel(x_ptr, y_ptr, out_ptr, M, N, D, sxm, sxd, sym, syd, som, son,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = _lanes(M, N, BLOCK_M, BLOCK_N)
    z = logits_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, sxm, sxd, sym, syd,
                    BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, "ieee")
    tl.store(out_ptr + offs_m[:, None] * som + offs_n[None, :] * son, z, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _pv_kernel(p_ptr, y_ptr, out_ptr, M, N, D, spm, spn, sym, syd, som, sod,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr, ACC_IN_REGS: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = _lanes(M, N, BLOCK_M, BLOCK_N)
    p = tl.load(p_ptr + offs_m[:, None] * spm + offs_n[None, :] * spn, mask=mask_m[:, None] & mask_n[None, :],
                other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    acc = accumulate_pv(p, y_ptr, out_ptr, acc, offs_m, offs_n, mask_m, mask_n, D, sym, syd, som, sod,
                        BLOCK_DO, ACC_IN_REGS, True, "ieee")
    if ACC_IN_REGS:
        store_acc(out_ptr, acc, offs_m, mask_m, D, som, sod, BLOCK_DO)


@needs_interp_or_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_tile_loops_over_d_with_masked_tails(dtype):
    """x[rows] @ y[cols].T in fp32 from a loop over D = 40 in 16-wide chunks, strided x, 5 x 7 of a 16 x 16 tile."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 80, generator=g).to(DEV, dtype)[:, ::2]  # stride (80, 2)
    y = torch.randn(7, 40, generator=g).to(DEV, dtype)
    out = torch.full((5, 7), float("nan"), device=DEV)
    _logits_kernel[(1,)](x, y, out, 5, 7, 40, *x.stride(), *y.stride(), *out.stride(),
                         BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, UPCAST=True)
    assert_close(out, x.double() @ y.double().T, dtype, "logits tile")


@needs_interp_or_cuda
@pytest.mark.parametrize("in_regs", [True, False], ids=["registers", "global-rmw"])
def test_accumulate_pv_in_registers_or_global_memory(in_regs):
    """p @ y added to the output rows: stored from a register accumulator (D <= BLOCK_DO), or
    read-modify-written in global memory BLOCK_DO columns at a time (adding to what is there)."""
    g = torch.Generator().manual_seed(1)
    p = torch.rand(5, 7, generator=g).to(DEV)
    y = torch.randn(7, 40, generator=g).to(DEV)
    start = torch.randn(5, 40, generator=g).to(DEV)
    out = start.clone()
    _pv_kernel[(1,)](p, y, out, 5, 7, 40, *p.stride(), *y.stride(), *out.stride(),
                     BLOCK_M=16, BLOCK_N=16, BLOCK_DO=64 if in_regs else 16, ACC_IN_REGS=in_regs)
    product = p.double() @ y.double()
    assert_close(out, product if in_regs else start.double() + product, torch.float32, "p @ y")
