"""The distributed CLIP / SigLIP losses on CPU with gloo, 2 and 4 processes.

Contract (fastclip.ops.distributed_loss):
* lean mode: every rank's loss equals the single-process loss on the concatenated batch, rank r's
  feature gradients are P * dL/d(its rows) and logit_scale's is dL/ds, so that after DDP's average
  every parameter gradient equals single-process training;
* open_clip's modes (``gather`` / ``local`` x gather_with_grad) equal open_clip's ClipLoss;
* invalid inputs on one rank, or ranks that disagree, raise on every rank (never a hang: every
  task runs under a deadline, see _pool.py), and the group stays usable.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastclip.ops import clip_loss_reference, siglip_loss_reference
from fastclip.testing import assert_close, load_open_clip_file

from . import _distributed_loss_tasks as T
from ..distributed._pool import DistPool, WorkerHang

pytestmark = pytest.mark.distributed

TASKS = "tests.ops._distributed_loss_tasks"
D = 8
F32 = torch.float32
DDP_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 DDP against the fp64 single-process oracle

OC, _OC_WHY = load_open_clip_file("loss")
needs_open_clip = pytest.mark.skipif(OC is None, reason=str(_OC_WHY))

_POOLS: dict = {}


@pytest.fixture(scope="module")
def pools():
    def get(world_size: int) -> DistPool:
        pool = _POOLS.get(world_size)
        if pool is None or pool.broken:
            pool = _POOLS[world_size] = DistPool(world_size)
        return pool
    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


# ----------------------------------------------------------------------------------------------
# Oracles on the concatenated batch (fp64)
# ----------------------------------------------------------------------------------------------
def _leaf(x):
    return x.detach().clone().double().requires_grad_()


def oracle(case, counts):
    """Per rank: the expected (loss, grad a, grad b, grad s, grad c) for ``case``."""
    A0, B0 = T.features(counts, D, seed=0, dtype=torch.float64)
    P = len(counts)
    kind, mode = case["loss"], case.get("mode", "lean")
    gwg, eps = case.get("gather_with_grad", False), case.get("eps", 0.0)
    has_bias = case.get("bias", kind == "siglip")
    out = []
    for r in range(P):
        A, B, s = _leaf(A0), _leaf(B0), torch.tensor(T.SCALE, dtype=torch.float64, requires_grad=True)
        c = torch.tensor(T.BIAS, dtype=torch.float64, requires_grad=True) if has_bias else None
        sl = T.rows(counts, r)
        if kind == "siglip":
            loss = siglip_loss_reference(A, B, s, c)
        elif mode == "local":
            off = sl.start
            cols_a, cols_b = (A, B) if gwg else (A.detach(), B.detach())
            labels = torch.arange(counts[r]) + off
            shift = c if c is not None else 0.0
            loss = (F.cross_entropy(s * A[sl] @ cols_b.T + shift, labels, label_smoothing=eps)
                    + F.cross_entropy(s * B[sl] @ cols_a.T + shift, labels, label_smoothing=eps)) / 2
            if gwg:  # rank r's feature gradients sum every rank's local loss (open_clip's all_gather backward)
                total = 0.0
                for q in range(P):
                    slq = T.rows(counts, q)
                    lq = torch.arange(counts[q]) + slq.start
                    total = total + (F.cross_entropy(s.detach() * A[slq] @ B.T, lq, label_smoothing=eps)
                                     + F.cross_entropy(s.detach() * B[slq] @ A.T, lq, label_smoothing=eps)) / 2
                ga, gb = torch.autograd.grad(total, (A, B))
                gs, = torch.autograd.grad(loss, (s,))
                out.append((loss.detach(), ga[sl], gb[sl], gs, torch.zeros(()) if has_bias else None))
                continue
        else:
            loss = clip_loss_reference(A, B, s, c, label_smoothing=eps)
        loss.backward()
        k = 1 if (mode == "gather" and not gwg) or mode == "local" else P
        out.append((loss.detach(), k * A.grad[sl], k * B.grad[sl], s.grad,
                    None if c is None else (c.grad if c.grad is not None else torch.zeros(()))))
    return out


def check_against_oracle(results, case, counts, tol=None):
    tol = tol or {}
    for r, (res, exp) in enumerate(zip(results, oracle(case, counts))):
        for name, got, want in zip(("loss", "grad image_features", "grad text_features", "grad logit_scale",
                                    "grad logit_bias"), (res["loss"], res["a"], res["b"], res["s"], res["c"]), exp):
            if want is None:
                assert got is None, f"rank {r}: {name} should be None"
                continue
            floor = 1.0 if name in ("loss", "grad logit_scale", "grad logit_bias") else 1e-30
            assert_close(got, want, F32, what=f"{case} rank {r} {name}", scale_floor=floor, **tol)


# ----------------------------------------------------------------------------------------------
# Loss value and gradients against the single-process oracle
# ----------------------------------------------------------------------------------------------
CLIP_CASES = [
    dict(loss="clip", mode="lean", chunk=4),
    dict(loss="clip", mode="lean", chunk=3, eps=0.1, bias=True),
    dict(loss="clip", mode="lean", backend="reference"),
    dict(loss="clip", mode="gather", gather_with_grad=False, chunk=4),
    dict(loss="clip", mode="gather", gather_with_grad=True, chunk=5, eps=0.1),
    dict(loss="clip", mode="local", gather_with_grad=False, chunk=4),
    dict(loss="clip", mode="local", gather_with_grad=True, chunk=3, eps=0.1, bias=True),
    dict(loss="clip", mode="local", gather_with_grad=True, backend="reference"),
    dict(loss="siglip", chunk=4),
    dict(loss="siglip", backend="reference"),
]


def _case_id(case):
    return "-".join([case["loss"]] + [f"{k}={v}" for k, v in case.items() if k != "loss"])


@pytest.mark.parametrize("counts", [(6, 6), (5, 9)], ids=["even", "uneven"])
@pytest.mark.parametrize("case", CLIP_CASES, ids=_case_id)
def test_two_ranks_match_single_process(pools, case, counts):
    results = pools(2).run(f"{TASKS}:loss_and_grads", list(counts), D, 0, case)
    check_against_oracle(results, case, counts)


def test_lean_fp64_is_exact(pools):
    case = dict(loss="clip", chunk=4, dtype=torch.float64, eps=0.05)
    results = pools(2).run(f"{TASKS}:loss_and_grads", [7, 4], D, 0, case)
    check_against_oracle(results, case, (7, 4), tol=dict(atol=1e-12, rtol=1e-10))
    case = dict(loss="siglip", chunk=4, dtype=torch.float64)
    results = pools(2).run(f"{TASKS}:loss_and_grads", [7, 4], D, 0, case)
    check_against_oracle(results, case, (7, 4), tol=dict(atol=1e-12, rtol=1e-10))


def test_no_grad_forward_agrees(pools):
    counts = [5, 9]
    got = pools(2).run(f"{TASKS}:no_grad_forward", counts, D, 0)
    A, B = T.features(counts, D, seed=0, dtype=torch.float64)
    want = [clip_loss_reference(A, B, T.SCALE).item(), siglip_loss_reference(A, B, T.SCALE, T.BIAS).item()]
    for r, vals in enumerate(got):
        assert vals[:2] == pytest.approx(want, rel=1e-5), f"rank {r}"
        assert vals[2] == 0, f"rank {r}: {vals[2]} SigLIP sweeps formed gradients under no_grad"


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel: parameter gradients equal single-process training
# ----------------------------------------------------------------------------------------------
DDP_SPECS = [
    ("fastclip", "clip", {}),
    ("fastclip", "clip", {"chunk_size": 3}),
    ("fastclip", "clip", {"dist_mode": "open_clip", "local_loss": False, "gather_with_grad": True}),
    ("fastclip", "clip", {"dist_mode": "open_clip", "local_loss": True, "gather_with_grad": True}),
    ("fastclip", "siglip", {"chunk_size": 3}),
    ("fastclip", "siglip", {"dist_impl": "shift"}),
]


def _check_grads(got, want, what, tol=DDP_TOL):
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], F32, what=f"{what}: grad of {name}", **tol)


# open_clip's local_loss returns per-rank means, which DDP's plain average weights unequally when
# the ranks' batches differ: that pair does not reproduce single-process gradients by definition,
# so it is not generated.
DDP_CASES = [
    pytest.param(spec, counts, id=f"{spec[1]}-{spec[2]}-{name}")
    for spec in DDP_SPECS for counts, name in (((6, 6), "even"), ((4, 9), "uneven"))
    if not (spec[2].get("dist_mode") == "open_clip" and spec[2].get("local_loss") and counts[0] != counts[1])
]


@pytest.mark.parametrize("spec,counts", DDP_CASES)
def test_ddp_gradients_equal_single_process(pools, spec, counts):
    results = pools(2).run(f"{TASKS}:ddp_step", list(counts), spec)
    want = T.single_process_grads(counts, spec[1])
    for r, res in enumerate(results):
        _check_grads(res["grads"], want["grads"], f"{spec} rank {r}")
        if not spec[2].get("local_loss"):
            assert_close(res["loss"], want["loss"], F32, what=f"{spec} rank {r} loss", scale_floor=1.0)


def test_logit_scale_and_bias_gradients_not_counted_per_rank(pools):
    """The scale (and bias) gradient is complete on every rank; DDP's average must leave it as the
    single-process value, not P times it (nor 1/P of it)."""
    counts = [5, 7]
    for spec in (("fastclip", "clip", {}), ("fastclip", "siglip", {})):
        results = pools(2).run(f"{TASKS}:ddp_step", counts, spec, 1, True)
        want = T.single_process_grads(counts, spec[1], 1, True)["grads"]
        for r, res in enumerate(results):
            for name in ("logit_scale", "logit_bias"):
                got, exp = res["grads"][name], want[name]
                assert_close(got, exp, F32, what=f"{spec[1]} rank {r} {name} (P x would be {2 * exp.item():.6g})",
                             scale_floor=1.0, **DDP_TOL)


@needs_open_clip
@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_open_clip_modes_equal_open_clip_under_ddp(pools, local_loss, gather_with_grad):
    counts = [6, 6]
    kw = {"local_loss": local_loss, "gather_with_grad": gather_with_grad}
    ours = pools(2).run(f"{TASKS}:ddp_step", counts, ("fastclip", "clip", {"dist_mode": "open_clip", **kw}))
    theirs = pools(2).run(f"{TASKS}:ddp_step", counts, ("open_clip", "clip", kw))
    for r, (o, t) in enumerate(zip(ours, theirs)):
        assert_close(o["loss"], t["loss"], F32, what=f"rank {r} loss", scale_floor=1.0)
        _check_grads(o["grads"], t["grads"], f"open_clip {kw} rank {r}")


@needs_open_clip
def test_lean_equals_open_clip_gather_with_grad(pools):
    """Lean's DDP gradients are open_clip's gather_with_grad ones; its value is the global loss."""
    counts = [6, 6]
    ours = pools(2).run(f"{TASKS}:ddp_step", counts, ("fastclip", "clip", {}))
    for local_loss in (False, True):
        theirs = pools(2).run(f"{TASKS}:ddp_step", counts,
                              ("open_clip", "clip", {"local_loss": local_loss, "gather_with_grad": True}))
        for r, (o, t) in enumerate(zip(ours, theirs)):
            _check_grads(o["grads"], t["grads"], f"lean vs open_clip local_loss={local_loss} rank {r}")
            if not local_loss:
                assert_close(o["loss"], t["loss"], F32, what=f"rank {r} loss", scale_floor=1.0)


@needs_open_clip
@pytest.mark.parametrize("dist_impl", ["bidir", "gather"])
def test_siglip_equals_open_clip_under_ddp(pools, dist_impl):
    counts = [6, 6]
    ours = pools(2).run(f"{TASKS}:ddp_step", counts, ("fastclip", "siglip", {"dist_impl": dist_impl}))
    theirs = pools(2).run(f"{TASKS}:ddp_step", counts, ("open_clip", "siglip", {"dist_impl": dist_impl}))
    mean_theirs = sum(t["loss"] for t in theirs) / len(theirs)  # open_clip returns per-rank shares
    for r, (o, t) in enumerate(zip(ours, theirs)):
        _check_grads(o["grads"], t["grads"], f"siglip {dist_impl} rank {r}")
        assert_close(o["loss"], mean_theirs, F32, what=f"rank {r} loss", scale_floor=1.0)


# ----------------------------------------------------------------------------------------------
# Invalid inputs raise on every rank; the group stays usable
# ----------------------------------------------------------------------------------------------
INVALID = [
    ("text_dim", "image_features and text_features must have the same shape"),
    ("not_2d", "must be 2-D"),
    ("nan_scale", "logit_scale must be finite"),
    ("chunk", "chunk_size must be >= 1"),
    ("backend", "is not a backend"),
    ("module_rank", "built with rank="),
]
MISMATCH = [
    ("feature_dim", "feature dimension D must be the same on every rank"),
    ("dtype", "dtype must be the same on every rank"),
    ("scale_value", "logit_scale must be the same on every rank"),
    ("requires_grad", "image_features.requires_grad must be the same on every rank"),
    ("mode", "mode must be the same on every rank"),
]


@pytest.mark.parametrize("kind,message", INVALID + MISMATCH, ids=[k for k, _ in INVALID + MISMATCH])
def test_bad_input_on_one_rank_raises_on_every_rank(pools, kind, message):
    counts = [4, 6]
    results = pools(2).run(f"{TASKS}:invalid_inputs", counts, D, 1, kind, timeout=60)
    for r, res in enumerate(results):
        status, text = res["result"]
        assert status == "raised", f"rank {r} did not raise for {kind}: returned {text}"
        assert message in text, f"rank {r}: {text!r} lacks {message!r}"
        if (kind, message) in INVALID:
            assert "rank 1" in text, text
        assert res["after"] == pytest.approx(results[0]["after"])


def test_bad_siglip_input_raises_on_every_rank(pools):
    results = pools(2).run(f"{TASKS}:invalid_inputs", [4, 6], D, 0, "nan_scale", "siglip", timeout=60)
    for res in results:
        assert res["result"][0] == "raised" and "invalid inputs on rank 0" in res["result"][1]


def test_pool_fails_a_hang_instead_of_waiting():
    """The deadline that guards every task above turns a deadlock into a failure (this is what
    makes a passing bad-input test a proof that nothing hangs)."""
    pool = DistPool(2)
    try:
        with pytest.raises(WorkerHang, match=r"ranks \[0\] did not finish"):
            pool.run(f"{TASKS}:deliberate_hang", timeout=5)
        assert pool.broken
    finally:
        pool.close()


# ----------------------------------------------------------------------------------------------
# Four ranks: uneven batches, subgroups, DDP, bad input
# ----------------------------------------------------------------------------------------------
def test_four_ranks_uneven(pools):
    counts = (3, 1, 4, 2)
    for case in (dict(loss="clip", chunk=2, eps=0.1), dict(loss="siglip", chunk=2),
                 dict(loss="clip", mode="local", gather_with_grad=True, chunk=2)):
        results = pools(4).run(f"{TASKS}:loss_and_grads", list(counts), D, 0, case)
        check_against_oracle(results, case, counts)


def test_four_ranks_subgroups(pools):
    """Two groups of two ({0, 2} and {1, 3}): nothing assumes WORLD or group rank == global rank."""
    groups = [[0, 2], [1, 3]]
    counts = (3, 5)
    for case in (dict(loss="clip", chunk=2), dict(loss="siglip", chunk=2)):
        results = pools(4).run(f"{TASKS}:loss_and_grads", list(counts), D, 0, case, groups)
        for k, ranks in enumerate(groups):
            per_group = sorted((results[g] for g in ranks), key=lambda res: res["group_rank"])
            A0, B0 = T.features(counts, D, seed=k, dtype=torch.float64)
            A, B, s = _leaf(A0), _leaf(B0), torch.tensor(T.SCALE, dtype=torch.float64, requires_grad=True)
            if case["loss"] == "clip":
                loss = clip_loss_reference(A, B, s)
            else:
                loss = siglip_loss_reference(A, B, s, T.BIAS)
            loss.backward()
            for q, res in enumerate(per_group):
                sl = T.rows(counts, q)
                assert_close(res["loss"], loss, F32, what=f"group {k} rank {q} loss", scale_floor=1.0)
                assert_close(res["a"], 2 * A.grad[sl], F32, what=f"group {k} rank {q} grad a")
                assert_close(res["b"], 2 * B.grad[sl], F32, what=f"group {k} rank {q} grad b")
                assert_close(res["s"], s.grad, F32, what=f"group {k} rank {q} grad s", scale_floor=1.0)


def test_four_ranks_ddp(pools):
    counts = [3, 4, 2, 3]
    for spec in (("fastclip", "clip", {}), ("fastclip", "siglip", {})):
        results = pools(4).run(f"{TASKS}:ddp_step", counts, spec)
        want = T.single_process_grads(counts, spec[1])
        for r, res in enumerate(results):
            _check_grads(res["grads"], want["grads"], f"{spec} rank {r}")
            assert_close(res["loss"], want["loss"], F32, what=f"{spec} rank {r} loss", scale_floor=1.0)


@needs_open_clip
def test_four_ranks_siglip_equals_open_clip_bidir(pools):
    """With 4 ranks open_clip's bidir exchange takes both its paths (one bidirectional round, one
    single exchange)."""
    counts = [3, 3, 3, 3]
    ours = pools(4).run(f"{TASKS}:ddp_step", counts, ("fastclip", "siglip", {}))
    theirs = pools(4).run(f"{TASKS}:ddp_step", counts, ("open_clip", "siglip", {"dist_impl": "bidir"}))
    for r, (o, t) in enumerate(zip(ours, theirs)):
        _check_grads(o["grads"], t["grads"], f"siglip bidir rank {r}")


def test_four_ranks_bad_input_on_one_rank(pools):
    results = pools(4).run(f"{TASKS}:invalid_inputs", [2, 3, 2, 3], D, 2, "text_dim", timeout=60)
    for r, res in enumerate(results):
        status, text = res["result"]
        assert status == "raised" and "invalid inputs on rank 2 of 4" in text, f"rank {r}: {text}"


# ----------------------------------------------------------------------------------------------
# One process: argument checks that need no group
# ----------------------------------------------------------------------------------------------
def test_module_arguments_are_checked_at_construction():
    import fastclip

    with pytest.raises(ValueError, match="dist_mode must be one of"):
        fastclip.ClipLoss(rank=0, world_size=2, dist_mode="ring")
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        fastclip.SigLipLoss(rank=0, world_size=2, dist_impl="allreduce")
    for impl in (None, "bidir", "shift", "reduce", "gather"):
        fastclip.SigLipLoss(rank=1, world_size=2, dist_impl=impl)


def test_world_size_above_one_needs_an_initialised_group():
    import torch.distributed as dist

    import fastclip
    from fastclip.ops import distributed_clip_loss, distributed_siglip_loss

    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process already has a default process group")
    a, b = T.features([4], D, seed=0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        fastclip.ClipLoss(rank=0, world_size=2)(a, b, 10.0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        fastclip.SigLipLoss(rank=0, world_size=2)(a, b, 10.0, -10.0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        distributed_clip_loss(a, b, 10.0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        distributed_siglip_loss(a, b, 10.0, -10.0)


@pytest.mark.parametrize("world", [1, 2])
def test_bad_mode_raises_with_one_process_too(pools, world):
    # A single-rank group takes a shortcut to the single-process loss; it must refuse the same
    # arguments as a larger group, or a script tested on one process breaks on several.
    for res in pools(world).run(f"{TASKS}:mode_errors", D):
        # (with several ranks the same error arrives wrapped in DistributedInputError, per rank)
        assert "ValueError: mode must be one of" in res[0], res[0]
        assert "ValueError: gather_with_grad applies to mode='gather' or 'local'" in res[1], res[1]
        assert "TypeError: gather_with_grad must be a bool" in res[2], res[2]
