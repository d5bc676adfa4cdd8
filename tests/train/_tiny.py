"""Tiny models and data shared by the training tests."""
from __future__ import annotations

import torch

TINY = dict(patch_size=8, vision_layers=2, vision_width=32, vision_head_width=16, text_layers=2, text_width=32,
            text_heads=2, embed_dim=32)


def tiny_model_cfg(**extra) -> dict:
    """The ``model`` section of a training config for a ViT small enough for CPU tests."""
    return {"name": "ViT-Ti-16", "image_size": 32, "overrides": dict(TINY, **extra)}


def random_batch(n: int, size: int = 32, views: int = 0, seed: int = 0, vocab: int = 49408) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.zeros(n, 12, dtype=torch.long)
    tokens[:, 0] = vocab - 2
    tokens[:, 1:8] = torch.randint(1, vocab - 3, (n, 7), generator=g)
    tokens[:, 8] = vocab - 1  # end token = the largest id
    return {"images": images, "tokens": tokens,
            "views": [torch.randn(n, 3, size, size, generator=g) for _ in range(views)]}
