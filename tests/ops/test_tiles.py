"""fastclip.ops.tiles: the chunked engine's precision rules, tile statistics, both passes, gradient finish."""
import math

import pytest
import torch

from fastclip.ops import clip_loss_reference, dispatch, tiles
from fastclip.ops.tiles import (
    STAT_DTYPE,
    acc_dtype,
    accumulate_mm,
    chunked_lse,
    chunked_softmax_grads,
    default_chunk_size,
    finish_clip_grads,
    mm_dtype,
    rowdot_sum,
    sub_stat,
    tile_logits,
    tile_lse,
)
from fastclip.testing import assert_close


def feats(m, k, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype))


# ----------------------------------------------------------------------------------------------
# Precision rules
# ----------------------------------------------------------------------------------------------
def test_dtype_rules():
    x32, x16, xb, x64 = (torch.zeros(2, 2, dtype=dt) for dt in (torch.float32, torch.float16, torch.bfloat16,
                                                                torch.float64))
    assert [mm_dtype(x) for x in (x32, x16, xb, x64)] == [torch.float32] * 3 + [torch.float64]  # CPU: fp32 BLAS
    assert [acc_dtype(x) for x in (x32, x16, xb, x64)] == [torch.float32] * 3 + [torch.float64]
    meta16 = torch.zeros(2, 2, dtype=torch.float16, device="meta")  # off CPU: products in the input dtype
    assert mm_dtype(meta16) == torch.float16 and acc_dtype(meta16) == torch.float32
    assert STAT_DTYPE == torch.float64
    assert default_chunk_size(torch.device("cpu")) == 1024 and default_chunk_size(torch.device("cuda")) == 4096


def test_tile_logits_is_a_fresh_scaled_product_in_the_accumulation_dtype():
    a, b = feats(5, 3, 8, torch.bfloat16)
    z = tile_logits(a.float(), b.float(), 2.5, torch.float32)
    assert z.dtype == torch.float32 and z.shape == (5, 3)
    assert_close(z, 2.5 * a.double() @ b.double().T, torch.float32, "z")
    a64, b64 = feats(4, 4, 3)
    z = tile_logits(a64, b64, 1.0, torch.float64)
    z.zero_()  # the caller owns it: modifying it leaves the inputs alone
    assert a64.abs().sum() > 0 and b64.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Tile statistics
# ----------------------------------------------------------------------------------------------
def test_sub_stat_keeps_an_fp64_statistics_precision_on_an_fp32_tile():
    """Logits near 400 (fp32 ulp 3e-5) minus an fp64 lse: the (hi, lo) split leaves only the
    rounding of a small result, where rounding the statistic to fp32 first would cost ~1e-5."""
    g = torch.Generator().manual_seed(1)
    z = (400.0 + torch.randint(-64, 64, (6, 7), generator=g) * 2.0 ** -16).float()  # exact in fp32
    stat = 400.0 + torch.rand(6, 1, generator=g, dtype=torch.float64) * 1e-3
    exact = z.double() - stat
    got = sub_stat(z, stat, torch.empty_like(z))
    assert got.dtype == torch.float32
    err = (got.double() - exact).abs().max().item()
    naive = (z - stat.float()).double().sub(exact).abs().max().item()
    assert err < 1e-9, f"sub_stat off by {err:.3g}"
    assert naive > 1e-6, "the case must be one that an fp32 statistic gets wrong"
    # a column statistic (broadcast along rows), and out= aliasing the tile as the engine does
    col = 400.0 + torch.rand(7, generator=g, dtype=torch.float64) * 1e-3
    exact = z.double() - col
    assert (sub_stat(z.clone(), col, z).double() - exact).abs().max().item() < 1e-9


def test_sub_stat_of_equal_dtypes_is_a_plain_subtraction():
    z, stat = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    assert torch.equal(sub_stat(z, stat, torch.empty_like(z)), z - stat)


@pytest.mark.parametrize("dim", [0, 1])
def test_tile_lse_matches_logsumexp_in_fp64(dim):
    z = torch.randn(9, 6, generator=torch.Generator().manual_seed(2)) * 30
    got = tile_lse(z, dim, torch.empty_like(z))
    assert got.dtype == STAT_DTYPE and got.shape == (z.shape[1 - dim],)
    assert_close(got, torch.logsumexp(z.double(), dim=dim), torch.float32, "tile lse")


def test_tile_lse_of_an_all_minus_inf_line_is_minus_inf_not_nan():
    """A masked self-pair tile of one row (SimCLR) has a line with no finite logit."""
    z = torch.tensor([[-math.inf, -math.inf, -math.inf], [-math.inf, 2.0, -math.inf]])
    rows = tile_lse(z, 1, torch.empty_like(z))
    cols = tile_lse(z, 0, torch.empty_like(z))
    assert rows[0].item() == -math.inf and rows[1].item() == 2.0
    assert cols.tolist() == [-math.inf, 2.0, -math.inf]
    assert not torch.isnan(rows).any() and not torch.isnan(cols).any()


# ----------------------------------------------------------------------------------------------
# The two passes, against the materialised matrices (chunk sizes that do not divide M or K)
# ----------------------------------------------------------------------------------------------
CHUNKS = [1, 3, 4, 7, 64]  # 13 and 10 rows: ragged last tiles, one tile, one row per tile


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_chunked_lse_matches_logsumexp(chunk, dtype):
    a, b = feats(13, 10, 8, dtype, seed=3)
    scale = 3.0
    row, col = chunked_lse(a, b, scale, chunk)
    assert row.dtype == col.dtype == STAT_DTYPE and row.shape == (13,) and col.shape == (10,)
    z = scale * a.double() @ b.double().T
    assert_close(row, torch.logsumexp(z, dim=1), dtype, "row lse")
    assert_close(col, torch.logsumexp(z, dim=0), dtype, "col lse")


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_chunked_softmax_grads_match_a_materialised_p(chunk, dtype):
    a, b = feats(13, 10, 8, dtype, seed=4)
    scale = 2.0
    g = torch.Generator().manual_seed(5)
    r = chunked_lse(a, b, scale, 64)[0] + torch.rand(13, generator=g, dtype=torch.float64)
    c = chunked_lse(a, b, scale, 64)[1] + torch.rand(10, generator=g, dtype=torch.float64)
    ga, gb = chunked_softmax_grads(a, b, scale, r, c, chunk)
    assert ga.dtype == gb.dtype == acc_dtype(a)  # never accumulated in bf16
    z = scale * a.double() @ b.double().T
    p = torch.exp(z - r[:, None]) + torch.exp(z - c[None, :])
    assert_close(ga, p @ b.double(), dtype, "P @ b")
    assert_close(gb, p.T @ a.double(), dtype, "P.T @ a")
    only_a = chunked_softmax_grads(a, b, scale, r, c, chunk, need_b=False)
    only_b = chunked_softmax_grads(a, b, scale, r, c, chunk, need_a=False)
    assert only_a[1] is None and torch.equal(only_a[0], ga)
    assert only_b[0] is None and torch.equal(only_b[1], gb)


@pytest.mark.parametrize("mmd, acc", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                      (torch.float16, torch.float32), (torch.bfloat16, torch.float32)], ids=str)
def test_accumulate_mm_adds_the_product_in_the_accumulation_dtype(mmd, acc):
    """dst += p @ src into rows of a larger buffer: one addmm_ when the dtypes agree; otherwise the
    product in the mm dtype (a GPU's tensor cores), cast up, then added (never accumulated in mmd)."""
    g = torch.Generator().manual_seed(8)
    p = torch.rand(7, 5, generator=g, dtype=torch.float64).to(mmd)  # a tile of probabilities, cast once
    src = torch.randn(7, 6, generator=g, dtype=torch.float64).to(mmd)
    buf = torch.randn(9, 6, generator=g, dtype=torch.float64).to(acc)
    before = buf.clone()
    dst = buf[2:7]
    out = accumulate_mm(dst, p.T, src)  # the transposed tile, as the column products pass it
    assert out.data_ptr() == dst.data_ptr() and buf.dtype == acc
    assert torch.equal(buf[:2], before[:2]) and torch.equal(buf[7:], before[7:])  # only its rows
    expected = before[2:7].double() + p.double().T @ src.double()
    assert_close(buf[2:7], expected, mmd, "dst + p.T @ src")
    exact = torch.addmm(before[2:7], p.T, src) if mmd == acc else before[2:7] + torch.mm(p.T, src).to(acc)
    assert torch.equal(buf[2:7], exact)  # the branch taken, to the bit


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_rowdot_sum(chunk):
    a, b = feats(11, 11, 6, torch.bfloat16, seed=6)
    got = rowdot_sum(a, b, torch.float32, chunk)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert_close(got, (a.double() * b.double()).sum(), torch.float32, "sum_i a_i.b_i", scale_floor=1.0)
    a64, b64 = feats(11, 11, 6, seed=7)
    assert rowdot_sum(a64, b64, torch.float64, chunk).item() == pytest.approx((a64 * b64).sum().item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Gradient finish: the pieces above assembled as ClipLossFunction.backward does, against autograd
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["no-smoothing", "ls0.1"])
@pytest.mark.parametrize("grad_out", [1.0, -0.5])
def test_finish_clip_grads_against_autograd_of_the_reference(eps, grad_out):
    n, d, s, chunk = 9, 5, 4.0, 4
    a, b = feats(n, n, d, seed=8)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    s_ = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    (grad_out * clip_loss_reference(a_, b_, s_, label_smoothing=eps)).backward()

    row, col = chunked_lse(a, b, s, chunk)
    shift = math.log(2 * n)
    ga, gb = chunked_softmax_grads(a, b, s, row + shift, col + shift, chunk)
    sa, sb = (a.sum(0), b.sum(0)) if eps else (None, None)
    lin_raw = (1 - eps) * rowdot_sum(a, b, torch.float64, chunk) + ((eps / n) * torch.dot(sa, sb) if eps else 0.0)
    ds = rowdot_sum(a, ga, torch.float64, chunk) - lin_raw / n
    g = torch.tensor(grad_out, dtype=torch.float64)
    grad_a, grad_b, grad_s = finish_clip_grads(ga, gb, ds, a, b, torch.float32, g=g, coef=g * s,
                                               w=(1 - eps) / n, smooth=eps / n / n, sa=sa, sb=sb)
    assert grad_s.dtype == torch.float32
    assert_close(grad_a, a_.grad, torch.float64, "d/d image_features")
    assert_close(grad_b, b_.grad, torch.float64, "d/d text_features")
    assert_close(grad_s, s_.grad, torch.float32, "d/d logit_scale")


def test_finish_clip_grads_pairs_rows_and_casts():
    """Local rows against all columns (the distributed loss): row i of a pairs with row rows[i] of b;
    inputs that need no gradient get None; results come back in the inputs' dtype."""
    a, b = feats(3, 7, 4, torch.bfloat16, seed=9)
    ga, gb = torch.zeros(3, 4), torch.zeros(7, 4)
    grad_a, grad_b, grad_s = finish_clip_grads(ga, gb, None, a, b, torch.float32, g=1.0, coef=2.0, w=0.5,
                                               smooth=0.0, sa=None, sb=None, rows=slice(2, 5))
    assert grad_s is None and grad_a.dtype == grad_b.dtype == torch.bfloat16
    assert torch.equal(grad_a, (-b[2:5].float()).to(torch.bfloat16))  # -w * b[rows] * coef
    want_b = torch.zeros(7, 4)
    want_b[2:5] = -a.float()
    assert torch.equal(grad_b, want_b.to(torch.bfloat16))
    assert finish_clip_grads(None, None, torch.tensor(3.0), a, b, torch.float64, g=torch.tensor(2.0), coef=1.0,
                             w=0.5, smooth=0.0, sa=None, sb=None)[:2] == (None, None)


# ----------------------------------------------------------------------------------------------
# Backend registration shared by the tiled losses
# ----------------------------------------------------------------------------------------------
def test_register_loss_backends_declares_the_three_backends(monkeypatch):
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    calls = []

    def run(engine, *inputs):
        calls.append((engine, inputs))
        return "loss"

    triton_engine, chunked_engine = object(), object()
    tiles.register_loss_backends("tiles_test_loss", run, lambda *inputs: "reference", triton=triton_engine,
                                 chunked=chunked_engine, chunked_doc="tiles")
    backends = dispatch.backends("tiles_test_loss")
    assert [x.name for x in backends] == ["triton", "chunked", "reference"]
    assert [x.extra["engine"] for x in backends] == [triton_engine, chunked_engine, None]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [x.picked_automatically(cpu) for x in backends] == [False, True, False]
    assert backends[0].picked_automatically(cuda) and "triton" in backends[0].packages
    assert backends[1].fn(1, 2) == "loss" and calls == [(chunked_engine, (1, 2))]
    assert backends[2].fn(1, 2) == "reference"


# ----------------------------------------------------------------------------------------------
# The native tile kernels (fastclip._C) against the torch code they replace
# ----------------------------------------------------------------------------------------------
def _native_or_skip():
    from fastclip import extension

    mod, why = extension.load()
    if mod is None:
        pytest.skip(f"fastclip._C is not available: {why}")
    return mod


def _torch_tiles(monkeypatch):
    monkeypatch.setattr(tiles, "NATIVE_TILES", False)


def _tile(m, k, seed=0, spread=5.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * spread


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,k", [(1, 1), (5, 17), (300, 257), (700, 400)])
def test_native_tile_lse_pair_matches_torch_and_fp64(monkeypatch, m, k, threads):
    """Shapes below and above one lane (16) and one row block (128); 700 x 400 splits over threads."""
    _native_or_skip()
    z = _tile(m, k)
    z[m // 2] = -math.inf  # an all -inf row, and an all -inf column: -inf, not NaN
    z[:, k // 2] = -math.inf
    z[0, 0] = 80.0  # near fp32 exp's overflow once shifted: the max must be taken first
    work = torch.empty(m, k)
    monkeypatch.setattr(tiles, "NATIVE_THREADS", threads)
    assert tiles.native_tiles(z) is not None
    row, col = tiles.tile_lse_pair(z, work)
    assert row.dtype == col.dtype == STAT_DTYPE and row.shape == (m,) and col.shape == (k,)
    assert torch.equal(torch.isinf(row), torch.isinf(tile_lse(z, 1, work)))
    assert torch.equal(torch.isinf(col), torch.isinf(tile_lse(z, 0, work)))
    for got, dim in ((row, 1), (col, 0)):
        exact = torch.logsumexp(z.double(), dim=dim)
        peer = tile_lse(z, dim, work)  # the torch code at the same precision
        fin = torch.isfinite(exact)
        assert_close(got[fin], exact[fin], torch.float32, f"lse along dim {dim}", atol=0, rtol=2e-7,
                     peers=[peer[fin]])


def test_native_tile_lse_pair_of_an_all_minus_inf_tile():
    _native_or_skip()
    z = torch.full((20, 33), -math.inf)
    row, col = tiles.tile_lse_pair(z, torch.empty_like(z))
    assert torch.isneginf(row).all() and torch.isneginf(col).all()


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_softmax_pair_matches_torch(monkeypatch, stat_dtype, threads):
    _native_or_skip()
    m, k = 600, 300
    z = _tile(m, k, seed=1)
    z[3, :] = -math.inf  # masked self-pairs (simclr's diagonal tiles): exactly 0
    z[:, 5] = -math.inf
    row = (torch.logsumexp(z.double(), 1) + torch.rand(m, dtype=torch.float64)).to(stat_dtype)
    row[3] = 0.0
    col = (torch.logsumexp(z.double(), 0) + torch.rand(k, dtype=torch.float64)).to(stat_dtype)
    col[5] = 0.0
    monkeypatch.setattr(tiles, "NATIVE_THREADS", threads)
    got = tiles.softmax_pair(z.clone(), row, col, torch.full((m, k), math.nan))
    exact = torch.exp(z.double() - row.double()[:, None]) + torch.exp(z.double() - col.double()[None, :])
    monkeypatch.setattr(tiles, "NATIVE_TILES", False)
    peer = tiles.softmax_pair(z.clone(), row, col, torch.empty(m, k))
    assert (got[3] == 0).all() and (got[:, 5] == 0).all()
    assert_close(got, exact, torch.float32, "P", atol=0, rtol=1e-6, peers=[peer])
    # a float64 statistic is applied as sub_stat applies it (hi, then lo): not rounded to fp32 first
    if stat_dtype == torch.float64:
        assert_close(got, peer, torch.float32, "P vs torch", atol=0, rtol=1e-6)


def test_native_softmax_pair_may_write_over_z():
    ext = _native_or_skip()
    z = _tile(40, 50, seed=2)
    row, col = torch.logsumexp(z, 1), torch.logsumexp(z, 0)
    want = torch.exp(z - row[:, None]) + torch.exp(z - col)
    zz = z.clone()
    ext.tile_softmax_pair(zz.numpy(), row.numpy(), col.numpy(), zz.numpy())
    assert_close(zz, want, torch.float32, "P in place")


def test_native_tiles_only_for_contiguous_cpu_float32_tiles(monkeypatch):
    _native_or_skip()
    z = _tile(8, 8)
    assert tiles.native_tiles(z) is not None
    assert tiles.native_tiles(z.double()) is None
    assert tiles.native_tiles(z.T) is None  # a strided view: the torch code
    assert tiles.native_tiles(z.half()) is None
    _torch_tiles(monkeypatch)
    assert tiles.native_tiles(z) is None


def test_native_tiles_follow_the_extension_verdict(monkeypatch):
    from fastclip import extension

    monkeypatch.setenv("FASTCLIP_NATIVE", "0")
    extension.reset()
    try:
        assert tiles.native_tiles(_tile(4, 4)) is None
        row, col = tiles.tile_lse_pair(_tile(4, 4), torch.empty(4, 4))  # the torch code runs
        assert row.dtype == STAT_DTYPE and col.shape == (4,)
    finally:
        monkeypatch.delenv("FASTCLIP_NATIVE")
        extension.reset()


@pytest.mark.parametrize("loss", ["clip", "simclr"])
def test_losses_agree_with_and_without_the_native_tiles(monkeypatch, loss):
    """The chunked CLIP and SimCLR losses and their gradients, fp32, several tiles (tails, the
    masked diagonal tiles of SimCLR): native tiles vs the torch tiles, both against fp64."""
    _native_or_skip()
    from fastclip.ops.clip_loss import clip_loss
    from fastclip.ops.simclr_loss import simclr_loss, simclr_loss_reference

    a64, b64 = feats(150, 150, 24, seed=3)
    a64, b64 = torch.nn.functional.normalize(a64, dim=-1), torch.nn.functional.normalize(b64, dim=-1)

    def run(a, b):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        if loss == "clip":
            out = clip_loss(a, b, 1 / 0.07, backend="chunked", chunk_size=64)
        elif a.dtype == torch.float64:
            out = simclr_loss_reference(a, b, 0.1)
        else:
            out = simclr_loss(a, b, 0.1, backend="chunked", chunk_size=64)
        out.backward()
        return out.detach(), a.grad, b.grad

    exact = run(a64, b64) if loss == "simclr" else None
    if exact is None:
        a, b = a64.clone().requires_grad_(), b64.clone().requires_grad_()
        out = clip_loss_reference(a, b, 1 / 0.07)
        out.backward()
        exact = (out.detach(), a.grad, b.grad)
    native = run(a64.float(), b64.float())
    _torch_tiles(monkeypatch)
    peer = run(a64.float(), b64.float())
    for what, got, want, p in zip(("loss", "grad a", "grad b"), native, exact, peer):
        assert_close(got, want, torch.float32, what, scale_floor=1.0, peers=[p])


def test_native_tiles_propagate_nan_and_inf_as_torch_does():
    """A diverged run's NaN logits must reach the loss (the trainer stops or skips on a NaN loss)."""
    _native_or_skip()
    z = _tile(40, 50, seed=4)
    z[3, 4], z[7, 9] = math.nan, math.inf
    work = torch.empty_like(z)
    row, col = tiles.tile_lse_pair(z, work)
    assert torch.equal(torch.isnan(row), torch.isnan(tile_lse(z, 1, work)))
    assert torch.equal(torch.isnan(col), torch.isnan(tile_lse(z, 0, work)))
    assert row[3].isnan() and col[4].isnan() and row[7].isnan() and col[9].isnan()
    p = tiles.softmax_pair(z.clone(), torch.zeros(40), torch.zeros(50), torch.empty(40, 50))
    assert p[3, 4].isnan() and not p[0].isnan().any()
