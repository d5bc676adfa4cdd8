"""The CLIP model: an image tower, a text tower and a learned temperature, open_clip-compatible.

    model = fastclip.create_model("ViT-S-16", image_size=64, mask_ratio=0.5)
    out = model(images, tokens)     # {"image_features", "text_features", "logit_scale"}
    loss = fastclip.ClipLoss()(**out)

State dict: exactly open_clip's ``CLIP`` (and so OpenAI CLIP's): ``visual.*``, the text tower at the
top level (``token_embedding``, ``positional_embedding``, ``transformer.*``, ``ln_final``,
``text_projection``) and ``logit_scale`` (a 0-d tensor, the log of the temperature), plus
``logit_bias`` when the config has ``init_logit_bias``.  An open_clip model's ``state_dict()``
loads with ``strict=True`` and gives the same features.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.encoders import TextTower, VisionTransformer, build_text_modules
from ..nn.resnet import ModifiedResNet
from ..ops.patch_mask import check_mask_ratio
from .config import CLIPConfig

__all__ = ["CLIP"]


class CLIP(TextTower, nn.Module):
    """CLIP with open_clip's interface and parameter layout.

    Args:
        config: a :class:`CLIPConfig` (see :func:`fastclip.create_model` to build one by name).

    Methods (open_clip's): ``encode_image(images, normalize=False)``, ``encode_text(tokens,
    normalize=False)``, ``forward(images, tokens)`` -> dict of L2-normalised ``image_features``
    [B, embed_dim], ``text_features`` [B, embed_dim] and ``logit_scale`` (exponentiated), plus
    ``logit_bias`` if the model has one; ``set_grad_checkpointing``, ``no_weight_decay``.
    fastclip's: ``set_mask_ratio(r)`` / ``mask_ratio`` (FLIP patch masking, training mode only).
    """

    def __init__(self, config: CLIPConfig):
        nn.Module.__init__(self)
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        v, t = config.vision_cfg, config.text_cfg
        if v.is_resnet:
            self.visual = ModifiedResNet(v.layers, config.embed_dim, v.heads, image_size=v.image_size,
                                         width=v.width, attn_backend=config.attn_backend)
        else:
            self.visual = VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio,
                                            config.embed_dim, mask_ratio=v.mask_ratio, mask_mode=v.mask_mode,
                                            quick_gelu=config.quick_gelu, attn_backend=config.attn_backend)
        build_text_modules(self, t.context_length, t.vocab_size, t.width, t.heads, t.layers, t.mlp_ratio,
                           config.embed_dim, config.quick_gelu, config.attn_backend, config.trim_text_padding)
        self._init_text_parameters()
        self.logit_scale = nn.Parameter(torch.full((), float(config.init_logit_scale)))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((), float(config.init_logit_bias)))
        else:
            self.logit_bias = None
        self.output_dict = True  # open_clip's flag; fastclip always returns the dict

    # -- FLIP patch masking ------------------------------------------------------------------
    @property
    def mask_ratio(self) -> float:
        """Share of patch tokens dropped in training mode (0 for ResNet towers)."""
        return getattr(self.visual, "mask_ratio", 0.0)

    def set_mask_ratio(self, mask_ratio: float) -> "CLIP":
        """Change the patch-masking ratio of a live model (FLIP's unmasked tuning sets 0)."""
        r = check_mask_ratio(mask_ratio, "mask_ratio")
        if isinstance(self.visual, ModifiedResNet):
            if r > 0:
                raise ValueError(f"mask_ratio applies to ViT image towers only (patch tokens); this model's image "
                                 f"tower is a ResNet, got mask_ratio={mask_ratio!r}")
            return self
        self.visual.mask_ratio = r
        self.config.vision_cfg.mask_ratio = r
        return self

    # -- training helpers --------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> "CLIP":
        """Recompute every transformer block in the backward pass (activation memory per block)."""
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = bool(enable)
        return self

    def no_weight_decay(self) -> set:
        """Parameter names open_clip excludes from weight decay."""
        out = {"positional_embedding"}
        if isinstance(self.visual, VisionTransformer):
            out |= {"visual.positional_embedding", "visual.class_embedding"}
        return out

    # -- forward -----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False, *,
                     mask_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images [B, 3, S, S] (S = config image_size) -> [B, embed_dim]."""
        features = self.visual(images, mask_generator=mask_generator)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens [B, L] (L <= context_length; ids from fastclip.get_tokenizer) -> [B, embed_dim]."""
        features = self._encode_tokens(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None, *,
                mask_generator: Optional[torch.Generator] = None) -> dict:
        """Normalised features of whichever inputs are given (None for the other) and the
        exponentiated ``logit_scale``: the dict that ``fastclip.ClipLoss()(**out)`` and open_clip's
        trainer take.

        ``mask_generator``: a ``torch.Generator`` for the patch-masking draws (eager mode only:
        ``torch.compile`` cannot trace a generator object; seed the global RNG instead, which makes
        compiled runs deterministic too)."""
        out = {
            "image_features": None if images is None else self.encode_image(images, normalize=True,
                                                                              mask_generator=mask_generator),
            "text_features": None if tokens is None else self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, mask_ratio={self.mask_ratio}"
