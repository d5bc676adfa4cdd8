"""The CLIP model: interface, open_clip's state-dict layout (checked without open_clip), param counts."""
import math

import pytest
import torch

import fastclip
from fastclip.models import CLIP, clean_state_dict, create_model, list_models, load_checkpoint
from fastclip.testing import assert_close

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


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("ViT-Ti-16", image_size=32, vision_layers=2, text_layers=2)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = fastclip.get_tokenizer()(["a photo of a cat", "a dog", ""])
    return images, tokens


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


def test_short_token_rows_equal_padded_rows(tiny, batch):
    """Causal attention + end-token pooling: trailing padding changes nothing, so rows may be cut."""
    _, tokens = batch
    full = tiny.encode_text(tokens)
    cut = tiny.encode_text(tokens[:, :8])
    assert_close(cut, full, torch.float32)


def test_padding_cut_gives_the_same_features(tiny, batch):
    """The text tower cuts the columns after the batch's last end token; switching it off changes
    nothing but the work done."""
    _, tokens = batch
    blocks_saw = []
    hook = tiny.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: blocks_saw.append(a[0].shape[1]))
    try:
        cut = tiny.encode_text(tokens)
        tiny.trim_padding = False
        full = tiny.encode_text(tokens)
    finally:
        tiny.trim_padding = True
        hook.remove()
    assert blocks_saw == [int(tokens.argmax(-1).max()) + 1, 77]
    assert_close(cut, full, torch.float32)
    untrimmed = create_model("ViT-Ti-16", image_size=32, vision_layers=2, text_layers=2, trim_text_padding=False)
    assert not untrimmed.trim_padding


def test_logit_bias_and_clip_loss_kwargs():
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, init_logit_bias=-10.0)
    out = model(torch.randn(2, 3, 32, 32), fastclip.get_tokenizer()(["a", "b"]))
    assert out["logit_bias"].item() == -10.0 and "logit_bias" in model.state_dict()
    fastclip.SigLipLoss()(**out).backward()


def test_resnet_forward():
    torch.manual_seed(0)
    model = create_model("RN50", image_size=64, text_layers=1)
    out = model(torch.randn(2, 3, 64, 64), fastclip.get_tokenizer()(["a", "b"]))
    assert out["image_features"].shape == (2, 1024) and torch.isfinite(out["image_features"]).all()


def test_dtype_and_device_arguments():
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), fastclip.get_tokenizer()(["a", "b"]))
    assert out["image_features"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        create_model("ViT-Ti-16", dtype=torch.int64, device="meta")


def test_create_from_config_and_checkpoint_round_trip(tmp_path, tiny, batch):
    images, tokens = batch
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in tiny.state_dict().items()}}, path)
    again = create_model(tiny.config, pretrained=str(path))
    tiny.eval(), again.eval()
    assert torch.equal(again(images, tokens)["image_features"], tiny(images, tokens)["image_features"])
    tiny.train()
    # OpenAI's metadata entries and a 1-element logit_scale are accepted
    sd = dict(tiny.state_dict(), input_resolution=torch.tensor(32), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    sd["logit_scale"] = sd["logit_scale"].reshape(1)
    assert set(clean_state_dict(sd)) == set(tiny.state_dict())
    load_checkpoint(again, sd)
    with pytest.raises(RuntimeError, match="Missing key"):
        again.load_state_dict({k: v for k, v in tiny.state_dict().items() if k != "visual.proj"})


def test_no_weight_decay_names_exist(tiny):
    names = dict(tiny.named_parameters())
    assert tiny.no_weight_decay() <= set(names)


def test_every_config_builds_on_meta():
    for name in list_models():
        model = create_model(name, device="meta")
        assert isinstance(model, CLIP) and model.config.name == name
