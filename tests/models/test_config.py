"""fastclip.models.config: named configs, open_clip's values, overrides, the JSON layout, errors."""
import dataclasses
import json
import math
import os

import pytest

import fastclip
from fastclip.models import (
    CLIPConfig,
    TextConfig,
    VisionConfig,
    get_model_config,
    list_models,
    register_model,
)
from tests.models.open_clip_ref import open_clip_model_module

REQUIRED = ["ViT-Ti-16", "ViT-S-32", "ViT-S-16", "ViT-M-32", "ViT-M-16", "ViT-B-32", "ViT-B-16", "ViT-L-14",
            "ViT-L-16", "RN50", "RN101"]

# name: (embed_dim, vision width, vision layers, patch, vision heads, text width, text heads, text layers)
# (open_clip's model_configs/*.json; vision heads = width // 64, ResNet: 32 * width // 64.)
EXPECTED = {
    "ViT-Ti-16": (192, 192, 12, 16, 3, 192, 3, 12),
    "ViT-S-32": (384, 384, 12, 32, 6, 384, 6, 12),
    "ViT-S-16": (384, 384, 12, 16, 6, 384, 6, 12),
    "ViT-M-32": (512, 512, 12, 32, 8, 512, 8, 12),
    "ViT-M-16": (512, 512, 12, 16, 8, 512, 8, 12),
    "ViT-B-32": (512, 768, 12, 32, 12, 512, 8, 12),
    "ViT-B-16": (512, 768, 12, 16, 12, 512, 8, 12),
    "ViT-L-14": (768, 1024, 24, 14, 16, 768, 12, 12),
    "ViT-L-16": (768, 1024, 24, 16, 16, 768, 12, 12),
    "RN50": (1024, 64, (3, 4, 6, 3), None, 32, 512, 8, 12),
    "RN101": (512, 64, (3, 4, 23, 3), None, 32, 512, 8, 12),
}


def test_list_models_has_the_required_names():
    names = list_models()
    assert set(REQUIRED) <= set(names)
    assert fastclip.list_models() == names


@pytest.mark.parametrize("name", REQUIRED)
def test_config_values(name):
    cfg = get_model_config(name)
    v, t = cfg.vision_cfg, cfg.text_cfg
    got = (cfg.embed_dim, v.width, v.layers, v.patch_size, v.heads, t.width, t.heads, t.layers)
    assert got == EXPECTED[name]
    assert (t.context_length, t.vocab_size, v.image_size, v.mlp_ratio, t.mlp_ratio) == (77, 49408, 224, 4.0, 4.0)
    assert cfg.name == name and not cfg.quick_gelu and math.isclose(cfg.init_logit_scale, math.log(1 / 0.07))
    assert v.mask_ratio == 0.0


@pytest.mark.skipif(open_clip_model_module()[0] is None, reason="open-clip-torch is not installed")
@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "ViT-Ti-16"])  # open_clip has no ViT-Ti-16
def test_config_matches_open_clip_json(name):
    mod = open_clip_model_module()[0]
    path = os.path.join(os.path.dirname(mod.__file__), "model_configs", f"{name}.json")
    with open(path) as f:
        theirs = json.load(f)
    ours = get_model_config(name).to_dict()
    assert ours["embed_dim"] == theirs["embed_dim"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in theirs[tower].items():
            assert ours[tower][key] == value, (tower, key)
    assert CLIPConfig.from_dict(theirs, name=name).to_dict() == ours


def test_quickgelu_suffix():
    cfg = get_model_config("ViT-B-32-quickgelu")
    assert cfg.quick_gelu and cfg.name == "ViT-B-32-quickgelu" and cfg.to_dict()["quick_gelu"] is True
    assert not get_model_config("ViT-B-32").quick_gelu


def test_image_size_is_one_argument():
    cfg = CLIPConfig.from_name("ViT-S-16", image_size=64)
    assert cfg.vision_cfg.image_size == 64 and cfg.vision_cfg.grid_size == (4, 4)
    assert get_model_config("ViT-S-16").vision_cfg.image_size == 224  # the registry is not mutated


def test_overrides():
    cfg = CLIPConfig.from_name("ViT-B-32", image_size=96, mask_ratio=0.5, mask_mode="grid", vision_layers=2,
                               text_width=256, text_heads=4, context_length=32, embed_dim=128,
                               text_cfg={"layers": 3}, quick_gelu=True, attn_backend="sdpa")
    v, t = cfg.vision_cfg, cfg.text_cfg
    assert (v.image_size, v.mask_ratio, v.mask_mode, v.layers) == (96, 0.5, "grid", 2)
    assert (t.width, t.heads, t.context_length, t.layers) == (256, 4, 32, 3)
    assert (cfg.embed_dim, cfg.quick_gelu, cfg.attn_backend) == (128, True, "sdpa")


def test_from_dict_round_trip():
    for name in REQUIRED:
        cfg = get_model_config(name)
        again = CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), name=name)
        assert again.to_dict() == cfg.to_dict()


def test_register_model():
    cfg = CLIPConfig(embed_dim=64, vision_cfg=VisionConfig(layers=2, width=64, patch_size=8, image_size=32),
                     text_cfg=TextConfig(width=64, heads=1, layers=2))
    register_model("test-tiny-vit", cfg, overwrite=True)
    assert "test-tiny-vit" in list_models()
    assert fastclip.create_model("test-tiny-vit").visual.grid_size == (4, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-tiny-vit", cfg)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"widht": 3}, TypeError, "unknown model override 'widht'"),
    ({"vision_cfg": {"nope": 1}}, TypeError, "unknown vision_cfg field 'nope'"),
    ({"mask_ratio": 1.0}, ValueError, "mask_ratio"),
    ({"mask_ratio": -0.1}, ValueError, "mask_ratio"),
    ({"mask_ratio": "0.5"}, TypeError, "mask_ratio"),
    ({"mask_mode": "zigzag"}, ValueError, "mask_mode"),
    ({"image_size": 0}, ValueError, "image_size"),
    ({"image_size": 8}, ValueError, "image_size must be >= patch_size"),
    ({"image_size": 64.0}, ValueError, "image_size"),
    ({"vision_width": 100}, ValueError, "divisible by head_width"),
    ({"text_heads": 7}, ValueError, "text width must be divisible"),
    ({"context_length": 0}, ValueError, "context_length"),
    ({"embed_dim": -1}, ValueError, "embed_dim"),
])
def test_bad_overrides(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CLIPConfig.from_name("ViT-S-16", **kwargs)


def test_resnet_rules():
    with pytest.raises(ValueError, match="multiple of 32"):
        CLIPConfig.from_name("RN50", image_size=48)
    with pytest.raises(ValueError, match="mask_ratio applies to ViT"):
        CLIPConfig.from_name("RN50", mask_ratio=0.5)
    assert CLIPConfig.from_name("RN50", image_size=64).vision_cfg.grid_size == (2, 2)


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="did you mean ViT-B-32"):
        get_model_config("ViT-B-23")
    with pytest.raises(TypeError, match="name must be a str"):
        get_model_config(None)


def test_round_trip_keeps_top_level_fields_off_their_defaults():
    cfg = get_model_config("ViT-Ti-16")
    cfg = dataclasses.replace(cfg, init_logit_bias=-10.0, init_logit_scale=2.3, attn_backend="sdpa",
                              trim_text_padding=False)
    again = CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), name="ViT-Ti-16")
    for name in ("init_logit_bias", "init_logit_scale", "attn_backend", "trim_text_padding"):
        assert getattr(again, name) == getattr(cfg, name), name
