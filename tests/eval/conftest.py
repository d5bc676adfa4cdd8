"""Shared fixtures of the evaluation tests."""
import pytest
import torch

import fastclip


@pytest.fixture(scope="module")
def model():
    """A tiny random CLIP (one block per tower) in eval mode."""
    torch.manual_seed(0)
    return fastclip.create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, text_width=64,
                                 text_heads=2, embed_dim=32).eval()
