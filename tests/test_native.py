"""fastclip._native: the C kernels compiled on first use, cached, and refused with a reason."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fastclip import _native
from fastclip.data.augment import AugmentConfig, augment_batch, draw_params

HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang")) and sys.platform.startswith("linux")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and a fresh load; the process's state is restored afterwards."""
    monkeypatch.setenv("FASTCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCLIP_NATIVE", raising=False)
    _native.reset()
    yield tmp_path
    monkeypatch.undo()
    _native.reset()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this Linux machine")
def test_compiles_once_and_is_reused(fresh):
    assert _native.reason("augment_cpu") is None
    built = list(fresh.glob("augment_cpu-*.so"))
    assert len(built) == 1 and not list(fresh.glob("tmp*"))
    stamp = built[0].stat().st_mtime_ns
    # another process finds it in the cache (no second compile)
    code = "from fastclip import _native; print(_native.reason('augment_cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, FASTCLIP_CACHE_DIR=str(fresh)))
    assert out.stdout.strip() == "None"
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


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("FASTCLIP_NATIVE", "0")
    _refused_with("disabled by FASTCLIP_NATIVE=0")


def test_missing_compiler_is_a_reason(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    _refused_with("cannot run the C compiler")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a shell script as the compiler")
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
    assert not list(fresh.glob("*.so"))  # nothing half-written left behind


def test_info_lists_the_augment_backends():
    import fastclip.data  # noqa: F401  (registers the data ops)
    from fastclip.info import report
    text = report()
    assert "augment:" in text and "native" in text and "torch" in text
