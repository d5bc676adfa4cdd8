"""The ``triton`` backend of the contrastive losses against the chunked engine and the reference twin.

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set below before
anything imports Triton), so shapes stay small: interpreter time grows with the number of tiles.
Awkward shapes on purpose: M != K, N = 1, D = 257 (not a multiple of any block), non-contiguous
inputs, and a small-block launch config that forces several row/column/D tiles, K1's persistent
loop with merged partial rows, and the global read-modify-write gradient path.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend cannot run")

from fastclip.ops import _clip_loss_triton as kclip
from fastclip.ops import _siglip_loss_triton as ksig
from fastclip.ops import clip_loss, siglip_loss
from fastclip.ops.clip_loss import chunked_lse, chunked_softmax_grads
from fastclip.ops.siglip_loss import chunked_siglip_sweep
from fastclip.testing import TOLERANCES, assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cpu" and not kclip.INTERPRET:
    pytest.skip("the Triton kernels were imported before TRITON_INTERPRET=1 was set; "
                "run this file in its own process (or export TRITON_INTERPRET=1)", allow_module_level=True)

# Tolerances: fastclip.testing.TOLERANCES, (dtype, atol, rtol) for results from inputs of `dtype`
# against an fp64 oracle that sees the same (rounded) input values.  atol is relative to the largest
# |expected| of the compared tensor, so one row serves lse values, losses and gradients.
# Low-precision rows cover the output cast and, on a GPU, the fp16/bf16 tensor-core products.
DTYPES = [dt for dt, _, _ in TOLERANCES if dt != torch.float64]
DT_IDS = [str(dt).replace("torch.", "") for dt in DTYPES]

# Small tiles: several row, column and D blocks even at N <= 64, two persistent programs in K1
# (so partial rows are merged), and D > BLOCK_DO (gradient accumulated in global memory).
SMALL = kclip.LaunchConfig(block_m=16, block_n=32, block_d=64, block_do=64, max_programs=2)


def _features(n: int, d: int, dtype: torch.dtype, *, seed: int, normalize: bool = True,
              layout: str = "contiguous") -> torch.Tensor:
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
# Low-level kernels against the chunked engine (same contracts)
# ----------------------------------------------------------------------------------------------
SHAPES = [(1, 7, 64), (7, 1, 257), (33, 64, 257), (64, 33, 64)]  # (M, K, D), M != K


def _oracle_lse(a, b, scale):
    return chunked_lse(a.double(), b.double(), scale, 16)


def _oracle_grads(a, b, scale, r, c):
    return chunked_softmax_grads(a.double(), b.double(), scale, r, c, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,K,D", SHAPES)
def test_clip_lse(M, K, D, dtype):
    a = _features(M, D, dtype, seed=1, layout="strided")
    b = _features(K, D, dtype, seed=2)
    scale = 100.0
    row, col = kclip.clip_lse(a, b, scale)
    row_ref, col_ref = _oracle_lse(a, b, scale)
    assert row.dtype == col.dtype == row_ref.dtype  # fp64 statistics, as the chunked engine
    assert_close(row, row_ref, dtype, f"row_lse M={M} K={K} D={D}")
    assert_close(col, col_ref, dtype, f"col_lse M={M} K={K} D={D}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,K,D", SHAPES)
def test_clip_softmax_grads(M, K, D, dtype):
    a = _features(M, D, dtype, seed=3)
    b = _features(K, D, dtype, seed=4, layout="transposed")
    scale = 30.0
    row_ref, col_ref = _oracle_lse(a, b, scale)
    shift = math.log(M + K)  # as the loss does: P entries are O(1/N)
    r, c = row_ref + shift, col_ref + shift
    ga, gb = kclip.clip_softmax_grads(a, b, scale, r, c)
    ga_ref, gb_ref = _oracle_grads(a, b, scale, r, c)
    assert ga.dtype == gb.dtype == torch.float32
    assert_close(ga, ga_ref, dtype, f"P @ b, M={M} K={K} D={D}")
    assert_close(gb, gb_ref, dtype, f"P.T @ a, M={M} K={K} D={D}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,D", [(33, 64, 257), (64, 33, 64)])
def test_clip_kernels_many_tiles(M, K, D, dtype):
    """Small blocks: multi-block tails in M, K and D, merged K1 partials, global-memory accumulation."""
    a = _features(M, D, dtype, seed=5, normalize=False, layout="strided")
    b = _features(K, D, dtype, seed=6, normalize=False)
    scale = 2.0
    row, col = kclip.clip_lse(a, b, scale, config=SMALL)
    row_ref, col_ref = _oracle_lse(a, b, scale)
    assert_close(row, row_ref, dtype, "row_lse (small blocks)")
    assert_close(col, col_ref, dtype, "col_lse (small blocks)")
    r, c = row_ref + 1.5, col_ref + 0.5
    ga, gb = kclip.clip_softmax_grads(a, b, scale, r, c, config=SMALL)
    ga_ref, gb_ref = _oracle_grads(a, b, scale, r, c)
    assert_close(ga, ga_ref, dtype, "P @ b (small blocks)")
    assert_close(gb, gb_ref, dtype, "P.T @ a (small blocks)")


def test_clip_softmax_grads_need_flags_and_fp32_statistics():
    a, b = _features(7, 64, torch.float32, seed=7), _features(9, 64, torch.float32, seed=8)
    r, c = (x.float() for x in _oracle_lse(a, b, 5.0))  # fp32 statistics are accepted too
    ga, gb = kclip.clip_softmax_grads(a, b, 5.0, r, c, need_b=False)
    assert gb is None and ga.shape == (7, 64)
    ga2, gb2 = kclip.clip_softmax_grads(a, b, 5.0, r, c, need_a=False)
    assert ga2 is None and gb2.shape == (9, 64)
    _, gb_ref = _oracle_grads(a, b, 5.0, r.double(), c.double())
    assert_close(gb2, gb_ref, torch.float32, "P.T @ a alone")


def test_clip_statistics_carry_fp64_precision():
    """Integer features make every logit exact in fp32 (~300-500, where an fp32 ulp is 3e-5).

    The kernels must then match the fp64 oracle far below fp32-lse rounding: the lse is assembled
    in fp64 from an exact max, and the backward applies an fp64 statistic as a (hi, lo) pair.
    """
    g = torch.Generator().manual_seed(15)
    a = torch.randint(0, 4, (33, 128), generator=g).float().to(DEVICE)
    b = torch.randint(0, 4, (20, 128), generator=g).float().to(DEVICE)
    row, col = kclip.clip_lse(a, b, 1.0, config=SMALL)
    row_ref, col_ref = chunked_lse(a.double(), b.double(), 1.0, 8)
    for got, exp, what in ((row, row_ref, "row_lse"), (col, col_ref, "col_lse")):
        err = (got - exp).abs()
        assert err.max().item() < 2e-6, f"{what} off by {err.max().item():.3g} at index {int(err.argmax())}"
    r, c = row_ref + math.log(53), col_ref + math.log(53)
    ga, gb = kclip.clip_softmax_grads(a, b, 1.0, r, c, config=SMALL)
    ga_ref, gb_ref = chunked_softmax_grads(a.double(), b.double(), 1.0, r, c, 8)
    for got, exp, what in ((ga, ga_ref, "P @ b"), (gb, gb_ref, "P.T @ a")):
        rel = ((got.double() - exp).abs().max() / exp.abs().max()).item()
        assert rel < 5e-7, (f"{what} with exact logits: max error {rel:.3g} of max|expected| "
                            "(an fp32 lse would give ~1e-5)")


def test_launcher_errors_name_the_arguments():
    a, b = _features(4, 64, torch.float32, seed=9), _features(4, 32, torch.float32, seed=10)
    with pytest.raises(ValueError, match="feature dim D"):
        kclip.clip_lse(a, b, 1.0)
    with pytest.raises(ValueError, match="row_lse must be a float32 or float64 \\[4\\]"):
        kclip.clip_softmax_grads(a, a, 1.0, torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("need_grads", [True, False], ids=["grads", "loss-only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,K,D", SHAPES)
def test_siglip_sweep(M, K, D, dtype, need_grads):
    a = _features(M, D, dtype, seed=11, layout="transposed")
    b = _features(K, D, dtype, seed=12, layout="strided")
    scale, bias = 10.0, -10.0
    out = ksig.siglip_sweep(a, b, scale, bias, need_grads)
    ref = chunked_siglip_sweep(a.double(), b.double(), scale, bias, 16, need_grads)
    assert out[0].dim() == 0 and out[0].dtype == torch.float32
    assert_close(out[0], ref[0], dtype, f"sum softplus M={M} K={K} D={D}")
    if not need_grads:
        assert out[1:] == (None, None, None)
        return
    for got, exp, what in zip(out[1:], ref[1:], ("sigmoid(z) @ b", "sigmoid(z).T @ a", "sum sigmoid")):
        assert_close(got, exp, dtype, f"{what} M={M} K={K} D={D}")


@pytest.mark.parametrize("M,K,D", [(33, 64, 257), (64, 33, 64)])
def test_siglip_sweep_many_tiles(M, K, D):
    a = _features(M, D, torch.float32, seed=13, normalize=False)
    b = _features(K, D, torch.float32, seed=14, normalize=False, layout="strided")
    out = ksig.siglip_sweep(a, b, 3.0, -20.0, True, config=SMALL)  # z spans both softplus branches
    ref = chunked_siglip_sweep(a.double(), b.double(), 3.0, -20.0, 16, True)
    names = ("sum softplus", "sigmoid(z) @ b", "sigmoid(z).T @ a", "sum sigmoid")
    for got, exp, what in zip(out, ref, names):
        assert_close(got, exp, torch.float32, f"{what} (small blocks)")


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


def _api_inputs(n, d, dtype, normalize, layouts, seed):
    a = _features(n, d, dtype, seed=seed, normalize=normalize, layout=layouts[0])
    b = _features(n, d, dtype, seed=seed + 1, normalize=normalize, layout=layouts[1])
    if not normalize:
        a, b = a * 0.3, b * 0.3  # |z| up to a few hundred: extreme but finite logits
    return a, b


# All statistics are fp32 whatever the input dtype, so quantities that vanish in exact arithmetic
# carry fp32 rounding noise relative to the size of the logits: this is the floor of their slack.
# On top of it the kernels may be off by twice PyTorch's own error at working precision (the
# ``peers``: the fp32 reference; on a GPU also the chunked backend in fp16/bf16), flash-attention's
# rule, which covers ill-conditioned cases such as logits of several hundred.
FLOOR = 1e-5


def _natural_sizes(a, b, scale, n):
    """Sizes to which rounding noise is relative: |z| bound, feature-gradient and d/d scale sizes."""
    zmax = scale * a.float().norm(dim=1).max().item() * b.float().norm(dim=1).max().item()
    fmax = scale * max(a.float().abs().max().item(), b.float().abs().max().item()) / n
    return {"loss": FLOOR * zmax, "feat": FLOOR * fmax, "scale": FLOOR * zmax / scale, "bias": FLOOR}


def _run(fn, a, b, scalars, backend, cast=None, **kw):
    """Loss and gradients wrt (a, b, *scalars), optionally on copies of the inputs cast to ``cast``."""
    a_ = (a.to(cast) if cast else a).detach().requires_grad_(True)
    b_ = (b.to(cast) if cast else b).detach().requires_grad_(True)
    s_ = [torch.tensor(v, device=DEVICE, dtype=cast or torch.float32, requires_grad=True) for v in scalars]
    loss = fn(a_, b_, *s_, backend=backend, **kw)
    grads = torch.autograd.grad(loss, [a_, b_, *s_])
    return (loss, *grads)


def _oracle_and_peers(fn, a, b, scalars, dtype, **kw):
    """fp64 reference on the same input values, and PyTorch's own results at working precision."""
    oracle = _run(fn, a, b, scalars, "reference", torch.float64, **kw)
    peers = [_run(fn, a, b, scalars, "reference", torch.float32, **kw)]
    if DEVICE.type == "cuda" and dtype != torch.float32:  # on CPU chunked computes in fp32 anyway
        peers.append(_run(fn, a, b, scalars, "chunked", **kw))
    return oracle, peers


NAMES = ("loss", "d/d image_features", "d/d text_features", "d/d logit_scale", "d/d logit_bias")
KINDS = ("loss", "feat", "feat", "scale", "bias")


# Label smoothing is rank-one host code: every shape in fp32, and one shape (N64) per low-precision
# dtype, is enough; only those cases are generated.
CLIP_API_CASES = [
    pytest.param(*case.values, dt, ls, id=f"{case.id}-{dt_id}-ls{ls}")
    for case in API_CASES for dt, dt_id in zip(DTYPES, DT_IDS) for ls in (0.0, 0.1)
    if ls == 0.0 or dt == torch.float32 or case.id == "N64-D257"
]


@pytest.mark.parametrize("n,d,scale,normalize,layouts,dtype,label_smoothing", CLIP_API_CASES)
def test_clip_loss_api(n, d, scale, normalize, layouts, dtype, label_smoothing):
    a, b = _api_inputs(n, d, dtype, normalize, layouts, seed=20)
    scalars, kw = (scale, 0.5), {"label_smoothing": label_smoothing}
    got = _run(clip_loss, a, b, scalars, "triton", **kw)
    ref, peers = _oracle_and_peers(clip_loss, a, b, scalars, dtype, **kw)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == a.dtype and got[2].dtype == b.dtype
    floors = _natural_sizes(a, b, scale, n)
    # Cross-entropy is shift-invariant: the engine returns an exact zero for the bias gradient.
    assert got[4].item() == 0.0, f"clip d/d logit_bias must be exactly 0, got {got[4].item()}"
    for k in range(4):
        assert_close(got[k], ref[k], dtype, f"clip {NAMES[k]}", floor=floors[KINDS[k]],
                     peers=[p[k] for p in peers])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,d,scale,normalize,layouts", API_CASES)
def test_siglip_loss_api(n, d, scale, normalize, layouts, dtype):
    a, b = _api_inputs(n, d, dtype, normalize, layouts, seed=30)
    scalars = (scale, -10.0)
    got = _run(siglip_loss, a, b, scalars, "triton")
    ref, peers = _oracle_and_peers(siglip_loss, a, b, scalars, dtype)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == a.dtype and got[2].dtype == b.dtype
    floors = _natural_sizes(a, b, scale, n)
    for k in range(5):
        assert_close(got[k], ref[k], dtype, f"siglip {NAMES[k]}", floor=floors[KINDS[k]],
                     peers=[p[k] for p in peers])


def test_siglip_loss_api_forward_only():
    a, b = _api_inputs(33, 257, torch.float32, True, ("contiguous", "contiguous"), seed=40)
    with torch.no_grad():
        loss = siglip_loss(a, b, 10.0, -10.0, backend="triton")
    expected = siglip_loss(a.double(), b.double(), 10.0, -10.0, backend="reference")
    assert_close(loss, expected, torch.float32, "siglip loss, no grad")
