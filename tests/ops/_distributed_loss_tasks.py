"""Tasks that every rank of a DistPool runs (imported by the workers), and the matching
single-process oracles (imported by the tests).

Everything here is deterministic in (counts, seed): every rank builds the same global batch and
takes its own rows, so the test process can rebuild the concatenated batch for the oracle.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastclip
from fastclip.ops import (
    DistributedInputError,
    clip_loss_reference,
    distributed_clip_loss,
    distributed_siglip_loss,
    siglip_loss_reference,
)
from fastclip.testing import load_open_clip_file

D_IMG_IN, D_TXT_IN, D_EMB = 12, 10, 8
SCALE, BIAS = 9.0, -4.0



def rows(counts, rank) -> slice:
    off = sum(counts[:rank])
    return slice(off, off + counts[rank])


def features(counts, d, seed, dtype=torch.float32):
    """The concatenated global batch (normalised image and text features)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.to(dtype), b.to(dtype)


def _detached(x):
    return None if x is None else x.detach().clone()


def _call_case(case, a, b, s, c, group):
    if case["loss"] == "clip":
        return distributed_clip_loss(a, b, s, c, group=group, mode=case.get("mode", "lean"),
                                     gather_with_grad=case.get("gather_with_grad", False),
                                     backend=case.get("backend", "auto"), chunk_size=case.get("chunk"),
                                     label_smoothing=case.get("eps", 0.0))
    return distributed_siglip_loss(a, b, s, c, group=group, backend=case.get("backend", "auto"),
                                   chunk_size=case.get("chunk"))


def loss_and_grads(counts, d, seed, case, groups=None):
    """This rank's loss and gradients for one case.  ``groups``: run inside the subgroup (a list of
    global-rank lists, every rank in exactly one) that holds this rank; counts then index group ranks."""
    group = None
    if groups is not None:
        made = [dist.new_group(ranks) for ranks in groups]  # every rank creates every group, in order
        k = next(i for i, ranks in enumerate(groups) if dist.get_rank() in ranks)
        group, seed = made[k], seed + k
    rank = dist.get_rank(group)
    A, B = features(counts, d, seed, case.get("dtype", torch.float32))
    sl = rows(counts, rank)
    a = A[sl].clone().requires_grad_()
    b = B[sl].clone().requires_grad_()
    s = torch.tensor(SCALE, dtype=A.dtype, requires_grad=True)
    c = torch.tensor(BIAS, dtype=A.dtype, requires_grad=True) if case.get("bias", case["loss"] == "siglip") else None
    loss = _call_case(case, a, b, s, c, group)
    loss.backward()
    return {"loss": loss.detach(), "a": _detached(a.grad), "b": _detached(b.grad), "s": _detached(s.grad),
            "c": None if c is None else _detached(c.grad), "group_rank": rank}


def no_grad_forward(counts, d, seed):
    """Evaluation (torch.no_grad) runs the forward collectives only, and agrees with training.

    The inputs require grad (text features only on rank 1): grad mode, not requires_grad, must
    decide whether gradients are formed, or the ranks would take different collective paths.
    Returns the two losses and how many SigLIP sweeps were asked for gradients (must be 0)."""
    from fastclip.ops.distributed_loss import distributed_engine
    engine = distributed_engine("siglip_loss", "chunked", torch.device("cpu"), torch.float32)
    orig, grad_sweeps = engine.sweep, []

    def counting(a, b, scale, bias, chunk, need_grads):
        grad_sweeps.append(bool(need_grads))
        return orig(a, b, scale, bias, chunk, need_grads)

    A, B = features(counts, d, seed)
    sl = rows(counts, dist.get_rank())
    a = A[sl].clone().requires_grad_()
    b = B[sl].clone().requires_grad_(dist.get_rank() == 1)
    engine.sweep = staticmethod(counting)
    try:
        with torch.no_grad():
            return [distributed_clip_loss(a, b, SCALE).item(),
                    distributed_siglip_loss(a, b, SCALE, BIAS).item(), sum(grad_sweeps)]
    finally:
        engine.sweep = staticmethod(orig)


# ----------------------------------------------------------------------------------------------
# A tiny two-tower model under DistributedDataParallel
# ----------------------------------------------------------------------------------------------
class Towers(nn.Module):
    def __init__(self, with_bias: bool):
        super().__init__()
        self.img = nn.Linear(D_IMG_IN, D_EMB)
        self.txt = nn.Linear(D_TXT_IN, D_EMB)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(SCALE)))
        self.logit_bias = nn.Parameter(torch.tensor(BIAS)) if with_bias else None

    def forward(self, x, y):
        i = F.normalize(self.img(x), dim=-1)
        t = F.normalize(self.txt(y), dim=-1)
        return i, t, self.logit_scale.exp(), self.logit_bias


def model_and_inputs(counts, seed, with_bias, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Towers(with_bias).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(counts)
    x = torch.randn(n, D_IMG_IN, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n, D_TXT_IN, generator=g, dtype=torch.float64).to(dtype)
    return model, x, y


def _make_loss(spec, rank, world):
    owner, kind, kwargs = spec
    if owner == "fastclip":
        cls = {"clip": fastclip.ClipLoss, "siglip": fastclip.SigLipLoss}[kind]
    else:
        oc, _ = load_open_clip_file("loss")
        cls = {"clip": oc.ClipLoss, "siglip": oc.SigLipLoss}[kind]
    return cls(rank=rank, world_size=world, **kwargs)


def ddp_step(counts, spec, seed=0, with_bias=False):
    """One forward/backward of Towers wrapped in DDP; returns this rank's loss and the averaged grads."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, y = model_and_inputs(counts, seed, with_bias or spec[1] == "siglip")
    ddp = DDP(model)
    sl = rows(counts, rank)
    i, t, s, c = ddp(x[sl], y[sl])
    loss_fn = _make_loss(spec, rank, world)
    loss = loss_fn(i, t, s, c) if (c is not None or spec[1] == "siglip") else loss_fn(i, t, s)
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()}}


def single_process_grads(counts, kind, seed=0, with_bias=False):
    """The oracle: the same model on the concatenated batch in one process (fp64, reference loss)."""
    model, x, y = model_and_inputs(counts, seed, with_bias or kind == "siglip", torch.float64)
    i, t, s, c = model(x, y)
    if kind == "clip":
        loss = clip_loss_reference(i, t, s, c)
    else:
        loss = siglip_loss_reference(i, t, s, c)
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()}}


# ----------------------------------------------------------------------------------------------
# Invalid inputs: every rank must raise, and the group must stay usable
# ----------------------------------------------------------------------------------------------
def invalid_inputs(counts, d, bad_rank, kind, op="clip"):
    rank, world = dist.get_rank(), dist.get_world_size()
    A, B = features(counts, d, seed=3)
    sl = rows(counts, rank)
    a, b = A[sl].clone().requires_grad_(), B[sl].clone().requires_grad_()
    scale, bias, kwargs = torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS), {}
    module_rank = rank
    bad = rank == bad_rank
    if bad:
        if kind == "text_dim":            # local check: shapes of the pair disagree
            b = torch.randn(counts[rank], d + 1)
        elif kind == "not_2d":
            a = a.detach().reshape(-1)
        elif kind == "nan_scale":
            scale = torch.tensor(float("nan"))
        elif kind == "chunk":
            kwargs["chunk_size"] = 0
        elif kind == "backend":
            kwargs["backend"] = "no-such-backend"
        elif kind == "feature_dim":       # locally valid, but D differs from the other ranks
            a, b = torch.randn(counts[rank], d + 2), torch.randn(counts[rank], d + 2)
        elif kind == "dtype":
            a, b = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        elif kind == "scale_value":
            scale = torch.tensor(SCALE + 1.0, requires_grad=True)
        elif kind == "requires_grad":
            a = a.detach()
        elif kind == "mode":
            kwargs["mode"] = "gather"
        elif kind == "module_rank":       # the module was built with another rank's number
            module_rank = (rank + 1) % world
        else:
            raise ValueError(kind)
    try:
        if kind == "module_rank":
            fn = fastclip.ClipLoss(rank=module_rank, world_size=world) if op == "clip" else \
                fastclip.SigLipLoss(rank=module_rank, world_size=world)
            out = fn(a, b, scale) if op == "clip" else fn(a, b, scale, bias)
        elif op == "clip":
            out = distributed_clip_loss(a, b, scale, **kwargs)
        else:
            out = distributed_siglip_loss(a, b, scale, bias, **kwargs)
        result = ("returned", out.item())
    except DistributedInputError as exc:
        result = ("raised", str(exc))
    # the group is still usable: a valid call right after succeeds on every rank
    after = distributed_clip_loss(A[sl], B[sl], SCALE).item()
    return {"result": result, "after": after}


def deliberate_hang():
    """Rank 0 enters a collective that the other ranks never join (to test the pool's deadline)."""
    if dist.get_rank() == 0:
        dist.all_reduce(torch.zeros(1))
    return "done"


def mode_errors(d):
    """(exception type, message) of each invalid mode argument, or "no error"."""
    a, b = torch.randn(4, d), torch.randn(4, d)
    out = []
    for kw in (dict(mode="bogus"), dict(mode="lean", gather_with_grad=True), dict(mode="gather", gather_with_grad=1)):
        try:
            distributed_clip_loss(a, b, SCALE, **kw)
            out.append("no error")
        except (ValueError, TypeError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out
