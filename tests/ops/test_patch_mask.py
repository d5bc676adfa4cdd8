"""fastclip.ops.patch_mask: selection modes, every gather backend against the reference, bad input.

Values and gradients are compared exactly (the gather is a copy); also determinism, identity cases
and the backend choice.  The module is tested in tests/nn/test_patch_mask.py, the Triton launchers
in test_patch_mask_triton.py.
"""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the kernels read it at definition)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest

from fastclip.ops import dispatch, patch_mask, patch_mask_reference
from fastclip.ops.patch_mask import block_shape, grid_window, num_kept, select_patches

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "reference"] + (["triton"] if CUDA or dispatch.triton_interpreter() else [])
MODES = ["random", "grid", "block"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (prefix tokens, grid): ViT-B/16 at 224 (197 tokens), ViT-B/32 (50), ViT-L/14 (257), no class token
SHAPES = [(1, (14, 14)), (1, (7, 7)), (1, (16, 16)), (0, (5, 9))]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tokens(B, prefix, grid, C, dtype=torch.float32, device=DEV, seed=0):
    n = grid[0] * grid[1]
    return torch.randn(B, prefix + n, C, generator=gen(seed)).to(device=device, dtype=dtype)


def mask_of(ids, n):
    m = torch.zeros(ids.shape[0], n, dtype=torch.bool, device=ids.device)
    m.scatter_(1, ids, True)
    return m


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio,k", [(196, 0.75, 49), (196, 0.5, 98), (49, 0.5, 25), (256, 0.9, 26),
                                       (196, 0.0, 196), (196, 0.999, 1), (4, 0.625, 2), (10, 0.95, 1)])
def test_num_kept(n, ratio, k):
    assert num_kept(n, ratio) == k  # round half up, at least 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix,grid", SHAPES)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_selection_invariants(mode, prefix, grid, ratio):
    n = grid[0] * grid[1]
    ids = select_patches(64, n, ratio, mode=mode, grid_size=grid, generator=gen(1))
    k = num_kept(n, ratio)
    assert ids.shape == (64, k) and ids.dtype == torch.int64
    assert (ids.diff(dim=1) > 0).all(), "ids_keep must be strictly ascending (hence distinct)"
    assert ids.min() >= 0 and ids.max() < n


def test_random_mode_is_uniform_and_per_sample():
    ids = select_patches(4000, 196, 0.75, generator=gen(2))
    freq = mask_of(ids, 196).float().mean(0)
    # binomial(4000, 0.25): sd 0.0068, so 6 sd is 0.04
    assert (freq - 0.25).abs().max() < 0.04
    assert len({tuple(r) for r in ids[:100].tolist()}) == 100, "masks must differ between samples"


def test_grid_mode_is_a_lattice():
    """Ratio 0.75 on 14 x 14: 2 x 2 windows, one patch per window at the same offset."""
    assert grid_window(196, 49) == (2, 2)
    ids = select_patches(32, 196, 0.75, mode="grid", grid_size=(14, 14), generator=gen(3))
    rows, cols = ids // 14, ids % 14
    assert (rows % 2 == rows[:, :1] % 2).all() and (cols % 2 == cols[:, :1] % 2).all()
    offsets = {(int(r[0]) % 2, int(c[0]) % 2) for r, c in zip(rows, cols)}
    assert len(offsets) > 1, "the lattice offset is drawn per sample"
    # ratio 0.89 on 14 x 14: 3 x 3 windows; the lattice has 16 to 25 points and K = 22 is topped up / trimmed
    assert grid_window(196, num_kept(196, 0.89)) == (3, 3)
    ids = select_patches(16, 196, 0.89, mode="grid", grid_size=(14, 14), generator=gen(4))
    assert ids.shape == (16, 22)


def test_block_mode_is_one_contiguous_block():
    ids = select_patches(32, 196, 0.75, mode="block", grid_size=(14, 14), generator=gen(5))
    assert block_shape(14, 14, 49) == (7, 7)
    rows, cols = ids // 14, ids % 14
    assert ((rows.amax(1) - rows.amin(1)) == 6).all() and ((cols.amax(1) - cols.amin(1)) == 6).all()
    assert len({(int(r), int(c)) for r, c in zip(rows.amin(1), cols.amin(1))}) > 1, "position drawn per sample"
    # K = 102 on 16 x 16: an 11 x 10 block whose last row keeps only 2 patches
    assert block_shape(16, 16, 102) == (11, 10)
    ids = select_patches(8, 256, 0.6, mode="block", grid_size=(16, 16), generator=gen(6))
    rows, cols = ids // 16, ids % 16
    for r, c in zip(rows, cols):
        top, left = int(r.min()), int(c.min())
        assert ((r - top) * 10 + (c - left)).tolist() == list(range(102))
    assert block_shape(3, 20, 50) == (3, 17)  # a wide grid: the block takes every row


# ----------------------------------------------------------------------------------------------
# Gather backends (exact copies, so exact comparisons)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix,grid", [(1, (14, 14)), (0, (5, 9))])
def test_backends_match_reference_values_and_gradients(backend, dtype, prefix, grid):
    x = tokens(3, prefix, grid, 40, dtype).requires_grad_()
    for mode in MODES:
        y, ids = patch_mask(x, 0.6, mode=mode, num_prefix_tokens=prefix, grid_size=grid, generator=gen(7),
                            backend=backend)
        k = num_kept(grid[0] * grid[1], 0.6)
        assert y.shape == (3, prefix + k, 40) and y.dtype == dtype
        ref = patch_mask_reference(x.detach(), ids, prefix)
        assert torch.equal(y, ref), f"{backend} {mode}: values differ from the reference"
        assert torch.equal(y[:, :prefix], x.detach()[:, :prefix]), "prefix tokens must be kept, first"
        dy = torch.randn(y.shape, generator=gen(8)).to(device=y.device, dtype=dtype)
        (dx,) = torch.autograd.grad(y, x, dy)
        want = torch.zeros_like(x)
        want[:, :prefix] = dy[:, :prefix]
        for b in range(3):
            want[b, prefix + ids[b]] = dy[b, prefix:]
        assert torch.equal(dx, want), f"{backend} {mode}: gradient is not dy scattered back with zeros"


@pytest.mark.skipif(not (CUDA or dispatch.triton_interpreter()), reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_gather_wide_rows_and_strided_input():
    """C larger than one channel block on a GPU (768) and a non-contiguous x."""
    base = tokens(2, 1, (7, 7), 2 * 768, torch.bfloat16)
    x = base[:, :, ::2].requires_grad_()  # stride 2 along C
    y, ids = patch_mask(x, 0.5, generator=gen(9), backend="triton")
    assert torch.equal(y, patch_mask_reference(x.detach(), ids, 1))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx.sum(-1), mask_of(torch.cat([torch.zeros(2, 1, dtype=torch.long, device=ids.device),
                                                        ids + 1], 1), 50).to(dx.dtype) * 768)


def test_deterministic_under_a_seed():
    x = tokens(4, 1, (14, 14), 8)
    for mode in MODES:
        a = patch_mask(x, 0.75, mode=mode, grid_size=(14, 14), generator=gen(11))
        b = patch_mask(x, 0.75, mode=mode, grid_size=(14, 14), generator=gen(11))
        c = patch_mask(x, 0.75, mode=mode, grid_size=(14, 14), generator=gen(12))
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
        assert not torch.equal(a[1], c[1])
    torch.manual_seed(0)
    d = patch_mask(x, 0.75)[1]
    torch.manual_seed(0)
    assert torch.equal(d, patch_mask(x, 0.75)[1]), "without a generator: the global RNG"


def test_ratio_zero_is_identity():
    x = tokens(2, 1, (7, 7), 8)
    y, ids = patch_mask(x, 0.0)
    assert y is x and torch.equal(ids, torch.arange(49).expand(2, 49))


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_backend_on_cpu_is_torch(monkeypatch, interpret):
    # What patch_mask itself runs: the interpreter is never chosen automatically.
    from fastclip.ops.patch_mask import choose_backend
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert choose_backend("auto", torch.device("cpu"), torch.float32) == "torch"


def test_explicit_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 5, 4)
    with pytest.raises(dispatch.BackendError, match=r"backend 'triton' \(backend=\) cannot run.*TRITON_INTERPRET=1"):
        patch_mask(x, 0.5, backend="triton")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x = tokens(2, 1, (7, 7), 8, device="cpu")
    for bad in (1.0, -0.5, math.inf):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got"):
            patch_mask(x, bad)
    with pytest.raises(TypeError, match=r"mask_ratio must be a float in \[0, 1\), got NoneType"):
        patch_mask(x, None)
    with pytest.raises(ValueError, match=r"mode must be one of \('random', 'grid', 'block'\), got 'grids'"):
        patch_mask(x, 0.5, mode="grids")
    with pytest.raises(ValueError, match=r"grid_size=\(gh, gw\) is required for mode='grid', got None"):
        patch_mask(x, 0.5, mode="grid")
    with pytest.raises(ValueError, match=r"grid_size 7 x 8 = 56 patches does not match the 49 patch tokens"):
        patch_mask(x, 0.5, mode="grid", grid_size=(7, 8))
    with pytest.raises(ValueError, match=r"grid_size must be a pair of positive ints"):
        patch_mask(x, 0.5, mode="block", grid_size=(49,))
    with pytest.raises(ValueError, match=r"x must be 3-D \[B, num_prefix_tokens \+ num_patches, C\], got shape \(50, 8\)"):
        patch_mask(x[0], 0.5)
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be an int >= 0, got -1"):
        patch_mask(x, 0.5, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"leaves no patch token after num_prefix_tokens=50"):
        patch_mask(x, 0.5, num_prefix_tokens=50)
    with pytest.raises(TypeError, match=r"x must be a floating tensor \(float32, float16, bfloat16 or float64\), got torch.int64"):
        patch_mask(x.long(), 0.5)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        patch_mask(x, 0.5, generator=0)
