"""fastclip.nn.encoders: ViT patch masking, the text tower's padding cut, input checks, blocks."""
import importlib
import shutil

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.models import create_model
from fastclip.nn.encoders import (
    LayerNorm,
    QuickGELU,
    TextTransformer,
    Transformer,
    VisionTransformer,
    check_images,
    check_tokens,
)
from fastclip.nn.resnet import ModifiedResNet
from fastclip.ops.patch_mask import num_kept, patch_mask
from fastclip.testing import assert_close


# ----------------------------------------------------------------------------------------------
# ViT image tower: FLIP patch masking before the blocks, identity in eval / at 0, seeded
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    # 64 px / 16 = 4 x 4 = 16 patches + the class token
    return VisionTransformer(64, 16, width=64, layers=2, heads=2, output_dim=32, mask_ratio=0.5)


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tokens_in_blocks(tower, images, **kwargs):
    """Tokens per sample each block of the tower sees."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for b in tower.transformer.resblocks]
    try:
        tower(images, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("ratio, tokens", [(0.0, 17), (0.25, 13), (0.5, 9), (0.75, 5), (0.9, 3)])
def test_blocks_see_fewer_tokens(vit, images, ratio, tokens):
    vit.train()
    vit.mask_ratio = ratio
    assert tokens == 1 + (num_kept(16, ratio) if ratio else 16)
    assert tokens_in_blocks(vit, images) == [tokens, tokens]
    assert vit.tokens_seen() == tokens
    vit.mask_ratio = 0.5


def test_identity_in_eval_mode(vit, images):
    vit.mask_ratio = 0.75
    vit.eval()
    masked_eval = vit(images)
    assert tokens_in_blocks(vit, images) == [17, 17]
    assert vit.tokens_seen() == 17
    vit.mask_ratio = 0.0
    assert torch.equal(vit(images), masked_eval)
    vit.train()
    # At ratio 0 the train-mode forward is the eval forward (a ViT has no dropout).
    assert torch.equal(vit(images), masked_eval)
    vit.mask_ratio = 0.5


def test_deterministic_under_a_seed(vit, images):
    vit.train()
    vit.mask_ratio = 0.5
    torch.manual_seed(7)
    a = vit(images)
    torch.manual_seed(7)
    b = vit(images)
    assert torch.equal(a, b)
    c = vit(images, mask_generator=torch.Generator().manual_seed(3))
    d = vit(images, mask_generator=torch.Generator().manual_seed(3))
    e = vit(images, mask_generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_masked_forward_is_the_forward_on_the_kept_tokens(vit, images):
    """Masking = running the unmasked pipeline on [class token, kept patches] (positions kept)."""
    vit.train()
    vit.mask_ratio = 0.5
    masked = vit(images, mask_generator=torch.Generator().manual_seed(11))
    ids = patch_mask(torch.zeros(4, 17, 1), 0.5, generator=torch.Generator().manual_seed(11))[1]
    x = vit.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.class_embedding.expand(4, 1, -1), x], 1) + vit.positional_embedding
    x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, ids[..., None].expand(-1, -1, x.shape[-1]))], 1)
    x = vit.transformer(vit.ln_pre(x))
    expected = vit.ln_post(x[:, 0]) @ vit.proj
    assert torch.allclose(masked, expected, atol=1e-5)
    assert torch.allclose(vit.forward_features(images, mask_generator=torch.Generator().manual_seed(11)) @ vit.proj,
                          masked, atol=1e-6)


@pytest.mark.parametrize("bad", [1.0, -0.01, "0.5"])
def test_bad_ratio_leaves_the_tower_unchanged(vit, bad):
    with pytest.raises((ValueError, TypeError), match="mask_ratio"):
        vit.mask_ratio = bad
    assert vit.mask_ratio == 0.5


@pytest.mark.parametrize("mode", ["grid", "block"])
def test_other_modes(mode, images):
    m = VisionTransformer(64, 16, width=64, layers=1, heads=2, output_dim=32, mask_ratio=0.75, mask_mode=mode)
    assert tokens_in_blocks(m, images) == [5]
    out = m(images)
    out.sum().backward()
    assert torch.isfinite(m.conv1.weight.grad).all()


def test_gradient_reaches_only_kept_patches_positions(vit, images):
    vit.train()
    vit.mask_ratio = 0.75
    vit.zero_grad()
    vit(images[:1], mask_generator=torch.Generator().manual_seed(0)).sum().backward()
    g = vit.positional_embedding.grad
    touched = (g.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert touched[0] == 0 and len(touched) == 1 + num_kept(16, 0.75)
    vit.zero_grad()
    vit.mask_ratio = 0.5


# Dynamo's own use of torch.jit.script_method warns on this torch; not fastclip's to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("g++") or shutil.which("cc")),
                    reason="torch.compile's inductor backend needs a C++ compiler on CPU, none found")
def test_compile_inductor_image_encoder():
    torch._dynamo.reset()
    torch.manual_seed(0)
    tower = VisionTransformer(32, 16, width=64, layers=2, heads=1, output_dim=32)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(tower, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(images), tower(images), torch.float32, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Text tower: causal, pooled at the end token, padding after the batch's last end token cut
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text():
    torch.manual_seed(0)
    return TextTransformer(width=64, heads=2, layers=2, output_dim=32)


@pytest.fixture(scope="module")
def captions():
    return fastclip.get_tokenizer()(["a photo of a cat", "a dog", ""])


def test_short_token_rows_equal_padded_rows(text, captions):
    """Causal attention + end-token pooling: trailing padding changes nothing, so rows may be cut."""
    full = text(captions)
    cut = text(captions[:, :8])
    assert_close(cut, full, torch.float32)


def test_padding_cut_gives_the_same_features(text, captions):
    """The text tower cuts the columns after the batch's last end token; switching it off changes
    nothing but the work done."""
    blocks_saw = []
    hook = text.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: blocks_saw.append(a[0].shape[1]))
    try:
        cut = text(captions)
        text.trim_padding = False
        full = text(captions)
    finally:
        text.trim_padding = True
        hook.remove()
    assert blocks_saw == [int(captions.argmax(-1).max()) + 1, 77]
    assert_close(cut, full, torch.float32)
    assert not TextTransformer(width=64, heads=2, layers=1, output_dim=32, trim_padding=False).trim_padding


def test_text_tower_has_the_clip_models_text_layout():
    """TextTransformer holds the text part of open_clip's CLIP under the same (top-level) names."""
    with torch.device("meta"):
        tower = TextTransformer(width=192, heads=3, layers=12, output_dim=192)
        model = create_model("ViT-Ti-16")
    text_part = {k: tuple(v.shape) for k, v in model.state_dict().items()
                 if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
    assert {k: tuple(v.shape) for k, v in tower.state_dict().items()} == text_part


# ----------------------------------------------------------------------------------------------
# Input checks: clear errors that name the argument, the expected and the actual
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vit():
    return VisionTransformer(32, 16, width=64, layers=1, heads=2, output_dim=32)


@pytest.fixture(scope="module")
def small_rn():
    return ModifiedResNet((1, 1, 1, 1), 32, heads=8, image_size=32, width=16)


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
def test_bad_images(small_vit, small_rn, which, images, exc, match):
    tower = small_vit if which == "vit" else small_rn
    with pytest.raises(exc, match=match):
        tower(images)
    with pytest.raises(exc, match=match):
        check_images(images, 32)


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
def test_bad_tokens(text, tokens, exc, match):
    with pytest.raises(exc, match=match):
        text(tokens)
    with pytest.raises(exc, match=match):
        check_tokens(tokens, 77, 49408)


def test_int32_tokens_are_fine(text):
    tokens = fastclip.get_tokenizer()(["a cat", "a dog"])
    assert torch.equal(text(tokens.int()), text(tokens))


def test_vocab_override_checks_range():
    tower = TextTransformer(vocab_size=100, width=64, heads=2, layers=1, output_dim=32)
    with pytest.raises(ValueError, match=r"vocab_size=100\), got 49407"):
        tower(fastclip.get_tokenizer()(["a cat"]))


# ----------------------------------------------------------------------------------------------
# Blocks: LayerNorm keeps the dtype, QuickGELU, per-block checkpointing
# ----------------------------------------------------------------------------------------------
def test_layer_norm_returns_its_inputs_dtype():
    """Under autocast the residual stream keeps its dtype instead of becoming fp32 after every norm."""
    ln = LayerNorm(16)
    x = torch.randn(3, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    assert y.dtype == torch.bfloat16
    assert_close(ln(x.float()), F.layer_norm(x.float(), (16,)), torch.float32)


def test_quick_gelu_is_openais_activation():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.equal(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_grad_checkpointing_is_off_without_grad(monkeypatch):
    encoders = importlib.import_module("fastclip.nn.encoders")
    calls = []
    orig = encoders.checkpoint
    monkeypatch.setattr(encoders, "checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    blocks = Transformer(64, 2, 2)
    x = torch.randn(2, 10, 64)
    want = blocks(x)
    blocks.grad_checkpointing = True
    with torch.no_grad():
        out = blocks(x)
    assert torch.equal(out, want)
    assert calls == [], "checkpoint ran under no_grad"
    assert torch.equal(blocks(x), want)  # with grad: every block goes through checkpoint
    assert len(calls) == len(blocks.resblocks)
