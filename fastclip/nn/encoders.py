"""Transformer towers of CLIP with open_clip's parameter layout: the ViT image tower (with FLIP patch
masking) and the causal text tower.

Parameter names and shapes are open_clip's (``VisionTransformer``, ``TextTransformer``,
``ResidualAttentionBlock`` over ``nn.MultiheadAttention``), so open_clip and OpenAI CLIP state dicts
load unchanged.  What differs is how they run:

* every attention is :class:`fastclip.nn.attention.MultiheadSelfAttention`, i.e.
  :func:`fastclip.ops.attention` (flash-attn / Triton / xformers / SDPA, picked per device);
  the text tower is causal by flag, with no mask tensor;
* the ViT drops patch tokens (:class:`fastclip.nn.patch_mask.PatchMasking`) right after the
  position embedding, before ``ln_pre`` and the blocks, so the blocks see ``1 + K`` tokens;
* pooling happens before the last LayerNorm (``ln_post`` on the class token only, ``ln_final`` on
  the end-of-text token only): LayerNorm is per token, so the result is the same as open_clip's and
  the other tokens' norms are never computed;
* the text tower skips the padding: causal attention and end-token pooling make every token after
  a row's end token irrelevant, so the columns after the batch's last end token are cut before the
  blocks (same features; a batch of 20-token captions costs about a quarter of 77 tokens).  It
  also accepts rows shorter than the context.  ``trim_padding = False`` turns the cut off; it is
  skipped under ``torch.compile`` (static shapes);
* gradient checkpointing is per block (``set_grad_checkpointing``), non-reentrant, and the whole
  forward compiles with ``torch.compile(fullgraph=True)``: the input checks that read tensor values
  (token ids in range) are skipped while compiling, shape checks are static.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops._checks import FLOATS
from ..ops.patch_mask import num_kept
from .attention import MultiheadSelfAttention
from .patch_mask import PatchMasking

__all__ = ["LayerNorm", "QuickGELU", "ResidualAttentionBlock", "Transformer", "VisionTransformer",
           "TextTransformer", "TextTower", "build_text_modules", "check_images", "check_tokens"]



class LayerNorm(nn.LayerNorm):
    """LayerNorm returning its input's dtype (open_clip's): under autocast the residual stream keeps
    the dtype it had instead of becoming fp32 after every norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's pretrained CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (open_clip's names)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, *, causal: bool = False,
                 quick_gelu: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads, causal=causal, backend=attn_backend)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual blocks over [B, L, width] (open_clip's ``Transformer``: ``resblocks``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, *, causal: bool = False,
                 quick_gelu: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, mlp_ratio, causal=causal, quick_gelu=quick_gelu,
                                   attn_backend=attn_backend)
            for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.resblocks:
            # Non-reentrant: works with torch.compile, and with inputs that do not require grad.
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        return x


# ----------------------------------------------------------------------------------------------
# Input checks (shape checks are static under torch.compile; value checks are skipped there)
# ----------------------------------------------------------------------------------------------
def check_images(images, image_size: int, channels: int = 3) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, {channels}, {image_size}, {image_size}], "
                        f"got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D [B, {channels}, {image_size}, {image_size}], got shape "
                         f"{tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channels (RGB, channels first: [B, {channels}, H, W]), "
                         f"got shape {tuple(images.shape)} with {images.shape[1]} channels")
    if images.shape[2] != image_size or images.shape[3] != image_size:
        raise ValueError(f"images must be {image_size} x {image_size} pixels (the model's image_size; pass "
                         f"image_size=... to create_model for another size), got "
                         f"{images.shape[2]} x {images.shape[3]} (shape {tuple(images.shape)})")
    if images.dtype not in FLOATS:
        raise TypeError(f"images must be a floating tensor (normalised pixels), got {images.dtype}")


def check_tokens(tokens, context_length: int, vocab_size: int) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids [B, {context_length}], got "
                        f"{type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D [B, L] with L <= context_length={context_length}, got shape "
                         f"{tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of token ids (e.g. from fastclip.get_tokenizer), "
                        f"got {tokens.dtype}")
    if tokens.shape[1] > context_length or tokens.shape[1] < 1:
        raise ValueError(f"tokens must have 1 to context_length={context_length} positions, got shape "
                         f"{tuple(tokens.shape)}")
    if not torch.compiler.is_compiling() and tokens.numel() and tokens.device.type != "meta":
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one device sync, not two
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"tokens must be ids in [0, vocab_size={vocab_size}), got {bad} "
                             f"(min {lo}, max {hi})")


# ----------------------------------------------------------------------------------------------
# Image tower
# ----------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT image tower: images [B, 3, S, S] -> features [B, output_dim].

    Parameters (open_clip's): conv1 (patch embedding, no bias), class_embedding [W],
    positional_embedding [1 + N, W], ln_pre, transformer.resblocks.*, ln_post, proj [W, output_dim].

    ``patch_mask`` (no parameters) drops ``mask_ratio`` of the N patch tokens while training.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, output_dim: int = 512, *, mask_ratio: float = 0.0,
                 mask_mode: str = "random", quick_gelu: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.output_dim = output_dim
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_patches + 1, width))
        self.patch_mask = PatchMasking(mask_ratio, mode=mask_mode, num_prefix_tokens=1, grid_size=self.grid_size)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu=quick_gelu,
                                       attn_backend=attn_backend)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    @property
    def mask_ratio(self) -> float:
        return self.patch_mask.mask_ratio

    @mask_ratio.setter
    def mask_ratio(self, value) -> None:
        self.patch_mask.mask_ratio = value  # validated by PatchMasking

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = bool(enable)

    def tokens_seen(self) -> int:
        """Tokens per sample in the blocks right now (class token + kept patches)."""
        n = self.grid_size[0] * self.grid_size[1]
        r = self.patch_mask.mask_ratio if self.training else 0.0
        return 1 + (num_kept(n, r) if r > 0 else n)

    def forward(self, images: torch.Tensor, *, mask_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        pooled = self.forward_features(images, mask_generator=mask_generator)
        return pooled @ self.proj.to(pooled.dtype)

    def forward_features(self, images: torch.Tensor, *,
                         mask_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The pooled class token before the projection, [B, width] (SLIP's head reads it)."""
        check_images(images, self.image_size)
        x = self.conv1(images)                                   # [B, W, gh, gw]
        x = x.flatten(2).transpose(1, 2)                         # [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.patch_mask(x, generator=mask_generator)         # [B, 1 + K, W] while training
        x = self.ln_pre(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0])


# ----------------------------------------------------------------------------------------------
# Text tower
# ----------------------------------------------------------------------------------------------
class TextTower:
    """The text forward, shared by :class:`TextTransformer` and the CLIP model, which (like open_clip's
    CLIP) holds ``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final`` and
    ``text_projection`` at its top level."""

    context_length: int
    vocab_size: int

    trim_padding: bool = True

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, self.context_length, self.vocab_size)
        tokens = tokens.long()
        # CLIP pools at the end-of-text token, the largest id in every row.  Under the causal mask
        # that output depends on the tokens up to it only, so the columns after the batch's last
        # end token (padding) are cut: same features, a fraction of the work for short captions.
        # The cut length depends on the values, so it is skipped while compiling (static shapes).
        pool = tokens.argmax(dim=-1)
        if self.trim_padding and tokens.numel() and not torch.compiler.is_compiling() \
                and tokens.device.type != "meta":
            tokens = tokens[:, :int(pool.max()) + 1]
        length = tokens.shape[1]
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool]
        x = self.ln_final(x)
        return x @ self.text_projection.to(x.dtype)

    def _init_text_parameters(self) -> None:
        # open_clip's TextTransformer.init_parameters (same distributions).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)


def build_text_modules(owner: nn.Module, context_length: int, vocab_size: int, width: int, heads: int,
                       layers: int, mlp_ratio: float, output_dim: int, quick_gelu: bool, attn_backend: str,
                       trim_padding: bool = True):
    """Give ``owner`` the text tower's modules under open_clip's top-level names (the CLIP model
    and :class:`TextTransformer` both hold them so)."""
    owner.trim_padding = bool(trim_padding)
    owner.context_length = context_length
    owner.vocab_size = vocab_size
    owner.token_embedding = nn.Embedding(vocab_size, width)
    owner.positional_embedding = nn.Parameter(torch.empty(context_length, width))
    owner.transformer = Transformer(width, layers, heads, mlp_ratio, causal=True, quick_gelu=quick_gelu,
                                    attn_backend=attn_backend)
    owner.ln_final = LayerNorm(width)
    owner.text_projection = nn.Parameter(torch.empty(width, output_dim))


class TextTransformer(TextTower, nn.Module):
    """Causal text tower on its own: tokens [B, L <= context_length] -> features [B, output_dim].

    Same parameter names as the text part of open_clip's CLIP (without a prefix).
    """

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                 layers: int = 12, mlp_ratio: float = 4.0, output_dim: int = 512, *, quick_gelu: bool = False,
                 attn_backend: str = "auto", trim_padding: bool = True):
        nn.Module.__init__(self)
        build_text_modules(self, context_length, vocab_size, width, heads, layers, mlp_ratio, output_dim,
                           quick_gelu, attn_backend, trim_padding)
        self._init_text_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = bool(enable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._encode_tokens(tokens)
