"""Inputs and checks shared by the contrastive losses' test files (test_clip_loss.py,
test_siglip_loss.py, test_simclr_loss.py).

``LossBadInput`` is not collected by itself (its name does not start with "Test"); each loss's
test file subclasses it as ``TestBadInput`` with its own ``call`` and a ``backend`` parameter.
"""
import math

import pytest
import torch

from fastclip.testing import assert_close

SHAPES_N = [1, 7, 64, 300, 1000]
SHAPES_D = [64, 257, 512]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_no_grad_forward(loss, reference):
    """``loss(a, b)`` under ``torch.no_grad()`` builds no graph (forward only) and equals
    ``reference`` on the same values in fp64 to fp32 rounding."""
    a, b = make(40, 16, torch.float32)
    with torch.no_grad():
        got = loss(a, b)
    assert not got.requires_grad
    assert_close(got, reference(a.double(), b.double()), torch.float32)


def chunks_for(n):
    """A chunk size that divides N, one that does not, and the default."""
    divides = next(c for c in range(max(1, n // 4), n + 1) if n % c == 0)
    ragged = n // 3 + 1 if n > 2 else 2
    if n > 3 and n % ragged == 0:
        ragged += 1
    return [divides, ragged, None]


def make(n, d, dtype, seed=0, normalise=True, scale_norm=1.0):
    """Two [n, d] feature matrices in ``dtype`` (unit rows, correlated pairs, if ``normalise``)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalise:
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b, dim=1) * 0.5 + a * 0.5  # correlated pairs, like training
        b = torch.nn.functional.normalize(b, dim=1)
    return (a * scale_norm).to(dtype), (b * scale_norm).to(dtype)


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument (and the shapes)
# ----------------------------------------------------------------------------------------------
BACKENDS = ["chunked", "reference"]


def ok(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


class LossBadInput:
    """Every error names the argument (and the shapes); ``call(a, b, scale=10.0, **kw)`` runs the loss."""

    @staticmethod
    def call(a, b, scale=10.0, **kw):
        raise NotImplementedError

    def test_mismatched_n(self, backend):
        with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(5, 8\)"):
            self.call(torch.randn(4, 8), torch.randn(5, 8), backend=backend)

    def test_mismatched_d(self, backend):
        with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(4, 9\)"):
            self.call(torch.randn(4, 8), torch.randn(4, 9), backend=backend)

    @pytest.mark.parametrize("shape", [(8,), (2, 4, 8), ()])
    def test_not_2d(self, backend, shape):
        with pytest.raises(ValueError, match=r"image_features must be 2-D \[N, D\], got shape"):
            self.call(torch.randn(shape), torch.randn(4, 8), backend=backend)
        with pytest.raises(ValueError, match=r"text_features must be 2-D"):
            self.call(torch.randn(4, 8), torch.randn(shape), backend=backend)

    def test_mixed_devices(self, backend):
        with pytest.raises(ValueError, match=r"same device, got cpu and meta"):
            self.call(torch.randn(4, 8), torch.randn(4, 8, device="meta"), backend=backend)

    def test_mixed_dtypes(self, backend):
        with pytest.raises(TypeError, match=r"same dtype, got torch.float32 and torch.float16"):
            self.call(torch.randn(4, 8), torch.randn(4, 8).half(), backend=backend)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
    def test_integer_dtypes(self, backend, dtype):
        with pytest.raises(TypeError, match=r"image_features must be a floating tensor"):
            self.call(torch.ones(4, 8, dtype=dtype), torch.randn(4, 8), backend=backend)

    def test_not_a_tensor(self, backend):
        with pytest.raises(TypeError, match=r"text_features must be a torch.Tensor, got list"):
            self.call(torch.randn(2, 2), [[1.0, 2.0], [3.0, 4.0]], backend=backend)

    @pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, torch.tensor(math.inf), torch.tensor([math.nan])])
    def test_non_finite_scale(self, backend, scale):
        a, b = ok()
        with pytest.raises(ValueError, match=r"logit_scale must be finite"):
            self.call(a, b, scale, backend=backend)

    def test_scale_wrong_shape_or_type(self, backend):
        a, b = ok()
        with pytest.raises(ValueError, match=r"logit_scale must have exactly one element, got shape \(2,\)"):
            self.call(a, b, torch.ones(2), backend=backend)
        with pytest.raises(TypeError, match=r"logit_scale must be a float or a one-element tensor, got str"):
            self.call(a, b, "10", backend=backend)
        with pytest.raises(TypeError, match=r"logit_scale must be a floating tensor"):
            self.call(a, b, torch.tensor(10), backend=backend)

    def test_empty_batch(self, backend):
        with pytest.raises(ValueError, match=r"at least one row \(N >= 1\), got \(0, 8\)"):
            self.call(torch.randn(0, 8), torch.randn(0, 8), backend=backend)

    def test_zero_feature_dim(self, backend):
        with pytest.raises(ValueError, match=r"feature dimension D must be >= 1"):
            self.call(torch.randn(3, 0), torch.randn(3, 0), backend=backend)

    @pytest.mark.parametrize("chunk", [0, -3])
    def test_bad_chunk_size(self, backend, chunk):
        a, b = ok()
        with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
            self.call(a, b, backend=backend, chunk_size=chunk)
        with pytest.raises(TypeError, match=r"chunk_size must be a positive int"):
            self.call(a, b, backend=backend, chunk_size=2.5)

    def test_unknown_backend(self, backend):
        a, b = ok()
        with pytest.raises(ValueError, match=r"'nope' is not a backend of .*choose one of"):
            self.call(a, b, backend="nope")
