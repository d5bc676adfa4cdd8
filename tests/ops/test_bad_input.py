"""Bad input gets a clear error naming the argument (and the shapes)."""
import math

import pytest
import torch

from fastclip.ops import clip_loss, siglip_loss

BACKENDS = ["chunked", "reference"]


def ok(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


def call(op, a, b, scale=10.0, **kw):
    if op == "siglip":
        return siglip_loss(a, b, scale, kw.pop("bias", -10.0), **kw)
    return clip_loss(a, b, scale, **kw)


@pytest.mark.parametrize("op", ["clip", "siglip"])
@pytest.mark.parametrize("backend", BACKENDS)
class TestBadInput:
    def test_mismatched_n(self, op, backend):
        with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(5, 8\)"):
            call(op, torch.randn(4, 8), torch.randn(5, 8), backend=backend)

    def test_mismatched_d(self, op, backend):
        with pytest.raises(ValueError, match=r"same shape, got \(4, 8\) and \(4, 9\)"):
            call(op, torch.randn(4, 8), torch.randn(4, 9), backend=backend)

    @pytest.mark.parametrize("shape", [(8,), (2, 4, 8), ()])
    def test_not_2d(self, op, backend, shape):
        with pytest.raises(ValueError, match=r"image_features must be 2-D \[N, D\], got shape"):
            call(op, torch.randn(shape), torch.randn(4, 8), backend=backend)
        with pytest.raises(ValueError, match=r"text_features must be 2-D"):
            call(op, torch.randn(4, 8), torch.randn(shape), backend=backend)

    def test_mixed_devices(self, op, backend):
        with pytest.raises(ValueError, match=r"same device, got cpu and meta"):
            call(op, torch.randn(4, 8), torch.randn(4, 8, device="meta"), backend=backend)

    def test_mixed_dtypes(self, op, backend):
        with pytest.raises(TypeError, match=r"same dtype, got torch.float32 and torch.float16"):
            call(op, torch.randn(4, 8), torch.randn(4, 8).half(), backend=backend)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
    def test_integer_dtypes(self, op, backend, dtype):
        with pytest.raises(TypeError, match=r"image_features must be a floating tensor"):
            call(op, torch.ones(4, 8, dtype=dtype), torch.randn(4, 8), backend=backend)

    def test_not_a_tensor(self, op, backend):
        with pytest.raises(TypeError, match=r"text_features must be a torch.Tensor, got list"):
            call(op, torch.randn(2, 2), [[1.0, 2.0], [3.0, 4.0]], backend=backend)

    @pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, torch.tensor(math.inf), torch.tensor([math.nan])])
    def test_non_finite_scale(self, op, backend, scale):
        a, b = ok()
        with pytest.raises(ValueError, match=r"logit_scale must be finite"):
            call(op, a, b, scale, backend=backend)

    def test_scale_wrong_shape_or_type(self, op, backend):
        a, b = ok()
        with pytest.raises(ValueError, match=r"logit_scale must have exactly one element, got shape \(2,\)"):
            call(op, a, b, torch.ones(2), backend=backend)
        with pytest.raises(TypeError, match=r"logit_scale must be a float or a one-element tensor, got str"):
            call(op, a, b, "10", backend=backend)
        with pytest.raises(TypeError, match=r"logit_scale must be a floating tensor"):
            call(op, a, b, torch.tensor(10), backend=backend)

    def test_empty_batch(self, op, backend):
        with pytest.raises(ValueError, match=r"at least one row \(N >= 1\), got \(0, 8\)"):
            call(op, torch.randn(0, 8), torch.randn(0, 8), backend=backend)

    def test_zero_feature_dim(self, op, backend):
        with pytest.raises(ValueError, match=r"feature dimension D must be >= 1"):
            call(op, torch.randn(3, 0), torch.randn(3, 0), backend=backend)

    @pytest.mark.parametrize("chunk", [0, -3])
    def test_bad_chunk_size(self, op, backend, chunk):
        a, b = ok()
        with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
            call(op, a, b, backend=backend, chunk_size=chunk)
        with pytest.raises(TypeError, match=r"chunk_size must be a positive int"):
            call(op, a, b, backend=backend, chunk_size=2.5)

    def test_unknown_backend(self, op, backend):
        a, b = ok()
        with pytest.raises(ValueError, match=r"'nope' is not a backend of .*choose one of"):
            call(op, a, b, backend="nope")


def test_siglip_bias_required_and_finite():
    a, b = ok()
    with pytest.raises(TypeError, match=r"logit_bias is required"):
        siglip_loss(a, b, 10.0, None)
    with pytest.raises(ValueError, match=r"logit_bias must be finite"):
        siglip_loss(a, b, 10.0, math.nan)


def test_clip_bad_label_smoothing():
    a, b = ok()
    for eps in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
            clip_loss(a, b, 10.0, label_smoothing=eps)
