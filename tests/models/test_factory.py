"""fastclip.models.factory: create_model (names, configs, overrides, dtype, device) and checkpoints."""
import pytest
import torch

import fastclip
from fastclip.models import (
    CLIP,
    clean_state_dict,
    create_model,
    get_model_config,
    list_models,
    load_checkpoint,
    read_checkpoint,
)


def test_every_config_builds_on_meta():
    for name in list_models():
        model = create_model(name, device="meta")
        assert isinstance(model, CLIP) and model.config.name == name


def test_dtype_and_device_arguments():
    model = create_model("ViT-Ti-16", image_size=32, vision_layers=1, text_layers=1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), fastclip.get_tokenizer()(["a", "b"]))
    assert out["image_features"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        create_model("ViT-Ti-16", dtype=torch.int64, device="meta")


def test_bad_name_and_overrides():
    with pytest.raises(ValueError, match="unknown model name 'ViT-Q-32'"):
        create_model("ViT-Q-32")
    with pytest.raises(TypeError, match="unknown model override 'image_sise'"):
        create_model("ViT-Ti-16", image_sise=64)
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        create_model("RN50", image_size=100)


def test_a_given_config_is_copied_not_changed():
    cfg = get_model_config("ViT-Ti-16")
    model = create_model(cfg, image_size=32, vision_layers=1, text_layers=1, mask_ratio=0.5, device="meta")
    assert (model.config.vision_cfg.image_size, model.config.vision_cfg.layers) == (32, 1)
    assert (cfg.vision_cfg.image_size, cfg.vision_cfg.layers, cfg.vision_cfg.mask_ratio) == (224, 12, 0.0)
    model.set_mask_ratio(0.25)  # the live model's config changes, the caller's does not
    assert model.config.vision_cfg.mask_ratio == 0.25 and cfg.vision_cfg.mask_ratio == 0.0


# ----------------------------------------------------------------------------------------------
# Checkpoints (fixtures tiny and batch: conftest.py)
# ----------------------------------------------------------------------------------------------
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


def test_clean_state_dict_normalises_open_clip_and_openai_layouts():
    weight, scale = torch.randn(3), torch.tensor([4.6])
    ckpt = {"epoch": 3, "state_dict": {"module.visual.proj": weight, "module.logit_scale": scale,
                                       "logit_bias": torch.tensor([-10.0]), "input_resolution": torch.tensor(224),
                                       "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}}
    out = clean_state_dict(ckpt)
    assert set(out) == {"visual.proj", "logit_scale", "logit_bias"}
    assert out["visual.proj"] is weight
    assert out["logit_scale"].shape == () and out["logit_scale"].item() == pytest.approx(4.6)
    assert out["logit_bias"].shape == () and out["logit_bias"].item() == -10.0
    plain = {"visual.proj": weight, "positional_embedding": torch.zeros(2, 3)}  # already clean: unchanged
    assert clean_state_dict(plain) == plain


def test_pretrained_path_or_mapping(tmp_path, tiny, batch):
    _, tokens = batch
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    for pretrained in (str(path), path, tiny.state_dict()):
        again = create_model(tiny.config, pretrained=pretrained).eval()
        assert torch.equal(again.encode_text(tokens), tiny.eval().encode_text(tokens))
    tiny.train()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_load_checkpoint_refusals(tmp_path, tiny):
    with pytest.raises(TypeError, match=r"checkpoint must be a path or a state dict mapping, got int"):
        load_checkpoint(tiny, 3)
    archive = tmp_path / "openai.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    with pytest.raises(ValueError, match=r"is not a plain state dict .*torch.jit.load\(path\).state_dict\(\)"):
        load_checkpoint(tiny, archive)
    missing = {k: v for k, v in tiny.state_dict().items() if k != "visual.proj"}
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(tiny, missing)
    load_checkpoint(tiny, missing, strict=False)  # strict=False passes through


def test_read_checkpoint_reads_a_state_dict_and_refuses_what_it_cannot_read(tmp_path, tiny):
    path = tmp_path / "sd.pt"
    torch.save(tiny.state_dict(), path)
    got = read_checkpoint(path)
    assert set(got) == set(tiny.state_dict()) and torch.equal(got["visual.proj"], tiny.state_dict()["visual.proj"])
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.pt' does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=r"checkpoint '.*junk.pt' cannot be read as a state dict"):
        read_checkpoint(junk)
    with pytest.raises(ValueError, match=r"junk.pt' cannot be read"):
        load_checkpoint(tiny, junk)  # the path form of load_checkpoint reads through it


def test_read_checkpoint_of_a_safetensors_file(tmp_path, tiny):
    path = tmp_path / "model.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"\0" * 16)
        with pytest.raises(ValueError, match=r"is a .safetensors file, which needs the optional package safetensors"):
            read_checkpoint(path)
        return
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    assert set(read_checkpoint(path)) == set(tiny.state_dict())
