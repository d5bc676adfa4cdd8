"""Shared fixtures of the model tests (test_clip.py, test_factory.py)."""
import pytest
import torch

import fastclip
from fastclip.models import create_model


@pytest.fixture(scope="module")
def tiny():
    """A small random ViT CLIP (2 blocks per tower, 32 px images) in training mode."""
    torch.manual_seed(0)
    return create_model("ViT-Ti-16", image_size=32, vision_layers=2, text_layers=2)


@pytest.fixture(scope="module")
def batch():
    """Three 32 px images and their tokenised captions (one empty)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = fastclip.get_tokenizer()(["a photo of a cat", "a dog", ""])
    return images, tokens
