"""fastclip's small CPU kernels in C (``fastclip/csrc/*.c``), compiled on first use.

Why not ``setup.py``: the kernels are plain C99 with no Python or torch headers, so building them
needs only a C compiler, and building them on first use (as Triton builds its launchers) means a
source checkout, an editable install and a wheel all get them, with the flags of the machine that
runs them.  ``pip install`` never needs a compiler: without one, the ops that have a native
backend run their torch backend, and ``python -m fastclip.info`` says why.

``library(name)`` compiles ``csrc/<name>.c`` with ``$CC`` (else ``cc``, ``gcc`` or ``clang`` on
the PATH) at ``-O3`` into the cache directory (``$FASTCLIP_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastclip``, else ``~/.cache/fastclip``), keyed by a hash of the source, the
compiler and the flags, and loads it with ctypes.  Concurrent processes each compile to a temporary
file and rename it into place, so they never see a half-written library.  ``FASTCLIP_NATIVE=0``
turns the native kernels off.  ``reason(name)`` is None when the library loads, else why not
(compiled once per process, then remembered).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

__all__ = ["library", "reason", "cache_dir", "reset"]

_SRC = Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared")
_LOCK = threading.Lock()
_LOADED: dict = {}  # name -> (ctypes.CDLL or None, reason or None)


def cache_dir() -> Path:
    if os.environ.get("FASTCLIP_CACHE_DIR"):
        return Path(os.environ["FASTCLIP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastclip"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _build(name: str) -> tuple:
    if os.environ.get("FASTCLIP_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return None, "disabled by FASTCLIP_NATIVE=0"
    if platform.system() == "Windows":
        return None, "compiling the native kernels is not supported on Windows yet"
    source = _SRC / f"{name}.c"
    if not source.is_file():
        return None, f"{source} is missing from this installation"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    text = source.read_bytes()
    errors = []
    # Per-CPU vector widths first (target_clones); then the baseline, for toolchains without them.
    for extra in ((), ("-DFASTCLIP_NO_CLONES",)):
        flags = (*_FLAGS, *extra)
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(flags).encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        target = cache_dir() / f"{name}-{key}.so"
        if not target.is_file():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
                os.close(fd)
            except OSError as exc:
                return None, f"cannot write to the cache directory {target.parent}: {exc}"
            try:
                run = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                                     timeout=300)
            except (OSError, subprocess.SubprocessError) as exc:
                os.unlink(tmp)
                return None, f"cannot run the C compiler {cc}: {exc}"
            if run.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{cc} {' '.join(flags)} failed: {(run.stderr or run.stdout).strip()[-400:]}")
                continue
            os.replace(tmp, target)
        try:
            return ctypes.CDLL(str(target)), None
        except OSError as exc:
            errors.append(f"cannot load {target}: {exc}")
    return None, "; ".join(errors)


def library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled ``csrc/<name>.c`` (built on first call), or None (see :func:`reason`)."""
    got = _LOADED.get(name)
    if got is None:
        with _LOCK:
            got = _LOADED.get(name)
            if got is None:
                got = _LOADED[name] = _build(name)
    return got[0]


def reason(name: str) -> Optional[str]:
    """None when ``csrc/<name>.c`` is compiled and loaded, else why it is not."""
    library(name)
    return _LOADED[name][1]


def reset() -> None:
    """Forget what was loaded (the next call compiles or loads again, seeing the environment anew)."""
    with _LOCK:
        _LOADED.clear()
