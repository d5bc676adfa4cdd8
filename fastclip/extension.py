"""``fastclip._C``, the compiled extension: loaded lazily, checked, and refused with a reason.

``setup.py`` builds ``_C`` from ``csrc/`` (C++ kernels and their pybind11 bindings) when the
package is built: a wheel carries it, an editable install or ``python setup.py build_ext
--inplace`` puts it next to this file.  It is optional: without it (no compiler at build time,
``FASTCLIP_BUILD_EXT=0``), the ops that have a native backend run their torch backend.

:func:`load` answers as :func:`fastclip.lazy.optional_module` does for a package: ``(module,
None)`` or ``(None, reason)``, decided once per process (until :func:`reset`), never raised, and
never at ``import fastclip``.  A ``_C`` that imports is still refused when it was built for
something else, since its kernels' arguments may mean something else:

- another fastclip version (``_C.__version__``, compiled in by setup.py) or another binding ABI
  (``_C.ABI`` against :data:`ABI`): a copy left over from another install;
- a file outside this package's directory (another installation's, reached through its import
  hooks);
- in a source checkout, other sources than ``csrc/`` holds now (``_C.SOURCES_SHA256``): a stale
  in-place build.

``FASTCLIP_NATIVE=0`` turns it off.  ``python -m fastclip.info`` prints :func:`status`.
"""
from __future__ import annotations

import hashlib
import importlib
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

from . import __version__
from .ops.dispatch import env_flag

__all__ = ["ABI", "NAME", "load", "reason", "reset", "status", "sources_sha256", "source_root"]

NAME = "fastclip._C"
ABI = 2  # the binding ABI this Python code calls; csrc/bindings.cpp's kAbi must be equal
_NOTE = Path(__file__).with_name("_C_build.txt")  # setup.py's reason when it did not build _C
_LOCK = threading.Lock()
_LOADED: list = []  # [(module or None, reason or None)] once decided


def sources_sha256(root: Path) -> str:
    """The hash setup.py compiles into ``_C`` (names and bytes of csrc/'s .cpp and .h files)."""
    h = hashlib.sha256()
    for path in sorted((root / "csrc").glob("*")):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def source_root() -> Optional[Path]:
    """The checkout this package runs from (holding setup.py and csrc/), or None when installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def _not_built() -> str:
    if _NOTE.is_file():
        why = _NOTE.read_text(encoding="utf-8", errors="replace").strip()
        return f"{NAME} was not built when fastclip was installed: {why}"
    hint = ("`python setup.py build_ext --inplace` builds it in this checkout" if source_root()
            else "reinstall with a C++ compiler present (`pip install -v .` shows the build's reason)")
    return f"{NAME} is not in this installation (built without it, or with FASTCLIP_BUILD_EXT=0); {hint}"


def _refusal(mod: ModuleType) -> Optional[str]:
    """Why a ``_C`` that imported must not be used, or None."""
    where = getattr(mod, "__file__", None) or "?"
    rebuild = ("rebuild it: `python setup.py build_ext --inplace` or `pip install -e .`" if source_root()
               else "reinstall fastclip")
    built_for = getattr(mod, "__version__", None)
    if built_for != __version__:
        return (f"{NAME} ({where}) was built for fastclip {built_for}, this is fastclip {__version__}; "
                f"{rebuild}")
    abi = getattr(mod, "ABI", None)
    if abi != ABI:
        return f"{NAME} ({where}) has binding ABI {abi}, fastclip {__version__} calls ABI {ABI}; {rebuild}"
    here = Path(__file__).resolve().parent
    if Path(where).resolve().parent != here:
        return f"the {NAME} found ({where}) is not this fastclip's ({here}), so it is not used; " \
            f"{_not_built()}"
    root = source_root()
    if root is not None:
        if getattr(mod, "SOURCES_SHA256", None) != sources_sha256(root):
            return f"{NAME} ({where}) was built from other sources than {root / 'csrc'} holds now; {rebuild}"
    return None


def _decide() -> tuple:
    if not env_flag("FASTCLIP_NATIVE", True):
        return None, "disabled by FASTCLIP_NATIVE=0"
    try:
        mod = importlib.import_module(NAME)
    except ModuleNotFoundError as exc:
        if exc.name != NAME:
            return None, f"cannot import {NAME}: {type(exc).__name__}: {exc}"
        return None, _not_built()
    except Exception as exc:  # a broken or foreign binary: undefined symbols, wrong architecture
        return None, f"cannot import {NAME}: {type(exc).__name__}: {exc}"
    why = _refusal(mod)
    return (None, why) if why else (mod, None)


def load() -> tuple[Optional[ModuleType], Optional[str]]:
    """``(fastclip._C, None)`` when the extension imports and was built for this fastclip, else
    ``(None, reason)``.  Decided on the first call, then remembered; never raises."""
    if not _LOADED:
        with _LOCK:
            if not _LOADED:
                try:
                    got = _decide()
                except Exception as exc:  # anything unforeseen is the reason, never raised
                    got = (None, f"{type(exc).__name__}: {exc}")
                _LOADED.append(got)
    return _LOADED[0]


def reason() -> Optional[str]:
    """None when ``fastclip._C`` is loaded and usable, else why not."""
    return load()[1]


def reset() -> None:
    """Forget the verdict (the next :func:`load` looks again: the environment, a new build)."""
    with _LOCK:
        _LOADED.clear()


def status() -> dict:
    """For ``fastclip.info`` and logs: ``{"loaded": bool, "reason", "path", "version", "abi",
    "cpu_isa"}`` (the last four None when it is not loaded)."""
    mod, why = load()
    if mod is None:
        return {"loaded": False, "reason": why, "path": None, "version": None, "abi": None, "cpu_isa": None}
    return {"loaded": True, "reason": None, "path": mod.__file__, "version": mod.__version__, "abi": mod.ABI,
            "cpu_isa": mod.cpu_isa() if mod.CLONES else "baseline (built without per-CPU clones)"}
