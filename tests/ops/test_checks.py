"""fastclip.ops._checks: input validation; every error names the argument, the expected and the actual."""
import math

import pytest
import torch

from fastclip.ops._checks import (
    FLOATS,
    as_scalar_tensor,
    check_chunk_size,
    check_features,
    check_float_tensor,
    check_label_smoothing,
)


def test_check_float_tensor_names_the_argument_and_the_layout():
    for dt in FLOATS:
        check_float_tensor("q", torch.zeros(1, 2, 3, 4, dtype=dt), "[B, H, L, head_dim]")
    with pytest.raises(TypeError, match=r"^q must be a torch.Tensor, got list$"):
        check_float_tensor("q", [1.0], "[B, H, L, head_dim]")
    with pytest.raises(ValueError, match=r"^q must be 4-D \[B, H, L, head_dim\], got shape \(2, 3\)$"):
        check_float_tensor("q", torch.zeros(2, 3), "[B, H, L, head_dim]")
    with pytest.raises(TypeError, match=r"^view2 must be a floating tensor \(float32, float16, bfloat16 or float64\), "
                                        r"got torch.int64$"):
        check_float_tensor("view2", torch.zeros(2, 3, dtype=torch.int64), "[N, D]")


def test_check_features_names_both_arguments():
    a = torch.zeros(4, 8)
    check_features(a, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"^text_features must be 2-D \[N, D\], got shape \(8,\)$"):
        check_features(a, torch.zeros(8))
    with pytest.raises(ValueError, match=r"image_features and text_features must be on the same device, got cpu and meta"):
        check_features(a, torch.zeros(4, 8, device="meta"))
    with pytest.raises(TypeError, match=r"image_features and text_features must have the same dtype, "
                                        r"got torch.float32 and torch.float64"):
        check_features(a, a.double())
    with pytest.raises(ValueError, match=r"must have the same shape, got \(4, 8\) and \(3, 8\)"):
        check_features(a, torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"need at least one row \(N >= 1\), got \(0, 8\) and \(0, 8\)"):
        check_features(torch.zeros(0, 8), torch.zeros(0, 8))
    with pytest.raises(ValueError, match=r"feature dimension D must be >= 1, got shapes \(4, 0\) and \(4, 0\)"):
        check_features(torch.zeros(4, 0), torch.zeros(4, 0))


def test_check_features_with_different_row_counts():
    """Local rows against gathered columns (the distributed losses): N may differ, D may not."""
    check_features(torch.zeros(3, 8), torch.zeros(12, 8), same_rows=False)
    with pytest.raises(ValueError, match=r"must have the same shape, got \(3, 8\) and \(12, 7\)"):
        check_features(torch.zeros(3, 8), torch.zeros(12, 7), same_rows=False)


@pytest.mark.parametrize("feat_dtype, want", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("value", [2.5, 3, torch.tensor(2.5), torch.tensor([2.5], dtype=torch.float64)],
                         ids=["float", "int", "0-dim", "shape-1-fp64"])
def test_as_scalar_tensor_is_0_dim_in_the_accumulation_dtype(value, feat_dtype, want):
    out = as_scalar_tensor(value, "logit_scale", torch.zeros(2, 2, dtype=feat_dtype), required=True)
    assert out.shape == () and out.dtype == want and out.item() == float(value)


def test_as_scalar_tensor_keeps_the_autograd_graph():
    p = torch.nn.Parameter(torch.tensor([0.5]))  # a shape-[1] logit_scale, as some trainers store it
    out = as_scalar_tensor(p.exp(), "logit_scale", torch.zeros(2, 2), required=True)
    out.backward()
    assert p.grad.shape == (1,) and p.grad.item() == pytest.approx(math.exp(0.5))


def test_as_scalar_tensor_errors_name_the_argument():
    like = torch.zeros(2, 2)
    assert as_scalar_tensor(None, "logit_bias", like, required=False) is None
    with pytest.raises(TypeError, match=r"^logit_bias is required, got None$"):
        as_scalar_tensor(None, "logit_bias", like, required=True)
    for bad, kind in ((True, "bool"), ("10", "str"), ([1.0], "list")):
        with pytest.raises(TypeError, match=rf"^logit_scale must be a float or a one-element tensor, got {kind}$"):
            as_scalar_tensor(bad, "logit_scale", like, required=True)
    with pytest.raises(ValueError, match=r"^logit_scale must have exactly one element, got shape \(2,\)$"):
        as_scalar_tensor(torch.ones(2), "logit_scale", like, required=True)
    with pytest.raises(TypeError, match=r"^logit_scale must be a floating tensor, got torch.int64$"):
        as_scalar_tensor(torch.tensor(3), "logit_scale", like, required=True)
    with pytest.raises(ValueError, match=r"^logit_scale is on meta but the features are on cpu$"):
        as_scalar_tensor(torch.tensor(1.0, device="meta"), "logit_scale", like, required=True)
    for bad in (math.inf, -math.inf, math.nan, torch.tensor(math.nan)):
        with pytest.raises(ValueError, match=r"^temperature must be finite, got"):
            as_scalar_tensor(bad, "temperature", like, required=True)
    assert math.isinf(as_scalar_tensor(math.inf, "x", like, required=True, check_finite=False).item())


def test_a_cpu_scalar_follows_the_features():
    out = as_scalar_tensor(torch.tensor(2.0), "logit_scale", torch.zeros(2, 2, device="meta"), required=True)
    assert out.device.type == "meta"


def test_check_chunk_size():
    assert check_chunk_size(None) is None and check_chunk_size(1) == 1 and check_chunk_size(4096) == 4096
    for bad, kind in ((2.5, "float"), (True, "bool"), ("8", "str")):
        with pytest.raises(TypeError, match=rf"^chunk_size must be a positive int or None, got {kind}$"):
            check_chunk_size(bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"^chunk_size must be >= 1, got {bad}$"):
            check_chunk_size(bad)


def test_check_label_smoothing():
    assert check_label_smoothing(0) == 0.0 and check_label_smoothing(1) == 1.0 and check_label_smoothing(0.1) == 0.1
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^label_smoothing must be in \[0, 1\], got"):
            check_label_smoothing(bad)
