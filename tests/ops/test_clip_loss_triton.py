"""fastclip.ops._clip_loss_triton: the kernels vs the chunked engine; clip_loss(backend="triton").

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set by
``_triton_loss_cases`` before anything imports Triton), so shapes stay small: interpreter time
grows with the number of tiles.
Awkward shapes on purpose: M != K, N = 1, D = 257 (not a multiple of any block), non-contiguous
inputs, and a small-block launch config that forces several row/column/D tiles, K1's persistent
loop with merged partial rows, and the global read-modify-write gradient path.
"""
from __future__ import annotations

import math

import pytest
import torch

# first: sets TRITON_INTERPRET=1 without CUDA, before anything imports Triton
from ._triton_loss_cases import (API_CASES, DEVICE, DT_IDS, DTYPES, KINDS, NAMES, SHAPES, SMALL_BLOCKS,
                                 api_inputs, features, natural_sizes, oracle_and_peers, run)

from fastclip.ops import _clip_loss_triton as kclip
from fastclip.ops import clip_loss
from fastclip.ops.tiles import chunked_lse, chunked_softmax_grads
from fastclip.testing import assert_close

SMALL = kclip.LaunchConfig(**SMALL_BLOCKS)


# ----------------------------------------------------------------------------------------------
# Low-level kernels against the chunked engine (same contracts)
# ----------------------------------------------------------------------------------------------
def _oracle_lse(a, b, scale):
    return chunked_lse(a.double(), b.double(), scale, 16)


def _oracle_grads(a, b, scale, r, c):
    return chunked_softmax_grads(a.double(), b.double(), scale, r, c, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,K,D", SHAPES)
def test_clip_lse(M, K, D, dtype):
    a = features(M, D, dtype, seed=1, layout="strided")
    b = features(K, D, dtype, seed=2)
    scale = 100.0
    row, col = kclip.clip_lse(a, b, scale)
    row_ref, col_ref = _oracle_lse(a, b, scale)
    assert row.dtype == col.dtype == row_ref.dtype  # fp64 statistics, as the chunked engine
    assert_close(row, row_ref, dtype, f"row_lse M={M} K={K} D={D}")
    assert_close(col, col_ref, dtype, f"col_lse M={M} K={K} D={D}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,K,D", SHAPES)
def test_clip_softmax_grads(M, K, D, dtype):
    a = features(M, D, dtype, seed=3)
    b = features(K, D, dtype, seed=4, layout="transposed")
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
    a = features(M, D, dtype, seed=5, normalize=False, layout="strided")
    b = features(K, D, dtype, seed=6, normalize=False)
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
    a, b = features(7, 64, torch.float32, seed=7), features(9, 64, torch.float32, seed=8)
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
    a, b = features(4, 64, torch.float32, seed=9), features(4, 32, torch.float32, seed=10)
    with pytest.raises(ValueError, match="feature dim D"):
        kclip.clip_lse(a, b, 1.0)
    with pytest.raises(ValueError, match="row_lse must be a float32 or float64 \\[4\\]"):
        kclip.clip_softmax_grads(a, a, 1.0, torch.zeros(3, device=DEVICE), torch.zeros(4, device=DEVICE))


def test_empty_side_gives_neutral_statistics():
    """No column (K = 0): every row lse is log(0) = -inf, and the gradients are zeros."""
    a, b = features(3, 16, torch.float32, seed=11), features(0, 16, torch.float32, seed=12)
    row, col = kclip.clip_lse(a, b, 1.0)
    assert row.dtype == torch.float64 and row.shape == (3,) and torch.isneginf(row).all()
    assert col.shape == (0,)
    ga, gb = kclip.clip_softmax_grads(a, b, 1.0, torch.zeros(3, device=DEVICE), torch.zeros(0, device=DEVICE))
    assert ga.shape == (3, 16) and not ga.any() and gb.shape == (0, 16)


# ----------------------------------------------------------------------------------------------
# Public API: backend="triton" against backend="reference" (loss and every gradient)
# ----------------------------------------------------------------------------------------------
# Label smoothing is rank-one host code: every shape in fp32, and one shape (N64) per low-precision
# dtype, is enough; only those cases are generated.
CLIP_API_CASES = [
    pytest.param(*case.values, dt, ls, id=f"{case.id}-{dt_id}-ls{ls}")
    for case in API_CASES for dt, dt_id in zip(DTYPES, DT_IDS) for ls in (0.0, 0.1)
    if ls == 0.0 or dt == torch.float32 or case.id == "N64-D257"
]


@pytest.mark.parametrize("n,d,scale,normalize,layouts,dtype,label_smoothing", CLIP_API_CASES)
def test_clip_loss_api(n, d, scale, normalize, layouts, dtype, label_smoothing):
    a, b = api_inputs(n, d, dtype, normalize, layouts, seed=20)
    scalars, kw = (scale, 0.5), {"label_smoothing": label_smoothing}
    got = run(clip_loss, a, b, scalars, "triton", **kw)
    ref, peers = oracle_and_peers(clip_loss, a, b, scalars, dtype, **kw)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == a.dtype and got[2].dtype == b.dtype
    floors = natural_sizes(a, b, scale, n)
    # Cross-entropy is shift-invariant: the engine returns an exact zero for the bias gradient.
    assert got[4].item() == 0.0, f"clip d/d logit_bias must be exactly 0, got {got[4].item()}"
    for k in range(4):
        assert_close(got[k], ref[k], dtype, f"clip {NAMES[k]}", floor=floors[KINDS[k]],
                     peers=[p[k] for p in peers])
