"""fastclip.models.clip: the CLIP model's interface, layout, mask ratio, training, open_clip equivalence.

The layout and parameter counts are checked without open_clip; the equivalence section (skipped
without open-clip-torch) loads an open_clip model's state_dict() into the fastclip model of the
same name with strict=True (and back) and compares features and gradients in fp32.
"""
import functools
import math

import pytest
import torch

import fastclip
from fastclip.models import create_model, list_models
from fastclip.testing import assert_close
from tests.models.open_clip_ref import open_clip_model, open_clip_model_module

_OC_MOD, _OC_WHY = open_clip_model_module()
needs_open_clip = pytest.mark.skipif(_OC_MOD is None, reason=f"open_clip's model code unavailable: {_OC_WHY}")
# Dynamo's own use of torch.jit.script_method warns on this torch; not fastclip's to fix.
dynamo_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# Parameter counts of open_clip's models (open-clip-torch 3.3.0; ViT-B-32, ViT-B-16, ViT-L-14, RN50
# and RN101 also equal OpenAI's released checkpoints).
PARAM_COUNTS = {
    "ViT-Ti-16": 20438209, "ViT-S-32": 63085825, "ViT-S-16": 62257537, "ViT-M-32": 103119873,
    "ViT-M-16": 102015489, "ViT-B-32": 151277313, "ViT-B-16": 149620737, "ViT-L-14": 427616513,
    "ViT-L-16": 427739393, "RN50": 102007137, "RN101": 119688033,
}


def _text_keys(width, layers, ctx, vocab, embed):
    keys = {"token_embedding.weight": (vocab, width), "positional_embedding": (ctx, width),
            "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, embed),
            "logit_scale": ()}
    keys.update(_block_keys("transformer", width, layers))
    return keys


def _block_keys(prefix, width, layers, mlp=4):
    out = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        out.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                    p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                    p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                    p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                    p + "mlp.c_fc.weight": (mlp * width, width), p + "mlp.c_fc.bias": (mlp * width,),
                    p + "mlp.c_proj.weight": (width, mlp * width), p + "mlp.c_proj.bias": (width,)})
    return out


def expected_vit_state(width, layers, patch, grid, embed, text_width, text_layers, ctx=77, vocab=49408):
    """open_clip's CLIP state-dict keys and shapes for a ViT tower (OpenAI CLIP's too)."""
    keys = {"visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
            "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
            "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
            "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)}
    keys.update(_block_keys("visual.transformer", width, layers))
    keys.update(_text_keys(text_width, text_layers, ctx, vocab, embed))
    return keys


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def expected_resnet_state(layers, width, image_size, embed, text_width=512, text_layers=12):
    """open_clip's ModifiedResNet keys (OpenAI CLIP's RN models)."""
    keys = {"visual.conv1.weight": (width // 2, 3, 3, 3), "visual.conv2.weight": (width // 2, width // 2, 3, 3),
            "visual.conv3.weight": (width, width // 2, 3, 3)}
    keys.update(_bn("visual.bn1", width // 2))
    keys.update(_bn("visual.bn2", width // 2))
    keys.update(_bn("visual.bn3", width))
    inplanes = width
    for s, blocks in enumerate(layers):
        planes = width * 2 ** s
        for b in range(blocks):
            p = f"visual.layer{s + 1}.{b}"
            keys.update({f"{p}.conv1.weight": (planes, inplanes, 1, 1), f"{p}.conv2.weight": (planes, planes, 3, 3),
                         f"{p}.conv3.weight": (4 * planes, planes, 1, 1)})
            keys.update(_bn(f"{p}.bn1", planes))
            keys.update(_bn(f"{p}.bn2", planes))
            keys.update(_bn(f"{p}.bn3", 4 * planes))
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", 4 * planes))
            inplanes = 4 * planes
    c = 32 * width
    keys["visual.attnpool.positional_embedding"] = ((image_size // 32) ** 2 + 1, c)
    for proj in ("q_proj", "k_proj", "v_proj"):
        keys[f"visual.attnpool.{proj}.weight"] = (c, c)
        keys[f"visual.attnpool.{proj}.bias"] = (c,)
    keys["visual.attnpool.c_proj.weight"] = (embed, c)
    keys["visual.attnpool.c_proj.bias"] = (embed,)
    keys.update(_text_keys(text_width, text_layers, 77, 49408, embed))
    return keys


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diff(got, want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(got) & set(want) if got[k] != want[k])
    return f"missing {missing[:5]}, unexpected {extra[:5]}, shape mismatch {[(k, got[k], want[k]) for k in shapes[:5]]}"


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14", "ViT-Ti-16"])
def test_vit_state_dict_layout(name):
    with torch.device("meta"):
        model = create_model(name)
    c, v, t = model.config, model.config.vision_cfg, model.config.text_cfg
    want = expected_vit_state(v.width, v.layers, v.patch_size, v.grid_size[0], c.embed_dim, t.width, t.layers)
    got = _shapes(model)
    assert got == want, _diff(got, want)


@pytest.mark.parametrize("name", ["RN50", "RN101"])
def test_resnet_state_dict_layout(name):
    with torch.device("meta"):
        model = create_model(name)
    c, v = model.config, model.config.vision_cfg
    want = expected_resnet_state(v.layers, v.width, v.image_size, c.embed_dim)
    got = _shapes(model)
    assert got == want, _diff(got, want)


def test_small_image_state_dict_layout():
    model = create_model("ViT-S-16", image_size=64, device="meta")
    assert _shapes(model)["visual.positional_embedding"] == (17, 384)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts(name):
    model = create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert all(p.is_meta for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Interface (fixtures tiny and batch: conftest.py)
# ----------------------------------------------------------------------------------------------
def test_forward_dict(tiny, batch):
    images, tokens = batch
    out = tiny(images, tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (3, 192)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-6)
    assert out["logit_scale"].requires_grad
    # fastclip's losses take the dict unchanged
    loss = fastclip.ClipLoss()(**out)
    loss.backward()
    assert tiny.logit_scale.grad is not None and tiny.visual.proj.grad is not None
    tiny.zero_grad()


def test_encode_matches_forward(tiny, batch):
    images, tokens = batch
    out = tiny(images, tokens)
    assert torch.allclose(tiny.encode_image(images, normalize=True), out["image_features"])
    assert torch.allclose(tiny.encode_text(tokens, normalize=True), out["text_features"])
    raw = tiny.encode_image(images)
    assert torch.allclose(raw / raw.norm(dim=-1, keepdim=True), out["image_features"], atol=1e-6)


def test_one_tower_at_a_time(tiny, batch):
    images, tokens = batch
    assert tiny(images=images)["text_features"] is None
    assert tiny(tokens=tokens)["image_features"] is None


def test_logit_bias_and_clip_loss_kwargs():
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, init_logit_bias=-10.0)
    out = model(torch.randn(2, 3, 32, 32), fastclip.get_tokenizer()(["a", "b"]))
    assert out["logit_bias"].item() == -10.0 and "logit_bias" in model.state_dict()
    fastclip.SigLipLoss()(**out).backward()


def test_no_weight_decay_names_exist(tiny):
    names = dict(tiny.named_parameters())
    assert tiny.no_weight_decay() <= set(names)


def test_bad_input_reaches_every_entry_point(tiny, batch):
    """The towers' input checks (tests/nn/test_encoders.py) guard every entry point of the model."""
    images, tokens = batch
    for call in (lambda: tiny.encode_image(images[:, :1]), lambda: tiny(images[:, :1], tokens)):
        with pytest.raises(ValueError, match=r"images must have 3 channels"):
            call()
    for call in (lambda: tiny.encode_text(tokens.float()), lambda: tiny(images, tokens.float())):
        with pytest.raises(TypeError, match=r"tokens must be an integer tensor"):
            call()


def test_trim_text_padding_reaches_the_text_tower():
    assert create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, device="meta").trim_padding
    untrimmed = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, trim_text_padding=False,
                             device="meta")
    assert not untrimmed.trim_padding


# ----------------------------------------------------------------------------------------------
# FLIP patch masking on the model (the ViT's masking itself: tests/nn/test_encoders.py)
# ----------------------------------------------------------------------------------------------
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


def test_forward_passes_the_mask_generator(model, images):
    model.train().set_mask_ratio(0.5)
    c = model.encode_image(images, mask_generator=torch.Generator().manual_seed(3))
    f = model(images, mask_generator=torch.Generator().manual_seed(3))["image_features"]
    assert torch.allclose(f, torch.nn.functional.normalize(c, dim=-1))


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


@pytest.mark.parametrize("ratio, exc", [(1.0, ValueError), (-0.5, ValueError), (2, ValueError),
                                        (float("inf"), ValueError), ("0.5", TypeError), (None, TypeError)])
def test_bad_mask_ratio(model, ratio, exc):
    with pytest.raises(exc, match="mask_ratio"):
        model.set_mask_ratio(ratio)
    with pytest.raises(exc, match="mask_ratio"):
        create_model("ViT-Ti-16", mask_ratio=ratio, device="meta")
    with pytest.raises(exc, match="mask_ratio"):
        fastclip.flops.model_flops("ViT-Ti-16", mask_ratio=ratio)


def test_resnet_has_no_patch_masking():
    m = create_model("RN50", image_size=32, vision_layers=(1, 1, 1, 1), text_layers=1, device="meta")
    assert m.mask_ratio == 0.0
    m.set_mask_ratio(0.0)
    with pytest.raises(ValueError, match="mask_ratio applies to ViT image towers only"):
        m.set_mask_ratio(0.5)


# ----------------------------------------------------------------------------------------------
# Training: per-block gradient checkpointing, torch.compile without graph breaks, bf16 autocast
# ----------------------------------------------------------------------------------------------
TINY_VIT = dict(image_size=32, vision_layers=2, text_layers=2, vision_width=64, text_width=64, text_heads=2,
                embed_dim=32, vocab_size=1000)
TINY_RN = dict(image_size=32, vision_layers=(1, 1, 1, 1), vision_width=16, text_layers=2, text_width=64,
               text_heads=2, embed_dim=32, vocab_size=1000)


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, 998, (n, 16), generator=g)
    tokens[:, -1] = 999  # end token = the largest id
    tokens[0, 5], tokens[0, 6:] = 999, 0
    return images, tokens


def _loss_and_grads(model, images, tokens, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = fastclip.ClipLoss()(**model(images, tokens))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_grad_checkpointing_same_grads_and_recomputes(kind):
    torch.manual_seed(0)
    model = create_model("ViT-Ti-16" if kind == "vit" else "RN50", mask_ratio=0.5 if kind == "vit" else 0.0,
                         **(TINY_VIT if kind == "vit" else TINY_RN))
    if kind == "resnet":
        model.eval()  # BatchNorm in eval: both runs see the same statistics
    images, tokens = _batch()
    loss0, grads0 = _loss_and_grads(model, images, tokens)
    calls = []
    blocks = list(model.transformer.resblocks)
    if kind == "vit":
        blocks += list(model.visual.transformer.resblocks)
    # A pre-hook: checkpoint's recomputation stops early, once the saved tensors are rebuilt.
    hooks = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in blocks]
    model.set_grad_checkpointing(True)
    loss1, grads1 = _loss_and_grads(model, images, tokens)
    model.set_grad_checkpointing(False)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(blocks)  # every block ran again in the backward pass
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for k in grads0:
        assert_close(grads1[k], grads0[k], torch.float32, what=k)


def _compile_check(model, backend, backward=False):
    images, tokens = _batch()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.manual_seed(5)
    got = compiled(images, tokens)
    torch.manual_seed(5)
    want = model(images, tokens)
    for key in ("image_features", "text_features"):
        assert_close(got[key], want[key], torch.float32, what=key, atol=1e-4, rtol=1e-4)
    if backward:
        fastclip.ClipLoss()(**got).backward()
        assert model.visual.conv1.weight.grad is not None


@dynamo_warning
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_compile_fullgraph_no_graph_breaks(kind):
    """Dynamo traces the whole model (train mode, patch masking, token checks, checkpointing) in one
    graph: fullgraph=True raises on any graph break.  backend="aot_eager" also traces the backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "vit":
        model = create_model("ViT-Ti-16", mask_ratio=0.5, **TINY_VIT)
        _compile_check(model, "eager")
        model.set_grad_checkpointing(True)
        _compile_check(model, "aot_eager", backward=True)
        model.eval()
        _compile_check(model, "eager")
    else:
        model = create_model("RN50", **TINY_RN).eval()
        _compile_check(model, "aot_eager", backward=True)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_bf16_autocast(kind):
    torch.manual_seed(0)
    model = create_model("ViT-Ti-16" if kind == "vit" else "RN50", **(TINY_VIT if kind == "vit" else TINY_RN))
    model.eval()
    images, tokens = _batch()
    ref = model(images, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, tokens)
        loss = fastclip.ClipLoss()(**out)
    loss.backward()
    for key in ("image_features", "text_features"):
        assert out[key].dtype == torch.bfloat16, key
        cos = torch.nn.functional.cosine_similarity(out[key].float(), ref[key], dim=-1)
        assert cos.min() > 0.99, (key, cos)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Against open_clip's CLIP (where open-clip-torch is installed; skipped otherwise)
# ----------------------------------------------------------------------------------------------
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


@functools.cache
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


@needs_open_clip
@pytest.mark.parametrize("name", list_models())
def test_state_dict_keys_and_shapes_equal_open_clips(name):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = open_clip_model(ours.config)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b, (sorted(set(a) ^ set(b))[:10], [(k, a[k], b[k]) for k in set(a) & set(b) if a[k] != b[k]][:5])


@needs_open_clip
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
@needs_open_clip
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


@needs_open_clip
def test_fastclip_state_dict_loads_into_open_clip():
    torch.manual_seed(3)
    ours = create_model("ViT-Ti-16", image_size=32).eval()
    theirs = open_clip_model(ours.config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images, tokens = _inputs(32)
    a, b = ours(images, tokens), theirs(images, tokens)
    assert_close(a["image_features"], b["image_features"], torch.float32, atol=1e-4, rtol=1e-4)
    assert_close(a["text_features"], b["text_features"], torch.float32, atol=1e-4, rtol=1e-4)


@needs_open_clip
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
