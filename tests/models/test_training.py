"""Training-friendly: per-block gradient checkpointing, torch.compile without graph breaks, bf16 autocast."""
import shutil

import pytest
import torch

import fastclip
from fastclip.models import create_model
from fastclip.testing import assert_close

# Dynamo's own use of torch.jit.script_method warns on this torch; not fastclip's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

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


def test_grad_checkpointing_is_off_without_grad(monkeypatch):
    import importlib
    encoders = importlib.import_module("fastclip.nn.encoders")
    calls = []
    orig = encoders.checkpoint
    monkeypatch.setattr(encoders, "checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model = create_model("ViT-Ti-16", **TINY_VIT).set_grad_checkpointing(True)
    images, tokens = _batch()
    with torch.no_grad():
        out = model(images, tokens)
    assert out["image_features"].shape == (4, 32)
    assert calls == [], "checkpoint ran under no_grad"
    model(images, tokens)  # with grad: every block goes through checkpoint
    assert len(calls) == len(model.transformer.resblocks) + len(model.visual.transformer.resblocks)


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


@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("g++") or shutil.which("cc")),
                    reason="torch.compile's inductor backend needs a C++ compiler on CPU, none found")
def test_compile_inductor_image_encoder():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("ViT-Ti-16", **TINY_VIT)
    images, _ = _batch()
    visual = torch.compile(model.visual, fullgraph=True)
    with torch.no_grad():
        assert_close(visual(images), model.visual(images), torch.float32, atol=1e-4, rtol=1e-4)


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
