"""fastclip.ops.siglip_loss: chunked against the reference (loss and all four gradients), bad input."""
import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastclip.ops import siglip_loss
from fastclip.testing import assert_close

from ._loss_cases import BACKENDS, DTYPES, SHAPES_D, SHAPES_N, LossBadInput, chunks_for, make, ok

NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias")


def run(a, b, scale, bias, **kw):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = torch.tensor(float(scale), dtype=acc, requires_grad=True)
    c = torch.tensor(float(bias), dtype=acc, requires_grad=True)
    loss = siglip_loss(a, b, s, c, **kw)
    loss.backward()
    return [loss.detach(), a.grad, b.grad, s.grad, c.grad]


def floors(a, b, scale):
    n = a.shape[0]
    na, nb = a.double().norm(dim=1).max().item(), b.double().norm(dim=1).max().item()
    return (1.0, abs(scale) * b.double().abs().max().item() / n, abs(scale) * a.double().abs().max().item() / n,
            na * nb, 1.0)


def compare(got, want, dtype, fl):
    for k, (g, w, name) in enumerate(zip(got, want, NAMES)):
        assert g is not None, f"{name}: no gradient"
        assert_close(g, w, dtype, what=name, scale_floor=fl[k])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", SHAPES_D)
@pytest.mark.parametrize("n", SHAPES_N)
def test_chunked_matches_reference(n, d, dtype):
    a, b = make(n, d, dtype, seed=7 * n + d)
    want = run(a.double(), b.double(), 10.0, -10.0, backend="reference")
    for chunk in chunks_for(n):
        got = run(a, b, 10.0, -10.0, backend="chunked", chunk_size=chunk)
        compare(got, want, dtype, floors(a, b, 10.0))


@pytest.mark.parametrize("scale,bias,norm", [(100.0, 0.0, 1.0), (100.0, -10.0, 3.0), (1.0, 5.0, 1.0), (0.0, 0.0, 1.0)])
def test_extremes_and_unnormalised(scale, bias, norm):
    a, b = make(40, 24, torch.float32, normalise=norm == 1.0, scale_norm=norm)
    want = run(a.double(), b.double(), scale, bias, backend="reference")
    got = run(a, b, scale, bias, backend="chunked", chunk_size=16)
    ref32 = run(a, b, scale, bias, backend="reference")
    for k, (g, r, w) in enumerate(zip(got, ref32, want)):
        assert torch.isfinite(g).all(), NAMES[k]
        # error <= 2 x the fp32 reference's error + 2e-5 x max(max|w|, floor)
        assert_close(g, w, what=NAMES[k], atol=2e-5, rtol=0.0, scale_floor=floors(a, b, scale)[k], peers=[r])


def test_non_contiguous_and_duplicates():
    a, b = make(30, 64, torch.float32)
    a[5:9] = a[0]
    b[5:9] = b[0]
    want = run(a.double(), b.double(), 10.0, -10.0, backend="reference")
    got = run(a.T.contiguous().T, b[:, :].T.contiguous().T, 10.0, -10.0, backend="chunked", chunk_size=7)
    compare(got, want, torch.float32, floors(a, b, 10.0))


def test_forward_only_and_float_arguments():
    a, b = make(25, 8, torch.float32)
    with torch.no_grad():
        loss = siglip_loss(a, b, 10.0, -10.0, backend="chunked", chunk_size=4)
    want = siglip_loss(a.double(), b.double(), 10.0, -10.0, backend="reference")
    assert_close(loss, want, torch.float32, what="loss", scale_floor=1.0)


def test_float64_gradcheck():
    a, b = make(6, 5, torch.float64, normalise=False)
    args = (a.requires_grad_(), b.requires_grad_(), torch.tensor(2.0, dtype=torch.float64, requires_grad=True),
            torch.tensor(-1.0, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *x: siglip_loss(*x, backend="chunked", chunk_size=4), args)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 60), d=st.integers(1, 40), chunk=st.integers(1, 70), scale=st.floats(0.01, 100.0),
       bias=st.floats(-20, 20), seed=st.integers(0, 2**16))
def test_chunked_hypothesis(n, d, chunk, scale, bias, seed):
    a, b = make(n, d, torch.float64, seed=seed)
    want = run(a, b, scale, bias, backend="reference")
    got = run(a, b, scale, bias, backend="chunked", chunk_size=chunk)
    compare(got, want, torch.float64, floors(a, b, scale))


def test_no_grad_mode_skips_gradient_work(monkeypatch):
    # Inside autograd.Function.forward, needs_input_grad ignores torch.no_grad(); the op must not
    # form gradients for an evaluation call on inputs that require grad.
    mod = importlib.import_module("fastclip.ops.siglip_loss")
    calls = []
    orig = mod.chunked_siglip_sweep
    monkeypatch.setattr(mod, "chunked_siglip_sweep", lambda *a: calls.append(a[-1]) or orig(*a))
    a, b = make(12, 8, torch.float32)
    a.requires_grad_()
    with torch.no_grad():
        siglip_loss(a, b, 10.0, -10.0, backend="chunked")
    siglip_loss(a, b, 10.0, -10.0, backend="chunked")
    assert calls == [False, True]


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument (and the shapes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput(LossBadInput):
    @staticmethod
    def call(a, b, scale=10.0, **kw):
        return siglip_loss(a, b, scale, kw.pop("bias", -10.0), **kw)


def test_siglip_bias_required_and_finite():
    a, b = ok()
    with pytest.raises(TypeError, match=r"logit_bias is required"):
        siglip_loss(a, b, 10.0, None)
    with pytest.raises(ValueError, match=r"logit_bias must be finite"):
        siglip_loss(a, b, 10.0, math.nan)
