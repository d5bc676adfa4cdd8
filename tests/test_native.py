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
from fastclip.data.augment import AugmentConfig, augment_batch, draw_params

POSIX = sys.platform != "win32"


@functools.lru_cache(maxsize=None)
def _can_compile() -> bool:
    """A C compiler that builds a shared library here (on the PATH is not enough: headers may be missing)."""
    cc = _native._compiler()  # the one _native would use ($CC, else cc, gcc, clang)
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
    code = "from fastclip import _native; print(_native.reason('augment_cpu'))"
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
    assert _native.reason("augment_cpu") is None
    built = list(fresh.glob("augment_cpu-*.so"))
    assert len(built) == 1 and not list(fresh.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert built[0].stat().st_mode & 0o777 == 0o755 & ~umask  # other users of a shared cache can load it
    stamp = built[0].stat().st_mtime_ns
    assert _reason_in_a_new_process(fresh) == "None"  # another process finds it (no second compile)
    assert list(fresh.glob("augment_cpu-*.so")) == built and built[0].stat().st_mtime_ns == stamp


def _refused_with(fragment: str):
    from fastclip.ops.dispatch import BackendError
    why = _native.reason("augment_cpu")
    assert why is not None and fragment in why, why
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    cfg = AugmentConfig.from_name("clip_aug", 8)
    params = draw_params(2, cfg, torch.Generator().manual_seed(0))
    with pytest.raises(BackendError, match=f"native.*{fragment[:12]}"):
        augment_batch(x, cfg, params=params, backend="native")
    # automatic selection falls back to the torch backend, with the same result
    auto = augment_batch(x, cfg, params=params)
    assert torch.equal(auto, augment_batch(x, cfg, params=params, backend="torch"))


@needs_cc
def test_a_corrupt_cached_library_is_rebuilt(fresh):
    # Only in other processes: truncating a library this process has mapped would crash it (SIGBUS).
    assert _reason_in_a_new_process(fresh) == "None"
    (built,) = fresh.glob("augment_cpu-*.so")
    built.write_bytes(b"")  # truncated (a full disk, a killed copy)
    assert _reason_in_a_new_process(fresh) == "None"
    assert built.stat().st_size > 0 and len(list(fresh.glob("augment_cpu-*.so"))) == 1


@needs_cc
def test_compiler_with_arguments(fresh, monkeypatch):
    monkeypatch.setenv("CC", " ".join([*_native._compiler(), "-DFASTCLIP_UNUSED=1"]))  # as CC="ccache gcc"
    assert _native.reason("augment_cpu") is None


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
    import fastclip.data  # noqa: F401  (registers the data ops)
    from fastclip.info import report
    text = report()
    assert "augment:" in text and "native" in text and "torch" in text
