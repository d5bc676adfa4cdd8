"""The attention accuracy rule shared by test_attention.py and test_attention_triton.py.

Accuracy rule (flash-attention's): the error of a backend in dtype X against an fp64 oracle is at
most twice the error of PyTorch's own attention computed in X (the reference formula with matmuls
and softmax in X), plus a floor of 1e-6 x max|oracle| so that an exactly-right PyTorch result cannot
make the bound 0.  Checked for the output and for dq, dk, dv.
"""
import torch

from fastclip.ops import attention_reference
from fastclip.testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"

FLOOR = 1e-6  # x max|oracle|


def make(B, H, Lq, Lk, D, dtype, seed=0, device=DEV):
    """q, k, v [B, H, L, D] and an output gradient do, drawn in fp64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def fwd_bwd(fn, q, k, v, do):
    """(out, dq, dk, dv) of ``fn(q, k, v)`` for the output gradient ``do``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return (out,) + grads


def check_rule(results, oracle, pytorch, what):
    """results/oracle/pytorch: (out, dq, dk, dv).  err(results) <= 2 err(pytorch) + floor, per tensor
    (assert_close with atol=FLOOR, rtol=0 and PyTorch's result as the peer); reports every failing tensor."""
    msgs = []
    for name, r, o, p in zip(("out", "dq", "dk", "dv"), results, oracle, pytorch):
        try:
            assert_close(r, o, what=name, atol=FLOOR, rtol=0.0, peers=[p])
        except AssertionError as exc:
            msgs.append(str(exc))
    assert not msgs, f"{what}:\n" + "\n".join(msgs)


def oracle_and_pytorch(q, k, v, do, causal, scale=None):
    """(out, dq, dk, dv) of the fp64 reference (the oracle) and of the reference computed in q's dtype."""
    def ref64(a, b, c):
        return attention_reference(a, b, c, causal=causal, scale=scale)
    oracle = fwd_bwd(ref64, q.double(), k.double(), v.double(), do.double())
    pytorch = fwd_bwd(lambda a, b, c: attention_reference(a, b, c, causal=causal, scale=scale, upcast=False),
                      q, k, v, do)
    return oracle, pytorch
