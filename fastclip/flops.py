"""Forward FLOPs per sample of fastclip's CLIP models: the basis of every compute budget in fastclip.

    fastclip.flops.model_flops("ViT-B-16", mask_ratio=0.5)  # ModelFlops(image=..., text=..., total=...)

Conventions (stated once, used everywhere):

* FLOPs, not MACs: a multiply-add is 2 FLOPs; an (M x K) @ (K x N) product is 2 M K N.
* Counted: every matrix product and convolution the forward pass runs — patch embedding,
  q/k/v and output projections, the two attention products (Q K^T and P V, over all L x L
  pairs; a causal kernel may skip half of the text tower's, the count does not), MLPs, the final
  projections; for ResNet towers every convolution and the attention pool.  Not counted:
  LayerNorm/BatchNorm, softmax, activations, residual adds, pooling, embedding lookups (all
  O(tokens x width), under 1% of the total for these configs).
* Patch masking applied: a ViT's blocks see 1 + K tokens, K = ``fastclip.ops.patch_mask.num_kept``
  (N, mask_ratio); the patch embedding still runs on all N patches (masking happens after it).
* The text tower is counted at the full context length (77 tokens), a data-independent
  convention comparable with published counts; fastclip's text encoder skips the padding after
  the batch's last end token, so on short captions it runs fewer FLOPs than counted.
* Where fastclip's forward is leaner than a generic one, the count follows it: the class-token
  LayerNorm and projection only, the
  text projection on the end-of-text token only, the ResNet attention pool with its single query.
* A training step (forward + backward) costs about 3x the forward.
* Utilisation (:func:`mfu`) is achieved FLOP/s over a peak FLOP/s, in plain FLOPs and seconds.

``torch.utils.flop_counter.FlopCounterMode`` agrees with these counts on fastclip's models (a test
checks it); this module needs no model and no torch work, so budgets are computed instantly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from .models.config import CLIPConfig, TextConfig, VisionConfig
from .ops.patch_mask import check_mask_ratio, num_kept

__all__ = ["ModelFlops", "model_flops", "transformer_flops", "vit_flops", "text_flops", "resnet_flops", "mfu"]


@dataclass(frozen=True)
class ModelFlops:
    """Forward GFLOPs per sample (1 GFLOP = 1e9 FLOPs) of each tower."""

    image: float
    text: float
    name: Optional[str] = None
    image_size: Optional[int] = None
    mask_ratio: float = 0.0
    image_tokens: Optional[int] = None  # tokens per sample in the ViT blocks (None for ResNet)
    text_tokens: Optional[int] = None

    @property
    def total(self) -> float:
        return self.image + self.text

    @property
    def train(self) -> float:
        """GFLOPs of a training step per sample: forward + backward = 3x the forward (4x with
        gradient checkpointing, which runs the forward twice)."""
        return 3.0 * self.total

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total, "train": self.train}


def transformer_flops(width: int, layers: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """FLOPs of ``layers`` pre-norm blocks over ``tokens`` tokens (one sample).

    Per block: q/k/v 6 L W^2, output projection 2 L W^2, Q K^T and P V 4 L^2 W, MLP 4 L W H
    (H = int(W * mlp_ratio)).
    """
    hidden = int(width * mlp_ratio)
    per_block = 8 * tokens * width ** 2 + 4 * tokens ** 2 * width + 4 * tokens * width * hidden
    return float(layers * per_block)


def vit_flops(cfg: VisionConfig, embed_dim: int, mask_ratio: float = 0.0) -> tuple:
    """(FLOPs, tokens in the blocks) of a ViT image tower for one image of ``cfg.image_size``."""
    n = cfg.num_patches
    tokens = 1 + (num_kept(n, mask_ratio) if mask_ratio > 0 else n)
    patch_embed = 2 * n * (3 * cfg.patch_size ** 2) * cfg.width
    head = 2 * cfg.width * embed_dim
    return float(patch_embed + transformer_flops(cfg.width, cfg.layers, tokens, cfg.mlp_ratio) + head), tokens


def text_flops(cfg: TextConfig, embed_dim: int, tokens: Optional[int] = None) -> float:
    """FLOPs of the text tower for one caption of ``tokens`` positions (default: the context)."""
    length = cfg.context_length if tokens is None else tokens
    return float(transformer_flops(cfg.width, cfg.layers, length, cfg.mlp_ratio) + 2 * cfg.width * embed_dim)


def _conv(cin: int, cout: int, k: int, hw: int) -> int:
    return 2 * cin * cout * k * k * hw * hw


def resnet_flops(cfg: VisionConfig, embed_dim: int) -> float:
    """FLOPs of CLIP's ModifiedResNet for one image of ``cfg.image_size`` (a multiple of 32)."""
    w, s = cfg.width, cfg.image_size
    h = s // 2
    total = _conv(3, w // 2, 3, h) + _conv(w // 2, w // 2, 3, h) + _conv(w // 2, w, 3, h)
    h //= 2  # stem average pool
    inplanes = w
    for i, blocks in enumerate(cfg.layers):
        planes = w * 2 ** i
        for b in range(blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            out_h = h // stride
            total += _conv(inplanes, planes, 1, h) + _conv(planes, planes, 3, h) + _conv(planes, 4 * planes, 1, out_h)
            if stride > 1 or inplanes != 4 * planes:
                total += _conv(inplanes, 4 * planes, 1, out_h)
            inplanes, h = 4 * planes, out_h
    c, length = 32 * w, h * h + 1
    # Attention pool: q for the one (mean) query, k and v for all 1 + HW, two products, c_proj.
    total += 2 * c * c + 2 * (2 * length * c * c) + 2 * (2 * length * c) + 2 * c * embed_dim
    return float(total)


def model_flops(name: Union[str, CLIPConfig], mask_ratio: float = 0.0, image_size: Optional[int] = None) -> ModelFlops:
    """Forward GFLOPs per sample of the image and text towers of model ``name``.

    Args:
        name: a model name (as for :func:`fastclip.create_model`) or a :class:`CLIPConfig`.
        mask_ratio: FLIP patch-masking ratio in [0, 1) (ViT towers only; a ResNet refuses r > 0).
        image_size: pixels per side (default: the config's, 224 for the built-ins).

    Returns:
        :class:`ModelFlops` with ``image``, ``text`` and ``total`` in GFLOPs (1e9 FLOPs, not MACs).
    """
    if isinstance(name, CLIPConfig):
        cfg = dataclasses.replace(name, vision_cfg=dataclasses.replace(name.vision_cfg),
                                  text_cfg=dataclasses.replace(name.text_cfg))
    else:
        from .models.config import get_model_config
        cfg = get_model_config(name)
    r = check_mask_ratio(mask_ratio, "mask_ratio")
    if image_size is not None:
        cfg.vision_cfg.image_size = image_size
    cfg.vision_cfg.mask_ratio = 0.0  # the ratio that counts is the argument; validated below
    cfg.validate()
    v = cfg.vision_cfg
    if v.is_resnet:
        if r > 0:
            raise ValueError(f"mask_ratio applies to ViT image towers only; {cfg.name or 'this model'} has a "
                             f"ResNet image tower, got mask_ratio={mask_ratio!r}")
        image, image_tokens = resnet_flops(v, cfg.embed_dim), None
    else:
        image, image_tokens = vit_flops(v, cfg.embed_dim, r)
    text = text_flops(cfg.text_cfg, cfg.embed_dim)
    return ModelFlops(image=image / 1e9, text=text / 1e9, name=cfg.name, image_size=v.image_size, mask_ratio=r,
                      image_tokens=image_tokens, text_tokens=cfg.text_cfg.context_length)


def _real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, "
                         f"got {value!r}")
    return float(value)


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the fraction of ``peak_flops_per_s`` that a step of ``flops_per_step``
    FLOPs taking ``seconds_per_step`` seconds achieves, ``flops_per_step / seconds_per_step /
    peak_flops_per_s``.

    Plain FLOPs, not GFLOPs (:class:`ModelFlops` and the trainer's budget count GFLOPs: multiply by
    1e9).  Any matching totals work too (a window's FLOPs and seconds).  The peak is what the caller
    compares against: a datasheet peak, or the dense matmul rate measured by
    :func:`fastclip.machine.measure_matmul_rate` (its ``gflops`` x 1e9), against which 1.0 means "as
    fast as one large GEMM" and more than 1.0 is possible when the rate was understated.

        mfu(3 * model_flops("ViT-B-16").total * 1e9 * 256, 0.5, 312e12)   # one A100 bf16 step
    """
    flops = _real("flops_per_step", flops_per_step, positive=False)
    seconds = _real("seconds_per_step", seconds_per_step, positive=True)
    peak = _real("peak_flops_per_s", peak_flops_per_s, positive=True)
    return flops / seconds / peak
