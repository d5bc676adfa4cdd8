"""fastclip.nn.resnet: CLIP's ModifiedResNet tower, its Bottleneck blocks, the single-query attention pool."""
import pytest
import torch

from fastclip.nn.resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from fastclip.testing import assert_close


def test_resnet_forward():
    """RN50's tower (open_clip's layers and width) at 64 px: [B, 3, 64, 64] -> [B, 1024]."""
    torch.manual_seed(0)
    tower = ModifiedResNet((3, 4, 6, 3), 1024, heads=32, image_size=64, width=64)
    out = tower(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1024) and torch.isfinite(out).all()


def full_attention_pool(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pool written out: every one of the 1 + HW tokens is a query, keep the first."""
    B, C = x.shape[:2]
    H = pool.num_heads
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding
    q, k, v = (proj(x).unflatten(-1, (H, C // H)).transpose(1, 2) for proj in (pool.q_proj, pool.k_proj, pool.v_proj))
    att = torch.softmax(q @ k.transpose(-1, -2) / (C // H) ** 0.5, dim=-1) @ v    # [B, H, 1 + HW, hd]
    return pool.c_proj(att.transpose(1, 2).reshape(B, -1, C))[:, 0]


@pytest.mark.parametrize("spacial,heads,out_dim", [(2, 4, 16), (3, 2, None)])
def test_attention_pool_equals_every_query_then_the_first(spacial, heads, out_dim):
    """The pool runs the mean token as the only query: the same result as CLIP's all-queries form."""
    torch.manual_seed(1)
    pool = AttentionPool2d(spacial, 32, heads, out_dim).double()
    x = torch.randn(2, 32, spacial, spacial, dtype=torch.float64)
    got = pool(x)
    assert got.shape == (2, out_dim or 32)
    assert_close(got, full_attention_pool(pool, x), torch.float64, "attention pool")


def test_attention_pool_rejects_indivisible_heads():
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads, got 30 and 4"):
        AttentionPool2d(2, 30, 4)


def test_bottleneck_shapes_and_clip_key_names():
    strided = Bottleneck(16, 8, stride=2)
    assert strided(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)
    keys = set(strided.state_dict())
    assert {"downsample.0.weight", "downsample.1.weight", "downsample.1.running_mean"} <= keys  # CLIP's names
    assert Bottleneck(32, 8).downsample is None  # same width, stride 1: identity shortcut
    assert Bottleneck(16, 8).downsample is not None  # width changes: 1x1 shortcut


def test_fresh_blocks_start_as_the_identity():
    """CLIP's init zeroes the last BatchNorm of every residual branch: a fresh block passes its
    (non-negative, post-ReLU) input through unchanged, or its shortcut's output."""
    tower = ModifiedResNet((2, 1, 1, 1), 32, heads=8, image_size=32, width=16).eval()
    x = torch.randn(1, 64, 8, 8).relu()
    assert torch.equal(tower.layer1[1](x), x)
    first = tower.layer2[0]
    assert torch.equal(first(x), first.downsample(x).relu())


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match=r"image_size must be a multiple of 32 for ModifiedResNet, got 48"):
        ModifiedResNet((1, 1, 1, 1), 32, heads=8, image_size=48, width=16)


def test_grad_checkpointing_is_a_no_op():
    """Re-running a block in training mode would update BatchNorm's statistics twice: not applied."""
    torch.manual_seed(2)
    tower = ModifiedResNet((1, 1, 1, 1), 32, heads=8, image_size=32, width=16)
    x = torch.randn(2, 3, 32, 32)
    want = tower.eval()(x)
    tower.set_grad_checkpointing(True)
    assert torch.equal(tower(x), want)
    tower.train()(x).sum().backward()
    assert all(m.num_batches_tracked.item() == 1 for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
