"""fastclip.nn.patch_mask: PatchMasking in train / eval, a ratio settable live, errors, torch.compile."""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the kernels read it at definition)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastclip.nn import PatchMasking
from fastclip.ops import dispatch
from fastclip.ops.patch_mask import num_kept

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# Gather backends the module can run here (the reference twin is exercised in tests/ops/test_patch_mask.py).
BACKENDS = ["torch"] + (["triton"] if CUDA or dispatch.triton_interpreter() else [])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tokens(B, prefix, grid, C, dtype=torch.float32, device=DEV, seed=0):
    n = grid[0] * grid[1]
    return torch.randn(B, prefix + n, C, generator=gen(seed)).to(device=device, dtype=dtype)


def test_module_train_eval_and_ratio():
    x = tokens(2, 1, (14, 14), 16)
    m = PatchMasking(0.75, mode="grid", grid_size=(14, 14))
    y = m(x, generator=gen(0))
    assert y.shape == (2, 50, 16)
    y2, ids = m(x, generator=gen(0), return_ids=True)
    assert torch.equal(y, y2) and ids.shape == (2, 49)
    m.eval()
    assert m(x) is x
    m.train()
    m.mask_ratio = 0.0
    assert m(x) is x
    m.mask_ratio = 0.5  # settable on a live model
    assert m(x).shape == (2, 1 + 98, 16)
    assert "mask_ratio=0.5" in repr(m)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_module_rejects_bad_ratio(bad):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got"):
        PatchMasking(bad)
    m = PatchMasking(0.5)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        m.mask_ratio = bad
    assert m.mask_ratio == 0.5, "a rejected assignment leaves the ratio unchanged"


def test_module_identity_still_returns_every_id():
    x = tokens(3, 2, (3, 4), 8)
    y, ids = PatchMasking(0.5, num_prefix_tokens=2).eval()(x, return_ids=True)
    assert y is x and torch.equal(ids, torch.arange(12).expand(3, 12))


def test_module_bad_config():
    with pytest.raises(ValueError, match=r"grid_size=\(gh, gw\) is required for mode='block'"):
        PatchMasking(0.5, mode="block")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        PatchMasking(0.5, mode="checkerboard")
    with pytest.raises(TypeError, match=r"mask_ratio must be a float in \[0, 1\), got str"):
        PatchMasking("0.5")
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be an int >= 0, got -1"):
        PatchMasking(0.5, num_prefix_tokens=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_torch_compile_fullgraph(backend):
    """Masking inside a compiled tower: the dispatch folds to a constant and the Triton kernels are
    custom ops, so there is no graph break (with generator=None: Dynamo cannot trace a Generator)."""
    torch._dynamo.reset()
    m = PatchMasking(0.5, mode="block", grid_size=(7, 7), backend=backend)
    x = tokens(2, 1, (7, 7), 8).requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    y = compiled(x)
    torch.manual_seed(0)
    assert torch.equal(y, m(x))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.sum().item() == y.numel()
    # a new batch size (dynamic batch after recompiling) and a new ratio set on the live model
    m.mask_ratio = 0.75
    x = tokens(3, 1, (7, 7), 8)
    torch.manual_seed(1)
    y = compiled(x)
    torch.manual_seed(1)
    assert y.shape == (3, 1 + num_kept(49, 0.75), 8) and torch.equal(y, m(x))
