"""The one way fastclip imports an optional dependency: lazily, once, keeping the reason it failed.

Nothing optional (Triton, flash-attn, xformers, DALI, tensorboard, open_clip, the compiled
extension) is imported when fastclip is imported.  A backend that needs a package asks
:func:`optional_module` when it is first checked or run; the answer is cached for the process, and
the reason a package cannot be used is recorded as text for ``fastclip.info`` and for the
dispatcher's refusals, never raised at import.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

__all__ = ["optional_module", "require_module", "package_reason", "plotting"]


@functools.lru_cache(maxsize=None)
def optional_module(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """``(module, None)`` if ``import name`` works, else ``(None, reason)``.

    Any exception counts as "cannot import", not only ImportError: a broken install (a wheel built
    for another CUDA, a missing shared library) raises all sorts of things, and an optional
    backend must degrade, not crash the caller.
    """
    try:
        return importlib.import_module(name), None
    except Exception as exc:
        return None, f"cannot import {name}: {type(exc).__name__}: {exc}".strip()


def package_reason(name: str) -> Optional[str]:
    """None if ``name`` imports, else the reason it does not."""
    return optional_module(name)[1]


def require_module(name: str, purpose: str) -> ModuleType:
    """The module, or ImportError saying what needed it and why the import failed."""
    mod, why = optional_module(name)
    if mod is None:
        raise ImportError(f"{purpose} needs the optional package {name!r}: {why}")
    return mod


@functools.lru_cache(maxsize=None)
def plotting() -> tuple[Optional[ModuleType], Optional[str]]:
    """``(matplotlib.pyplot, None)`` set up for files (the Agg backend, no display needed), or
    ``(None, reason)``."""
    mpl, why = optional_module("matplotlib")
    if mpl is None:
        return None, why
    try:
        mpl.use("Agg", force=False)
    except Exception as exc:  # a backend already chosen that cannot be switched: plot with it
        del exc
    return optional_module("matplotlib.pyplot")
