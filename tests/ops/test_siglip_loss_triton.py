"""fastclip.ops._siglip_loss_triton: the sweep vs the chunked one; siglip_loss(backend="triton").

Without CUDA the kernel runs through the Triton interpreter (TRITON_INTERPRET=1, set by
``_triton_loss_cases`` before anything imports Triton), so shapes stay small: interpreter time
grows with the number of tiles.
Awkward shapes on purpose: M != K, N = 1, D = 257 (not a multiple of any block), non-contiguous
inputs, and a small-block launch config that forces several row/column/D tiles and the global
read-modify-write gradient path.
"""
from __future__ import annotations


import pytest
import torch

# first: sets TRITON_INTERPRET=1 without CUDA, before anything imports Triton
from ._triton_loss_cases import (API_CASES, DT_IDS, DTYPES, KINDS, NAMES, SHAPES, SMALL_BLOCKS, api_inputs,
                                 features, natural_sizes, oracle_and_peers, run)

from fastclip.ops import _siglip_loss_triton as ksig
from fastclip.ops import siglip_loss
from fastclip.ops._triton_utils import LaunchConfig
from fastclip.ops.siglip_loss import chunked_siglip_sweep
from fastclip.testing import assert_close

SMALL = LaunchConfig(**SMALL_BLOCKS)


# ----------------------------------------------------------------------------------------------
# The kernel against the chunked sweep (same contract)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("need_grads", [True, False], ids=["grads", "loss-only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M,K,D", SHAPES)
def test_siglip_sweep(M, K, D, dtype, need_grads):
    a = features(M, D, dtype, seed=11, layout="transposed")
    b = features(K, D, dtype, seed=12, layout="strided")
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
    a = features(M, D, torch.float32, seed=13, normalize=False)
    b = features(K, D, torch.float32, seed=14, normalize=False, layout="strided")
    out = ksig.siglip_sweep(a, b, 3.0, -20.0, True, config=SMALL)  # z spans both softplus branches
    ref = chunked_siglip_sweep(a.double(), b.double(), 3.0, -20.0, 16, True)
    names = ("sum softplus", "sigmoid(z) @ b", "sigmoid(z).T @ a", "sum sigmoid")
    for got, exp, what in zip(out, ref, names):
        assert_close(got, exp, torch.float32, f"{what} (small blocks)")


def test_launcher_errors_name_the_function_and_arguments():
    a, b = features(4, 64, torch.float32, seed=15), features(4, 32, torch.float32, seed=16)
    with pytest.raises(ValueError, match=r"siglip_sweep: a and b must have the same feature dim D"):
        ksig.siglip_sweep(a, b, 1.0, 0.0, True)
    with pytest.raises(TypeError, match=r"siglip_sweep: a and b must share a dtype .* got torch.float64"):
        ksig.siglip_sweep(a.double(), a.double(), 1.0, 0.0, True)
    with pytest.raises(ValueError, match=r"siglip_sweep: a and b must be 2-D"):
        ksig.siglip_sweep(a[0], a, 1.0, 0.0, True)


def test_empty_side_gives_zeros_without_a_launch():
    a, b = features(3, 16, torch.float32, seed=17), features(0, 16, torch.float32, seed=18)
    total, ga, gb, sig = ksig.siglip_sweep(a, b, 10.0, -10.0, True)
    assert total.item() == 0.0 and sig.item() == 0.0
    assert ga.shape == (3, 16) and gb.shape == (0, 16) and not ga.any()
    assert ksig.siglip_sweep(a, b, 10.0, -10.0, False)[1:] == (None, None, None)


# ----------------------------------------------------------------------------------------------
# Public API: backend="triton" against backend="reference" (loss and every gradient)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n,d,scale,normalize,layouts", API_CASES)
def test_siglip_loss_api(n, d, scale, normalize, layouts, dtype):
    a, b = api_inputs(n, d, dtype, normalize, layouts, seed=30)
    scalars = (scale, -10.0)
    got = run(siglip_loss, a, b, scalars, "triton")
    ref, peers = oracle_and_peers(siglip_loss, a, b, scalars, dtype)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == a.dtype and got[2].dtype == b.dtype
    floors = natural_sizes(a, b, scale, n)
    for k in range(5):
        assert_close(got[k], ref[k], dtype, f"siglip {NAMES[k]}", floor=floors[KINDS[k]],
                     peers=[p[k] for p in peers])


def test_siglip_loss_api_forward_only():
    a, b = api_inputs(33, 257, torch.float32, True, ("contiguous", "contiguous"), seed=40)
    with torch.no_grad():
        loss = siglip_loss(a, b, 10.0, -10.0, backend="triton")
    expected = siglip_loss(a.double(), b.double(), 10.0, -10.0, backend="reference")
    assert_close(loss, expected, torch.float32, "siglip loss, no grad")
