"""fastclip.nn.loss: ClipLoss / SigLipLoss as drop-in replacements for open_clip's losses, and SimCLRLoss."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.nn import SimCLRLoss
from fastclip.ops import clip_loss, siglip_loss, simclr_loss
from fastclip.testing import assert_close, load_open_clip_file


def _open_clip_loss_module():
    return load_open_clip_file("loss")[0]


OC = _open_clip_loss_module()
needs_open_clip = pytest.mark.skipif(OC is None, reason="open-clip-torch is not installed")


def feats(n=48, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return a, b


def grads_of(loss_fn, a, b, *params):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    out = loss_fn(a, b, *ps)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    return [loss.detach(), a.grad, b.grad] + [p.grad for p in ps]


def test_module_equals_functional():
    a, b = feats()
    scale = torch.tensor(14.0)
    assert_close(fastclip.ClipLoss(chunk_size=16)(a, b, scale), clip_loss(a, b, scale), torch.float32,
                 scale_floor=1.0)
    assert_close(fastclip.SigLipLoss()(a, b, scale, torch.tensor(-5.0)), siglip_loss(a, b, scale, -5.0),
                 torch.float32, scale_floor=1.0)


def test_output_dict():
    a, b = feats()
    out = fastclip.ClipLoss()(a, b, 10.0, output_dict=True)
    assert list(out) == ["contrastive_loss"] and out["contrastive_loss"].dim() == 0
    out = fastclip.SigLipLoss()(a, b, 10.0, -10.0, output_dict=True)
    assert list(out) == ["contrastive_loss"]


def test_retain_graph_twice():
    a, b = feats(16, 8)
    for mod, extra in ((fastclip.ClipLoss(), ()), (fastclip.SigLipLoss(), (torch.tensor(-1.0),))):
        x = a.clone().requires_grad_()
        loss = mod(x, b, torch.tensor(5.0), *extra)
        loss.backward(retain_graph=True)
        g1 = x.grad.clone()
        loss.backward()
        assert_close(x.grad, 2 * g1, torch.float32)


def test_constructor_validation():
    with pytest.raises(ValueError, match="rank must be an int in"):
        fastclip.ClipLoss(rank=3, world_size=2)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        fastclip.SigLipLoss(world_size=0)
    with pytest.raises(NotImplementedError, match="use_horovod"):
        fastclip.ClipLoss(use_horovod=True)


@needs_open_clip
def test_constructor_and_forward_signatures_match_open_clip():
    for ours, theirs in ((fastclip.ClipLoss, OC.ClipLoss), (fastclip.SigLipLoss, OC.SigLipLoss)):
        our_init = inspect.signature(ours.__init__).parameters
        for name, p in inspect.signature(theirs.__init__).parameters.items():
            assert name in our_init, f"{ours.__name__} lacks open_clip argument {name}"
            assert our_init[name].default == p.default, f"{ours.__name__}.{name} default differs"
        ours_fwd = list(inspect.signature(ours.forward).parameters)
        theirs_fwd = list(inspect.signature(theirs.forward).parameters)
        assert ours_fwd == theirs_fwd


@needs_open_clip
@pytest.mark.parametrize("n,d", [(1, 16), (37, 64), (128, 257)])
def test_clip_loss_drop_in_matches_open_clip(n, d):
    a, b = feats(n, d, seed=n)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    ours = grads_of(fastclip.ClipLoss(chunk_size=32), a, b, scale)
    theirs = grads_of(OC.ClipLoss(), a, b, scale)
    for k, (x, y) in enumerate(zip(ours, theirs)):
        assert_close(x, y, torch.float32, what=f"output {k}", scale_floor=1.0 if k == 0 else 1e-30)
    # output_dict and logit_bias pass through alike
    o = fastclip.ClipLoss()(a, b, scale, torch.tensor(-2.0), output_dict=True)
    t = OC.ClipLoss()(a, b, scale, torch.tensor(-2.0), output_dict=True)
    assert o.keys() == t.keys()
    assert_close(o["contrastive_loss"], t["contrastive_loss"], torch.float32, scale_floor=1.0)


@needs_open_clip
@pytest.mark.parametrize("n,d", [(1, 16), (37, 64), (128, 257)])
def test_siglip_loss_drop_in_matches_open_clip(n, d):
    a, b = feats(n, d, seed=n)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = grads_of(fastclip.SigLipLoss(chunk_size=32), a, b, scale, bias)
    theirs = grads_of(OC.SigLipLoss(), a, b, scale, bias)
    for k, (x, y) in enumerate(zip(ours, theirs)):
        assert_close(x, y, torch.float32, what=f"output {k}", scale_floor=1.0 if k in (0, 4) else 1e-30)


@needs_open_clip
def test_open_clip_style_training_step_is_unchanged():
    """A training step written for open_clip runs unchanged with fastclip's loss swapped in."""
    torch.manual_seed(0)
    results = []
    for loss_cls in (OC.ClipLoss, fastclip.ClipLoss):
        torch.manual_seed(0)
        img_tower, txt_tower = torch.nn.Linear(20, 16), torch.nn.Linear(12, 16)
        logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        params = list(img_tower.parameters()) + list(txt_tower.parameters()) + [logit_scale]
        opt = torch.optim.SGD(params, lr=0.1)
        loss_fn = loss_cls(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
        x, y = torch.randn(32, 20), torch.randn(32, 12)
        for _ in range(3):
            i = torch.nn.functional.normalize(img_tower(x), dim=-1)
            t = torch.nn.functional.normalize(txt_tower(y), dim=-1)
            losses = loss_fn(i, t, logit_scale.exp(), output_dict=True)
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for p, q in zip(*results):
        assert_close(p, q, torch.float32, what="parameters after 3 steps")


# ----------------------------------------------------------------------------------------------
# SimCLRLoss
# ----------------------------------------------------------------------------------------------
def views(n, d, seed, scale_norm=1.0):
    """Two views of n samples in fp64: correlated rows, like two augmentations of the same image."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return a * scale_norm, b * scale_norm


@pytest.mark.parametrize("chunk", [None, 5])
def test_simclr_module_normalises(chunk):
    a, b = (x.float() for x in views(20, 16, seed=2, scale_norm=3.0))
    module = SimCLRLoss(temperature=0.2, chunk_size=chunk)
    got = grads_of(module, a, b)

    def on_normalised(x, y):
        return simclr_loss(F.normalize(x, dim=-1), F.normalize(y, dim=-1), 0.2, backend="reference")
    want = grads_of(on_normalised, a.double(), b.double())
    for name, x, y, floor in zip(("loss", "d_view1", "d_view2"), got, want, (1.0, 1e-30, 1e-30)):
        assert_close(x, y, torch.float32, what=name, scale_floor=floor)
    # Scaling a view's rows changes nothing once they are normalised.
    assert_close(module(a * 7.0, b), got[0], torch.float32, what="loss of rescaled view1", scale_floor=1.0)


def test_simclr_module_arguments():
    module = SimCLRLoss()
    assert module.temperature == 0.1 and module.backend == "auto" and module.chunk_size is None
    assert "temperature=0.1" in repr(module)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0, got 0"):
        SimCLRLoss(temperature=0.0)
    with pytest.raises(TypeError, match=r"view1 must be a torch.Tensor, got list"):
        module([[1.0, 0.0]], torch.randn(1, 2))
    with pytest.raises(TypeError, match=r"view2 must be a floating tensor"):
        module(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"view1 must be 2-D \[N, D\]"):
        module(torch.randn(4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"backend='bogus' is not a backend of simclr_loss"):
        SimCLRLoss(backend="bogus")(torch.randn(3, 4), torch.randn(3, 4))
