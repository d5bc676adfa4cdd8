"""CLIP's ModifiedResNet image tower (RN50, RN101, ...) with open_clip's parameter layout.

Differences from a torchvision ResNet (CLIP's design): a three-convolution stem with an average
pool instead of a max pool; anti-aliased downsampling (an average pool before every strided
step instead of a strided convolution); and an attention pool instead of global average pooling:
the mean of the final feature map, as a query, attends over the map and itself (with a learned
position embedding), and the attention output projected to ``output_dim`` is the image feature.

The attention pool runs :func:`fastclip.ops.attention` with that single query (open_clip computes
all ``1 + HW`` queries and keeps the first): same result, a fraction of the work.

Gradient checkpointing is not applied to the convolution stages: re-running a block in training
mode would update BatchNorm's running statistics a second time.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.attention import attention
from .encoders import check_images

__all__ = ["Bottleneck", "AttentionPool2d", "ModifiedResNet"]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg-pool if strided) -> 1x1 (x4 channels), identity or pooled 1x1 shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.stride = stride
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Key names "-1", "0", "1" are CLIP's (so "downsample.0.weight" etc. load unchanged).
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """[B, C, H, W] -> [B, output_dim]: the map's mean attends over (mean, pixels) with ``num_heads``.

    Parameters (CLIP's): positional_embedding [1 + H*W, C], q_proj, k_proj, v_proj, c_proj.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None, *,
                 attn_backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}")
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)                                     # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)                # [B, 1 + HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        H, hd = self.num_heads, C // self.num_heads
        q = self.q_proj(x[:, :1]).view(B, 1, H, hd).transpose(1, 2)         # [B, H, 1, hd]
        k = self.k_proj(x).unflatten(-1, (H, hd)).transpose(1, 2)            # [B, H, 1 + HW, hd]
        v = self.v_proj(x).unflatten(-1, (H, hd)).transpose(1, 2)
        out = attention(q, k, v, backend=self.attn_backend)                  # [B, H, 1, hd]
        return self.c_proj(out.transpose(1, 2).reshape(B, C))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: images [B, 3, S, S] (S a multiple of 32) -> [B, output_dim]."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, image_size: int = 224, width: int = 64,
                 *, attn_backend: str = "auto"):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 for ModifiedResNet, got {image_size}")
        self.output_dim = output_dim
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim, attn_backend=attn_backend)
        self.init_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        # CLIP's: attention-pool projections ~ N(0, 1/C), and the last BatchNorm of every residual
        # branch starts at zero (each block starts as the identity).
        std = self.attnpool.c_proj.in_features ** -0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Accepted for API symmetry; a no-op (see the module notes on BatchNorm)."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, images: torch.Tensor, *, mask_generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_images(images, self.image_size)
        x = self.stem(images)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)
