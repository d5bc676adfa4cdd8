"""Augmentation presets and the batched tensor operations (fused vs op-by-op reference)."""
import random

import numpy as np
import pytest
import torch

from fastclip.data.augment import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    augment_batch,
    augment_batch_reference,
    crop_box,
    draw_params,
    gaussian_blur,
    gaussian_blur_reference,
)
from fastclip.testing import assert_close

# (dtype, atol, rtol) of the fused path against the float64 reference, in normalised units (~[-2, 2]).
TOLERANCES = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-2), (torch.float16, 4e-3, 2e-3)]
SHAPES = [(1, 8, 8), (5, 17, 23), (9, 64, 64), (3, 224, 224)]  # (B, H, W): odd sizes, chunk tails


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)


# Every small shape in every dtype; the large shape once per preset (float32) is enough.
FUSED_CASES = [
    pytest.param(shape, *tol, id=f"{'x'.join(map(str, shape))}-{str(tol[0]).replace('torch.', '')}")
    for shape in SHAPES for tol in TOLERANCES if shape[1] < 224 or tol[0] == torch.float32
]


def _native_or_skip(backend):
    from fastclip import _native
    if backend == "native" and _native.reason("augment_cpu"):
        pytest.skip(f"native augment kernel unavailable: {_native.reason('augment_cpu')}")


@pytest.mark.parametrize("shape,dtype,atol,rtol", FUSED_CASES)
@pytest.mark.parametrize("preset", ["clip", "clip_aug", "jitter_only", "gray_only", "blur_wide"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_fused_matches_reference(backend, preset, shape, dtype, atol, rtol):
    _native_or_skip(backend)
    b, h, w = shape
    overrides = {"jitter_only": dict(jitter_p=1.0), "gray_only": dict(grayscale_p=1.0),
                 "blur_wide": dict(blur_p=1.0, blur_sigma=(0.1, 12.0), flip_p=0.5)}.get(preset, {})
    name = "clip" if preset in ("jitter_only", "gray_only", "blur_wide") else preset
    cfg = AugmentConfig.from_name(name, w, **overrides)
    x = _images(b, h, w)
    if preset == "blur_wide":  # a strided batch (channels-first memory seen as [B, H, W, 3])
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    params = draw_params(b, cfg, torch.Generator().manual_seed(7))
    got = augment_batch(x, cfg, dtype=dtype, params=params, backend=backend)
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert got.shape == (b, 3, h, w) and got.dtype == dtype and got.is_contiguous()
    # this table's atol is absolute (normalised units), not relative to max|want|: pass it as floor
    assert_close(got, want, what=f"{preset} {shape}", atol=0.0, rtol=rtol, floor=atol)


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


def test_each_knob_does_what_it_says():
    x = _images(16, 12, 12)
    plain = augment_batch(x, AugmentConfig(image_size=12))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, (x.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    flipped = augment_batch(x, AugmentConfig(image_size=12, flip_p=1.0))
    torch.testing.assert_close(flipped, plain.flip(-1))
    gray = augment_batch(x, AugmentConfig(image_size=12, grayscale_p=1.0)) * std + mean
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[:, 1], gray[:, 2], atol=1e-5, rtol=0)
    jit = augment_batch(x, AugmentConfig(image_size=12, jitter_p=1.0), torch.Generator().manual_seed(0))
    unit = jit * std + mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5  # clamped to the valid range
    assert not torch.allclose(jit, plain)


def test_deterministic_under_a_seed():
    cfg = AugmentConfig.from_name("clip_aug", 32)
    x = _images(8, 32, 32)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_presets_and_knobs():
    clip = AugmentConfig.from_name("clip", 64)
    assert clip.random_crop and clip.scale == (0.9, 1.0) and not clip.has_color
    evalc = AugmentConfig.from_name("clip_aug", 64, train=False)
    assert not evalc.random_crop and not evalc.has_color
    strong = AugmentConfig.from_name("clip_aug", 64, blur_p=0.0, scale=(0.2, 1.0))
    assert strong.scale == (0.2, 1.0) and strong.blur_p == 0
    assert strong.jitter_p == 0.8 and strong.flip_p == 0.5
    simclr = AugmentConfig.from_name("simclr", 48)
    assert simclr.extra_views == 2 and simclr.view.preset == "clip_aug" and simclr.view.image_size == 48
    with pytest.raises(ValueError, match="augment preset must be one of"):
        AugmentConfig.from_name("autoaugment")
    with pytest.raises(TypeError, match="unknown augmentation knob"):
        AugmentConfig.from_name("clip", blurr_p=0.5)
    with pytest.raises(ValueError, match="flip_p must be a probability"):
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="scale must satisfy"):
        AugmentConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"images must be uint8 \[B, H, W, 3\]"):
        augment_batch(torch.zeros(2, 3, 8, 8), clip)


@pytest.mark.parametrize("size", [(640, 480), (100, 300), (64, 64)])
def test_crop_box(size):
    w, h = size
    cfg = AugmentConfig.from_name("clip_aug", 32)
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = crop_box(w, h, cfg, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    left, top, right, bottom = crop_box(w, h, AugmentConfig.from_name("clip", 32, train=False), None)
    assert right - left == bottom - top == min(w, h)
    assert abs((left + right) / 2 - w / 2) < 1 and abs((top + bottom) / 2 - h / 2) < 1


def test_config_instance_honours_image_size_and_eval():
    cfg = AugmentConfig.from_name("clip_aug", 96, mean=(0.5, 0.5, 0.5))
    assert AugmentConfig.from_name(cfg) is cfg
    assert AugmentConfig.from_name(cfg, image_size=64).image_size == 64
    ev = AugmentConfig.from_name(cfg, train=False)
    assert (ev.image_size, ev.random_crop, ev.jitter_p, ev.flip_p, ev.mean) == (96, False, 0.0, 0.0, (0.5, 0.5, 0.5))


def test_blur_taps_are_the_gaussian():
    from fastclip.data.augment import blur_taps
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
# Resize (torch's uint8 kernels) against Pillow, its reference; batches in parts; out=
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,box,size", [
    ((256, 256), (0, 0, 256, 256), 224),    # downscale, whole image
    ((200, 150), (13, 7, 190, 140), 64),    # downscale a crop, non-square
    ((96, 120), (30, 40, 60, 62), 112),     # upscale a small crop
    ((48, 48), None, 48),                   # same size: a copy
])
def test_resize_crop_matches_pillow(interpolation, src, box, size):
    from PIL import Image

    from fastclip.data.augment import resize_crop
    w, h = src
    g = torch.Generator().manual_seed(3)
    # smooth content plus noise: both what photos look like and what exposes a wrong filter
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 3) % 256], -1)
    img = (base + torch.randint(-20, 21, (h, w, 3), generator=g)).clamp(0, 255).to(torch.uint8)
    out = torch.empty(3, size, size, dtype=torch.uint8)
    resize_crop(img, box, size, interpolation, out)
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    pil = Image.fromarray(img.numpy())
    want = (pil.crop(box) if box is not None else pil).resize((size, size), resample)  # crop, then resize
    want = torch.from_numpy(np.array(want)).permute(2, 0, 1)
    diff = (out.int() - want.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.2, f"max {diff.max()}, mean {diff.float().mean():.3f}"


def test_int_box_rounds_and_stays_inside():
    from fastclip.data.augment import int_box
    assert int_box((10.5, 3.49, 100.5, 60.0), 200, 100) == (10, 3, 100, 60)  # round half to even
    assert int_box((-3, -1, 500, 300), 200, 100) == (0, 0, 200, 100)
    assert int_box((50, 50, 50.2, 50.1), 200, 100) == (50, 50, 51, 51)  # at least one pixel
    assert int_box((199.7, 99.9, 200, 100), 200, 100) == (199, 99, 200, 100)


@pytest.mark.parametrize("preset", ["clip", "clip_aug"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_augment_in_parts_equals_whole_batch(backend, preset):
    from fastclip.data.augment import slice_params
    _native_or_skip(backend)
    cfg = AugmentConfig.from_name(preset, image_size=20)
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


def test_backends_agree_and_tiny_images_are_not_blurred():
    """native and torch give the same batch to float32 rounding; an image under 3 px has no room
    for a blur window (reflect padding needs a neighbour on each side) and comes out unblurred."""
    _native_or_skip("native")
    cfg = AugmentConfig.from_name("clip_aug", 64, blur_p=1.0)
    x = _images(12, 64, 64, seed=3)
    params = draw_params(12, cfg, torch.Generator().manual_seed(4))
    a = augment_batch(x, cfg, params=params, backend="native")
    b = augment_batch(x, cfg, params=params, backend="torch")
    assert_close(a, b, what="native vs torch", atol=0.0, rtol=1e-5, floor=1e-5)
    for h, w in ((1, 1), (2, 2), (1, 5), (3, 2)):
        t = _images(3, h, w)
        p = draw_params(3, cfg, torch.Generator().manual_seed(1))
        unblurred = augment_batch(t, cfg, params=dict(p, sigma=torch.zeros(3, dtype=torch.float64)))
        for backend in ("native", "torch"):
            got = augment_batch(t, cfg, params=p, backend=backend)
            assert_close(got, unblurred, what=f"{h}x{w} {backend}", atol=0.0, rtol=1e-6, floor=1e-6)


@pytest.mark.parametrize("view", ["every_other_column", "crop", "every_other_image", "transposed"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_strided_views(backend, view):
    """uint8 views with any strides (a W stride that is neither 1 nor 3, crop offsets, a batch
    stride that is not the image size) read the same pixels as their contiguous copies."""
    _native_or_skip(backend)
    big = _images(10, 30, 44, seed=6)
    x = {"every_other_column": big[:4, :, ::2], "crop": big[:5, 3:20, 5:30],
         "every_other_image": big[::2], "transposed": big.transpose(1, 2)[:3]}[view]
    cfg = AugmentConfig.from_name("clip_aug", 16, blur_p=0.7, flip_p=0.5)
    params = draw_params(x.shape[0], cfg, torch.Generator().manual_seed(8))
    got = augment_batch(x, cfg, params=params, backend=backend)
    assert torch.equal(got, augment_batch(x.contiguous(), cfg, params=params, backend=backend))
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert_close(got, want, what=f"{view} {backend}", atol=0.0, rtol=1e-5, floor=2e-5)


@pytest.mark.parametrize("hw", [(1, 5), (3, 2), (2, 7), (3, 3), (4, 9)])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_tiny_and_thin_images_match_reference(backend, hw):
    _native_or_skip(backend)
    cfg = AugmentConfig.from_name("clip_aug", 8, blur_p=1.0, blur_sigma=(1.0, 5.0))
    x = _images(4, *hw, seed=2)
    params = draw_params(4, cfg, torch.Generator().manual_seed(3))
    got = augment_batch(x, cfg, params=params, backend=backend)
    want = augment_batch_reference(x, cfg, params, dtype=torch.float64)
    assert_close(got, want, what=f"{hw} {backend}", atol=0.0, rtol=1e-5, floor=2e-5)


def test_empty_images_and_float64_output():
    from fastclip.ops.dispatch import BackendError
    cfg = AugmentConfig(image_size=8)
    with pytest.raises(ValueError, match="at least 1x1"):
        augment_batch(torch.zeros(2, 0, 5, 3, dtype=torch.uint8), cfg)
    x = _images(2, 8, 8)
    y = augment_batch(x, cfg, dtype=torch.float64)  # the torch backend takes float64 output
    assert y.dtype == torch.float64
    assert_close(y, augment_batch(x, cfg).double(), what="float64", atol=0.0, rtol=1e-6, floor=1e-6)
    with pytest.raises(BackendError, match="native.*float64"):
        augment_batch(x, cfg, dtype=torch.float64, backend="native")


def test_augment_backend_choice_is_explained(monkeypatch):
    from fastclip.ops.dispatch import BackendError
    x = _images(2, 8, 8)
    cfg = AugmentConfig(image_size=8)
    with pytest.raises(ValueError, match="'cuda' is not a backend of augment"):
        augment_batch(x, cfg, backend="cuda")
    monkeypatch.setenv("FASTCLIP_AUGMENT_BACKEND", "torch")
    assert torch.equal(augment_batch(x, cfg), augment_batch(x, cfg, backend="torch"))
    if torch.cuda.is_available():
        with pytest.raises(BackendError, match="runs on cpu"):
            augment_batch(x.cuda(), cfg, backend="native")


def test_augment_out_is_checked():
    cfg = AugmentConfig(image_size=8)
    x = _images(2, 8, 8)
    for bad in (torch.empty(2, 3, 8, 9), torch.empty(2, 3, 8, 8, dtype=torch.float16),
                torch.empty(2, 8, 8, 3).permute(0, 3, 1, 2)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            augment_batch(x, cfg, out=bad)


@pytest.mark.parametrize("size", [48, 112])  # Pillow's resize below 96 px, torch's from 96 px
@pytest.mark.parametrize("preset", ["clip", "clip_aug", "simclr"])
def test_pil_decoder_views_match_pillow(size, preset):
    """The fallback decoder: each view is the crop box of its seeded draw resized as Pillow does it
    (a crop rounded to whole pixels, then the resize, from 96 px on), within rounding."""
    import io

    from PIL import Image

    from fastclip.data.augment import int_box
    from fastclip.data.decode import decode_views
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(150, 200, 3, generator=g) * 60 + torch.linspace(0, 190, 200).view(1, 200, 1))
    buf = io.BytesIO()
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(buf, "PNG")  # lossless: no decoder differences
    cfg = AugmentConfig.from_name(preset, image_size=size)
    got = decode_views(buf.getvalue(), cfg, random.Random(9))
    cfgs = [cfg] + [cfg.view] * cfg.extra_views
    rng = random.Random(9)
    img = Image.open(buf)
    assert len(got) == len(cfgs)
    for view, c in zip(got, cfgs):
        box = crop_box(200, 150, c, rng)
        want = (img.crop(int_box(box, 200, 150)).resize((size, size), Image.Resampling.BICUBIC) if size >= 96
                else img.resize((size, size), Image.Resampling.BICUBIC, box=box))
        want = torch.from_numpy(np.array(want)).permute(2, 0, 1)
        assert view.shape == (3, size, size) and view.dtype == torch.uint8
        diff = (view.int() - want.int()).abs()
        assert diff.max() <= 2, f"{preset} {size}: max |diff| {diff.max()}"
