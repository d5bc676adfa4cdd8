"""Helpers for comparing an op against its reference twin (used by fastclip's tests, usable by yours)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Sequence
from typing import Optional

import torch

from .machine import peak_memory

# (dtype, atol, rtol) for a result computed from inputs of `dtype` against an fp64 oracle.  atol is
# relative to the largest magnitude of the expected tensor, so one table serves losses (~log N) and
# gradients (~scale / N) alike.
TOLERANCES = (
    (torch.float64, 1e-10, 1e-8),
    (torch.float32, 2e-5, 1e-4),
    (torch.float16, 2e-3, 5e-3),
    (torch.bfloat16, 1e-2, 2e-2),
)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    for d, atol, rtol in TOLERANCES:
        if d == dtype:
            return atol, rtol
    raise KeyError(f"no tolerance for {dtype}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 what: str = "value", atol: Optional[float] = None, rtol: Optional[float] = None,
                 scale_floor: float = 1e-30, *, floor: float = 0.0, peers: Sequence[torch.Tensor] = ()) -> None:
    """Assert |actual - expected| <= atol * max(max|expected|, scale_floor) + rtol * |expected| + slack,
    elementwise, where slack = floor + 2 * max over ``peers`` of max|peer - expected|.

    ``atol``/``rtol`` default to ``dtype``'s row of TOLERANCES (``actual``'s dtype if not given).
    ``scale_floor=1`` suits loss values (nats), whose exact value can be 0 (N = 1).
    ``floor``: absolute slack, for quantities that are exactly 0 in exact arithmetic and rounding
    noise otherwise, or for a tolerance given in absolute units (then pass ``atol=0``).
    ``peers``: PyTorch's own results for the same inputs at the same precision.  ``actual`` may then
    be off by up to twice their worst error (flash-attention's rule); with ``atol=c, rtol=0`` alone
    this is "max error <= 2 x PyTorch's max error + c x max|expected|".  A non-finite peer error
    fails: it would make the bound meaningless.

    The failure message says where the worst element is, both values, and by how much it is off.
    """
    if actual is None or expected is None:
        raise AssertionError(f"{what}: actual is {actual is None and 'None' or 'set'}, "
                             f"expected is {expected is None and 'None' or 'set'}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    dtype = dtype or actual.dtype
    d_atol, d_rtol = tolerance(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    what = f"{what} ({str(dtype).replace('torch.', '')})"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()
        first = bad[0].tolist()
        raise AssertionError(f"{what}: {len(bad)} non-finite values, the first {a[tuple(first)].item()} at index "
                             f"{first}; first indices {bad[:5].tolist()}")
    peer_errs = []
    for i, p in enumerate(peers):
        if p.shape != expected.shape:
            raise AssertionError(f"{what}: peer {i} has shape {tuple(p.shape)}, expected {tuple(expected.shape)}")
        peer_errs.append((p.detach().to(torch.float64).cpu() - e).abs().max().item() if e.numel() else 0.0)
    if not all(math.isfinite(x) for x in peer_errs):
        raise AssertionError(f"{what}: the peers' errors {peer_errs} are not all finite: no bound to compare with")
    peer_err = max(peer_errs, default=0.0)
    slack = floor + 2.0 * peer_err
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs()
    allowed = atol * max(scale, scale_floor) + rtol * e.abs() + slack
    excess = err - allowed
    if e.numel() and excess.max().item() > 0:
        idx = excess.argmax()
        where = list(torch.unravel_index(idx, e.shape)) if e.dim() else []
        where = [int(w) for w in where]
        n_bad = int((excess > 0).sum())
        diff, exp_v = err.reshape(-1)[idx].item(), e.reshape(-1)[idx].item()
        raised = f" raised to scale_floor {scale_floor:.3g}" if scale_floor > scale else ""
        extra = (f", floor={floor:.3g}" if floor else "") + (f", 2 x peers' max error {peer_err:.3g}" if peers else "")
        raise AssertionError(
            f"{what}: {n_bad}/{e.numel()} elements out of tolerance (atol={atol:g} x max|expected|={scale:.3g}{raised}, "
            f"rtol={rtol:g}{extra}); worst at index {where}: actual {a.reshape(-1)[idx].item():.8g}, expected "
            f"{exp_v:.8g}, |diff| {diff:.3g} (relative {diff / max(abs(exp_v), 1e-30):.3g}, "
            f"allowed {allowed.reshape(-1)[idx].item():.3g}); max |diff| overall {err.max().item():.3g}")


def open_clip_dir():
    """``(folder of the installed open_clip package, None)`` or ``(None, reason)``, found without
    importing it (``import open_clip`` needs torchvision, which has no CPU build here)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError) as exc:
        return None, f"open_clip not found: {exc}"
    if spec is None or not spec.submodule_search_locations:
        return None, "open_clip is not installed (pip install --no-deps open-clip-torch)"
    return list(spec.submodule_search_locations)[0], None


@functools.lru_cache(maxsize=None)
def load_open_clip_file(stem: str):
    """One file of an installed open_clip, e.g. ``"loss"`` or ``"tokenizer"``, loaded on its own.

    Its loss and tokenizer files import only torch (and ftfy/regex), so tests and benchmarks compare
    against the real open_clip code this way.  Returns ``(module, None)`` or ``(None, reason)``.
    """
    root, why = open_clip_dir()
    if root is None:
        return None, why
    path = os.path.join(root, f"{stem}.py")
    try:
        file_spec = importlib.util.spec_from_file_location(f"_fastclip_open_clip_{stem}", path)
        mod = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(mod)
    except Exception as exc:  # a missing dependency (ftfy, regex) or a renamed file: say which
        return None, f"cannot load {path}: {type(exc).__name__}: {exc}"
    return mod, None


# The older name of fastclip.machine.peak_memory (same arguments, same result), kept for callers of
# this module; the measurement and its contract live in fastclip.machine.
peak_extra_memory = peak_memory


# open_clip's model code as an oracle: ``open_clip/model.py`` and what it imports need torchvision
# for one name only (``torchvision.ops.misc.FrozenBatchNorm2d``, used when freezing BatchNorm, never
# at construction).  The installed package directory is mounted under a private package name (its
# ``__init__`` is not run) and, only if torchvision cannot be imported, a stand-in providing that
# one name is put in ``sys.modules`` for the import and removed afterwards.
_OPEN_CLIP_PKG = "_fastclip_open_clip_pkg"


@functools.lru_cache(maxsize=None)
def open_clip_model_module():
    """(open_clip's ``model`` module, None) or (None, reason it cannot be loaded)."""
    root, why = open_clip_dir()
    if root is None:
        return None, why
    fakes = {}
    if importlib.util.find_spec("torchvision") is None:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

        class FrozenBatchNorm2d:  # never instantiated by model construction
            def __init__(self, *a, **k):
                raise RuntimeError("stand-in torchvision: FrozenBatchNorm2d is not available here")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops.misc = ops, misc
        fakes = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    pkg = types.ModuleType(_OPEN_CLIP_PKG)
    pkg.__path__ = [root]
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    sys.modules[_OPEN_CLIP_PKG] = pkg
    try:
        mod = importlib.import_module(f"{_OPEN_CLIP_PKG}.model")
    except Exception as exc:  # a changed open_clip layout: skip with the reason
        return None, f"cannot load open_clip/model.py: {type(exc).__name__}: {exc}"
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod, None


def open_clip_model(config, **kwargs):
    """open_clip's CLIP built from a fastclip CLIPConfig (same widths, depths, heads, sizes)."""
    mod, why = open_clip_model_module()
    if mod is None:
        raise RuntimeError(why)
    d = config.to_dict()
    for k in ("mask_ratio", "mask_mode"):
        d["vision_cfg"].pop(k)
    return mod.CLIP(d["embed_dim"], d["vision_cfg"], d["text_cfg"], quick_gelu=config.quick_gelu,
                    output_dict=True, **kwargs)


def open_clip_version() -> str:
    """The installed open-clip-torch version (recorded beside benchmark comparisons), or "unknown"."""
    try:
        from importlib.metadata import version
        return version("open_clip_torch")
    except Exception:  # not installed, or metadata missing
        return "unknown"
