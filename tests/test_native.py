"""fastclip._native: the C kernels compiled on first use, cached, and refused with a reason."""
import functools
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from fastclip import _native
from fastclip.ops import dispatch
from fastclip.ops.augment import NATIVE_KERNEL, OP, AugmentOpConfig, augment_batch, draw_params

POSIX = sys.platform != "win32"


@functools.lru_cache(maxsize=None)
def _can_compile() -> bool:
    """A C compiler that builds a shared library here (on the PATH is not enough: headers may be missing)."""
    cc = _native.compiler()  # the one _native would use ($CC, else cc, gcc, clang)
    if cc is None or not POSIX:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <stdint.h>\n#include <string.h>\nint64_t f(void) { return 1; }\n")
        return subprocess.run([*cc, "-shared", "-fPIC", src, "-o", os.path.join(d, "t.so")],
                              capture_output=True, check=False).returncode == 0


needs_cc = pytest.mark.skipif(not _can_compile(), reason="no working C compiler on this machine")


def _reason_in_a_new_process(cache) -> str:
    code = f"from fastclip import _native; print(_native.reason({NATIVE_KERNEL!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, FASTCLIP_CACHE_DIR=str(cache)))
    return out.stdout.strip()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and a fresh load; the process's state is restored afterwards."""
    monkeypatch.setenv("FASTCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCLIP_NATIVE", raising=False)
    _native.reset()
    yield tmp_path
    monkeypatch.undo()
    _native.reset()


@needs_cc
def test_compiles_once_and_is_reused(fresh):
    assert _native.reason(NATIVE_KERNEL) is None
    built = list(fresh.glob(f"{NATIVE_KERNEL}-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert built[0].stat().st_mode & 0o777 == 0o755 & ~umask  # other users of a shared cache can load it
    stamp = built[0].stat().st_mtime_ns
    assert _reason_in_a_new_process(fresh) == "None"  # another process finds it (no second compile)
    assert list(fresh.glob(f"{NATIVE_KERNEL}-*.so")) == built and built[0].stat().st_mtime_ns == stamp


def _refused_with(fragment: str):
    why = _native.reason(NATIVE_KERNEL)
    assert why is not None and fragment in why, why
    assert _native.load(NATIVE_KERNEL) == (None, why) and _native.library(NATIVE_KERNEL) is None
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    cfg = AugmentOpConfig(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    params = draw_params(2, cfg, torch.Generator().manual_seed(0))
    with pytest.raises(dispatch.BackendError, match=f"native.*{fragment[:12]}"):
        augment_batch(x, cfg, params=params, backend="native")
    # automatic selection falls back to the torch backend, with the same result
    auto = augment_batch(x, cfg, params=params)
    assert torch.equal(auto, augment_batch(x, cfg, params=params, backend="torch"))


@needs_cc
def test_a_corrupt_cached_library_is_rebuilt(fresh):
    # Only in other processes: truncating a library this process has mapped would crash it (SIGBUS).
    assert _reason_in_a_new_process(fresh) == "None"
    (built,) = fresh.glob(f"{NATIVE_KERNEL}-*.so")
    built.write_bytes(b"")  # truncated (a full disk, a killed copy)
    assert _reason_in_a_new_process(fresh) == "None"
    assert built.stat().st_size > 0 and len(list(fresh.glob(f"{NATIVE_KERNEL}-*.so"))) == 1


@needs_cc
def test_compiler_with_arguments(fresh, monkeypatch):
    monkeypatch.setenv("CC", " ".join([*_native.compiler(), "-DFASTCLIP_UNUSED=1"]))  # as CC="ccache gcc"
    assert _native.reason(NATIVE_KERNEL) is None


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_unusable_or_unsafe_cache_directory_is_a_reason(fresh, monkeypatch):
    blocker = fresh / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTCLIP_CACHE_DIR", str(blocker / "cache"))
    _refused_with("cannot use the cache directory")
    shared = fresh / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("FASTCLIP_CACHE_DIR", str(shared))
    _native.reset()
    _refused_with("is writable by everyone")


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("FASTCLIP_NATIVE", "0")
    _refused_with("disabled by FASTCLIP_NATIVE=0")


@pytest.mark.skipif(not POSIX, reason="Windows has its own refusal")
def test_missing_compiler_is_a_reason(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    _refused_with("cannot run the C compiler")


@pytest.mark.skipif(not POSIX, reason="uses a shell script as the compiler")
def test_failing_compiler_is_a_reason(fresh, monkeypatch):
    fake = fresh / "broken-cc"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "broken-cc: no luck today" >&2
        exit 1
    """))
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    _refused_with("no luck today")
    assert not list(fresh.glob("*.so")) and not list(fresh.glob("*.tmp"))  # nothing half-written left


def test_info_lists_the_augment_backends():
    from fastclip.info import report  # the augment op registered its backends when imported above
    text = report()
    assert "augment:" in text and "native" in text and "torch" in text


@needs_cc
def test_load_is_the_pair_the_backend_checks_and_runs_with(fresh):
    """load() answers (library, None) like fastclip.lazy.optional_module; the native backend's
    check and its run use that one answer, and a reset is seen by both."""
    lib, why = _native.load(NATIVE_KERNEL)
    assert why is None and lib is _native.library(NATIVE_KERNEL) and _native.load(NATIVE_KERNEL)[0] is lib
    native = next(b for b in dispatch.backends(OP) if b.name == "native")
    assert native.reasons(device=torch.device("cpu"), dtype=torch.float32) == []
    x = torch.randint(0, 256, (3, 9, 9, 3), dtype=torch.uint8)
    cfg = AugmentOpConfig(jitter_p=1.0, blur_p=1.0)
    params = draw_params(3, cfg, torch.Generator().manual_seed(1))
    before = augment_batch(x, cfg, params=params, backend="native")
    _native.reset()  # forgotten: the next use loads again (from the cache) and configures its signature
    assert torch.equal(augment_batch(x, cfg, params=params, backend="native"), before)
