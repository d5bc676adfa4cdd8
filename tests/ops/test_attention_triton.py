"""fastclip.ops._attention_triton: the launchers (small blocks, base-2 lse, errors), GPU codegen.

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set below before
anything imports Triton); the accuracy rule is _attention_oracle.py's.  The Triton backend through
``fastclip.ops.attention`` is tested in test_attention.py.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the kernels read it at definition)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")

from fastclip.ops import _attention_triton as kern
from fastclip.ops import attention_reference, dispatch
from fastclip.testing import assert_close

from ._attention_oracle import check_rule, make, oracle_and_pytorch

CUDA = torch.cuda.is_available()
needs_interp_or_cuda = pytest.mark.skipif(
    not CUDA and not kern.INTERPRET,
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 set before triton is first imported")


@needs_interp_or_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_triton_small_blocks_cover_tails_and_diagonals(causal):
    """Blocks much smaller than L, of unequal sizes, so that every code path runs: several key
    blocks per tile, the unmasked/masked split of the forward, causal diagonal blocks, the dk/dv
    loop start, and partial tail blocks (77 = 4 x 16 + 13 = 2 x 32 + 13)."""
    q, k, v, do = make(1, 2, 77, 77, 32, torch.float32, seed=3)
    scale = 0.3
    for bm, bn in ((32, 16), (16, 32)):
        cfg = kern.LaunchConfig(bm, bn)
        out, lse = kern.attention_fwd(q, k, v, causal=causal, scale=scale, config=cfg)
        dq, dk, dv = kern.attention_bwd(do, q, k, v, out, lse, causal=causal, scale=scale,
                                        config_dkdv=cfg, config_dq=cfg)
        oracle, pytorch = oracle_and_pytorch(q, k, v, do, causal, scale)
        check_rule((out, dq, dk, dv), oracle, pytorch, f"blocks {bm}x{bn} causal={causal}")


@needs_interp_or_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_forward_lse_is_the_base2_logsumexp(causal):
    """The forward's second output, which the backward consumes: log2 sum_j exp(scale q.k_j) per
    query (top-left causal mask when Lq != Lk, as SDPA), fp32, next to the right output."""
    q, k, v, _ = make(1, 2, 50, 77, 32, torch.float32, seed=4)
    out, lse = kern.attention_fwd(q, k, v, causal=causal, scale=0.2, config=kern.LaunchConfig(16, 32))
    assert lse.shape == (1, 2, 50) and lse.dtype == torch.float32 and out.dtype == torch.float32
    z = 0.2 * q.double() @ k.double().transpose(-1, -2)
    if causal:
        z = z.masked_fill(~torch.ones(50, 77, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.logsumexp(z, dim=-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert_close(lse, expected, torch.float32, "base-2 lse")
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, scale=0.2)
    assert_close(out, ref, torch.float32, "out")


@needs_interp_or_cuda
def test_launcher_errors_name_the_function_and_argument():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"attention_fwd: k must be 4-D \[B, H, L, head_dim\], got shape \(2, 8, 16\)"):
        kern.attention_fwd(q, q[0], q, causal=False, scale=1.0)
    with pytest.raises(TypeError, match=r"attention_fwd: q, k, v must share a dtype among float32/float16/bfloat16, "
                                        r"got torch.float64"):
        kern.attention_fwd(q.double(), q.double(), q.double(), causal=False, scale=1.0)
    with pytest.raises(ValueError, match=r"attention_fwd: shapes do not fit"):
        kern.attention_fwd(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), causal=False, scale=1.0)
    big = torch.randn(1, 1, 4, 256)
    with pytest.raises(ValueError, match=r"attention_fwd: head_dim must be <= 128, got 256"):
        kern.attention_fwd(big, big, big, causal=False, scale=1.0)
    with pytest.raises(ValueError, match=r"attention_bwd: do and out must have q's shape \(1, 2, 8, 16\)"):
        kern.attention_bwd(q[:, :1], q, q, q, q, torch.zeros(1, 2, 8), causal=False, scale=1.0)
    with pytest.raises(ValueError, match=r"attention_bwd: lse must be a contiguous float32 \[1, 2, 8\] tensor, "
                                         r"got torch.float64"):
        kern.attention_bwd(q, q, q, q, q, torch.zeros(1, 2, 8, dtype=torch.float64), causal=False, scale=1.0)


def test_block_d_pads_the_head_dim_to_a_power_of_two():
    assert [kern.block_d(d) for d in (8, 16, 32, 40, 64, 96, 128)] == [16, 16, 32, 64, 64, 128, 128]


@pytest.mark.skipif(not kern.INTERPRET, reason="the interpreter's launch configuration")
def test_interpreter_config_takes_few_large_blocks():
    """Under the interpreter every tile costs numpy calls: one block per sequence up to 256."""
    assert kern.default_config("fwd", 77, 50, 64, torch.float32) == kern.LaunchConfig(128, 64)
    assert kern.default_config("bwd_dq", 5, 300, 32, torch.bfloat16) == kern.LaunchConfig(16, 256)


# ----------------------------------------------------------------------------------------------
# GPU code generation without a GPU
# ----------------------------------------------------------------------------------------------
AOT_SCRIPT = r'''
import inspect, sys, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fastclip.ops import _attention_triton as A
assert not A.INTERPRET
ok = []
for cc, dt, hd, causal in ((90, "bf16", 64, True), (90, "fp16", 128, False), (80, "fp32", 128, True)):
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
    prec = "tf32x3" if dt == "fp32" else "ieee"
    for fn, kind in ((A._attn_fwd_kernel, "fwd"), (A._attn_bwd_dkdv_kernel, "bwd_dkdv"), (A._attn_bwd_dq_kernel, "bwd_dq")):
        cfg = A.default_config(kind, 197, 197, hd, tdt)
        const = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=A.block_d(hd), CAUSAL=causal, UPCAST=False,
                     DOT_PRECISION=prec)
        sig = {}
        for p in inspect.signature(fn.fn).parameters:
            sig[p] = ("constexpr" if p in const else "*fp32" if p in ("lse_ptr", "delta_ptr") else
                      f"*{dt}" if p.endswith("_ptr") else "fp32" if p.endswith("scale") else "i32")
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        assert k.metadata.shared <= 99 * 1024, (kind, dt, hd, k.metadata.shared)
        ok.append(f"{kind}-{dt}-hd{hd}-sm{cc}")
print(" ".join(ok))
'''


def test_kernels_compile_for_gpu_targets_without_a_gpu():
    """Triton's ahead-of-time compiler (ptxas ships with triton) builds the kernels for sm80/sm90:
    catches what the interpreter cannot (types, layouts, shared memory), on a CPU machine."""
    if dispatch.package_status("triton.backends.nvidia.compiler"):
        pytest.skip("triton's NVIDIA backend is not available: " + dispatch.package_status("triton.backends.nvidia.compiler"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.split()) == 9, out.stdout
