"""FLIP / CLIPA patch masking: keep K patch tokens per sample (and every prefix token), drop the rest.

    x [B, P + N, C]  ->  x_kept [B, P + K, C],  ids_keep [B, K]      K = max(1, round_half_up((1 - r) * N))

P = ``num_prefix_tokens`` (class/register tokens, always kept, first, in order), N patch tokens,
r = ``mask_ratio`` in [0, 1).  ``ids_keep`` indexes the N patch tokens (0-based, prefix excluded)
and is sorted ascending in every row, so the kept tokens keep their raster order and r = 0 is an
exact identity.  Masking runs before the transformer blocks: they see P + K tokens, so the saving
is real (FLIP).  Position embeddings must be added before masking.

Which K patches are kept (every mode keeps exactly K, so all modes cost the same):

* ``random`` (FLIP, MAE): the K patches with the smallest uniform noise, independently per sample.
* ``grid`` (CLIPA): a regular lattice.  The (gh, gw) patch grid is tiled by windows of (wh, ww)
  whose product wh * ww is the one closest to N / K among near-square windows
  (ww <= wh <= ww + 1, e.g. ratio 0.75 -> 2 x 2,
  0.5 -> 2 x 1, 0.89 -> 3 x 3) and the patch at the same offset (oh, ow) of every window is kept;
  the offset is drawn per sample.  When the lattice does not hold exactly K patches (the grid is
  not a multiple of the window, or N / K is not an integer) it is trimmed, or topped up, with
  random patches: lattice patches are taken first in random order, then the others.
* ``block`` (CLIPA): one contiguous block.  bh = min(gh, ceil(sqrt(K))), bw = min(gw, ceil(K / bh))
  (bh grown if bh * bw < K), at a per-sample uniform position; the K first patches of the block in
  raster order are kept (only its last row can be partial).

Randomness: uniform draws from ``generator`` (or the global RNG) on the generator's device (CPU if
none is given and x is on CPU, else x's device), so a seeded CPU generator gives the same masks
for CPU and CUDA inputs.  The selection is PyTorch; only the gather (and its backward, a
scatter of the gradient with zeros at dropped positions) has backends:

    triton     gather / scatter kernels in ``_patch_mask_triton`` (CUDA; CPU through TRITON_INTERPRET=1)
    torch      torch.gather (its backward scatters); runs everywhere
    reference  per-sample indexing loop (the test oracle)

Layers: ``patch_mask_reference`` (twin) -> ``select_patches`` (the ids) -> backends /
``PatchGatherFunction`` (autograd over the Triton launchers) -> ``patch_mask`` (functional API).
The module is ``fastclip.nn.patch_mask.PatchMasking``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from . import dispatch
from ._checks import ANY_DEVICE, FLOATS, check_float_tensor

__all__ = [
    "patch_mask",
    "patch_mask_reference",
    "select_patches",
    "num_kept",
    "check_mask_ratio",
    "PatchGatherFunction",
    "choose_backend",
    "MODES",
]

OP = "patch_mask"
MODES = ("random", "grid", "block")


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def check_mask_ratio(mask_ratio, name: str = "mask_ratio") -> float:
    """``mask_ratio`` as a float in [0, 1), else a ValueError/TypeError naming the argument."""
    if isinstance(mask_ratio, torch.Tensor) and mask_ratio.numel() == 1:
        mask_ratio = mask_ratio.item()
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(mask_ratio).__name__}")
    r = float(mask_ratio)
    if not (0.0 <= r < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {mask_ratio!r}")
    return r


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = max(1, round((1 - mask_ratio) * num_patches)), halves rounded up."""
    return max(1, min(num_patches, int(math.floor((1.0 - mask_ratio) * num_patches + 0.5))))


def _check_grid(grid_size, num_patches: int, mode: str) -> Optional[tuple]:
    if grid_size is None:
        if mode != "random":
            raise ValueError(f"grid_size=(gh, gw) is required for mode={mode!r}, got None")
        return None
    if (not isinstance(grid_size, Sequence) or len(grid_size) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid_size)):
        raise ValueError(f"grid_size must be a pair of positive ints (gh, gw), got {grid_size!r}")
    gh, gw = int(grid_size[0]), int(grid_size[1])
    if gh * gw != num_patches:
        raise ValueError(f"grid_size {gh} x {gw} = {gh * gw} patches does not match the {num_patches} patch "
                         f"tokens of x (x.shape[1] - num_prefix_tokens)")
    return gh, gw


def _check_args(x, mask_ratio, mode, num_prefix_tokens, grid_size):
    check_float_tensor("x", x, "[B, num_prefix_tokens + num_patches, C]")
    r = check_mask_ratio(mask_ratio)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    n = x.shape[1] - num_prefix_tokens
    if n < 1:
        raise ValueError(f"x has {x.shape[1]} tokens, which leaves no patch token after num_prefix_tokens="
                         f"{num_prefix_tokens} (x.shape = {tuple(x.shape)})")
    grid = _check_grid(grid_size, n, mode)
    if grid is not None:
        # The patch count as a plain int from the static grid, also when torch.compile(dynamic=True)
        # makes x's token count symbolic (the check above guards that they agree).
        n = grid[0] * grid[1]
    return r, n, grid


# ----------------------------------------------------------------------------------------------
# Selection (PyTorch, shared by every backend)
# ----------------------------------------------------------------------------------------------
def _uniform(shape, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    if generator is None:  # (no generator= keyword: with it, symbolic sizes fail under torch.compile)
        return torch.rand(shape, device=device, dtype=torch.float32)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def grid_window(num_patches: int, k: int) -> tuple[int, int]:
    """(wh, ww), wh >= ww >= wh - 1, with wh * ww the closest such product to num_patches / k."""
    target = num_patches / k
    best = (1, 1)
    for wh in range(1, int(math.isqrt(max(1, round(target)))) + 3):
        for ww in (wh - 1, wh):
            if ww >= 1 and abs(wh * ww - target) < abs(best[0] * best[1] - target):
                best = (wh, ww)
    return best


def block_shape(gh: int, gw: int, k: int) -> tuple[int, int]:
    bh = min(gh, math.isqrt(k - 1) + 1)          # ceil(sqrt(k))
    bw = min(gw, -(-k // bh))
    if bh * bw < k:
        bh = min(gh, -(-k // bw))
    return bh, bw


def select_patches(batch: int, num_patches: int, mask_ratio: float, *, mode: str = "random",
                   grid_size: Optional[tuple] = None, generator: Optional[torch.Generator] = None,
                   device=None) -> torch.Tensor:
    """ids_keep [batch, K] (int64, ascending per row) of the patches to keep (see the module notes)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    k = num_kept(num_patches, mask_ratio)
    # Every mode ranks the patches by priority + tie-break noise in [0, 1) and keeps the K lowest.
    noise = _uniform((batch, num_patches), generator, device)
    if mode == "random":
        score = noise
    elif mode == "grid":
        gh, gw = grid_size
        wh, ww = grid_window(num_patches, k)
        off = _uniform((batch, 2), generator, device)
        oh = (off[:, 0] * wh).long().clamp_(max=wh - 1)
        ow = (off[:, 1] * ww).long().clamp_(max=ww - 1)
        rows = torch.arange(gh, device=device).repeat_interleave(gw)
        cols = torch.arange(gw, device=device).repeat(gh)
        on = ((rows[None] % wh) == oh[:, None]) & ((cols[None] % ww) == ow[:, None])
        score = noise + (~on).to(noise.dtype)
    elif mode == "block":
        gh, gw = grid_size
        bh, bw = block_shape(gh, gw, k)
        pos = _uniform((batch, 2), generator, device)
        top = (pos[:, 0] * (gh - bh + 1)).long().clamp_(max=gh - bh)
        left = (pos[:, 1] * (gw - bw + 1)).long().clamp_(max=gw - bw)
        rows = torch.arange(gh, device=device).repeat_interleave(gw)[None] - top[:, None]
        cols = torch.arange(gw, device=device).repeat(gh)[None] - left[:, None]
        inside = (rows >= 0) & (rows < bh) & (cols >= 0) & (cols < bw)
        # Inside: raster rank within the block (so the trim drops the block's tail); outside: >= 1.
        rank = (rows * bw + cols).to(noise.dtype) / (bh * bw)
        score = torch.where(inside, rank, 1.0 + noise)
    else:  # pragma: no cover - checked by the callers
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids = torch.argsort(score, dim=1)[:, :k]
    return ids.sort(dim=1).values


# ----------------------------------------------------------------------------------------------
# Reference twin and backends.  fn(x, src [B, P + K] int64 rows of x to keep) -> x_kept
# ----------------------------------------------------------------------------------------------
def _source_rows(ids_keep: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    b = ids_keep.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=ids_keep.device).expand(b, num_prefix_tokens)
    return torch.cat([prefix, ids_keep + num_prefix_tokens], dim=1)


def patch_mask_reference(x: torch.Tensor, ids_keep: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[x[b, :P]; x[b, P + ids_keep[b]]] per sample: the obvious loop (test oracle)."""
    p = num_prefix_tokens
    return torch.stack([torch.cat([x[b, :p], x[b, p + ids_keep[b]]], dim=0) for b in range(x.shape[0])])


def _run_reference(x, src):
    return torch.stack([x[b, src[b]] for b in range(x.shape[0])])


def _run_torch(x, src):
    return torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# The Triton launchers as custom ops: opaque to torch.compile (no tracing into Triton).
@torch.library.custom_op("fastclip::patch_gather_triton", mutates_args=(), schema="(Tensor x, Tensor src) -> Tensor")
def _gather_op(x, src):
    from . import _patch_mask_triton as kern
    return kern.gather_rows(x, src)


@_gather_op.register_fake
def _(x, src):
    return x.new_empty(x.shape[0], src.shape[1], x.shape[2])


@torch.library.custom_op("fastclip::patch_scatter_triton", mutates_args=(),
                         schema="(Tensor grad, Tensor src, SymInt num_tokens) -> Tensor")
def _scatter_op(grad, src, num_tokens):
    from . import _patch_mask_triton as kern
    return kern.scatter_rows(grad, src, num_tokens)


@_scatter_op.register_fake
def _(grad, src, num_tokens):
    return grad.new_empty(grad.shape[0], num_tokens, grad.shape[2])


class PatchGatherFunction(torch.autograd.Function):
    """forward(x [B, T, C], src [B, R]) -> x[b, src[b]] [B, R, C] with the Triton gather kernel;
    backward scatters the gradient into zeros [B, T, C] (rows of ``src`` are distinct per sample,
    so the scatter is a plain store: no atomics, deterministic)."""

    @staticmethod
    def forward(ctx, x, src):
        ctx.save_for_backward(src)
        ctx.num_tokens = x.shape[1]
        return torch.ops.fastclip.patch_gather_triton(x, src)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (src,) = ctx.saved_tensors
        return torch.ops.fastclip.patch_scatter_triton(grad, src, ctx.num_tokens), None


def _run_triton(x, src):
    return PatchGatherFunction.apply(x, src)


dispatch.register(OP, dispatch.triton_backend(
    _run_triton, faster="torch", doc="Triton row gather / scatter kernels; CPU only through TRITON_INTERPRET=1 (tests)"))
dispatch.register(OP, dispatch.Backend(
    "torch", _run_torch, devices=ANY_DEVICE, dtypes=FLOATS, doc="torch.gather; runs everywhere"))
dispatch.register(OP, dispatch.Backend(
    "reference", _run_reference, devices=ANY_DEVICE, dtypes=FLOATS, auto_devices=(), doc="per-sample indexing (the test oracle)"))

_FNS = {b.name: b.fn for b in dispatch.backends(OP)}


_choose = dispatch.make_static_chooser(OP)


def choose_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """Name of the gather backend for these static properties (raises with every reason)."""
    return _choose(backend, device, dtype)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
def patch_mask(x: torch.Tensor, mask_ratio: float, *, mode: str = "random", num_prefix_tokens: int = 1,
               grid_size: Optional[tuple] = None, generator: Optional[torch.Generator] = None,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Drop a ``mask_ratio`` share of the patch tokens of ``x`` (FLIP / CLIPA token reduction).

    Args:
        x: [B, num_prefix_tokens + N, C] tokens (position embeddings already added).
        mask_ratio: share of the N patch tokens to drop, in [0, 1); K = max(1, round((1 - r) * N))
            are kept.
        mode: "random" (per-sample uniform), "grid" (regular lattice) or "block" (one contiguous
            block); see the module notes for exactly which patches each keeps.
        num_prefix_tokens: leading tokens (class token) that are always kept, first.
        grid_size: (gh, gw) with gh * gw = N; required for "grid" and "block".
        generator: torch.Generator for the draws (deterministic under a seed).  Under torch.compile
            pass None (the global RNG, seeded by torch.manual_seed): Dynamo cannot trace a
            Generator object, or run the masking outside the compiled region.
        backend: gather backend, "auto", "triton", "torch" or "reference" (else FASTCLIP_BACKEND).

    Returns:
        (x_kept [B, num_prefix_tokens + K, C], ids_keep [B, K] int64 ascending indices into the
        N patch tokens).  Gradients flow back to x (zeros at the dropped positions).  At ratio 0
        x itself is returned with ids_keep = arange(N).
    """
    r, n, grid = _check_args(x, mask_ratio, mode, num_prefix_tokens, grid_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    name = choose_backend(backend, x.device, x.dtype)  # a constant under torch.compile
    B = x.shape[0]
    if r == 0.0:
        return x, torch.arange(n, device=x.device).expand(B, n)
    ids_keep = select_patches(B, n, r, mode=mode, grid_size=grid, generator=generator, device=x.device)
    return _FNS[name](x, _source_rows(ids_keep, num_prefix_tokens)), ids_keep
