"""fastclip.ops.clip_loss: every CPU backend against the reference (loss and all gradients), bad input."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastclip.ops import clip_loss, clip_loss_reference
from fastclip.testing import assert_close

from ._loss_cases import (BACKENDS, DTYPES, SHAPES_D, SHAPES_N, LossBadInput, check_no_grad_forward,
                          chunks_for, make, ok)


def run(fn, a, b, scale, bias=None, **kw):
    """Loss and gradients for features and logit_scale (and bias)."""
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float32 if a.dtype != torch.float64 else torch.float64,
                     requires_grad=True)
    args = [a, b, s]
    if bias is not None:
        args.append(torch.tensor(float(bias), dtype=s.dtype, requires_grad=True))
    loss = fn(*args, **kw)
    loss.backward()
    return [loss.detach()] + [x.grad for x in args]


def oracle(a, b, scale, **kw):
    return run(lambda *x, **k: clip_loss(*x, backend="reference", **k), a.double(), b.double(), scale, **kw)


def floors(a, b, scale):
    """Size of the terms that cancel in each result: atol is relative to at least this.

    (At N = 1 the loss and every gradient are exactly 0, made of terms of these sizes.)"""
    n = a.shape[0]
    na, nb = a.double().norm(dim=1).max().item(), b.double().norm(dim=1).max().item()
    return (1.0, abs(scale) * b.double().abs().max().item() / n, abs(scale) * a.double().abs().max().item() / n,
            na * nb, 1.0)


def compare(got, want, dtype, names=("loss", "d_image", "d_text", "d_logit_scale"), floor=None):
    for k, (g, w, name) in enumerate(zip(got, want, names)):
        assert g is not None, f"{name}: no gradient"
        assert_close(g, w, dtype, what=name, scale_floor=floor[k] if floor else 1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", SHAPES_D)
@pytest.mark.parametrize("n", SHAPES_N)
def test_chunked_matches_reference(n, d, dtype):
    a, b = make(n, d, dtype, seed=n * 1000 + d)
    want = oracle(a, b, 14.3)
    for chunk in chunks_for(n):
        got = run(clip_loss, a, b, 14.3, backend="chunked", chunk_size=chunk)
        compare(got, want, dtype, floor=floors(a, b, 14.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backend_is_open_clip_formula(dtype):
    a, b = make(64, 64, dtype)
    got = run(clip_loss, a, b, 10.0, backend="reference")
    want = oracle(a, b, 10.0)
    # The reference computes in the input dtype, so its own error is the dtype's rounding.
    compare(got, want, dtype, floor=floors(a, b, 10.0))


@pytest.mark.parametrize("eps", [0.1, 0.5])
@pytest.mark.parametrize("n,chunk", [(7, 3), (300, 128)])
def test_label_smoothing(n, chunk, eps):
    a, b = make(n, 64, torch.float32)
    want = oracle(a, b, 20.0, label_smoothing=eps)
    got = run(clip_loss, a, b, 20.0, backend="chunked", chunk_size=chunk, label_smoothing=eps)
    compare(got, want, torch.float32, floor=floors(a, b, 20.0))


@pytest.mark.parametrize("case", ["n1", "noncontig_T", "noncontig_slice", "scale100", "unnormalised",
                                  "duplicates", "zero_scale", "float_scale"])
def test_edge_cases_equal_reference(case):
    n, d, scale = 64, 96, 14.3
    a, b = make(n, d, torch.float32)
    if case == "n1":
        a, b = a[:1], b[:1]
    elif case == "noncontig_T":
        a, b = a.T.contiguous().T, b.T.contiguous().T
        assert not a.is_contiguous()
    elif case == "noncontig_slice":
        a, b = make(n, 2 * d, torch.float32)
        a, b = a[:, ::2], b[:, 1::2]
        assert not a.is_contiguous()
    elif case == "scale100":
        scale = 100.0
    elif case == "unnormalised":
        a, b = make(n, d, torch.float32, normalise=False, scale_norm=3.0)
    elif case == "duplicates":
        a[10:20] = a[0]
        b[10:20] = b[0]
    elif case == "zero_scale":
        scale = 0.0
    want = oracle(a, b, scale)
    if case == "float_scale":
        loss = clip_loss(a, b, scale, backend="chunked", chunk_size=24)
        assert_close(loss, want[0], torch.float32, what="loss")
        return
    got = run(clip_loss, a, b, scale, backend="chunked", chunk_size=24)
    compare(got, want, torch.float32, floor=floors(a, b, scale))
    assert all(torch.isfinite(x).all() for x in got)


def test_extreme_logits_stay_finite():
    # Logits spanning +-400: any unshifted exp would overflow.  fp32 rounding of such logits is
    # itself large, so the rule is: error against the fp64 oracle at most 2x the error of the
    # fp32 reference formula (plus a hair).
    a, b = make(50, 32, torch.float32, normalise=False, scale_norm=2.0)
    want = oracle(a, b, 100.0)
    ref32 = run(clip_loss, a, b, 100.0, backend="reference")
    got = run(clip_loss, a, b, 100.0, backend="chunked", chunk_size=16)
    for name, g, r, w in zip(("loss", "d_image", "d_text", "d_logit_scale"), got, ref32, want):
        assert torch.isfinite(g).all(), name
        assert_close(g, w, what=name, atol=1e-6, rtol=0.0, peers=[r])


def test_logit_scale_parameter_shapes_and_dtypes():
    a, b = make(33, 40, torch.float32)
    for shape in [(), (1,)]:
        p = torch.nn.Parameter(torch.full(shape, math.log(1 / 0.07)))
        loss = clip_loss(a, b, p.exp(), backend="chunked", chunk_size=8)
        loss.backward()
        assert p.grad is not None and p.grad.shape == p.shape
        p_ref = torch.nn.Parameter(torch.full(shape, math.log(1 / 0.07)))
        clip_loss_reference(a, b, p_ref.exp()).backward()
        assert_close(p.grad, p_ref.grad, torch.float32, what=f"logit_scale grad shape {shape}")


def test_logit_bias_is_shift_invariant():
    a, b = make(20, 16, torch.float32)
    bias = torch.tensor(-3.0, requires_grad=True)
    loss = clip_loss(a, b, 10.0, bias, backend="chunked")
    assert_close(loss, clip_loss_reference(a.double(), b.double(), 10.0, -3.0), torch.float32)
    loss.backward()
    assert bias.grad is not None and bias.grad.item() == 0.0


def test_no_grad_forward_only():
    check_no_grad_forward(lambda a, b: clip_loss(a, b, 5.0, backend="chunked", chunk_size=7),
                          lambda a, b: clip_loss_reference(a, b, 5.0))


def test_partial_requires_grad():
    a, b = make(40, 16, torch.float32)
    a.requires_grad_()
    clip_loss(a, b, 5.0, backend="chunked", chunk_size=7).backward()
    a2 = a.detach().double().requires_grad_()
    clip_loss_reference(a2, b.double(), 5.0).backward()
    assert_close(a.grad, a2.grad, torch.float32, what="d_image")


def test_grad_output_scaling():
    # A loss weighted by -0.5 must give -0.5 x the gradients (backward scales by grad_output).
    a, b = make(30, 16, torch.float64)
    a1 = a.clone().requires_grad_()
    (-0.5 * clip_loss(a1, b, 7.0, backend="chunked", chunk_size=8)).backward()
    a2 = a.clone().requires_grad_()
    (-0.5 * clip_loss_reference(a2, b, 7.0)).backward()
    assert_close(a1.grad, a2.grad, torch.float64, what="d_image")


def test_float64_gradcheck():
    a, b = make(9, 5, torch.float64, normalise=False)
    a.requires_grad_()
    b.requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, z: clip_loss(x, y, z, backend="chunked", chunk_size=4, label_smoothing=0.2), (a, b, s))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 70), d=st.integers(1, 48), chunk=st.integers(1, 80),
       scale=st.floats(0.01, 100.0), eps=st.sampled_from([0.0, 0.0, 0.3]),
       normalise=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_hypothesis(n, d, chunk, scale, eps, normalise, seed):
    a, b = make(n, d, torch.float64, seed=seed, normalise=normalise)
    want = oracle(a, b, scale, label_smoothing=eps)
    got = run(clip_loss, a, b, scale, backend="chunked", chunk_size=chunk, label_smoothing=eps)
    compare(got, want, torch.float64, floor=floors(a, b, scale))


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument (and the shapes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput(LossBadInput):
    @staticmethod
    def call(a, b, scale=10.0, **kw):
        return clip_loss(a, b, scale, **kw)


def test_clip_bad_label_smoothing():
    a, b = ok()
    for eps in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
            clip_loss(a, b, 10.0, label_smoothing=eps)
