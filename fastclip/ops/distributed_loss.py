"""CLIP and SigLIP losses over a global batch spread across the ranks of a process group.

Rank q of a group of P ranks holds n_q image/text pairs (sizes may differ); the global batch is the
concatenation in rank order, N = sum_q n_q, and rank r's pairs are global rows off_r .. off_r + n_r.
Every mode computes an exact result for that global batch, and only the reference twin ever holds
an N x N (or n x N) logit matrix.  ``group=None`` means the default (WORLD) group; ranks in messages are ranks
within ``group``.

Design of the lean CLIP mode (``mode="lean"``, the default)
-----------------------------------------------------------
Row i of the global logit matrix z = s * A @ T.T is an image, column j a text.  Rank r owns image
rows and text columns off_r .. off_r + n_r.  It receives the other ranks' text features (P
broadcasts, issued asynchronously so that its own block is computed while the others arrive, no
autograd), and sweeps its n_r image rows against all N text columns tile by tile:

* its rows' log-sum-exp r_i are complete locally (each row sees every column);
* each column's log-sum-exp c_j is only partial (n_r of N rows); the N partials are merged across
  ranks with one all-reduce MAX and one all-reduce SUM of exp(partial - max), into which the
  scalar sums of the loss (sum r_i, the diagonal, and for label smoothing sum A, sum T) are
  packed.  Only these O(N) statistics cross ranks, never logits.  Every rank then holds all c_j,
  so the text->image half of the loss (text rows = global columns) needs no second sweep and the
  image features are never sent anywhere.

Backward recomputes the tiles of the same n_r x N strip, P = exp(z - r - log 2N) + exp(z - c - log 2N):
P @ T gives the gradient of the local image rows completely; P.T @ A gives this rank's share of
every text feature's gradient.  These shares are summed onto their owners with one ``reduce`` per
column block (async: one block's reduce is in flight while the next block's tiles are computed),
and the logit_scale gradient needs one all-reduce of two scalars.

Per rank and step (n = N/P, D features, b bytes per feature element):

==========================  =====================================  ==========================================
                            lean (this mode)                       open_clip local_loss + gather_with_grad
==========================  =====================================  ==========================================
features sent/received      (N - n) * D * b  (text only)           2 * (N - n) * D * b  (both towers)
statistics                  2 all-reduces of N fp64 (+2D+2)        --
gradients sent              ~(N - n) * D * 4  (text, fp32)         2 * (N - n) * D * 4  (both towers)
extra memory                (N-n)*D*b (text blocks, kept for       2*N*D*b + >= 4 * n * N * 4 bytes
                            backward) + O(N) + ~4*n*D*4 + tiles    (two n x N logit matrices, their
                                                                   log-softmax and its gradient)
FLOPs                       8 * n * N * D                          12 * n * N * D
==========================  =====================================  ==========================================

The lean SigLIP loss has no statistic that couples tiles, so it sweeps the same n_r x N strip once
in forward (loss and gradients together, as the single-process op does); the text gradient shares
are reduced to their owners during that sweep, the received text blocks are prefetched at most two
ahead and dropped after use (extra memory O(n * D + tile), not N * D), and four scalars are
all-reduced.
It gives open_clip's neighbour-exchange result (all of open_clip's ``dist_impl`` compute the same
loss) without its P - 1 sequential exchanges.

open_clip's modes (``mode="gather"``: open_clip's ``local_loss=False``; ``mode="local"``:
``local_loss=True``; each with ``gather_with_grad``) are reproduced exactly, including their
per-rank loss values and gradients, with the memory-lean kernels in place of materialised logits.
Uneven local batches work in every mode (open_clip's own code needs equal ones; ``local`` mode's
labels are then the global row offsets).

Gradient contract under DistributedDataParallel
-----------------------------------------------
DDP averages parameter gradients over ranks (divides their sum by P).  With L the single-process
loss on the concatenated batch and g_q the gradient flowing into rank q's loss (1 in plain
training; a loss-scaler factor, equal on all ranks, under AMP):

* ``lean`` (CLIP and SigLIP): every rank returns L.  Backward behaves as if every rank held the
  whole graph of L and the feature gathers carried gradients (open_clip's gather_with_grad):
  rank r's features get (sum_q g_q) * dL/d(its features) and its logit_scale / logit_bias get
  g_r * dL/ds.  After DDP's average every parameter gradient equals the single-process gradient
  of L (times g).  The logit_scale gradient is complete on each rank and must NOT be summed again:
  DDP's average of P equal values is that value (summing inside the loss and again in DDP is the
  P-fold over-count this contract avoids).
* ``gather``/``local``: exactly open_clip's ClipLoss with the same flags (gather: every rank
  returns L; local: rank r returns the mean over its own rows and text rows).  After DDP,
  gather_with_grad=True gives the single-process gradients in both; gather_with_grad=False gives
  open_clip's known deviations (``gather``: tower gradients 1/P of the single-process ones;
  ``local``: no gradient through the gathered columns), kept for reproducibility.

Safety: before the first data collective every call all-reduces a small table of each rank's
shapes, dtypes, flags and scale values (at most P x 16 float64).  An invalid input on any rank, or a
disagreement between ranks (feature dim, dtype, logit_scale, requires_grad, mode, ...), raises
:class:`DistributedInputError` on every rank naming the rank and argument, so no rank is left
waiting in a collective.  All ranks must call backward (as DDP requires anyway).

Layers: reference twin (``backend="reference"``: autograd gathers + materialised logits) ->
lean autograd Functions over the single-process engines (chunked tiles or Triton kernels) ->
``distributed_clip_loss`` / ``distributed_siglip_loss``.  The modules are fastclip.ClipLoss and
fastclip.SigLipLoss with world_size > 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed.agreement import DEVICE_CODES, AgreementField, DistributedInputError, agree_inputs
from ..distributed.collectives import GatherWithGrad, all_gather_with_grad, all_reduce_scalars, gather_blocks
from ..distributed.collectives import BlockReducer, broadcast_block
from ..distributed.group import Layout, check_group_device, group_rank_and_size
from . import dispatch
from ._checks import FLOATS, as_scalar_tensor, check_chunk_size, check_features, check_label_smoothing
from .clip_loss import clip_loss, clip_loss_reference
from .clip_loss import run_engine as run_clip_engine
from .siglip_loss import siglip_loss, siglip_loss_reference
from .tiles import STAT_DTYPE, acc_dtype, default_chunk_size, finish_clip_grads, rowdot_sum

__all__ = ["distributed_clip_loss", "distributed_siglip_loss", "DistributedInputError", "CLIP_MODES",
           "distributed_engine", "all_gather_with_grad"]

CLIP_MODES = ("lean", "gather", "local")
# Column statistic that switches off the column half of P = exp(z - r) + exp(z - c) (row-only CE).
# Finite on purpose: inf - inf would be NaN in the split fp64 -> fp32 subtraction of the engines.
_NO_COLUMN_TERM = 1e30


# ----------------------------------------------------------------------------------------------
# Agreement (fastclip.distributed.agreement): what every rank must share before any data moves
# ----------------------------------------------------------------------------------------------
_N_COMMON = 10  # fields from _common_fields
_N_CLIP_FIELDS = _N_COMMON + 4
_N_SIGLIP_FIELDS = _N_COMMON + 1


def _common_fields(a, b, scale_t, bias_t, has_bias: bool) -> list:
    grad = torch.is_grad_enabled()
    dtypes = [str(d).replace("torch.", "") for d in FLOATS]
    return [
        AgreementField("feature dimension D", a.shape[1]),
        AgreementField("dtype", FLOATS.index(a.dtype), show=dtypes),
        AgreementField("device type", DEVICE_CODES.get(a.device.type, 9), show=["?", "cpu", "cuda"]),
        AgreementField("image_features.requires_grad", float(grad and a.requires_grad), show=["False", "True"]),
        AgreementField("text_features.requires_grad", float(grad and b.requires_grad), show=["False", "True"]),
        AgreementField("logit_scale.requires_grad", float(grad and scale_t.requires_grad), show=["False", "True"]),
        AgreementField("logit_bias given", float(has_bias), show=["False", "True"]),
        AgreementField("logit_bias.requires_grad", float(grad and bias_t is not None and bias_t.requires_grad),
                       show=["False", "True"]),
        AgreementField("logit_scale", float(scale_t.detach()), exact=False),
        AgreementField("logit_bias", float(bias_t.detach()) if bias_t is not None else 0.0, exact=False),
    ]


# ----------------------------------------------------------------------------------------------
# open_clip's feature gather
# ----------------------------------------------------------------------------------------------
def _gathered(x, layout, group, *, with_grad: bool, keep_local: bool) -> torch.Tensor:
    """open_clip's gather_features for one tower (uneven blocks allowed)."""
    if with_grad:
        return GatherWithGrad.apply(x, layout, group)
    blocks = gather_blocks(x, layout, group)
    if keep_local:  # open_clip puts the local features back so that they keep their gradient
        blocks[layout.rank] = x
    return torch.cat(blocks, dim=0)


# ----------------------------------------------------------------------------------------------
# Lean CLIP
# ----------------------------------------------------------------------------------------------
class DistributedClipLossFunction(torch.autograd.Function):
    """forward(a [n_r, D], b [n_r, D], scale (0-dim), eps, chunk, engine, layout, group) -> global loss.

    Pass 1 and the statistic exchange run in forward, pass 2 and the gradient reduces in backward
    (see the module docstring)."""

    @staticmethod
    def forward(ctx, a, b, scale_t, eps, chunk, engine, layout, group):
        P, r, N = layout.world, layout.rank, layout.total
        acc = acc_dtype(a)
        s = float(scale_t)
        b_own = b.detach().contiguous()
        blocks = [None] * P
        works = [broadcast_block(blocks, q, b_own, layout, group) for q in range(P)]
        row_lse = None
        col_part = torch.empty(N, dtype=STAT_DTYPE, device=a.device)
        for q in [r] + [q for q in range(P) if q != r]:  # own block first, the others as they arrive
            if q != r:
                works[q].wait()
            rq, cq = engine.lse(a, blocks[q], s, chunk)
            st = rq.dtype
            rq = rq.to(STAT_DTYPE)
            row_lse = rq if row_lse is None else torch.logaddexp(row_lse, rq)
            col_part[layout.rows(q)] = cq
        works[r].wait()  # our own block's broadcast (it only reads b_own)
        col_max = col_part.clone()
        dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=group)
        diag = rowdot_sum(a, b_own, acc, chunk)
        parts = [torch.exp(col_part - col_max), row_lse.sum().reshape(1), diag.to(STAT_DTYPE).reshape(1)]
        if eps:
            parts += [a.sum(dim=0, dtype=STAT_DTYPE), b_own.sum(dim=0, dtype=STAT_DTYPE)]
        packed = torch.cat(parts)
        dist.all_reduce(packed, group=group)
        col_lse = col_max + packed[:N].log()
        row_sum, diag_sum = packed[N], packed[N + 1]
        sa = packed[N + 2:N + 2 + a.shape[1]] if eps else None
        sb = packed[N + 2 + a.shape[1]:] if eps else None
        lin_raw = (1.0 - eps) * diag_sum + ((eps / N) * torch.dot(sa, sb) if eps else 0.0)
        loss = (row_sum + col_lse.sum()) / (2 * N) - s * lin_raw / N
        others = [blocks[q] for q in range(P) if q != r]
        ctx.save_for_backward(a, b, scale_t, row_lse.to(st), col_lse.to(st), *others)
        ctx.extra = (eps, chunk, engine, layout, group, lin_raw, sa, sb)
        return loss.to(torch.promote_types(a.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a, b, scale_t, row_lse, col_lse, *others = ctx.saved_tensors
        eps, chunk, engine, layout, group, lin_raw, sa, sb = ctx.extra
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if not (need_a or need_b or need_s):  # the same on every rank: the agreement checked it
            return none
        P, r, N = layout.world, layout.rank, layout.total
        acc = acc_dtype(a)
        s = float(scale_t)
        blocks = list(others)
        blocks.insert(r, b.detach())
        shift = math.log(2 * N)  # folds the 1/(2N) of the two means into the exponent
        r_sh, c_sh = row_lse + shift, col_lse + shift
        ga = None
        red = BlockReducer(layout, group) if need_b else None
        for q in range(P):  # the same order on every rank: the reduces must match
            ga_q, gb_q = engine.softmax_grads(a, blocks[q], s, r_sh, c_sh[layout.rows(q)], chunk,
                                              need_a or need_s, need_b)
            if ga_q is not None:
                ga = ga_q if ga is None else ga.add_(ga_q)
            if need_b:
                red.add(q, gb_q)
        gb = red.finish() if need_b else None
        ds_local = rowdot_sum(a, ga, acc, chunk) if need_s else 0.0
        g_sum, dot_sum = all_reduce_scalars([grad_out, ds_local], group, a.device)
        g = grad_out.to(acc)
        coef = (g_sum * s).to(acc)  # sum over ranks of the incoming gradients: see the contract
        ds = (dot_sum - lin_raw / N).to(acc) if need_s else None
        grads = finish_clip_grads(ga if need_a else None, gb, ds, a, b, scale_t.dtype, g=g, coef=coef,
                              w=(1.0 - eps) / N, smooth=eps / N / N, sa=sa, sb=sb)
        return grads + none[3:]


# ----------------------------------------------------------------------------------------------
# open_clip's local_loss: cross-entropy of local rows against all gathered columns
# ----------------------------------------------------------------------------------------------
class _RowCrossEntropy(torch.autograd.Function):
    """mean_i CE(s * a_i @ b.T, label offset + i) with label smoothing; a: [M, D] rows, b: [K, D]."""

    @staticmethod
    def forward(ctx, a, b, scale_t, offset, eps, chunk, engine):
        M, K = a.shape[0], b.shape[0]
        acc = acc_dtype(a)
        s = float(scale_t)
        row_lse, _ = engine.lse(a, b, s, chunk)
        target = b[offset:offset + M]
        lin_raw = (1.0 - eps) * rowdot_sum(a, target, acc, chunk).to(STAT_DTYPE)
        sa = sb = None
        if eps:
            sa, sb = a.sum(dim=0, dtype=STAT_DTYPE), b.sum(dim=0, dtype=STAT_DTYPE)
            lin_raw = lin_raw + (eps / K) * torch.dot(sa, sb)
        loss = (row_lse.to(STAT_DTYPE).sum() - s * lin_raw) / M
        ctx.save_for_backward(a, b, scale_t, row_lse)
        ctx.extra = (offset, eps, chunk, engine, lin_raw, sa, sb)
        return loss.to(torch.promote_types(a.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a, b, scale_t, row_lse = ctx.saved_tensors
        offset, eps, chunk, engine, lin_raw, sa, sb = ctx.extra
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        none = (None,) * 7
        if not (need_a or need_b or need_s):
            return none
        M, K = a.shape[0], b.shape[0]
        acc = acc_dtype(a)
        s = float(scale_t)
        g = grad_out.to(acc)
        no_col = torch.full((K,), _NO_COLUMN_TERM, dtype=row_lse.dtype, device=a.device)
        ga, gb = engine.softmax_grads(a, b, s, row_lse + math.log(M), no_col, chunk, need_a or need_s, need_b)
        ds = rowdot_sum(a, ga, acc, chunk) - (lin_raw / M).to(acc) if need_s else None
        grads = finish_clip_grads(ga if need_a else None, gb, ds, a, b, scale_t.dtype, g=g, coef=g * s,
                              w=(1.0 - eps) / M, smooth=eps / (M * K), sa=sa, sb=sb,
                              rows=slice(offset, offset + M))
        return grads + none[3:]


def _row_ce_reference(a, b, scale_t, bias_t, offset, eps):
    logits = scale_t.to(a.dtype) * a @ b.T
    if bias_t is not None:
        logits = logits + bias_t.to(a.dtype)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    return F.cross_entropy(logits, labels, label_smoothing=eps)


# ----------------------------------------------------------------------------------------------
# Lean SigLIP
# ----------------------------------------------------------------------------------------------
class DistributedSigLipLossFunction(torch.autograd.Function):
    """forward(a, b, scale (0-dim), bias (0-dim), chunk, engine, layout, group) -> global loss.

    One sweep in forward yields the loss and the gradients; text-gradient shares are reduced to
    their owners during the sweep.  Backward only scales (plus one scalar all-reduce)."""

    @staticmethod
    def forward(ctx, a, b, scale_t, bias_t, chunk, engine, layout, group, needs):
        # needs: computed by the caller with grad mode (ctx.needs_input_grad ignores no_grad), the
        # same flags the agreement compared, so every rank takes the same collective path.
        P, r, N = layout.world, layout.rank, layout.total
        acc = acc_dtype(a)
        s, c = float(scale_t), float(bias_t)
        need = any(needs)
        b_own = b.detach().contiguous()
        blocks, works = [None] * P, [None] * P

        def start(q):
            if q < P:
                works[q] = broadcast_block(blocks, q, b_own, layout, group)

        start(0)
        start(1)
        total = torch.zeros((), dtype=STAT_DTYPE, device=a.device)
        sig_sum = torch.zeros((), dtype=STAT_DTYPE, device=a.device)
        ga = None
        red = BlockReducer(layout, group) if needs[1] else None
        for q in range(P):  # the same order on every rank: broadcasts and reduces must match
            if q != r:
                works[q].wait()
            start(q + 2)  # keep up to two blocks in flight ahead of the one being swept
            t_q, ga_q, gb_q, sig_q = engine.sweep(a, blocks[q], s, c, chunk, need)
            if q == r:
                works[q].wait()  # our own block's broadcast (it only reads b_own)
            blocks[q] = works[q] = None  # not kept: SigLIP's gradients are complete after the sweep
            total += t_q.to(STAT_DTYPE)
            if need:
                sig_sum += sig_q.to(STAT_DTYPE)
                ga = ga_q if ga is None else ga.add_(ga_q)
                if needs[1]:
                    red.add(q, gb_q)
        gb = red.finish() if needs[1] else None
        diag = rowdot_sum(a, b_own, acc, chunk)
        ds_local = rowdot_sum(a, ga, acc, chunk) if needs[2] else 0.0
        total, diag, sig_sum, ds = all_reduce_scalars([total, diag, sig_sum, ds_local], group, a.device)
        loss = (total - s * diag - N * c) / N
        if need:
            grads = [None] * 4
            if needs[0]:
                grads[0] = ga.sub_(b_own.to(acc)).mul_(s / N)
            if needs[1]:
                grads[1] = gb.sub_(a.to(acc)).mul_(s / N)
            if needs[2]:
                grads[2] = ((ds - diag) / N).to(scale_t.dtype)
            if needs[3]:
                grads[3] = ((sig_sum - N) / N).to(bias_t.dtype)
            ctx.grads = grads
            ctx.meta = (a.dtype, b.dtype, group)
        return loss.to(torch.promote_types(a.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a_dtype, b_dtype, group = ctx.meta
        ga, gb, gs, gc = ctx.grads
        out = [None] * 4
        if ga is not None or gb is not None:  # the same on every rank: the agreement checked it
            (g_sum,) = all_reduce_scalars([grad_out], group, grad_out.device)
            if ga is not None:
                out[0] = (ga * g_sum.to(ga.dtype)).to(a_dtype)
            if gb is not None:
                out[1] = (gb * g_sum.to(gb.dtype)).to(b_dtype)
        # out of place: the stored gradients must survive a second backward (retain_graph=True)
        if gs is not None:
            out[2] = gs * grad_out.to(gs.dtype)
        if gc is not None:
            out[3] = gc * grad_out.to(gc.dtype)
        return (*out, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def distributed_engine(op: str, backend, device: torch.device, dtype: torch.dtype):
    """The engine the distributed loss runs for ``op``'s chosen backend: the backend's own
    ``extra["engine"]`` (None: the materialised reference twin).  A backend that declares none is
    refused: it must never fall back silently to the O(N^2) path across ranks."""
    chosen = dispatch.select(op, backend, device=device, dtype=dtype)
    if "engine" not in chosen.extra:
        raise dispatch.BackendError(
            f"{op}: backend {chosen.name!r} declares no engine for the distributed loss (Backend.extra['engine']; "
            "None would mean the materialised reference); choose another backend")
    return chosen.extra["engine"]


def distributed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias=None, *, group=None, mode: str = "lean", gather_with_grad: bool = False,
                          backend: str = "auto", chunk_size: Optional[int] = None,
                          label_smoothing: float = 0.0, expect: Optional[tuple] = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss of the global batch spread over the ranks of ``group``.

    Every rank of the group must call it (with its own local pairs) and, when gradients are
    needed, call backward.  See the module docstring for the algorithm, its communication and
    memory, and the gradient contract under DistributedDataParallel.

    Args:
        image_features, text_features: this rank's [n_r, D] pairs (n_r may differ between ranks;
            D, dtype and device type may not).
        logit_scale: already-exponentiated temperature, float or one-element tensor, the same on
            every rank.
        logit_bias: optional; the loss is invariant to it (gradient zero), as in ``clip_loss``.
        group: the process group (None: the default group).
        mode: "lean" (default): the exact global loss with O(N) statistics exchanged and text
            gradients reduced to their owners; every rank returns the global loss.
            "gather" / "local": open_clip's ClipLoss with local_loss=False / True, computed
            without materialised logits (same per-rank values and gradients as open_clip).
        gather_with_grad: open_clip's flag for "gather" / "local" (lean always carries the
            gradients of remote features home; the flag must stay False there).
        backend: "auto", "triton", "chunked" or "reference" (materialised logits, the oracle).
        chunk_size: tile edge of the chunked backend.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``, on both directions.
        expect: optional (rank, world_size) the caller believes it has in ``group`` (the loss
            modules pass theirs); a mismatch is refused on every rank, like invalid input.

    Returns:
        0-dim tensor (float32 for low-precision inputs, except with backend="reference", which
        computes in the input dtype).

    Raises:
        DistributedInputError: on every rank, when any rank's inputs are invalid or the ranks
            disagree (shapes, dtype, logit_scale, requires_grad, mode, ...), before any data moves.
    """
    return _distributed_clip_loss(image_features, text_features, logit_scale, logit_bias, group=group, mode=mode,
                                  gather_with_grad=gather_with_grad, backend=backend, chunk_size=chunk_size,
                                  label_smoothing=label_smoothing, expect=expect)


def _clip_reference(a, b, scale_t, bias_t, eps):
    return clip_loss_reference(a, b, scale_t.to(a.dtype), None if bias_t is None else bias_t.to(a.dtype), eps)


def _check_clip_mode(mode, gather_with_grad) -> None:
    if mode not in CLIP_MODES:
        raise ValueError(f"mode must be one of {CLIP_MODES}, got {mode!r}")
    if not isinstance(gather_with_grad, bool):
        raise TypeError(f"gather_with_grad must be a bool, got {type(gather_with_grad).__name__}")
    if mode == "lean" and gather_with_grad:
        raise ValueError("gather_with_grad applies to mode='gather' or 'local'; mode='lean' always "
                         "returns the gradients of remote features to their ranks")


def _distributed_clip_loss(a, b, logit_scale, logit_bias=None, *, group=None, mode="lean", gather_with_grad=False,
                           backend="auto", chunk_size=None, label_smoothing=0.0, expect=None):
    rank, size = group_rank_and_size(group)
    if size == 1 and expect is None:
        _check_clip_mode(mode, gather_with_grad)  # the same errors with one process as with many
        return clip_loss(a, b, logit_scale, logit_bias, backend=backend, chunk_size=chunk_size,
                         label_smoothing=label_smoothing)
    error, fields, n = None, [], 0
    try:
        check_features(a, b)
        chunk = check_chunk_size(chunk_size)
        eps = check_label_smoothing(label_smoothing)
        _check_clip_mode(mode, gather_with_grad)
        check_group_device(a, group, expect)
        scale_t = as_scalar_tensor(logit_scale, "logit_scale", a, required=True)
        bias_t = as_scalar_tensor(logit_bias, "logit_bias", a, required=False)
        engine = distributed_engine("clip_loss", backend, a.device, a.dtype)
        n = a.shape[0]
        fields = _common_fields(a, b, scale_t, bias_t, logit_bias is not None) + [
            AgreementField("mode", CLIP_MODES.index(mode), show=CLIP_MODES),
            AgreementField("gather_with_grad", float(gather_with_grad), show=["False", "True"]),
            AgreementField("label_smoothing", eps),
            AgreementField("backend kind (reference or kernels)", float(engine is not None), show=["reference", "kernels"]),
        ]
    except Exception as exc:  # reported to every rank by agree_inputs
        error = exc
    counts = agree_inputs("distributed_clip_loss", group, error, n, fields, _N_CLIP_FIELDS)
    layout = Layout(rank, counts)
    chunk = chunk or default_chunk_size(a.device)
    if mode == "lean":
        if engine is None:  # the reference twin: autograd gathers + materialised logits
            aa = GatherWithGrad.apply(a, layout, group)
            bb = GatherWithGrad.apply(b, layout, group)
            return _clip_reference(aa, bb, scale_t, bias_t, eps)
        loss = DistributedClipLossFunction.apply(a, b, scale_t, eps, chunk, engine, layout, group)
    else:
        keep = mode == "gather"
        aa = _gathered(a, layout, group, with_grad=gather_with_grad, keep_local=keep)
        bb = _gathered(b, layout, group, with_grad=gather_with_grad, keep_local=keep)
        if mode == "gather":  # the single-process loss on the gathered batch, either backend
            if engine is None:
                return _clip_reference(aa, bb, scale_t, bias_t, eps)
            return run_clip_engine(engine, aa, bb, scale_t, bias_t, eps, chunk)
        else:
            off = layout.offset(rank)
            if engine is None:
                return (_row_ce_reference(a, bb, scale_t, bias_t, off, eps)
                        + _row_ce_reference(b, aa, scale_t, bias_t, off, eps)) / 2
            loss = (_RowCrossEntropy.apply(a, bb, scale_t, off, eps, chunk, engine)
                    + _RowCrossEntropy.apply(b, aa, scale_t, off, eps, chunk, engine)) / 2
    if bias_t is not None and bias_t.requires_grad:
        loss = loss + 0.0 * bias_t  # cross-entropy is shift-invariant: d loss / d bias = 0
    return loss


def distributed_siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                            group=None, backend: str = "auto", chunk_size: Optional[int] = None,
                            expect: Optional[tuple] = None) -> torch.Tensor:
    """Sigmoid (SigLIP) loss of the global batch spread over the ranks of ``group``.

    The result of open_clip's neighbour-exchange SigLipLoss (any ``dist_impl``) on the concatenated
    batch: every rank returns the global loss, -sum_ij log sigmoid(y_ij z_ij) / N over all N x N
    pairs, and the gradient contract is lean CLIP's (module docstring): after DDP's average every
    parameter gradient, logit_scale's and logit_bias's included, equals the single-process one.
    (open_clip's per-rank value is this rank's share, normalised by the local batch; the mean of
    those over ranks equals this value for even batches, and the DDP gradients are identical.)

    Args:
        image_features, text_features: this rank's [n_r, D] pairs (n_r may differ between ranks).
        logit_scale, logit_bias: floats or one-element tensors, the same on every rank.
        group: the process group (None: the default group).
        backend: "auto", "triton", "chunked" or "reference" (materialised logits, the oracle).
        chunk_size: tile edge of the chunked backend.
        expect: optional (rank, world_size), checked as in distributed_clip_loss.

    Raises:
        DistributedInputError: on every rank, before any data moves, as for distributed_clip_loss.
    """
    return _distributed_siglip_loss(image_features, text_features, logit_scale, logit_bias, group=group,
                                    backend=backend, chunk_size=chunk_size, expect=expect)


def _distributed_siglip_loss(a, b, logit_scale, logit_bias, *, group=None, backend="auto", chunk_size=None,
                             expect=None):
    rank, size = group_rank_and_size(group)
    if size == 1 and expect is None:
        return siglip_loss(a, b, logit_scale, logit_bias, backend=backend, chunk_size=chunk_size)
    error, fields, n = None, [], 0
    try:
        check_features(a, b)
        chunk = check_chunk_size(chunk_size)
        check_group_device(a, group, expect)
        scale_t = as_scalar_tensor(logit_scale, "logit_scale", a, required=True)
        bias_t = as_scalar_tensor(logit_bias, "logit_bias", a, required=True)
        engine = distributed_engine("siglip_loss", backend, a.device, a.dtype)
        n = a.shape[0]
        fields = _common_fields(a, b, scale_t, bias_t, True) + [
            AgreementField("backend kind (reference or kernels)", float(engine is not None), show=["reference", "kernels"]),
        ]
    except Exception as exc:  # reported to every rank by agree_inputs
        error = exc
    counts = agree_inputs("distributed_siglip_loss", group, error, n, fields, _N_SIGLIP_FIELDS)
    layout = Layout(rank, counts)
    if engine is None:
        aa = GatherWithGrad.apply(a, layout, group)
        bb = GatherWithGrad.apply(b, layout, group)
        return siglip_loss_reference(aa, bb, scale_t.to(aa.dtype), bias_t.to(aa.dtype))
    needs = tuple(torch.is_grad_enabled() and t.requires_grad for t in (a, b, scale_t, bias_t))
    return DistributedSigLipLossFunction.apply(a, b, scale_t, bias_t, chunk or default_chunk_size(a.device), engine,
                                               layout, group, needs)
