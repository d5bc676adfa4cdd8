"""fastclip.nn.attention: MultiheadSelfAttention vs nn.MultiheadAttention, Triton, compile, bf16."""
import os

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the kernels read it at definition)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from torch import nn

from fastclip.nn import MultiheadSelfAttention
from fastclip.ops import dispatch
from fastclip.testing import assert_close

E, H = 64, 4


def pair(causal=False, seed=0):
    torch.manual_seed(seed)
    ours = MultiheadSelfAttention(E, H, causal=causal)
    theirs = nn.MultiheadAttention(E, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())  # same names and shapes, both ways
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def causal_float_mask(L):
    # what open_clip's text tower builds
    return torch.full((L, L), float("-inf")).triu(1)


def test_state_dict_layout_is_open_clips():
    m = MultiheadSelfAttention(E, H)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"in_proj_weight": (3 * E, E), "in_proj_bias": (3 * E,),
                      "out_proj.weight": (E, E), "out_proj.bias": (E,)}
    assert shapes == {k: tuple(v.shape) for k, v in nn.MultiheadAttention(E, H).state_dict().items()}


def test_matches_nn_multihead_attention_with_and_without_masks():
    ours, theirs = pair()
    x = torch.randn(2, 77, E)
    assert_close(ours(x), theirs(x, x, x, need_weights=False)[0], torch.float32, "no mask")
    fm = causal_float_mask(77)
    assert_close(ours(x, attn_mask=fm), theirs(x, x, x, need_weights=False, attn_mask=fm)[0], torch.float32,
                 "float mask")
    bm = torch.ones(77, 77, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = masked out
    assert_close(ours(x, attn_mask=bm), theirs(x, x, x, need_weights=False, attn_mask=bm)[0], torch.float32,
                 "bool mask")
    causal, _ = pair(causal=True)
    assert_close(causal(x), ours(x, attn_mask=fm), torch.float32, "causal=True vs open_clip's causal mask")
    assert_close(causal(x, attn_mask=fm), ours(x, attn_mask=fm), torch.float32, "causal=True plus the mask")


def test_gradients_match_nn_multihead_attention():
    ours, theirs = pair(causal=True)
    x = torch.randn(2, 50, E)
    ours(x).square().sum().backward()
    theirs(x, x, x, need_weights=False, attn_mask=causal_float_mask(50))[0].square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad {name}")


@pytest.mark.skipif(not (torch.cuda.is_available() or dispatch.triton_interpreter()),
                    reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_through_the_module():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU only via the interpreter
    ours, _ = pair(causal=True)
    ours = ours.to(dev)
    tri = MultiheadSelfAttention(E, H, causal=True, backend="triton").to(dev)
    tri.load_state_dict(ours.state_dict())
    x = torch.randn(1, 77, E, device=dev, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = tri(x), ours(x2)
    assert_close(y, y2, torch.float32, "out")
    y.square().sum().backward()
    y2.square().sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "dx")
    assert_close(tri.in_proj_weight.grad, ours.in_proj_weight.grad, torch.float32, "d in_proj_weight")


def test_compile_fullgraph_on_cpu_and_bf16_autocast():
    """The dispatch folds to a constant: no graph break, forward and backward."""
    torch._dynamo.reset()
    ours, _ = pair(causal=True)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 77, E, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    assert_close(compiled(x), ours(x2), torch.float32, "compiled out")
    compiled(x).sum().backward()
    ours(x2).sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "compiled dx")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
        ref = ours(x2)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, torch.bfloat16, "bf16 autocast")
    # with a float mask (open_clip's text tower calling convention)
    plain, _ = pair()
    fm = causal_float_mask(77)
    assert_close(torch.compile(plain, fullgraph=True, backend="aot_eager")(x, fm), plain(x, fm), torch.float32,
                 "compiled with attn_mask")


def test_compile_fullgraph_inductor_cpu():
    """The default inductor backend on CPU (what a trainer uses)."""
    torch._dynamo.reset()
    ours, _ = pair(causal=True)
    x = torch.randn(2, 50, E)
    assert_close(torch.compile(ours, fullgraph=True)(x), ours(x), torch.float32, "inductor")


def test_compile_dynamic_shapes():
    """dynamic=True makes every size symbolic; the dispatch still folds to a constant."""
    torch._dynamo.reset()
    ours, _ = pair(causal=True)
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
    for L in (50, 77):
        x = torch.randn(2, L, E)
        assert_close(compiled(x), ours(x), torch.float32, f"dynamic L={L}")


@pytest.mark.skipif(not dispatch.triton_interpreter() or torch.cuda.is_available(),
                    reason="exercises the Triton custom ops on CPU through the interpreter")
def test_compile_fullgraph_triton_custom_ops():
    torch._dynamo.reset()
    ours, _ = pair(causal=True)
    tri = MultiheadSelfAttention(E, H, causal=True, backend="triton")
    tri.load_state_dict(ours.state_dict())
    x = torch.randn(1, 50, E, requires_grad=True)
    y = torch.compile(tri, fullgraph=True, backend="aot_eager")(x)
    assert_close(y, ours(x), torch.float32, "compiled triton")
    (g,) = torch.autograd.grad(y.sum(), x)
    (g2,) = torch.autograd.grad(ours(x).sum(), x)
    assert_close(g, g2, torch.float32, "compiled triton dx")


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads, got embed_dim=64 and num_heads=5"):
        MultiheadSelfAttention(64, 5)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        MultiheadSelfAttention(64, 0)
    m = MultiheadSelfAttention(E, H)
    with pytest.raises(ValueError, match=r"x must be \[B, L, embed_dim=64\], got shape \(2, 5, 32\)"):
        m(torch.randn(2, 5, 32))
