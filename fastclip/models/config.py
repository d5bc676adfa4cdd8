"""Named model configs as dataclasses, with open_clip's field names and values.

    cfg = CLIPConfig.from_name("ViT-S-16", image_size=64, mask_ratio=0.5)

Every built-in config has open_clip's widths, depths, heads, embedding dims, context length 77 and
vocabulary 49408 (``open_clip/model_configs/<name>.json``), except ViT-Ti-16, which open_clip does
not have: fastclip's follows the pattern of its ViT-S and ViT-M (text width = vision width, 64-wide
heads): width 192, 3 heads, 12 layers in both towers, embed dim 192.

``to_dict()`` / ``from_dict()`` use open_clip's JSON layout (``embed_dim``, ``vision_cfg``,
``text_cfg``, ``quick_gelu``), so an open_clip model config file can be read directly.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple, Union

from ..ops.patch_mask import MODES as MASK_MODES
from ..ops.patch_mask import check_mask_ratio

__all__ = ["VisionConfig", "TextConfig", "CLIPConfig", "list_models", "get_model_config", "register_model"]


def _pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass
class VisionConfig:
    """Image tower.  ``layers`` an int: ViT; a 4-tuple: CLIP's ModifiedResNet (RN50, RN101).

    Fields (open_clip's ``CLIPVisionCfg`` names): layers, width (ViT width; ResNet stem width),
    head_width (ViT heads = width // head_width; ResNet attention-pool heads = 32 * width //
    head_width), mlp_ratio, patch_size (ViT only), image_size (square, pixels).  fastclip's:
    mask_ratio (FLIP patch masking while training, in [0, 1); ViT only), mask_mode ("random",
    "grid" or "block", see :mod:`fastclip.ops.patch_mask`).
    """

    layers: Union[int, Tuple[int, int, int, int]] = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: Optional[int] = 16
    image_size: int = 224
    mask_ratio: float = 0.0
    mask_mode: str = "random"

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (tuple, list))

    @property
    def heads(self) -> int:
        return (32 * self.width if self.is_resnet else self.width) // self.head_width

    @property
    def grid_size(self) -> Tuple[int, int]:
        """ViT patch grid (gh, gw); ResNet: the final feature map (image_size // 32 per side)."""
        if self.is_resnet:
            return (self.image_size // 32, self.image_size // 32)
        return (self.image_size // self.patch_size, self.image_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def validate(self) -> "VisionConfig":
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.is_resnet:
            if len(self.layers) != 4:
                raise ValueError(f"vision layers must be an int (ViT) or 4 ints (ResNet), got {self.layers!r}")
            for i, n in enumerate(self.layers):
                _pos_int(f"vision layers[{i}]", n)
        else:
            _pos_int("vision layers", self.layers)
        _pos_int("vision width", self.width)
        _pos_int("vision head_width", self.head_width)
        _pos_int("image_size", self.image_size)
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"vision mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        self.mask_ratio = check_mask_ratio(self.mask_ratio, "mask_ratio")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.is_resnet:
            if self.image_size % 32:
                raise ValueError(f"image_size must be a multiple of 32 for a ResNet tower (its attention pool "
                                 f"works on the image_size / 32 feature map), got {self.image_size}")
            if self.width % 2:
                raise ValueError(f"vision width of a ResNet tower must be even (its stem has width / 2 "
                                 f"channels), got {self.width}")
            if (32 * self.width) % self.head_width:
                raise ValueError(f"ResNet feature width 32 * width = {32 * self.width} must be divisible by "
                                 f"head_width={self.head_width}")
            if self.mask_ratio > 0:
                raise ValueError(f"mask_ratio applies to ViT towers only (patch tokens); this is a ResNet "
                                 f"tower (layers={self.layers}), got mask_ratio={self.mask_ratio}")
        else:
            _pos_int("patch_size", self.patch_size)
            if self.width % self.head_width:
                raise ValueError(f"vision width must be divisible by head_width, got width={self.width} and "
                                 f"head_width={self.head_width}")
            if self.image_size < self.patch_size:
                raise ValueError(f"image_size must be >= patch_size, got image_size={self.image_size} and "
                                 f"patch_size={self.patch_size}")
        return self


@dataclass
class TextConfig:
    """Text tower (causal transformer, pooled at the end-of-text token = the largest id)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def validate(self) -> "TextConfig":
        for name in ("context_length", "vocab_size", "width", "heads", "layers"):
            _pos_int(name if name in ("context_length", "vocab_size") else f"text {name}", getattr(self, name))
        if self.width % self.heads:
            raise ValueError(f"text width must be divisible by text heads, got width={self.width} and "
                             f"heads={self.heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"text mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        return self


@dataclass
class CLIPConfig:
    """A CLIP model: both towers, the shared embedding dim and the logit scale's initial value.

    ``quick_gelu``: OpenAI's pretrained weights use QuickGELU (open_clip's ``-quickgelu`` names);
    the default is exact GELU like open_clip's plain names.  ``attn_backend``: passed to every
    attention layer (see :func:`fastclip.ops.attention`).  ``trim_text_padding``: the text tower
    skips the padding after the batch's last end token (same features, less work; see
    :mod:`fastclip.nn.encoders`).
    """

    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None
    attn_backend: str = "auto"
    trim_text_padding: bool = True
    name: Optional[str] = None

    def validate(self) -> "CLIPConfig":
        _pos_int("embed_dim", self.embed_dim)
        if isinstance(self.vision_cfg, dict):
            self.vision_cfg = VisionConfig(**self.vision_cfg)
        if isinstance(self.text_cfg, dict):
            self.text_cfg = TextConfig(**self.text_cfg)
        self.vision_cfg.validate()
        self.text_cfg.validate()
        return self

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "CLIPConfig":
        """The built-in config ``name`` (``-quickgelu`` suffix allowed) with ``overrides`` applied.

        Overrides: any top-level field (embed_dim, quick_gelu, init_logit_scale, init_logit_bias,
        attn_backend, trim_text_padding); the shortcuts image_size, patch_size, mask_ratio, mask_mode (vision) and
        context_length, vocab_size (text); ``vision_<field>`` / ``text_<field>`` for any tower
        field (vision_width, text_layers, ...); or ``vision_cfg={...}`` / ``text_cfg={...}``.
        """
        cfg = dataclasses.replace(get_model_config(name))
        cfg.vision_cfg = dataclasses.replace(cfg.vision_cfg)
        cfg.text_cfg = dataclasses.replace(cfg.text_cfg)
        cfg.apply_overrides(**overrides)
        return cfg

    def apply_overrides(self, **overrides) -> "CLIPConfig":
        vis_fields = {f.name for f in fields(VisionConfig)}
        txt_fields = {f.name for f in fields(TextConfig)}
        top_fields = {f.name for f in fields(CLIPConfig)} - {"vision_cfg", "text_cfg"}
        vision_shortcuts = {"image_size", "patch_size", "mask_ratio", "mask_mode"}
        text_shortcuts = {"context_length", "vocab_size"}
        for key, value in overrides.items():
            if key in ("vision_cfg", "text_cfg"):
                if not isinstance(value, dict):
                    raise TypeError(f"{key} override must be a dict of field values, got {type(value).__name__}")
                target, allowed = (self.vision_cfg, vis_fields) if key == "vision_cfg" else (self.text_cfg, txt_fields)
                for k, v in value.items():
                    if k not in allowed:
                        raise TypeError(f"unknown {key} field {k!r}; fields: {sorted(allowed)}")
                    setattr(target, k, v)
            elif key in top_fields:
                setattr(self, key, value)
            elif key in vision_shortcuts:
                setattr(self.vision_cfg, key, value)
            elif key in text_shortcuts:
                setattr(self.text_cfg, key, value)
            elif key.startswith("vision_") and key[len("vision_"):] in vis_fields:
                setattr(self.vision_cfg, key[len("vision_"):], value)
            elif key.startswith("text_") and key[len("text_"):] in txt_fields:
                setattr(self.text_cfg, key[len("text_"):], value)
            else:
                valid = sorted(top_fields | vision_shortcuts | text_shortcuts | {"vision_cfg", "text_cfg"}
                               | {f"vision_{f}" for f in vis_fields} | {f"text_{f}" for f in txt_fields})
                raise TypeError(f"unknown model override {key!r}; valid overrides: {', '.join(valid)}")
        return self.validate()

    @classmethod
    def from_dict(cls, d: dict, name: Optional[str] = None) -> "CLIPConfig":
        """From open_clip's JSON layout (unknown open_clip fields that change nothing here are
        refused rather than silently ignored, except the ones listed in ``_IGNORED_OPEN_CLIP_KEYS``)."""
        d = dict(d)
        vision = {k: v for k, v in dict(d.pop("vision_cfg", {})).items() if k not in _IGNORED_OPEN_CLIP_KEYS}
        text = {k: v for k, v in dict(d.pop("text_cfg", {})).items() if k not in _IGNORED_OPEN_CLIP_KEYS}
        for k in list(d):
            if k in _IGNORED_OPEN_CLIP_KEYS:
                d.pop(k)
        try:
            cfg = cls(vision_cfg=VisionConfig(**vision), text_cfg=TextConfig(**text), name=name, **d)
        except TypeError as exc:
            raise TypeError(f"config has fields fastclip does not support: {exc}") from None
        return cfg.validate()

    def to_dict(self) -> dict:
        """open_clip's JSON layout (plus fastclip's mask fields inside vision_cfg)."""
        out = {"embed_dim": self.embed_dim, "vision_cfg": dataclasses.asdict(self.vision_cfg),
               "text_cfg": dataclasses.asdict(self.text_cfg)}
        if self.quick_gelu:
            out["quick_gelu"] = True
        # Top-level fields off their defaults round-trip through from_dict (open_clip's JSON files
        # carry init_logit_bias for SigLIP models; the others are fastclip's own).
        for f in dataclasses.fields(self):
            if f.name in ("init_logit_scale", "init_logit_bias", "attn_backend", "trim_text_padding") \
                    and getattr(self, f.name) != f.default:
                out[f.name] = getattr(self, f.name)
        if self.vision_cfg.is_resnet:
            out["vision_cfg"]["layers"] = list(self.vision_cfg.layers)
            out["vision_cfg"]["patch_size"] = None
        return out


# open_clip config keys that describe what fastclip always does (or only the tokenizer/loader).
_IGNORED_OPEN_CLIP_KEYS = {"custom_text", "timm_model_name", "hf_tokenizer_name", "tokenizer_kwargs"}


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------
def _vit(embed_dim, width, layers, patch, text_width, text_heads, text_layers=12, image_size=224):
    return CLIPConfig(embed_dim=embed_dim,
                      vision_cfg=VisionConfig(layers=layers, width=width, patch_size=patch, image_size=image_size),
                      text_cfg=TextConfig(width=text_width, heads=text_heads, layers=text_layers))


def _rn(embed_dim, layers):
    return CLIPConfig(embed_dim=embed_dim,
                      vision_cfg=VisionConfig(layers=tuple(layers), width=64, patch_size=None, image_size=224),
                      text_cfg=TextConfig(width=512, heads=8, layers=12))


_REGISTRY: dict = {
    "ViT-Ti-16": _vit(192, 192, 12, 16, 192, 3),
    "ViT-S-32": _vit(384, 384, 12, 32, 384, 6),
    "ViT-S-16": _vit(384, 384, 12, 16, 384, 6),
    "ViT-M-32": _vit(512, 512, 12, 32, 512, 8),
    "ViT-M-16": _vit(512, 512, 12, 16, 512, 8),
    "ViT-B-32": _vit(512, 768, 12, 32, 512, 8),
    "ViT-B-16": _vit(512, 768, 12, 16, 512, 8),
    "ViT-L-14": _vit(768, 1024, 24, 14, 768, 12),
    "ViT-L-16": _vit(768, 1024, 24, 16, 768, 12),
    "RN50": _rn(1024, (3, 4, 6, 3)),
    "RN101": _rn(512, (3, 4, 23, 3)),
}
_QUICKGELU = "-quickgelu"


def register_model(name: str, config: CLIPConfig, overwrite: bool = False) -> None:
    """Add a named config (e.g. from ``CLIPConfig.from_dict(json.load(f))``)."""
    if not isinstance(name, str) or not name or name.endswith(_QUICKGELU):
        raise ValueError(f"name must be a non-empty str not ending in {_QUICKGELU!r}, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
    if not isinstance(config, CLIPConfig):
        raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
    _REGISTRY[name] = dataclasses.replace(config, name=name).validate()


def list_models() -> list:
    """Names accepted by :func:`fastclip.create_model` (each also with a ``-quickgelu`` suffix)."""
    return sorted(_REGISTRY, key=lambda n: (n.startswith("RN"), n))


def get_model_config(name: str) -> CLIPConfig:
    """A fresh copy of the built-in config ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    base, quick = (name[:-len(_QUICKGELU)], True) if name.endswith(_QUICKGELU) else (name, False)
    if base not in _REGISTRY:
        close = difflib.get_close_matches(base, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} Known models: {', '.join(list_models())}")
    src = _REGISTRY[base]
    cfg = dataclasses.replace(src, vision_cfg=dataclasses.replace(src.vision_cfg),
                              text_cfg=dataclasses.replace(src.text_cfg), name=name)
    if quick:
        cfg.quick_gelu = True
    return cfg.validate()
