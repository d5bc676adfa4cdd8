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
file and rename it into place, so they never see a half-written library; a cached file that does
not load is rebuilt once; a cache directory owned by another user or writable by everyone is
refused.  ``FASTCLIP_NATIVE=0`` turns the native kernels off.

``load(name)`` answers as :func:`fastclip.lazy.optional_module` does for a package: ``(library,
None)`` or ``(None, reason)``, compiled or loaded once per process, then remembered (until
:func:`reset`); ``library(name)`` and ``reason(name)`` are its two halves.  A backend checks and
runs through the same answer, so it is never chosen on one verdict and run on another.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

from .ops.dispatch import env_flag

__all__ = ["load", "library", "reason", "cache_dir", "compiler", "reset"]

_SRC = Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared")
_TIMEOUT_S = 60
_LOCK = threading.Lock()
_LOADED: dict = {}  # name -> (ctypes.CDLL or None, reason or None)


def cache_dir() -> Path:
    if os.environ.get("FASTCLIP_CACHE_DIR"):
        return Path(os.environ["FASTCLIP_CACHE_DIR"])
    home = os.path.expanduser("~")
    if not os.environ.get("XDG_CACHE_HOME") and home == "~":  # no HOME, no passwd entry
        return Path(tempfile.gettempdir()) / f"fastclip-{os.getuid()}"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return Path(base) / "fastclip"


def compiler() -> Optional[list]:
    """The compiler's argv (``$CC`` may carry arguments: ``ccache gcc``), or None."""
    cc = os.environ.get("CC")
    if cc:
        argv = shlex.split(cc)
        return [shutil.which(argv[0]) or argv[0], *argv[1:]] if argv else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _unsafe(directory: Path) -> Optional[str]:
    """Why libraries in ``directory`` must not be loaded (another user could plant one), or None."""
    st = directory.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"the cache directory {directory} belongs to another user"
    if st.st_mode & 0o002:
        return f"the cache directory {directory} is writable by everyone (mode {oct(st.st_mode & 0o777)})"
    return None


def _compile(cc: list, flags: tuple, source: Path, target: Path) -> Optional[str]:
    """Compile into a temporary file, then rename it to ``target``; None, or the error."""
    fd, tmp = tempfile.mkstemp(prefix=f"{target.stem}-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        try:
            run = subprocess.run([*cc, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                                 errors="replace", timeout=_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return f"{cc[0]} took over {_TIMEOUT_S} s"
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot run the C compiler {' '.join(cc)}: {exc}"
        if run.returncode != 0:
            return f"{' '.join(cc)} {' '.join(flags)} failed: {(run.stderr or run.stdout).strip()[-400:]}"
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would keep other users of the cache out
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(name: str) -> tuple:
    if not env_flag("FASTCLIP_NATIVE", True):
        return None, "disabled by FASTCLIP_NATIVE=0"
    if platform.system() == "Windows":
        return None, "compiling the native kernels is not supported on Windows yet"
    source = _SRC / f"{name}.c"
    if not source.is_file():
        return None, f"{source} is missing from this installation"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        unsafe = _unsafe(directory)
    except OSError as exc:
        return None, f"cannot use the cache directory {directory}: {exc}"
    if unsafe:
        return None, unsafe + " (set FASTCLIP_CACHE_DIR to a private directory)"
    text = source.read_bytes()
    errors = []
    # Per-CPU vector widths first (target_clones); then the baseline, for toolchains without them.
    for extra in ((), ("-DFASTCLIP_NO_CLONES",)):
        flags = (*_FLAGS, *extra)
        key = hashlib.sha256(b"\0".join([text, " ".join(cc).encode(), " ".join(flags).encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        target = directory / f"{name}-{key}.so"
        for attempt in range(2):  # a cached file that does not load (truncated, foreign) is rebuilt once
            if not target.is_file():
                error = _compile(cc, flags, source, target)
                if error:
                    errors.append(error)
                    break
            try:
                return ctypes.CDLL(str(target)), None
            except OSError as exc:
                if attempt == 0:
                    target.unlink(missing_ok=True)
                    continue
                errors.append(f"cannot load {target}: {exc}")
    return None, "; ".join(errors)


def load(name: str) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """``(library, None)`` when ``csrc/<name>.c`` is compiled and loaded (built on the first
    call), else ``(None, reason)``.  Never raises: a failure is the reason."""
    got = _LOADED.get(name)
    if got is None:
        with _LOCK:
            got = _LOADED.get(name)
            if got is None:
                try:
                    got = _build(name)
                except Exception as exc:  # anything unforeseen: recorded as the reason, never raised
                    got = (None, f"{type(exc).__name__}: {exc}")
                _LOADED[name] = got
    return got


def library(name: str) -> Optional[ctypes.CDLL]:
    """The compiled ``csrc/<name>.c`` (built on first call), or None (see :func:`reason`)."""
    return load(name)[0]


def reason(name: str) -> Optional[str]:
    """None when ``csrc/<name>.c`` is compiled and loaded, else why it is not."""
    return load(name)[1]


def reset() -> None:
    """Forget what was loaded (the next call compiles or loads again, seeing the environment anew)."""
    with _LOCK:
        _LOADED.clear()
