"""fastclip.flops.model_flops: a hand count, torch's FLOP counter on the real models, masking."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastclip
from fastclip.flops import ModelFlops, model_flops, transformer_flops
from fastclip.models import CLIPConfig, create_model


def test_hand_count_vit_ti_16_at_32px():
    """ViT-Ti-16 at 32 px: W = 192, 12 layers, MLP 768, embed 192; 2 x 2 = 4 patches + class token."""
    W, H, E, layers = 192, 768, 192, 12
    # image tower, 5 tokens
    patch_embed = 2 * 4 * (3 * 16 * 16) * W                  # conv 16x16x3 -> W on 4 patches: 1,179,648
    per_block = (2 * 5 * W * 3 * W                            # q, k, v projections: 1,105,920
                 + 2 * 5 * 5 * W                              # Q K^T: 9,600
                 + 2 * 5 * 5 * W                              # P V: 9,600
                 + 2 * 5 * W * W                              # output projection: 368,640
                 + 2 * 5 * W * H + 2 * 5 * H * W)             # MLP: 2,949,120
    head = 2 * W * E                                          # class token @ proj: 73,728
    image = patch_embed + layers * per_block + head
    assert image == 54_567_936
    # text tower, 77 tokens
    text_block = 2 * 77 * W * 3 * W + 4 * 77 * 77 * W + 2 * 77 * W * W + 4 * 77 * W * H
    text = layers * text_block + 2 * W * E
    assert text == 872_211_456

    f = model_flops("ViT-Ti-16", image_size=32)
    assert isinstance(f, ModelFlops)
    assert f.image == pytest.approx(image / 1e9, rel=1e-12) and f.text == pytest.approx(text / 1e9, rel=1e-12)
    assert f.total == pytest.approx((image + text) / 1e9, rel=1e-12) and f.train == 3 * f.total
    assert (f.image_tokens, f.text_tokens, f.image_size, f.mask_ratio) == (5, 77, 32, 0.0)

    # mask 0.5 keeps 2 of the 4 patches: the blocks see 3 tokens, the patch embedding still runs on 4
    per_block3 = 2 * 3 * W * 3 * W + 4 * 3 * 3 * W + 2 * 3 * W * W + 4 * 3 * W * H
    masked = model_flops("ViT-Ti-16", mask_ratio=0.5, image_size=32)
    assert masked.image == pytest.approx((patch_embed + layers * per_block3 + head) / 1e9, rel=1e-12)
    assert masked.image_tokens == 3 and masked.text == f.text


def test_published_vit_b_32_macs():
    """open_clip's model profile lists ViT-B-32 at 4.41 image GMACs and 2.96 text GMACs."""
    f = model_flops("ViT-B-32")
    assert f.image / 2 == pytest.approx(4.41, abs=0.01)
    assert f.text / 2 == pytest.approx(2.96, rel=0.01)


def _counted(model, images=None, tokens=None):
    """torch's FLOP count of one tower's forward, per sample, in GFLOPs."""
    x = images if images is not None else tokens
    with FlopCounterMode(display=False) as fc:
        model.encode_image(x) if images is not None else model.encode_text(x)
    return fc.get_total_flops() / x.shape[0] / 1e9


@pytest.mark.parametrize("name, overrides, ratio", [
    ("ViT-Ti-16", dict(image_size=64), 0.0),
    ("ViT-Ti-16", dict(image_size=64), 0.5),
    ("ViT-S-16", dict(image_size=96, vision_layers=2), 0.75),
    ("ViT-L-14", dict(image_size=56, vision_layers=1), 0.3),
    ("RN50", dict(image_size=64), 0.0),
    ("RN101", dict(image_size=96, vision_width=16), 0.0),
])
def test_agrees_with_torch_flop_counter(name, overrides, ratio):
    """torch's FlopCounterMode on the real forward (reference attention, whose matmuls it counts)."""
    torch.manual_seed(0)
    model = create_model(name, attn_backend="reference", mask_ratio=ratio, text_layers=1, **overrides)
    size = model.config.vision_cfg.image_size
    counted = _counted(model, images=torch.randn(2, 3, size, size))
    assert model_flops(model.config, mask_ratio=ratio).image == pytest.approx(counted, rel=1e-9)


def test_text_agrees_with_torch_flop_counter():
    """Counted at the full context, as open_clip computes it (fastclip's padding cut switched off)."""
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=2, attn_backend="reference",
                         trim_text_padding=False)
    counted = _counted(model, tokens=fastclip.get_tokenizer()(["a cat", "a dog"]))
    assert model_flops(model.config).text == pytest.approx(counted, rel=1e-9)


def test_padding_cut_runs_fewer_flops_than_counted():
    """With the cut (the default) a batch of short captions runs the FLOPs of its longest row."""
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=2, attn_backend="reference")
    tokens = fastclip.get_tokenizer()(["a cat", "a photo of a dog"])  # longest: 7 tokens with sot/eot
    counted = _counted(model, tokens=tokens)
    assert counted == pytest.approx(fastclip.flops.text_flops(model.config.text_cfg, 192, tokens=7) / 1e9, rel=1e-9)
    assert counted < model_flops(model.config).text / 5


def test_masking_scales_the_blocks():
    full = model_flops("ViT-B-16")
    assert full.image_tokens == 197
    half, quarter = model_flops("ViT-B-16", mask_ratio=0.5), model_flops("ViT-B-16", mask_ratio=0.75)
    assert (half.image_tokens, quarter.image_tokens) == (99, 50)
    # the token count halves (quarters); the attention products fall faster (quadratic in tokens)
    assert 1.95 < full.image / half.image < 2.1 and 3.7 < full.image / quarter.image < 4.2


def test_image_size_argument_and_configs():
    assert model_flops("ViT-S-16", image_size=64).image_tokens == 17
    assert model_flops("ViT-S-16").image_size == 224
    cfg = CLIPConfig.from_name("ViT-S-16", image_size=64)
    assert model_flops(cfg) == model_flops("ViT-S-16", image_size=64)
    assert model_flops(cfg, image_size=96).image_tokens == 37 and cfg.vision_cfg.image_size == 64
    assert model_flops("RN50").image_tokens is None
    for name in fastclip.list_models():
        f = model_flops(name)
        assert f.image > 0 and f.text > 0 and f.as_dict()["total"] == f.total


def test_transformer_flops_formula():
    assert transformer_flops(64, 2, 10, 4.0) == 2 * (8 * 10 * 64 ** 2 + 4 * 10 ** 2 * 64 + 4 * 10 * 64 * 256)


def test_errors():
    with pytest.raises(ValueError, match="mask_ratio applies to ViT image towers only"):
        model_flops("RN50", mask_ratio=0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        model_flops("ViT-B-32", mask_ratio=1.0)
    with pytest.raises(ValueError, match="image_size"):
        model_flops("ViT-B-32", image_size=16)
    with pytest.raises(ValueError, match="multiple of 32"):
        model_flops("RN50", image_size=100)
    with pytest.raises(ValueError, match="unknown model name"):
        model_flops("ViT-Z-1")


def test_mfu_is_achieved_over_peak():
    from fastclip.flops import mfu
    assert mfu(1e12, 2.0, 1e12) == 0.5
    assert mfu(0, 1.0, 1e9) == 0.0
    assert mfu(3, 1, 2) == 1.5  # more than 1 when the peak was understated: reported, not clipped
    # a training step of ViT-B-16 counted with model_flops (GFLOPs per sample -> FLOPs per step)
    f = model_flops("ViT-B-16")
    batch, seconds, peak = 256, 0.5, 312e12
    assert mfu(f.train * 1e9 * batch, seconds, peak) == pytest.approx(f.train * batch / seconds * 1e9 / peak,
                                                                      rel=1e-12)


@pytest.mark.parametrize("args,match", [
    ((1e9, 0.0, 1e12), "seconds_per_step must be a positive finite number, got 0.0"),
    ((1e9, -1.0, 1e12), "seconds_per_step must be a positive finite number, got -1.0"),
    ((-1.0, 1.0, 1e12), "flops_per_step must be a non-negative finite number, got -1.0"),
    ((float("nan"), 1.0, 1e12), "flops_per_step must be a non-negative finite number, got nan"),
    ((1e9, 1.0, 0), "peak_flops_per_s must be a positive finite number, got 0"),
    ((1e9, 1.0, float("inf")), "peak_flops_per_s must be a positive finite number, got inf"),
    ((1e9, True, 1e12), "seconds_per_step must be a positive finite number, got True"),
    (("1e9", 1.0, 1e12), "flops_per_step must be a non-negative finite number, got '1e9'"),
])
def test_mfu_bad_arguments_name_the_argument(args, match):
    from fastclip.flops import mfu
    with pytest.raises(ValueError, match=match):
        mfu(*args)
