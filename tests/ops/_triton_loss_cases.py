"""Inputs, oracles and tolerances shared by test_clip_loss_triton.py and test_siglip_loss_triton.py.

Import it before anything that imports Triton: without CUDA it sets TRITON_INTERPRET=1 (which must
precede Triton's first import), skips the importing test module when Triton is missing, or when
Triton was already imported without the interpreter (run that file in its own process then).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")

from fastclip.ops._triton_utils import INTERPRET  # noqa: E402
from fastclip.testing import TOLERANCES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not INTERPRET:
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                "run this file in its own process (or export TRITON_INTERPRET=1)", allow_module_level=True)

# Tolerances: fastclip.testing.TOLERANCES, (dtype, atol, rtol) for results from inputs of `dtype`
# against an fp64 oracle that sees the same (rounded) input values.  atol is relative to the largest
# |expected| of the compared tensor, so one row serves lse values, losses and gradients.
# Low-precision rows cover the output cast and, on a GPU, the fp16/bf16 tensor-core products.
DTYPES = [dt for dt, _, _ in TOLERANCES if dt != torch.float64]
DT_IDS = [str(dt).replace("torch.", "") for dt in DTYPES]

# Launcher-level shapes (M, K, D), M != K: N = 1 on either side, D = 257 (not a multiple of any block).
SHAPES = [(1, 7, 64), (7, 1, 257), (33, 64, 257), (64, 33, 64)]

# Small tiles (a LaunchConfig built by each test file): several row, column and D blocks even at
# N <= 64, two persistent programs in the clip K1 (so partial rows are merged), and D > BLOCK_DO
# (gradient accumulated in global memory).
SMALL_BLOCKS = dict(block_m=16, block_n=32, block_d=64, block_do=64, max_programs=2)


def features(n: int, d: int, dtype: torch.dtype, *, seed: int, normalize: bool = True,
             layout: str = "contiguous") -> torch.Tensor:
    """[n, d] random rows (unit norm if ``normalize``) in ``dtype`` on DEVICE, stored as ``layout``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    x = x.to(dtype)
    if layout == "strided":  # every other column of a wider buffer: stride (2D, 2)
        buf = torch.zeros(n, 2 * d, dtype=dtype)
        buf[:, ::2] = x
        x = buf[:, ::2]
    elif layout == "transposed":  # column-major storage: stride (1, N)
        x = x.T.contiguous().T
    return x.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Public API: backend="triton" against backend="reference" (loss and every gradient)
# ----------------------------------------------------------------------------------------------
# (N, D, logit_scale, normalised features, layout of image/text features)
API_CASES = [
    pytest.param(1, 64, 100.0, True, ("contiguous", "contiguous"), id="N1"),
    pytest.param(7, 64, 100.0, True, ("strided", "transposed"), id="N7-noncontig"),
    pytest.param(33, 257, 100.0, False, ("contiguous", "strided"), id="N33-D257-unnormalised"),
    pytest.param(64, 257, 14.3, True, ("transposed", "contiguous"), id="N64-D257"),
]

# All statistics are fp32 whatever the input dtype, so quantities that vanish in exact arithmetic
# carry fp32 rounding noise relative to the size of the logits: this is the floor of their slack.
# On top of it the kernels may be off by twice PyTorch's own error at working precision (the
# ``peers``: the fp32 reference; on a GPU also the chunked backend in fp16/bf16), flash-attention's
# rule, which covers ill-conditioned cases such as logits of several hundred.
FLOOR = 1e-5

NAMES = ("loss", "d/d image_features", "d/d text_features", "d/d logit_scale", "d/d logit_bias")
KINDS = ("loss", "feat", "feat", "scale", "bias")


def api_inputs(n, d, dtype, normalize, layouts, seed):
    a = features(n, d, dtype, seed=seed, normalize=normalize, layout=layouts[0])
    b = features(n, d, dtype, seed=seed + 1, normalize=normalize, layout=layouts[1])
    if not normalize:
        a, b = a * 0.3, b * 0.3  # |z| up to a few hundred: extreme but finite logits
    return a, b


def natural_sizes(a, b, scale, n):
    """Sizes to which rounding noise is relative: |z| bound, feature-gradient and d/d scale sizes."""
    zmax = scale * a.float().norm(dim=1).max().item() * b.float().norm(dim=1).max().item()
    fmax = scale * max(a.float().abs().max().item(), b.float().abs().max().item()) / n
    return {"loss": FLOOR * zmax, "feat": FLOOR * fmax, "scale": FLOOR * zmax / scale, "bias": FLOOR}


def run(fn, a, b, scalars, backend, cast=None, **kw):
    """Loss and gradients wrt (a, b, *scalars), optionally on copies of the inputs cast to ``cast``."""
    a_ = (a.to(cast) if cast else a).detach().requires_grad_(True)
    b_ = (b.to(cast) if cast else b).detach().requires_grad_(True)
    s_ = [torch.tensor(v, device=DEVICE, dtype=cast or torch.float32, requires_grad=True) for v in scalars]
    loss = fn(a_, b_, *s_, backend=backend, **kw)
    grads = torch.autograd.grad(loss, [a_, b_, *s_])
    return (loss, *grads)


def oracle_and_peers(fn, a, b, scalars, dtype, **kw):
    """fp64 reference on the same input values, and PyTorch's own results at working precision."""
    oracle = run(fn, a, b, scalars, "reference", torch.float64, **kw)
    peers = [run(fn, a, b, scalars, "reference", torch.float32, **kw)]
    if DEVICE.type == "cuda" and dtype != torch.float32:  # on CPU chunked computes in fp32 anyway
        peers.append(run(fn, a, b, scalars, "chunked", **kw))
    return oracle, peers
