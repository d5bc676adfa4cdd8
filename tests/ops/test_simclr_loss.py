"""fastclip.ops.simclr_loss: chunked vs the reference and a SLIP-style formula, bad input, backends.

The SimCLRLoss module is tested in tests/nn/test_loss.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastclip.ops import dispatch, simclr_loss, simclr_loss_reference
from fastclip.testing import assert_close

from ._loss_cases import check_no_grad_forward

TEMPERATURES = [0.05, 0.1, 1.0]
NAMES = ("loss", "d_view1", "d_view2")


def make(n, d, dtype=torch.float64, seed=0, normalise=True, scale_norm=1.0):
    """Two views of n samples: correlated rows, like two augmentations of the same image."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalise:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return (a * scale_norm).to(dtype), (b * scale_norm).to(dtype)


def run(fn, a, b, *args, **kw):
    """[loss, d view1, d view2] of ``fn(a, b, *args, **kw)``."""
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    loss = fn(a, b, *args, **kw)
    loss.backward()
    return [loss.detach(), a.grad, b.grad]


def oracle(a, b, temperature):
    return run(simclr_loss_reference, a.double(), b.double(), temperature)


def floors(a, b, temperature):
    """Sizes of the terms that cancel in each result (at N = 1 the loss and both gradients are
    exactly 0, made of terms this large): the atol of assert_close is relative to at least these."""
    m = 2 * a.shape[0]
    z_max = max(a.double().abs().max().item(), b.double().abs().max().item())
    return (1.0, z_max / temperature / m, z_max / temperature / m)


def compare(got, want, dtype, floor, **kw):
    for g, w, name, f in zip(got, want, NAMES, floor):
        assert g is not None, f"{name}: no gradient"
        assert_close(g, w, dtype, what=name, scale_floor=f, **kw)


def slip_formula(view1, view2, temperature):
    """SLIP's SIMCLRLoss, written out block by block: view1's rows against [view2 | view1] and
    view2's rows against [view1 | view2], the self-similarities pushed out by a large negative."""
    n = view1.shape[0]
    large = 1e9
    mask = torch.eye(n, dtype=view1.dtype) * large
    logits_aa = view1 @ view1.T / temperature - mask
    logits_bb = view2 @ view2.T / temperature - mask
    logits_ab = view1 @ view2.T / temperature
    logits_ba = view2 @ view1.T / temperature
    labels = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


# ----------------------------------------------------------------------------------------------
# Chunked against the reference
# ----------------------------------------------------------------------------------------------
# (N, chunk): N = 1 and 3 (2N = 2, 6), chunk 1 (every tile 1 x 1, diagonal tiles all -inf), chunks
# that leave tails, chunk = 2N, chunks larger than 2N (one diagonal tile), N not a multiple.
FP64_CASES = [(1, 1), (1, 7), (3, 1), (3, 7), (3, 64), (10, 1), (10, 7), (37, 7), (37, 64),
              (100, 7), (100, 64), (100, 200), (100, 1000)]


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,chunk", FP64_CASES)
def test_chunked_matches_reference_fp64(n, chunk, temperature):
    a, b = make(n, 24, seed=n * 100 + chunk)
    want = oracle(a, b, temperature)
    got = run(simclr_loss, a, b, temperature, backend="chunked", chunk_size=chunk)
    compare(got, want, torch.float64, floors(a, b, temperature))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,d,chunk", [(3, 64, 1), (64, 64, 7), (64, 64, None), (300, 128, 64),
                                        (300, 128, 1000), (257, 96, 100)])
def test_chunked_matches_reference_fp32(n, d, chunk, temperature):
    a, b = make(n, d, torch.float32, seed=n + d)
    want = oracle(a, b, temperature)
    got = run(simclr_loss, a, b, temperature, backend="chunked", chunk_size=chunk)
    compare(got, want, torch.float32, floors(a, b, temperature))
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,chunk", [(1, 64), (100, 32), (100, 1000), (77, 13)])
@pytest.mark.parametrize("temperature", [0.05, 0.1])
def test_low_precision_inputs(n, chunk, temperature, dtype):
    # The oracle runs in fp64 on the same (rounded) inputs; the chunked engine works in fp32.
    a, b = make(n, 64, dtype, seed=n)
    want = oracle(a, b, temperature)
    got = run(simclr_loss, a, b, temperature, backend="chunked", chunk_size=chunk)
    compare(got, want, dtype, floors(a, b, temperature))
    assert got[0].dtype == torch.float32, "low-precision inputs give an fp32 loss"
    assert got[1].dtype == got[2].dtype == dtype, "gradients come back in the inputs' dtype"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_backend(dtype):
    # The reference computes in the inputs' dtype, so its error is that dtype's rounding.
    a, b = make(48, 64, dtype, seed=3)
    want = oracle(a, b, 0.1)
    got = run(simclr_loss, a, b, 0.1, backend="reference")
    compare(got, want, dtype, floors(a, b, 0.1))
    assert got[0].dtype == dtype


# ----------------------------------------------------------------------------------------------
# The definition itself
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_equals_slip_formula(n, temperature):
    a, b = make(n, 32, seed=n + 7)
    want = run(slip_formula, a, b, temperature)
    floor = floors(a, b, temperature)
    for backend, chunk in (("reference", None), ("chunked", 5), ("chunked", 1000)):
        got = run(simclr_loss, a, b, temperature, backend=backend, chunk_size=chunk)
        compare(got, want, torch.float64, floor)


def test_single_pair_loss_is_zero():
    # N = 1: each row's only candidate is its positive, so the loss is 0 for any features.
    a, b = make(1, 16, normalise=False, scale_norm=3.0)
    for backend in ("chunked", "reference"):
        loss, ga, gb = run(simclr_loss, a, b, 0.1, backend=backend, chunk_size=1)
        assert abs(loss.item()) < 1e-12, backend
        assert ga.abs().max().item() < 1e-12 and gb.abs().max().item() < 1e-12, backend


def test_symmetric_in_the_views():
    a, b = make(20, 16, seed=11)
    ab = simclr_loss(a, b, 0.1, backend="chunked", chunk_size=6)
    ba = simclr_loss(b, a, 0.1, backend="chunked", chunk_size=6)
    assert_close(ab, ba, torch.float64, what="loss(view1, view2) vs loss(view2, view1)", scale_floor=1.0)


@pytest.mark.parametrize("case", ["noncontig_T", "noncontig_slice", "unnormalised", "duplicates"])
def test_edge_cases_equal_reference(case):
    n, d, t = 40, 32, 0.1
    a, b = make(n, d, torch.float32, seed=5)
    if case == "noncontig_T":
        a, b = a.T.contiguous().T, b.T.contiguous().T
        assert not a.is_contiguous()
    elif case == "noncontig_slice":
        a, b = make(n, 2 * d, torch.float32, seed=5)
        a, b = a[:, ::2], b[:, 1::2]
        assert not a.is_contiguous()
    elif case == "unnormalised":
        a, b = make(n, d, torch.float32, normalise=False, scale_norm=0.5)
    elif case == "duplicates":
        a[10:20] = a[0]
        b[10:20] = b[0]
    want = oracle(a, b, t)
    got = run(simclr_loss, a, b, t, backend="chunked", chunk_size=12)
    compare(got, want, torch.float32, floors(a, b, t))


def test_extreme_logits_stay_finite():
    # Logits up to ~+-2000: an unshifted exp overflows.  fp32 rounding of such logits is large in
    # itself, so: error against the fp64 oracle at most 2x the fp32 reference's own (plus a hair).
    a, b = make(50, 32, torch.float32, normalise=False, scale_norm=1.6)
    want = oracle(a, b, 0.05)
    ref32 = run(simclr_loss, a, b, 0.05, backend="reference")
    got = run(simclr_loss, a, b, 0.05, backend="chunked", chunk_size=16)
    for name, g, r, w in zip(NAMES, got, ref32, want):
        assert torch.isfinite(g).all(), name
        assert_close(g, w, what=name, atol=1e-6, rtol=0.0, peers=[r])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), d=st.integers(1, 24), chunk=st.integers(1, 90),
       temperature=st.floats(0.05, 2.0), normalise=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_hypothesis(n, d, chunk, temperature, normalise, seed):
    a, b = make(n, d, seed=seed, normalise=normalise)
    want = oracle(a, b, temperature)
    got = run(simclr_loss, a, b, temperature, backend="chunked", chunk_size=chunk)
    compare(got, want, torch.float64, floors(a, b, temperature))


# ----------------------------------------------------------------------------------------------
# Autograd behaviour
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("n,chunk", [(37, 10), (37, 64), (8, 3)])
def test_only_one_view_requires_grad(which, n, chunk):
    # chunk 10 with N = 37: the block [30, 40) straddles the boundary between the views.
    a, b = make(n, 16, torch.float32, seed=n + which)
    views = [a.clone(), b.clone()]
    views[which].requires_grad_()
    simclr_loss(*views, 0.1, backend="chunked", chunk_size=chunk).backward()
    assert views[1 - which].grad is None
    want = oracle(a, b, 0.1)
    assert_close(views[which].grad, want[1 + which], torch.float32, what=NAMES[1 + which],
                 scale_floor=floors(a, b, 0.1)[1])


def test_no_grad_forward_only():
    check_no_grad_forward(lambda a, b: simclr_loss(a, b, 0.2, backend="chunked", chunk_size=7),
                          lambda a, b: simclr_loss_reference(a, b, 0.2))


def test_grad_output_scaling():
    # A loss weighted by -0.5 gives -0.5 x the gradients (backward scales by grad_output).
    a, b = make(30, 16)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    (-0.5 * simclr_loss(a1, b1, 0.1, backend="chunked", chunk_size=8)).backward()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    (-0.5 * simclr_loss_reference(a2, b2, 0.1)).backward()
    assert_close(a1.grad, a2.grad, torch.float64, what="d_view1")
    assert_close(b1.grad, b2.grad, torch.float64, what="d_view2")


def test_float64_gradcheck():
    a, b = make(5, 4, normalise=False)
    a.requires_grad_()
    b.requires_grad_()
    def loss(x, y):
        return simclr_loss(x, y, 0.7, backend="chunked", chunk_size=3)
    assert torch.autograd.gradcheck(loss, (a, b))


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["chunked", "reference"])
class TestBadInput:
    def test_not_2d(self, backend):
        for shape in [(8,), (2, 4, 8), ()]:
            with pytest.raises(ValueError, match=r"view1 must be 2-D \[N, D\], got shape"):
                simclr_loss(torch.randn(shape), torch.randn(4, 8), backend=backend)
            with pytest.raises(ValueError, match=r"view2 must be 2-D \[N, D\], got shape"):
                simclr_loss(torch.randn(4, 8), torch.randn(shape), backend=backend)

    def test_mismatched_shapes(self, backend):
        with pytest.raises(ValueError,
                           match=r"view1 and view2 must have the same shape, got \(4, 8\) and \(5, 8\)"):
            simclr_loss(torch.randn(4, 8), torch.randn(5, 8), backend=backend)
        with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(4, 9\)"):
            simclr_loss(torch.randn(4, 8), torch.randn(4, 9), backend=backend)

    def test_empty(self, backend):
        with pytest.raises(ValueError, match=r"view1 and view2 need at least one row \(N >= 1\)"):
            simclr_loss(torch.randn(0, 8), torch.randn(0, 8), backend=backend)
        with pytest.raises(ValueError, match=r"feature dimension D >= 1"):
            simclr_loss(torch.randn(4, 0), torch.randn(4, 0), backend=backend)

    def test_mismatched_dtypes(self, backend):
        msg = r"view1 and view2 must have the same dtype, got torch.float32 and torch.float16"
        with pytest.raises(TypeError, match=msg):
            simclr_loss(torch.randn(4, 8), torch.randn(4, 8).half(), backend=backend)

    def test_mismatched_devices(self, backend):
        with pytest.raises(ValueError,
                           match=r"view1 and view2 must be on the same device, got cpu and meta"):
            simclr_loss(torch.randn(4, 8), torch.randn(4, 8, device="meta"), backend=backend)

    def test_integer_dtype(self, backend):
        with pytest.raises(TypeError, match=r"view1 must be a floating tensor"):
            simclr_loss(torch.ones(4, 8, dtype=torch.int64), torch.randn(4, 8), backend=backend)

    def test_not_a_tensor(self, backend):
        with pytest.raises(TypeError, match=r"view2 must be a torch.Tensor, got list"):
            simclr_loss(torch.randn(2, 2), [[1.0, 2.0], [3.0, 4.0]], backend=backend)
        with pytest.raises(TypeError, match=r"view1 must be a torch.Tensor, got ndarray"):
            simclr_loss(torch.randn(2, 2).numpy(), torch.randn(2, 2), backend=backend)

    @pytest.mark.parametrize("temperature", [0.0, -0.1, math.nan, math.inf, -math.inf])
    def test_bad_temperature_value(self, backend, temperature):
        a, b = make(4, 8, torch.float32)
        with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got"):
            simclr_loss(a, b, temperature, backend=backend)

    @pytest.mark.parametrize("temperature", [torch.tensor(0.1), "0.1", None, True])
    def test_bad_temperature_type(self, backend, temperature):
        a, b = make(4, 8, torch.float32)
        with pytest.raises(TypeError, match=r"temperature must be a float, got"):
            simclr_loss(a, b, temperature, backend=backend)

    def test_bad_chunk_size(self, backend):
        a, b = make(4, 8, torch.float32)
        with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0"):
            simclr_loss(a, b, backend=backend, chunk_size=0)
        with pytest.raises(TypeError, match=r"chunk_size must be a positive int or None, got float"):
            simclr_loss(a, b, backend=backend, chunk_size=2.0)


def test_integer_temperature_is_accepted():
    a, b = make(6, 8)
    assert_close(simclr_loss(a, b, 1, backend="chunked"), simclr_loss_reference(a, b, 1.0), torch.float64)


# ----------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------
def _spy(monkeypatch, calls):
    """Record which simclr_loss backend runs."""
    for b in dispatch.backends("simclr_loss"):
        monkeypatch.setattr(b, "fn", lambda *a, _b=b, _fn=b.fn: calls.append(_b.name) or _fn(*a))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    calls = []
    _spy(monkeypatch, calls)
    a, b = make(6, 8, torch.float32)
    simclr_loss(a, b)
    simclr_loss(a, b, backend="reference")
    simclr_loss(a, b, backend="chunked")
    assert calls == ["chunked", "reference", "chunked"], "auto must pick chunked, never the O(N^2) reference"
    assert [x.name for x in dispatch.backends("simclr_loss")] == ["chunked", "reference"]


def test_environment_variable(monkeypatch):
    calls = []
    _spy(monkeypatch, calls)
    a, b = make(6, 8, torch.float32)
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    simclr_loss(a, b)
    simclr_loss(a, b, backend="chunked")  # the argument beats the environment
    assert calls == ["reference", "chunked"]
    monkeypatch.setenv("FASTCLIP_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"FASTCLIP_BACKEND='triton' is not a backend of simclr_loss"):
        simclr_loss(a, b)


def test_unknown_backend():
    a, b = make(6, 8, torch.float32)
    with pytest.raises(ValueError, match=r"backend='bogus' is not a backend of simclr_loss; choose one of "
                                         r"\['chunked', 'reference'\]"):
        simclr_loss(a, b, backend="bogus")


def test_chunked_refuses_other_devices_with_a_reason():
    a = torch.randn(4, 8, device="meta")
    with pytest.raises(dispatch.BackendError,
                       match=r"backend 'chunked' \(backend=\) cannot run.*runs on cpu/cuda"):
        simclr_loss(a, a, backend="chunked")
