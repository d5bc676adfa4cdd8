"""fastclip.ops.attention: every backend against the reference, dispatch, wrappers, bad input.

The Triton backend runs through TRITON_INTERPRET=1 on CPU; flash-attn / xformers are checked for
layout through fake modules.  Accuracy rule: see _attention_oracle.py (error at most twice
PyTorch's own in the same dtype).  The kernel launchers themselves: test_attention_triton.py.
"""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the kernels read it at definition)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
import types

import pytest

from fastclip.ops import attention, attention_reference, dispatch
from fastclip.ops.attention import _run_flash_attn, _run_xformers, choose_backend
from fastclip.testing import assert_close

from ._attention_oracle import check_rule, fwd_bwd, make, oracle_and_pytorch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_interp_or_cuda = pytest.mark.skipif(
    not CUDA and not dispatch.triton_interpreter(),
    reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by this module unless the environment overrides it)")

# CLIP's real lengths (50 = ViT-B/32, 77 = text, 197 = ViT-B/16, 257 = ViT-L/14), head dims
# 32/64/128 and one that is padded (40); few cases, B * H tiny: the interpreter is slow.
TRITON_CASES = [
    # (B, H, Lq, Lk, D, causal, dtype)
    (1, 2, 50, 50, 32, False, torch.float32),
    (1, 2, 77, 77, 64, True, torch.bfloat16),
    (1, 2, 197, 197, 64, False, torch.bfloat16),
    (1, 2, 257, 257, 128, True, torch.float16),
    (2, 1, 77, 77, 40, True, torch.float16),
    (1, 2, 50, 77, 32, True, torch.float32),  # Lq != Lk: top-left causal, as SDPA
    (1, 2, 197, 197, 32, True, torch.float16),
    (1, 2, 257, 257, 64, False, torch.float32),
    (1, 1, 50, 50, 128, False, torch.bfloat16),
    (1, 2, 77, 77, 96, False, torch.bfloat16),  # padded to 128
    (2, 1, 5, 5, 16, True, torch.float32),  # shorter than the smallest block
]


def case_id(c):
    B, H, Lq, Lk, D, causal, dtype = c
    return f"B{B}H{H}-L{Lq}x{Lk}-hd{D}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"


@needs_interp_or_cuda
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_within_twice_pytorch_error(case):
    B, H, Lq, Lk, D, causal, dtype = case
    q, k, v, do = make(B, H, Lq, Lk, D, dtype)
    res = fwd_bwd(lambda a, b, c: attention(a, b, c, causal=causal, backend="triton"), q, k, v, do)
    assert res[0].dtype == dtype and all(g.dtype == dtype for g in res[1:])
    oracle, pytorch = oracle_and_pytorch(q, k, v, do, causal)
    check_rule(res, oracle, pytorch, f"triton {case_id(case)}")


@needs_interp_or_cuda
def test_triton_reads_strided_views_of_a_fused_projection():
    """The module passes q/k/v as permuted views of one [B, L, 3, H, hd] tensor: no copies."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 50, 3, 2, 32, generator=g).to(DEV).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    (gq,) = torch.autograd.grad(out.square().sum(), qkv)
    qkv2 = qkv.detach().clone().requires_grad_()
    q2, k2, v2 = qkv2.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    ref = attention_reference(q2, k2, v2)
    (gr,) = torch.autograd.grad(ref.square().sum(), qkv2)
    assert_close(out, ref, torch.float32, "out")
    assert_close(gq, gr, torch.float32, "d qkv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backend_matches_reference(dtype, causal):
    q, k, v, do = make(2, 3, 77, 77, 64, dtype, device="cpu")
    res = fwd_bwd(lambda a, b, c: attention(a, b, c, causal=causal, backend="sdpa"), q, k, v, do)
    oracle, pytorch = oracle_and_pytorch(q, k, v, do, causal)
    check_rule(res, oracle, pytorch, f"sdpa {dtype} causal={causal}")


def test_masks_bool_float_and_with_causal():
    q, k, v, _ = make(1, 2, 50, 50, 32, torch.float32, device="cpu")
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(50, 50, generator=g) > 0.3
    keep.fill_diagonal_(True)
    additive = torch.zeros(50, 50).masked_fill(~keep, float("-inf"))
    for backend in ("sdpa", "reference"):
        a = attention(q, k, v, attn_mask=keep, backend=backend)
        b = attention(q, k, v, attn_mask=additive, backend=backend)
        assert_close(a, b, torch.float32, f"{backend}: bool vs additive mask")
        # causal=True together with a mask: both apply
        c = attention(q, k, v, attn_mask=keep, causal=True, backend=backend)
        d = attention(q, k, v, attn_mask=keep & torch.ones(50, 50, dtype=torch.bool).tril(), backend=backend)
        assert_close(c, d, torch.float32, f"{backend}: causal + mask")
    causal_mask = torch.zeros(50, 50).masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    assert_close(attention(q, k, v, attn_mask=causal_mask), attention(q, k, v, causal=True), torch.float32,
                 "additive causal mask vs causal=True")


def test_custom_scale():
    q, k, v, _ = make(1, 2, 50, 50, 32, torch.float32, device="cpu")
    a = attention(q, k, v, scale=0.05)
    b = attention_reference(q, k, v, scale=0.05)
    assert_close(a, b, torch.float32, "scale=0.05")
    assert not torch.allclose(a, attention(q, k, v), atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Dispatch: choices and refusal reasons
# ----------------------------------------------------------------------------------------------
def _choose(backend="auto", device="cpu", dtype=torch.float32, head_dim=64, **kw):
    return choose_backend(backend, torch.device(device), dtype, head_dim, **kw)


def test_auto_on_cpu_is_sdpa_even_with_the_interpreter(monkeypatch):
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    for interp in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        assert _choose() == "sdpa"
        assert _choose(causal=True) == "sdpa"
        assert _choose(has_mask=True) == "sdpa"


def test_explicit_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(dispatch.BackendError, match=r"backend 'triton' \(backend=\) cannot run.*TRITON_INTERPRET=1"):
        attention(q, q, q, backend="triton")


def test_refusal_reasons_name_the_cause(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    with pytest.raises(dispatch.BackendError, match=r"head dim unsupported.*<= 128, got 256"):
        _choose("triton", head_dim=256)
    with pytest.raises(dispatch.BackendError, match=r"attn_mask is not supported"):
        _choose("triton", has_mask=True)
    with pytest.raises(dispatch.BackendError, match=r"supports dtypes float32, float16, bfloat16, got float64"):
        _choose("triton", dtype=torch.float64)
    for name, pkg in (("flash_attn", "flash_attn"), ("xformers", "xformers.ops")):
        why = dispatch.package_status(pkg)
        pattern = rf"cannot import {pkg}" if why else r"runs on cuda, inputs are on cpu"
        with pytest.raises(dispatch.BackendError, match=pattern):
            _choose(name, dtype=torch.float16)
    with pytest.raises(dispatch.BackendError, match=r"supports dtypes float16, bfloat16, got float32"):
        _choose("flash_attn", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"backend='bogus' is not a backend of attention"):
        _choose("bogus")


def test_flash_attn_reasons_without_the_package_on_cuda_inputs(monkeypatch):
    """Reasons for CUDA inputs can be listed on a CPU machine (no CUDA call is made before the
    package and dtype checks refuse)."""
    b = {x.name: x for x in dispatch.backends("attention")}
    why = b["flash_attn"].reasons(device=torch.device("cuda"), dtype=torch.float32, head_dim=64, head_dim_v=64)
    assert any("float16, bfloat16, got float32" in r for r in why)
    why = b["flash_attn"].check(device=None, head_dim=64, head_dim_v=64, causal=True, same_len=False)
    assert any("bottom-right" in r for r in why)


def test_env_variable_selects_backend(monkeypatch):
    q, k, v, _ = make(1, 1, 8, 8, 16, torch.float32, device="cpu")
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    assert _choose() == "reference"
    assert_close(attention(q, k, v), attention_reference(q, k, v), torch.float32)
    assert _choose("sdpa") == "sdpa"  # the argument beats the environment


def test_package_import_is_lazy():
    """Importing fastclip imports neither triton nor flash-attn/xformers nor torch._dynamo."""
    import subprocess
    code = ("import sys, fastclip, fastclip.nn.attention, fastclip.nn.patch_mask; "
            "print([m for m in ('triton', 'flash_attn', 'xformers', 'torch._dynamo') if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# ----------------------------------------------------------------------------------------------
# flash-attn / xformers wrappers: layout conversion through fake modules
# ----------------------------------------------------------------------------------------------
def _bthd_reference(q, k, v, causal, scale):
    # what both libraries compute, in their [B, L, H, hd] layout
    out = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale)
    return out.transpose(1, 2)


def test_flash_attn_wrapper_layout(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((tuple(q.shape), q.stride(-1), dropout_p, softmax_scale, causal))
        return _bthd_reference(q, k, v, causal, softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v, _ = make(2, 3, 50, 50, 32, torch.float32, device="cpu")
    out = _run_flash_attn(q, k, v, True, 0.2, None)
    assert calls == [((2, 50, 3, 32), 1, 0.0, 0.2, True)]
    assert_close(out, attention_reference(q, k, v, causal=True, scale=0.2), torch.float32)


def test_xformers_wrapper_layout(monkeypatch):
    calls = []

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        causal = isinstance(attn_bias, LowerTriangularMask)
        calls.append((tuple(q.shape), p, scale, causal))
        return _bthd_reference(q, k, v, causal, scale)

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention,
                                LowerTriangularMask=LowerTriangularMask)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v, _ = make(1, 2, 77, 77, 64, torch.float32, device="cpu")
    for causal in (False, True):
        out = _run_xformers(q, k, v, causal, 0.125, None)
        assert_close(out, attention_reference(q, k, v, causal=causal, scale=0.125), torch.float32)
    assert calls == [((1, 77, 2, 64), 0.0, 0.125, False), ((1, 77, 2, 64), 0.0, 0.125, True)]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, H, L, head_dim\], got shape \(2, 8, 16\)"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match=r"k must be 4-D"):
        attention(q, q[0], q)
    with pytest.raises(TypeError, match=r"v must be a floating tensor .* got torch.int64"):
        attention(q, q, q.long())
    with pytest.raises(TypeError, match=r"q, k and v must have the same dtype, got torch.float32, torch.float16"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match=r"same device, got cpu, meta and cpu"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match=r"same batch and head dims"):
        attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match=r"k and v must have the same sequence length"):
        attention(q, q, torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match=r"q and k must have the same head_dim, got \(1, 2, 8, 16\) and \(1, 2, 8, 32\)"):
        attention(q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32))
    with pytest.raises(ValueError, match=r"attn_mask must broadcast to \[B, H, Lq, Lk\] = \[1, 2, 8, 8\], got shape \(7, 8\)"):
        attention(q, q, q, attn_mask=torch.zeros(7, 8))
    with pytest.raises(ValueError, match=r"scale must be a finite float or None, got nan"):
        attention(q, q, q, scale=float("nan"))
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        attention([1.0], q, q)
