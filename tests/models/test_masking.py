"""FLIP patch masking wired into the ViT: before the blocks, identity in eval / at 0, seeded, settable."""
import pytest
import torch

import fastclip
from fastclip.models import create_model
from fastclip.ops.patch_mask import num_kept


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # 64 px / 16 = 4 x 4 = 16 patches + the class token
    return create_model("ViT-S-16", image_size=64, vision_layers=2, text_layers=1, mask_ratio=0.5)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tokens_in_blocks(model, images, **kwargs):
    """Tokens per sample each image-tower block sees."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for b in model.visual.transformer.resblocks]
    try:
        model.encode_image(images, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("ratio, tokens", [(0.0, 17), (0.25, 13), (0.5, 9), (0.75, 5), (0.9, 3)])
def test_blocks_see_fewer_tokens(model, images, ratio, tokens):
    model.train().set_mask_ratio(ratio)
    assert tokens == 1 + (num_kept(16, ratio) if ratio else 16)
    assert tokens_in_blocks(model, images) == [tokens, tokens]
    assert model.visual.tokens_seen() == tokens
    model.set_mask_ratio(0.5)


def test_identity_in_eval_mode(model, images):
    model.set_mask_ratio(0.75)
    model.eval()
    masked_eval = model.encode_image(images)
    assert tokens_in_blocks(model, images) == [17, 17]
    model.set_mask_ratio(0.0)
    assert torch.equal(model.encode_image(images), masked_eval)
    model.train()
    # At ratio 0 the train-mode forward is the eval forward (a ViT has no dropout).
    assert torch.equal(model.encode_image(images), masked_eval)
    model.set_mask_ratio(0.5)


def test_deterministic_under_a_seed(model, images):
    model.train().set_mask_ratio(0.5)
    torch.manual_seed(7)
    a = model.encode_image(images)
    torch.manual_seed(7)
    b = model.encode_image(images)
    assert torch.equal(a, b)
    c = model.encode_image(images, mask_generator=torch.Generator().manual_seed(3))
    d = model.encode_image(images, mask_generator=torch.Generator().manual_seed(3))
    e = model.encode_image(images, mask_generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, d) and not torch.equal(c, e)
    f = model(images, mask_generator=torch.Generator().manual_seed(3))["image_features"]
    assert torch.allclose(f, torch.nn.functional.normalize(c, dim=-1))


def test_masked_forward_is_the_forward_on_the_kept_tokens(model, images):
    """Masking = running the unmasked pipeline on [class token, kept patches] (positions kept)."""
    model.train().set_mask_ratio(0.5)
    gen = torch.Generator().manual_seed(11)
    masked = model.encode_image(images, mask_generator=gen)
    v = model.visual
    ids = fastclip.ops.patch_mask(torch.zeros(4, 17, 1), 0.5, generator=torch.Generator().manual_seed(11))[1]
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(4, 1, -1), x], 1) + v.positional_embedding
    x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, ids[..., None].expand(-1, -1, x.shape[-1]))], 1)
    x = v.transformer(v.ln_pre(x))
    expected = v.ln_post(x[:, 0]) @ v.proj
    assert torch.allclose(masked, expected, atol=1e-5)


def test_set_mask_ratio_on_a_live_model(model, images):
    model.train()
    model.set_mask_ratio(0.75)
    assert model.mask_ratio == 0.75 and model.config.vision_cfg.mask_ratio == 0.75
    assert tokens_in_blocks(model, images) == [5, 5]
    model.set_mask_ratio(0)  # FLIP's unmasked tuning
    assert tokens_in_blocks(model, images) == [17, 17]
    model.set_mask_ratio(0.5)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.01, float("nan")])
def test_bad_ratio_names_the_argument(model, bad):
    with pytest.raises(ValueError, match="mask_ratio"):
        model.set_mask_ratio(bad)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("ViT-Ti-16", mask_ratio=bad, device="meta")
    assert model.mask_ratio == 0.5  # unchanged


@pytest.mark.parametrize("mode", ["grid", "block"])
def test_other_modes(mode, images):
    m = create_model("ViT-S-16", image_size=64, vision_layers=1, text_layers=1, mask_ratio=0.75, mask_mode=mode)
    assert tokens_in_blocks(m, images) == [5]
    out = m.encode_image(images)
    out.sum().backward()
    assert torch.isfinite(m.visual.conv1.weight.grad).all()


def test_resnet_has_no_patch_masking():
    m = create_model("RN50", image_size=32, vision_layers=(1, 1, 1, 1), text_layers=1, device="meta")
    assert m.mask_ratio == 0.0
    m.set_mask_ratio(0.0)
    with pytest.raises(ValueError, match="mask_ratio applies to ViT image towers only"):
        m.set_mask_ratio(0.5)


def test_gradient_reaches_only_kept_patches_positions(model, images):
    model.train().set_mask_ratio(0.75)
    model.zero_grad()
    model.encode_image(images[:1], mask_generator=torch.Generator().manual_seed(0)).sum().backward()
    g = model.visual.positional_embedding.grad
    touched = (g.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert touched[0] == 0 and len(touched) == 1 + num_kept(16, 0.75)
    model.zero_grad()
    model.set_mask_ratio(0.5)
