"""fastclip.ops._patch_mask_triton: gather_rows / scatter_rows as exact copies, errors, GPU codegen.

Without CUDA the kernel runs through the Triton interpreter (TRITON_INTERPRET=1, set below before
anything imports Triton).  The Triton backend through ``fastclip.ops.patch_mask`` is tested in
test_patch_mask.py.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the kernels read it at definition)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")

from fastclip.ops import _patch_mask_triton as kern
from fastclip.ops import dispatch
from fastclip.ops._triton_utils import INTERPRET

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_interp_or_cuda = pytest.mark.skipif(
    not CUDA and not INTERPRET,
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 set before triton is first imported")


def rows_to_keep(B, T, R, seed, dtype=torch.int64):
    """[B, R] distinct, ascending row ids per sample (as patch_mask's sorted ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:R].sort().values for _ in range(B)]).to(DEV, dtype)


@needs_interp_or_cuda
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gather_and_scatter_are_exact_copies(dtype, idx_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 40, generator=g).to(DEV, dtype)
    src = rows_to_keep(3, 50, 13, seed=1, dtype=idx_dtype)
    y = kern.gather_rows(x, src)
    assert y.shape == (3, 13, 40) and y.dtype == dtype
    assert torch.equal(y, torch.stack([x[b, src[b].long()] for b in range(3)]))
    dy = torch.randn(3, 13, 40, generator=g).to(DEV, dtype)
    dx = kern.scatter_rows(dy, src, 50)
    want = torch.zeros_like(x)
    for b in range(3):
        want[b, src[b].long()] = dy[b]
    assert dx.shape == x.shape and dx.dtype == dtype and torch.equal(dx, want)


@needs_interp_or_cuda
def test_strided_input_and_empty_selection():
    base = torch.randn(2, 9, 2 * 24, generator=torch.Generator().manual_seed(2)).to(DEV)
    x = base[:, :, ::2]  # stride 2 along C
    src = rows_to_keep(2, 9, 4, seed=3)
    assert torch.equal(kern.gather_rows(x, src), torch.stack([x[b, src[b]] for b in range(2)]))
    none = torch.zeros(2, 0, dtype=torch.int64, device=DEV)
    assert kern.gather_rows(x, none).shape == (2, 0, 24)
    dx = kern.scatter_rows(torch.zeros(2, 0, 24, device=DEV), none, 9)
    assert dx.shape == (2, 9, 24) and not dx.any()


@needs_interp_or_cuda
def test_launcher_errors_name_the_function_and_argument():
    x = torch.randn(2, 9, 8, device=DEV)
    src = torch.zeros(2, 3, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match=r"gather_rows: expected x \[B, T, C\] and src \[B, R\], got \(9, 8\) and \(2, 3\)"):
        kern.gather_rows(x[0], src)
    with pytest.raises(ValueError, match=r"gather_rows: expected x \[B, T, C\] and src \[B, R\]"):
        kern.gather_rows(x, src[:1])
    with pytest.raises(TypeError, match=r"gather_rows: src must be int64 or int32, got torch.float32"):
        kern.gather_rows(x, src.float())
    with pytest.raises(ValueError, match=r"scatter_rows: dy has 3 rows per sample but src has 2"):
        kern.scatter_rows(torch.zeros(2, 3, 8, device=DEV), src[:, :2], 9)


def test_kernel_compiles_for_a_gpu_target_without_a_gpu():
    """Triton's ahead-of-time compiler builds the gather/scatter kernel for sm80 on a CPU machine."""
    if dispatch.package_status("triton.backends.nvidia.compiler"):
        pytest.skip("triton's NVIDIA backend is not available")
    script = r'''
import inspect, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastclip.ops import _patch_mask_triton as P
assert not P.INTERPRET
for scatter in (False, True):
    const = dict(SCATTER=scatter, BLOCK_R=16, BLOCK_C=256)
    sig = {p: ("constexpr" if p in const else "*i64" if p == "idx_ptr" else "*bf16" if p.endswith("_ptr") else "i32")
           for p in inspect.signature(P._row_copy_kernel.fn).parameters}
    triton.compile(ASTSource(P._row_copy_kernel, sig, const), target=GPUTarget("cuda", 80, 32), options={"num_warps": 4})
print("ok")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
