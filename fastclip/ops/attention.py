"""Scaled dot-product attention with one dispatcher over flash-attn, Triton, xformers and PyTorch SDPA.

    out = softmax(scale * q @ k.T + mask) @ v,     q, k, v, out: [B, H, L, head_dim]

exactly like ``torch.nn.functional.scaled_dot_product_attention`` (same layout, same top-left
aligned causal mask when Lq != Lk, same boolean-mask convention: True = may attend).

Backends, in automatic-selection order (each declares where "auto" may pick it: ``auto_devices``):

=========== ======================= =============== ===============================================
name        devices                 dtypes          notes
=========== ======================= =============== ===============================================
flash_attn  cuda (sm80+)            fp16, bf16      ``flash_attn_func``; head_dim <= 256; no
                                                    attn_mask; causal only with Lq == Lk (flash-attn
                                                    aligns the causal mask bottom-right)
triton      cuda; cpu only through  fp32/fp16/bf16  fastclip's flash-attention kernels (forward +
            TRITON_INTERPRET=1                      FA2 backward) in ``_attention_triton``;
                                                    head_dim <= 128 (32/64/128 native, others padded
                                                    to the next power of two); no attn_mask
xformers    cuda                    fp32/fp16/bf16  ``memory_efficient_attention``; no attn_mask
sdpa        any                     + fp64          ``F.scaled_dot_product_attention``; attn_mask ok
reference   any                     + fp64          the materialised formula (test oracle, never
                                                    chosen automatically)
=========== ======================= =============== ===============================================

Order on CUDA: flash-attn > triton > xformers > sdpa (flash-attn 2 is the fastest where it
runs; fastclip's kernel is next because it handles any L and causal without a
package; xformers' kernel and SDPA follow).  On CPU automatic selection gives ``sdpa``: the Triton
interpreter is for tests and is only used when asked for (``backend="triton"``), and flash-attn /
xformers need CUDA.  Refusals name the reason (not installed with the import error, head dim,
dtype, needs CUDA, ...), see ``fastclip.info``.

torch.compile: the backend is chosen by :func:`choose_backend`, a memoised function of static
properties (device type, dtype, head dims, causal, whether a mask is given, the requested name,
``FASTCLIP_BACKEND``/``TRITON_INTERPRET``) that Dynamo treats as a constant
(``torch.compiler.assume_constant_result``, see ``dispatch.make_static_chooser``), so the dispatch
never graph-breaks.  The Triton launchers are registered as ``torch.library`` custom ops
(``fastclip::attention_triton_fwd/bwd``), opaque to the compiler.  flash-attn and xformers are
imported lazily, on first use or check.

Layers in this file: ``attention_reference`` (twin) -> backend wrappers -> ``TritonAttentionFunction``
(autograd over the custom ops; kernels and launchers in ``_attention_triton``, imported lazily so
that importing fastclip never imports Triton) -> ``attention`` (functional API).  The module is
``fastclip.nn.attention.MultiheadSelfAttention``.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from ._checks import ANY_DEVICE, FLOATS, check_float_tensor

__all__ = [
    "attention",
    "attention_reference",
    "choose_backend",
    "TritonAttentionFunction",
    "TRITON_MAX_HEAD_DIM",
]

OP = "attention"
TRITON_MAX_HEAD_DIM = 128
FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Reference twin: the plain formula (test oracle and slowest backend).
# ----------------------------------------------------------------------------------------------
def _causal_bool(lq: int, lk: int, device) -> torch.Tensor:
    # Top-left aligned, as torch SDPA: query i may attend keys j <= i.
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
                        upcast: bool = True) -> torch.Tensor:
    """softmax(scale * q @ k.T + mask) @ v with the [.., Lq, Lk] scores materialised.

    ``upcast=True`` computes in fp32 (fp64 stays fp64) and returns the input dtype: the oracle.
    ``upcast=False`` computes in the input dtype throughout (matmuls and softmax in fp16/bf16):
    "PyTorch's own error in that dtype" of the attention test rule.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dtype = q.dtype
    if upcast:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    s = torch.matmul(q * scale, k.transpose(-2, -1)) if not upcast else torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(s.dtype)
    if causal:
        s = s.masked_fill(~_causal_bool(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p.to(v.dtype), v).to(dtype)


# ----------------------------------------------------------------------------------------------
# Backend wrappers.  Signature: fn(q, k, v, causal, scale (float), attn_mask) -> out [B, H, Lq, hd]
# ----------------------------------------------------------------------------------------------
def _run_reference(q, k, v, causal, scale, attn_mask):
    return attention_reference(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)


def _run_sdpa(q, k, v, causal, scale, attn_mask):
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants the query dtype (or bool)
        if causal:  # SDPA refuses is_causal together with a mask: fold the causal part in
            tri = _causal_bool(q.shape[-2], k.shape[-2], q.device)
            attn_mask = (attn_mask & tri) if attn_mask.dtype == torch.bool else \
                attn_mask.masked_fill(~tri, float("-inf"))
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)


def _bthd(t: torch.Tensor) -> torch.Tensor:
    # [B, H, L, hd] -> [B, L, H, hd] (a view); flash-attn / xformers want a unit last stride.
    t = t.transpose(1, 2)
    return t if t.stride(-1) == 1 else t.contiguous()


def _run_flash_attn(q, k, v, causal, scale, attn_mask):
    from flash_attn import flash_attn_func  # documented API: [B, L, H, hd] in and out

    out = flash_attn_func(_bthd(q), _bthd(k), _bthd(v), dropout_p=0.0, softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)


def _run_xformers(q, k, v, causal, scale, attn_mask):
    import xformers.ops as xops  # documented API: [B, L, H, hd]; LowerTriangularMask = top-left causal

    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(_bthd(q), _bthd(k), _bthd(v), attn_bias=bias, p=0.0, scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Triton engine: custom ops (opaque to torch.compile) -> autograd Function
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastclip::attention_triton_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)")
def _triton_fwd_op(q, k, v, causal, scale):
    from . import _attention_triton as kern
    return kern.attention_fwd(q, k, v, causal=causal, scale=scale)


@_triton_fwd_op.register_fake
def _(q, k, v, causal, scale):
    B, H, Lq, _ = q.shape
    return (q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=torch.float32))


@torch.library.custom_op(
    "fastclip::attention_triton_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, float scale)"
           " -> (Tensor, Tensor, Tensor)")
def _triton_bwd_op(do, q, k, v, o, lse, causal, scale):
    from . import _attention_triton as kern
    return kern.attention_bwd(do, q, k, v, o, lse, causal=causal, scale=scale)


@_triton_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class TritonAttentionFunction(torch.autograd.Function):
    """forward(q, k, v, causal, scale) -> out.  Saves (q, k, v, out, lse); the backward is the
    FA2 recomputation (delta = rowsum(dO * O), a dk/dv kernel over key blocks, a dq kernel over
    query blocks), so memory stays O(B * H * L * hd)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = torch.ops.fastclip.attention_triton_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastclip.attention_triton_bwd(do, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _run_triton(q, k, v, causal, scale, attn_mask):
    return TritonAttentionFunction.apply(q, k, v, causal, scale)


# ----------------------------------------------------------------------------------------------
# Capability checks (extra reasons beyond devices/dtypes/packages)
# ----------------------------------------------------------------------------------------------
def _no_mask(has_mask):
    return ["an arbitrary attn_mask is not supported (causal=True is); use backend 'sdpa'"] if has_mask else []


def _cuda_capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _flash_check(device=None, dtype=None, head_dim=0, head_dim_v=0, causal=False, same_len=True,
                 has_mask=False, **_):
    out = _no_mask(has_mask)
    if head_dim > FLASH_MAX_HEAD_DIM or head_dim_v != head_dim:
        out.append(f"head dim must be <= {FLASH_MAX_HEAD_DIM} and equal for q/k and v, got {head_dim} and {head_dim_v}")
    if causal and not same_len:
        out.append("causal with Lq != Lk: flash-attn aligns the causal mask bottom-right, torch SDPA top-left")
    if device is not None and device.type == "cuda" and not out and _cuda_capability(device) < (8, 0):
        out.append(f"needs an sm80+ GPU (Ampere or newer), got sm{''.join(map(str, _cuda_capability(device)))}")
    return out


def _triton_check(device=None, dtype=None, head_dim=0, head_dim_v=0, has_mask=False, **_):
    """The kernel's own limits; dispatch.triton_backend adds the device reasons after these."""
    out = _no_mask(has_mask)
    if head_dim > TRITON_MAX_HEAD_DIM or head_dim_v != head_dim:
        out.append(f"head dim unsupported: needs q/k and v head dims equal and <= {TRITON_MAX_HEAD_DIM}, "
                   f"got {head_dim} and {head_dim_v}")
    # Only where the device itself is fine (CUDA without the interpreter), so this stays the last reason.
    if device is not None and device.type == "cuda" and not dispatch.triton_interpreter() \
            and dtype == torch.bfloat16 and _cuda_capability(device) < (8, 0):
        out.append("bfloat16 tl.dot needs an sm80+ GPU")
    return out


def _xformers_check(device=None, dtype=None, head_dim=0, head_dim_v=0, has_mask=False, **_):
    return _no_mask(has_mask)


dispatch.register(OP, dispatch.Backend(
    "flash_attn", _run_flash_attn, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16),
    packages=("flash_attn",), check=_flash_check, doc="flash-attn 2 flash_attn_func (CUDA, fp16/bf16)"))
dispatch.register(OP, dispatch.triton_backend(
    _run_triton, faster="sdpa", check=_triton_check,
    doc="fastclip's Triton flash attention; CPU only through TRITON_INTERPRET=1 (tests)"))
dispatch.register(OP, dispatch.Backend(
    "xformers", _run_xformers, devices=("cuda",), packages=("xformers.ops",), check=_xformers_check,
    doc="xformers memory_efficient_attention (CUDA)"))
dispatch.register(OP, dispatch.Backend(
    "sdpa", _run_sdpa, devices=ANY_DEVICE, dtypes=FLOATS,
    doc="torch.nn.functional.scaled_dot_product_attention; runs everywhere, takes attn_mask"))
dispatch.register(OP, dispatch.Backend(
    "reference", _run_reference, devices=ANY_DEVICE, dtypes=FLOATS, auto_devices=(),
    doc="materialised scores in fp32 (the test oracle)"))

_FNS = {b.name: b.fn for b in dispatch.backends(OP)}


_choose = dispatch.make_static_chooser(OP, maxsize=512)


def choose_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype, head_dim: int,
                   head_dim_v: Optional[int] = None, causal: bool = False, same_len: bool = True,
                   has_mask: bool = False) -> str:
    """Name of the backend ``attention`` runs for these static properties (raises BackendError /
    ValueError with every reason when none, or not the requested one, can run)."""
    return _choose(backend, device, dtype, head_dim=int(head_dim),
                   head_dim_v=int(head_dim if head_dim_v is None else head_dim_v), causal=bool(causal),
                   same_len=bool(same_len), has_mask=bool(has_mask))


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, attn_mask, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, "[B, H, L, head_dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device} and {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(f"q, k and v must have the same batch and head dims [B, H, ...], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError(f"k and v need at least one key (Lk >= 1) when q has queries, got k of shape {tuple(k.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOATS:
            raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), target)
            ok = attn_mask.dim() <= 4
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask must broadcast to [B, H, Lq, Lk] = {list(target)}, got shape "
                             f"{tuple(attn_mask.shape)}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention, like ``F.scaled_dot_product_attention`` (no dropout).

    Args:
        q: [B, H, Lq, head_dim]; k, v: [B, H, Lk, head_dim]; same dtype (fp32/fp16/bf16, fp64 on
            sdpa/reference) and device.  Any strides (the Triton kernels take explicit strides, so
            the views of a fused qkv projection are not copied).
        causal: query i attends keys j <= i (top-left aligned when Lq != Lk, as SDPA).
        scale: multiplies q @ k.T; default 1 / sqrt(head_dim).
        attn_mask: optional mask broadcastable to [B, H, Lq, Lk]: bool (True = may attend, the SDPA
            convention) or additive float.  Only sdpa/reference take it; automatic selection then
            picks sdpa.  Prefer ``causal=True`` for a causal mask (the fast path).
        backend: "auto", "flash_attn", "triton", "xformers", "sdpa" or "reference"; else
            ``FASTCLIP_BACKEND``; see ``fastclip.info`` for what runs here and why not.

    Returns:
        [B, H, Lq, head_dim] in q's dtype.
    """
    _check_inputs(q, k, v, attn_mask, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0 or v.shape[-1] == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    # Plain Python constants, also under torch.compile(dynamic=True): operator.index and a branch
    # specialise a SymInt / SymBool with a guard (int() and bool() would stay symbolic there).
    # Head dims are static in practice; Lq == Lk only matters to flash-attn's causal alignment.
    same_len = True if q.shape[-2] == k.shape[-2] else False  # noqa: SIM210 (a branch, see above)
    name = choose_backend(backend, q.device, q.dtype, operator.index(q.shape[-1]), operator.index(v.shape[-1]),
                          bool(causal), same_len, attn_mask is not None)
    return _FNS[name](q, k, v, bool(causal), scale, attn_mask)
