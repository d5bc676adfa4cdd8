"""Augmentation presets and crop geometry (the op, fastclip.ops.augment: tests/ops/test_augment.py)."""
import random

import numpy as np
import pytest
import torch

import fastclip.data.augment as data_augment
from fastclip.data.augment import AugmentConfig, augment_batch, crop_box, draw_params
from fastclip.ops import augment as op


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)


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
    with pytest.raises(ValueError, match="flip_p must be a probability"):  # the op's knobs are checked too
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="scale must satisfy"):
        AugmentConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="interpolation must be"):
        AugmentConfig(interpolation="nearest")


def test_a_preset_is_the_ops_config_and_the_op_is_reexported():
    """AugmentConfig extends the op's AugmentOpConfig: a preset goes to the op as it is, and draws
    and output depend on the op's knobs only (not on the crop geometry or the preset's name)."""
    reexported = ("augment_batch", "augment_batch_reference", "draw_params", "slice_params", "gaussian_blur",
                  "gaussian_blur_reference", "CLIP_MEAN", "CLIP_STD")
    for name in reexported:
        assert name in data_augment.__all__ and getattr(data_augment, name) is getattr(op, name), name
    cfg = AugmentConfig.from_name("clip_aug", 24, scale=(0.3, 1.0))
    assert isinstance(cfg, op.AugmentOpConfig)
    knobs = {f: getattr(cfg, f) for f in op.AugmentOpConfig.__dataclass_fields__}
    plain = op.AugmentOpConfig(**knobs)
    x = _images(6, 24, 24, seed=1)
    assert torch.equal(augment_batch(x, cfg, torch.Generator().manual_seed(3)),
                       op.augment_batch(x, plain, torch.Generator().manual_seed(3)))
    p = draw_params(6, cfg, torch.Generator().manual_seed(4))
    q = op.draw_params(6, plain, torch.Generator().manual_seed(4))
    assert torch.equal(p["sigma"], q["sigma"]) and torch.equal(p["jitter"]["hue"], q["jitter"]["hue"])


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
    assert (ev.image_size, ev.random_crop, ev.jitter_p, ev.flip_p) == (96, False, 0.0, 0.0)
    assert ev.mean == (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# Resize (torch's uint8 kernels) against Pillow, its reference; whole-pixel boxes; the PIL decoder
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
