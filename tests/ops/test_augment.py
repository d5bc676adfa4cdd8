"""augment: the native and torch backends against the float64 reference twin, the blur against a
grouped convolution, the draws, batches in parts, strided views, backend choice, bad input."""
import pytest
import torch

from fastclip.ops import dispatch
from fastclip.ops.augment import (
    CLIP_MEAN,
    CLIP_STD,
    ENV,
    OP,
    AugmentOpConfig,
    augment_batch,
    augment_batch_reference,
    blur_taps,
    draw_params,
    gaussian_blur,
    gaussian_blur_reference,
    slice_params,
)
from fastclip.testing import assert_close

# (dtype, atol, rtol) of the fused path against the float64 reference, in normalised units (~[-2, 2]).
TOLERANCES = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-2), (torch.float16, 4e-3, 2e-3)]
SHAPES = [(1, 8, 8), (5, 17, 23), (9, 64, 64), (3, 224, 224)]  # (B, H, W): odd sizes, chunk tails
BACKENDS = ["native", "torch"]
# The op's knobs of fastclip.data's presets: "clip" draws nothing, "clip_aug" draws everything.
KNOBS = {"clip": {}, "clip_aug": dict(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)}


def _cfg(preset: str = "clip", **overrides) -> AugmentOpConfig:
    return AugmentOpConfig(**{**KNOBS[preset], **overrides})


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)


def _native_or_skip(backend):
    from fastclip import extension
    why = extension.reason()
    if backend == "native" and why:
        pytest.skip(f"native augment kernel unavailable: {why}")


# Every small shape in every dtype; the large shape once per preset (float32) is enough.
FUSED_CASES = [
    pytest.param(shape, *tol, id=f"{'x'.join(map(str, shape))}-{str(tol[0]).replace('torch.', '')}")
    for shape in SHAPES for tol in TOLERANCES if shape[1] < 224 or tol[0] == torch.float32
]


# ----------------------------------------------------------------------------------------------
# Backends against the reference twin
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,atol,rtol", FUSED_CASES)
@pytest.mark.parametrize("preset", ["clip", "clip_aug", "jitter_only", "gray_only", "blur_wide"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_reference(backend, preset, shape, dtype, atol, rtol):
    _native_or_skip(backend)
    b, h, w = shape
    overrides = {"jitter_only": dict(jitter_p=1.0), "gray_only": dict(grayscale_p=1.0),
                 "blur_wide": dict(blur_p=1.0, blur_sigma=(0.1, 12.0), flip_p=0.5)}.get(preset, {})
    cfg = _cfg(preset if preset in KNOBS else "clip", **overrides)
    x = _images(b, h, w)
    if preset == "blur_wide":  # a strided batch (channels-first memory seen as [B, H, W, 3])
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    params = draw_params(b, cfg, torch.Generator().manual_seed(7))
    got = augment_batch(x, cfg, dtype=dtype, params=params, backend=backend)
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert got.shape == (b, 3, h, w) and got.dtype == dtype and got.is_contiguous()
    # this table's atol is absolute (normalised units), not relative to max|want|: pass it as floor
    assert_close(got, want, what=f"{preset} {shape}", atol=0.0, rtol=rtol, floor=atol)


def test_reference_backend_is_the_twin_and_only_on_request():
    cfg = _cfg("clip_aug", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    x = _images(5, 19, 21, seed=1)
    params = draw_params(5, cfg, torch.Generator().manual_seed(3))
    got = augment_batch(x, cfg, dtype=torch.float64, params=params, backend="reference")
    assert torch.equal(got, augment_batch_reference(x, cfg, params, dtype=torch.float64))
    ref = next(b for b in dispatch.backends(OP) if b.name == "reference")
    assert not ref.picked_automatically(torch.device("cpu"))
    assert dispatch.select(OP, device=torch.device("cpu"), dtype=torch.float64, env=ENV).name == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cuda_matches_cpu_reference(backend):
    cfg = _cfg("clip_aug", blur_p=1.0)
    x = _images(7, 40, 36, seed=5)
    params = draw_params(7, cfg, torch.Generator().manual_seed(6))
    got = augment_batch(x.cuda(), cfg, params=params, backend=backend)
    assert got.device.type == "cuda"
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert_close(got.cpu(), want, what=f"cuda {backend}", atol=0.0, rtol=1e-5, floor=2e-5)


def test_backends_agree_and_tiny_images_are_not_blurred():
    """native and torch give the same batch to float32 rounding; an image under 3 px has no room
    for a blur window (reflect padding needs a neighbour on each side) and comes out unblurred."""
    _native_or_skip("native")
    cfg = _cfg("clip_aug", blur_p=1.0)
    x = _images(12, 64, 64, seed=3)
    params = draw_params(12, cfg, torch.Generator().manual_seed(4))
    a = augment_batch(x, cfg, params=params, backend="native")
    b = augment_batch(x, cfg, params=params, backend="torch")
    assert_close(a, b, what="native vs torch", atol=0.0, rtol=1e-5, floor=1e-5)
    for h, w in ((1, 1), (2, 2), (1, 5), (3, 2)):
        t = _images(3, h, w)
        p = draw_params(3, cfg, torch.Generator().manual_seed(1))
        unblurred = augment_batch(t, cfg, params=dict(p, sigma=torch.zeros(3, dtype=torch.float64)))
        for backend in BACKENDS:
            got = augment_batch(t, cfg, params=p, backend=backend)
            assert_close(got, unblurred, what=f"{h}x{w} {backend}", atol=0.0, rtol=1e-6, floor=1e-6)


@pytest.mark.parametrize("view", ["every_other_column", "crop", "every_other_image", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend, view):
    """uint8 views with any strides (a W stride that is neither 1 nor 3, crop offsets, a batch
    stride that is not the image size) read the same pixels as their contiguous copies."""
    _native_or_skip(backend)
    big = _images(10, 30, 44, seed=6)
    x = {"every_other_column": big[:4, :, ::2], "crop": big[:5, 3:20, 5:30],
         "every_other_image": big[::2], "transposed": big.transpose(1, 2)[:3]}[view]
    cfg = _cfg("clip_aug", blur_p=0.7, flip_p=0.5)
    params = draw_params(x.shape[0], cfg, torch.Generator().manual_seed(8))
    got = augment_batch(x, cfg, params=params, backend=backend)
    assert torch.equal(got, augment_batch(x.contiguous(), cfg, params=params, backend=backend))
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert_close(got, want, what=f"{view} {backend}", atol=0.0, rtol=1e-5, floor=2e-5)


@pytest.mark.parametrize("hw", [(1, 5), (3, 2), (2, 7), (3, 3), (4, 9)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_thin_images_match_reference(backend, hw):
    _native_or_skip(backend)
    cfg = _cfg("clip_aug", blur_p=1.0, blur_sigma=(1.0, 5.0))
    x = _images(4, *hw, seed=2)
    params = draw_params(4, cfg, torch.Generator().manual_seed(3))
    got = augment_batch(x, cfg, params=params, backend=backend)
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert_close(got, want, what=f"{hw} {backend}", atol=0.0, rtol=1e-5, floor=2e-5)


@pytest.mark.parametrize("preset", ["clip", "clip_aug"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_augment_in_parts_equals_whole_batch(backend, preset):
    _native_or_skip(backend)
    cfg = _cfg(preset)
    x = _images(11, 20, 20, seed=4)
    params = draw_params(11, cfg, torch.Generator().manual_seed(2))
    whole = augment_batch(x, cfg, params=params, backend=backend)
    parts = torch.full_like(whole, float("nan"))
    for lo, hi in ((0, 4), (4, 5), (5, 11)):
        got = augment_batch(x[lo:hi], cfg, params=slice_params(params, lo, hi), out=parts[lo:hi],
                            backend=backend)
        assert got.data_ptr() == parts[lo:hi].data_ptr()
    assert torch.equal(parts, whole)
    # a channels-first batch seen as [B, H, W, 3] (what the DALI CPU path hands over) is the same
    chw = x.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(augment_batch(chw.permute(0, 2, 3, 1), cfg, params=params, backend=backend), whole)


# ----------------------------------------------------------------------------------------------
# Blur
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(31, 40), (97, 100)])  # the batched and the per-image paths
def test_blur_matches_grouped_convolution(hw):
    x = torch.rand(6, 3, *hw, dtype=torch.float64) * 255
    sigma = torch.tensor([0.0, 0.1, 0.7, 1.5, 2.0, 0.0], dtype=torch.float64)
    got, want = gaussian_blur(x, sigma), gaussian_blur_reference(x, sigma)
    assert_close(got, want, what="blur", atol=0.0, rtol=1e-12, floor=1e-9)
    assert torch.equal(got[0], x[0]) and torch.equal(got[5], x[5])  # sigma 0: untouched
    assert got[4].std() < x[4].std()
    y = x.clone()
    assert gaussian_blur(y, sigma, inplace=True) is y and torch.equal(y, got)


def test_blur_taps_are_the_gaussian():
    sigma = torch.tensor([0.0, 0.5, 1.5])
    radius, k = blur_taps(sigma, 64, 64)
    assert radius == 5 and k.shape == (3, 11)
    pos = torch.arange(-5, 6, dtype=torch.float64)
    assert torch.equal(k[0], (pos == 0).double())  # sigma 0: identity
    for i, own in ((1, 2), (2, 5)):  # each sample's own window: 2*ceil(3*sigma)+1 taps
        g = torch.exp(-pos ** 2 / (2 * float(sigma[i]) ** 2)) * (pos.abs() <= own)
        assert torch.allclose(k[i], g / g.sum(), atol=1e-15)
        assert torch.allclose(k[i], k[i].flip(0), atol=0)
        assert (k[i][pos.abs() > own] == 0).all() and (k[i][pos.abs() <= own] > 0).all()
    assert blur_taps(torch.zeros(2), 8, 8) == (0, None)
    assert blur_taps(torch.tensor([5.0]), 9, 9)[0] == 4  # capped below the image size
    radius, k = blur_taps(torch.tensor([1.0]), 2, 2)  # no room for a window: the identity
    assert radius == 0 and k.tolist() == [[1.0]]


# ----------------------------------------------------------------------------------------------
# Knobs and draws
# ----------------------------------------------------------------------------------------------
def test_each_knob_does_what_it_says():
    x = _images(16, 12, 12)
    plain = augment_batch(x, AugmentOpConfig())
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, (x.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    flipped = augment_batch(x, AugmentOpConfig(flip_p=1.0))
    torch.testing.assert_close(flipped, plain.flip(-1))
    gray = augment_batch(x, AugmentOpConfig(grayscale_p=1.0)) * std + mean
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[:, 1], gray[:, 2], atol=1e-5, rtol=0)
    jit = augment_batch(x, AugmentOpConfig(jitter_p=1.0), torch.Generator().manual_seed(0))
    unit = jit * std + mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5  # clamped to the valid range
    assert not torch.allclose(jit, plain)


def test_deterministic_under_a_seed():
    cfg = _cfg("clip_aug")
    x = _images(8, 32, 32)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_draws_layout_and_identity_when_off():
    cfg = _cfg("clip_aug", jitter_p=0.5, blur_p=0.5)
    p = draw_params(200, cfg, torch.Generator().manual_seed(0))
    assert set(p) == {"jitter", "gray", "sigma", "flip"}
    j = p["jitter"]
    for key in ("brightness", "contrast", "saturation", "hue"):
        assert j[key].shape == (200,) and j[key].dtype == torch.float64
    off = ~j["on"]
    assert 0 < int(off.sum()) < 200
    assert (j["brightness"][off] == 1).all() and (j["hue"][off] == 0).all()
    assert (j["brightness"] >= 0.6).all() and (j["brightness"] <= 1.4).all()
    assert (j["hue"].abs() <= 0.1).all()
    s = p["sigma"]
    assert ((s == 0) | ((s >= 0.1) & (s <= 2.0))).all() and (s == 0).any() and (s > 0).any()
    nothing = draw_params(4, AugmentOpConfig(), torch.Generator())
    assert nothing == {"jitter": None, "gray": None, "sigma": None, "flip": None}
    assert not AugmentOpConfig().has_color and cfg.has_color
    part = slice_params(p, 10, 13)
    assert torch.equal(part["sigma"], s[10:13]) and torch.equal(part["jitter"]["hue"], j["hue"][10:13])


@pytest.mark.parametrize("knobs,match", [
    (dict(flip_p=1.5), "flip_p must be a probability"),
    (dict(jitter_p=-0.1), "jitter_p must be a probability"),
    (dict(brightness=-0.2), "brightness must be >= 0"),
    (dict(hue=0.6), r"hue must be in \[0, 0.5\]"),
    (dict(blur_sigma=(0.0, 1.0)), "blur_sigma must satisfy"),
    (dict(blur_sigma=(2.0, 1.0)), "blur_sigma must satisfy"),
    (dict(mean=(0.5, 0.5)), r"mean must be 3 numbers"),
    (dict(std=(0.2, 0.0, 0.2)), "std must be > 0"),
])
def test_config_rejects_bad_knobs(knobs, match):
    with pytest.raises(ValueError, match=match):
        AugmentOpConfig(**knobs)


# ----------------------------------------------------------------------------------------------
# Backend choice and bad input
# ----------------------------------------------------------------------------------------------
def test_empty_images_and_float64_output():
    cfg = AugmentOpConfig()
    with pytest.raises(ValueError, match="at least 1x1"):
        augment_batch(torch.zeros(2, 0, 5, 3, dtype=torch.uint8), cfg)
    x = _images(2, 8, 8)
    y = augment_batch(x, cfg, dtype=torch.float64)  # the torch backend takes float64 output
    assert y.dtype == torch.float64
    assert_close(y, augment_batch(x, cfg).double(), what="float64", atol=0.0, rtol=1e-6, floor=1e-6)
    with pytest.raises(dispatch.BackendError, match="native.*float64"):
        augment_batch(x, cfg, dtype=torch.float64, backend="native")


def test_augment_backend_choice_is_explained(monkeypatch):
    x = _images(2, 8, 8)
    cfg = AugmentOpConfig()
    with pytest.raises(ValueError, match="'cuda' is not a backend of augment"):
        augment_batch(x, cfg, backend="cuda")
    monkeypatch.setenv("FASTCLIP_AUGMENT_BACKEND", "torch")
    assert torch.equal(augment_batch(x, cfg), augment_batch(x, cfg, backend="torch"))
    if torch.cuda.is_available():
        with pytest.raises(dispatch.BackendError, match="runs on cpu"):
            augment_batch(x.cuda(), cfg, backend="native")


def test_augment_out_is_checked():
    cfg = AugmentOpConfig()
    x = _images(2, 8, 8)
    for bad in (torch.empty(2, 3, 8, 9), torch.empty(2, 3, 8, 8, dtype=torch.float16),
                torch.empty(2, 8, 8, 3).permute(0, 3, 1, 2)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            augment_batch(x, cfg, out=bad)


def test_bad_images_config_and_params_are_named():
    cfg = _cfg("clip_aug")
    x = _images(3, 8, 8)
    with pytest.raises(ValueError, match=r"images must be uint8 \[B, H, W, 3\], got torch.float32"):
        augment_batch(torch.zeros(2, 3, 8, 8), cfg)
    with pytest.raises(ValueError, match=r"images must be uint8 \[B, H, W, 3\]"):
        augment_batch(torch.zeros(2, 8, 8, 4, dtype=torch.uint8), cfg)
    with pytest.raises(TypeError, match="images must be a uint8 tensor"):
        augment_batch(x.numpy(), cfg)
    with pytest.raises(TypeError, match="cfg must be an AugmentOpConfig"):
        augment_batch(x, {"flip_p": 0.5})
    with pytest.raises(TypeError, match="cfg must be an AugmentOpConfig"):
        draw_params(3, "clip_aug", torch.Generator())
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        draw_params(-1, cfg, torch.Generator())
    params = draw_params(3, cfg, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"params sigma must be a tensor of shape \(3,\).*got \(2,\)"):
        augment_batch(x, cfg, params=dict(params, sigma=torch.zeros(2, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"params jitter\['hue'\] must be a tensor of shape \(3,\)"):
        augment_batch(x, cfg, params=dict(params, jitter=dict(params["jitter"], hue=None)))
    with pytest.raises(ValueError, match="params must be a dict with keys"):
        augment_batch(x, cfg, params={"sigma": None})
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[B, C, H, W\]"):
        gaussian_blur(torch.zeros(2, 3, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\)"):
        gaussian_blur(torch.zeros(2, 3, 8, 8), torch.zeros(3))
