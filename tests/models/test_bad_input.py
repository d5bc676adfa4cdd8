"""Bad input to the model: clear errors that name the argument, the expected and the actual."""
import pytest
import torch

import fastclip
from fastclip.models import create_model


@pytest.fixture(scope="module")
def vit():
    return create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1)


@pytest.fixture(scope="module")
def rn():
    return create_model("RN50", image_size=32, vision_layers=(1, 1, 1, 1), vision_width=16, text_layers=1)


@pytest.mark.parametrize("which", ["vit", "rn"])
@pytest.mark.parametrize("images, exc, match", [
    (torch.randn(2, 3, 64, 64), ValueError, r"images must be 32 x 32 pixels .*image_size=.*got 64 x 64"),
    (torch.randn(2, 3, 32, 48), ValueError, r"images must be 32 x 32 pixels .*got 32 x 48"),
    (torch.randn(2, 1, 32, 32), ValueError, r"images must have 3 channels .*got shape \(2, 1, 32, 32\) with 1"),
    (torch.randn(2, 32, 32, 3), ValueError, r"images must have 3 channels"),
    (torch.randn(3, 32, 32), ValueError, r"images must be 4-D \[B, 3, 32, 32\], got shape \(3, 32, 32\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, r"images must be a floating tensor"),
    ([[1.0]], TypeError, r"images must be a torch.Tensor"),
])
def test_bad_images(vit, rn, which, images, exc, match):
    model = vit if which == "vit" else rn
    with pytest.raises(exc, match=match):
        model.encode_image(images)
    with pytest.raises(exc, match=match):
        model(images, None)


@pytest.mark.parametrize("tokens, exc, match", [
    (torch.tensor([[49406, 49408, 49407]]), ValueError, r"tokens must be ids in \[0, vocab_size=49408\), got 49408"),
    (torch.tensor([[49406, -1, 49407]]), ValueError, r"tokens must be ids in \[0, vocab_size=49408\), got -1"),
    (torch.zeros(2, 78, dtype=torch.long), ValueError, r"tokens must have 1 to context_length=77 positions"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"tokens must have 1 to context_length=77"),
    (torch.zeros(77, dtype=torch.long), ValueError, r"tokens must be 2-D"),
    (torch.zeros(2, 77), TypeError, r"tokens must be an integer tensor"),
    (torch.zeros(2, 77, dtype=torch.bool), TypeError, r"tokens must be an integer tensor"),
    (["a cat"], TypeError, r"tokens must be a torch.Tensor"),
])
def test_bad_tokens(vit, tokens, exc, match):
    with pytest.raises(exc, match=match):
        vit.encode_text(tokens)
    with pytest.raises(exc, match=match):
        vit(None, tokens)


def test_int32_tokens_are_fine(vit):
    tokens = fastclip.get_tokenizer()(["a cat", "a dog"])
    assert torch.equal(vit.encode_text(tokens.int()), vit.encode_text(tokens))


def test_vocab_override_checks_range():
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab_size=100\), got 49407"):
        model.encode_text(fastclip.get_tokenizer()(["a cat"]))


@pytest.mark.parametrize("ratio, exc", [(1.0, ValueError), (-0.5, ValueError), (2, ValueError),
                                        (float("inf"), ValueError), ("0.5", TypeError), (None, TypeError)])
def test_bad_mask_ratio(vit, ratio, exc):
    with pytest.raises(exc, match="mask_ratio"):
        vit.set_mask_ratio(ratio)
    with pytest.raises(exc, match="mask_ratio"):
        create_model("ViT-Ti-16", mask_ratio=ratio, device="meta")
    with pytest.raises(exc, match="mask_ratio"):
        fastclip.flops.model_flops("ViT-Ti-16", mask_ratio=ratio)


def test_bad_name_and_overrides():
    with pytest.raises(ValueError, match="unknown model name 'ViT-Q-32'"):
        create_model("ViT-Q-32")
    with pytest.raises(TypeError, match="unknown model override 'image_sise'"):
        create_model("ViT-Ti-16", image_sise=64)
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        create_model("RN50", image_size=100)
