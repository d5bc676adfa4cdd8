"""fastclip models against open_clip's (where open-clip-torch is installed; skipped otherwise).

An open_clip model's state_dict() loads into the fastclip model of the same name with strict=True
(and back), and both give the same features and gradients in fp32.
"""
import functools

import pytest
import torch

import fastclip
from fastclip.models import create_model, list_models
from fastclip.testing import assert_close
from tests.models.open_clip_ref import open_clip_model, open_clip_model_module

_MOD, _WHY = open_clip_model_module()
pytestmark = pytest.mark.skipif(_MOD is None, reason=f"open_clip's model code unavailable: {_WHY}")

# Small image sizes, and 2 text layers where the text tower would dominate the run time: every
# layer type and every width/head layout is exercised, in seconds.
CASES = [
    ("ViT-Ti-16", dict(image_size=32)),
    ("ViT-Ti-16-quickgelu", dict(image_size=32, vision_layers=2, text_layers=2)),
    ("ViT-B-32", dict(image_size=64, text_layers=2)),
    ("ViT-L-14", dict(image_size=28, vision_layers=2, text_layers=2)),   # L's widths and heads, 2x2 patches
    ("RN50", dict(image_size=64, text_layers=2)),
    ("RN101", dict(image_size=32, text_layers=2)),
]


@functools.lru_cache(maxsize=None)
def _cached_pair(name, overrides):
    return _pair(name, dict(overrides))


def _pair(name, overrides, seed=0):
    torch.manual_seed(seed)
    ours = create_model(name, **overrides)
    torch.manual_seed(seed + 1)
    theirs = open_clip_model(ours.config)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, theirs


def _inputs(image_size, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    texts = ["a photo of a cat", "a diagram of a transformer block, with arrows & labels", ""][:n]
    return images, fastclip.get_tokenizer()(texts)


@pytest.mark.parametrize("name", list_models())
def test_state_dict_keys_and_shapes_equal_open_clips(name):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = open_clip_model(ours.config)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b, (sorted(set(a) ^ set(b))[:10], [(k, a[k], b[k]) for k in set(a) & set(b) if a[k] != b[k]][:5])


@pytest.mark.parametrize("name, overrides", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_same_features(name, overrides, mode):
    ours, theirs = _cached_pair(name, tuple(sorted(overrides.items())))
    ours.train(mode == "train"), theirs.train(mode == "train")
    images, tokens = _inputs(ours.config.vision_cfg.image_size)
    a, b = ours(images, tokens), theirs(images, tokens)
    for key in ("image_features", "text_features", "logit_scale"):
        assert_close(a[key], b[key], torch.float32, what=f"{name} {key}", atol=1e-4, rtol=1e-4)
    assert_close(ours.encode_image(images), theirs.encode_image(images), torch.float32, atol=1e-4, rtol=1e-4)
    assert_close(ours.encode_text(tokens), theirs.encode_text(tokens), torch.float32, atol=1e-4, rtol=1e-4)


# A 1000-token vocabulary keeps the dense embedding gradient small; ids are synthetic, with the
# end token (the largest id, where the text tower pools) at varied positions.
@pytest.mark.parametrize("name, overrides", [("ViT-Ti-16", dict(image_size=32, vision_layers=3, text_layers=3)),
                                             ("RN50", dict(image_size=32, vision_layers=(1, 1, 1, 1), vision_width=16,
                                                          text_layers=2))],
                         ids=["ViT-Ti-16", "RN50-1111"])
def test_same_gradients(name, overrides):
    ours, theirs = _pair(name, dict(overrides, vocab_size=1000))
    images, _ = _inputs(ours.config.vision_cfg.image_size)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 998, (3, 77), generator=g)
    for row, end in enumerate((5, 40, 76)):
        tokens[row, end] = 999
        tokens[row, end + 1:] = 0
    for model in (ours, theirs):
        out = model(images, tokens)
        fastclip.ClipLoss()(**out).backward()
    grads = dict(theirs.named_parameters())
    # Relative to the largest gradient: some are exactly zero in exact arithmetic (e.g. the key bias
    # of an attention, which shifts every score of a query equally) and are rounding noise here.
    floor = max(p.grad.abs().max().item() for p in theirs.parameters())
    for key, p in ours.named_parameters():
        assert_close(p.grad, grads[key].grad, torch.float32, what=f"{name} grad {key}", atol=1e-4, rtol=1e-3,
                     scale_floor=floor)


def test_fastclip_state_dict_loads_into_open_clip():
    torch.manual_seed(3)
    ours = create_model("ViT-Ti-16", image_size=32).eval()
    theirs = open_clip_model(ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images, tokens = _inputs(32)
    a, b = ours(images, tokens), theirs(images, tokens)
    assert_close(a["image_features"], b["image_features"], torch.float32, atol=1e-4, rtol=1e-4)
    assert_close(a["text_features"], b["text_features"], torch.float32, atol=1e-4, rtol=1e-4)


def test_same_initialisation_statistics():
    """fastclip initialises like open_clip (same distributions), so training recipes carry over."""
    torch.manual_seed(0)
    ours = create_model("ViT-B-32", image_size=64, vision_layers=4, text_layers=4)
    theirs = open_clip_model(ours.config)
    b = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        q = b[key]
        if p.numel() < 1000:
            continue
        assert abs(p.std().item() - q.std().item()) <= 0.05 * q.std().item() + 1e-6, key
        assert abs(p.mean().item() - q.mean().item()) <= 0.05 * q.std().item() + 1e-6, key
