"""fastclip._C through fastclip.extension: the binding's refusals (each names its argument), and a
missing, foreign or stale extension refused with a reason while the torch backend takes over.
(Building it, the wheel, and installs without a compiler: tests/test_build.py.)"""
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fastclip
from fastclip import extension
from fastclip.ops import dispatch
from fastclip.ops.augment import OP, AugmentOpConfig, augment_batch, draw_params


@pytest.fixture
def fresh(monkeypatch):
    """A fresh verdict, and the process's own restored afterwards."""
    monkeypatch.delenv("FASTCLIP_NATIVE", raising=False)
    extension.reset()
    yield monkeypatch
    monkeypatch.undo()
    extension.reset()


def _ext():
    mod, why = extension.load()
    if mod is None:
        pytest.skip(f"fastclip._C is not available: {why}")
    return mod


def _args(b=2, h=8, w=8):
    """Valid arguments of _C.augment as numpy arrays (blur, flip, jitter clamp: every optional one)."""
    return dict(images=np.zeros((b, h, w, 3), np.uint8), out=np.empty((b, 3, h, w), np.float32),
                a=np.tile(np.eye(3, dtype=np.float32), (b, 1, 1)), offset=np.zeros(3, np.float32),
                luma=np.array([0.299, 0.587, 0.114], np.float32), flip=np.array([True, False] * (b // 2)),
                taps=np.full((b, 3), 1 / 3, np.float32), radii=np.ones(b, np.int64),
                kl=np.zeros((b, 3), np.float32), lo=np.full(3, -1, np.float32), hi=np.full(3, 1, np.float32))


def _read_only(x):
    x = x.copy()
    x.flags.writeable = False
    return x


# (argument, bad value, exception, message fragment): each refusal names the argument
BAD = [
    ("images", np.zeros((2, 8, 8, 3), np.float32), TypeError, "images must be uint8, got float32"),
    ("images", np.zeros((8, 8, 3), np.uint8), ValueError, r"images must be a uint8 array \[B, H, W, 3\]"),
    ("images", np.zeros((2, 8, 8, 4), np.uint8), ValueError, r"images must be a uint8 array \[B, H, W, 3\]"),
    ("images", np.zeros((2, 0, 8, 3), np.uint8), ValueError, "images must be at least 1x1"),
    ("images", torch.zeros(2, 8, 8, 3, dtype=torch.uint8), TypeError,
     "images must be a CPU array with the buffer protocol.*got Tensor of dtype torch.uint8 on cpu"),
    ("images", [[1, 2, 3]], TypeError, "images must be a CPU array.*got list"),
    ("out", np.empty((2, 3, 8, 8), np.float64), TypeError, "out must be float32, got float64"),
    ("out", np.empty((2, 3, 8, 9), np.float32), ValueError,
     r"out must have shape \[B, 3, H, W\] = \(2, 3, 8, 8\), got \(2, 3, 8, 9\)"),
    ("out", np.empty((2, 8, 8, 3), np.float32).transpose(0, 3, 1, 2), ValueError, "out must be C-contiguous"),
    ("out", _read_only(np.empty((2, 3, 8, 8), np.float32)), ValueError, "out must be writable"),
    ("out", b"\0" * (2 * 3 * 8 * 8 * 4), TypeError, "out must be float32, got uint8"),
    ("a", np.zeros((2, 3), np.float32), ValueError, r"a must have shape \[B, 3, 3\]"),
    ("a", np.zeros((2, 3, 3), np.float64), TypeError, "a must be float32, got float64"),
    ("offset", np.zeros(4, np.float32), ValueError, r"offset must have shape \[3\]"),
    ("luma", np.zeros(6, np.float32)[::2], ValueError, "luma must be C-contiguous"),
    ("flip", np.zeros(2, np.int32), TypeError, "flip must be bool or uint8, got int32"),
    ("flip", np.zeros(3, bool), ValueError, r"flip must have shape \[B\] = \(2,\)"),
    ("taps", np.zeros((2, 4), np.float32), ValueError, r"taps must have shape \[B, 2R\+1\]"),
    ("taps", None, ValueError, "taps and radii go together, got radii without taps"),
    ("radii", np.ones(2, np.int32), TypeError, "radii must be int64, got int32"),
    ("radii", np.array([1, 2], np.int64), ValueError, r"radii\[1\] = 2 is out of range.*\[0, 1\]"),
    ("radii", np.array([-1, 0], np.int64), ValueError, r"radii\[0\] = -1 is out of range"),
    ("kl", np.zeros((2, 4), np.float32), ValueError, r"kl must have shape \[B, 3\]"),
    ("lo", None, ValueError, "lo and hi go together.*hi without lo"),
    ("hi", np.zeros(3, np.float16), TypeError, "hi must be float32, got float16"),
]


@pytest.mark.parametrize("name,value,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_binding_refuses_bad_arguments_naming_them(name, value, exc, match):
    ext = _ext()
    args = _args()
    args[name] = value
    with pytest.raises(exc, match=match):
        ext.augment(**args)


def test_binding_refuses_a_device_tensor():
    ext = _ext()
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.raises(TypeError, match="images must be a CPU array.*on cuda"):
        ext.augment(**{**_args(), "images": torch.zeros(2, 8, 8, 3, dtype=torch.uint8, device="cuda")})


def test_binding_writes_through_views_without_copies():
    """A strided uint8 view in, the caller's float32 memory out (numpy views of torch tensors)."""
    ext = _ext()
    x = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8).permute(0, 2, 3, 1)  # [B, H, W, 3] view
    out = torch.full((3, 3, 9, 11), float("nan"))
    args = {**_args(3, 9, 11), "images": x.numpy(), "out": out.numpy(), "flip": None, "taps": None,
            "radii": None, "kl": None, "lo": None, "hi": None}
    ext.augment(**args)
    assert torch.equal(out, x.permute(0, 3, 1, 2).float())  # identity map, no offset


def _refused(fragment: str) -> None:
    """fastclip._C is refused with ``fragment`` in its reason; the native backend says so, and
    automatic selection runs the torch backend with the same result."""
    why = extension.reason()
    assert why is not None and fragment in why, why
    assert extension.load() == (None, why) and extension.status()["loaded"] is False
    native = next(b for b in dispatch.backends(OP) if b.name == "native")
    assert any(fragment in r for r in native.reasons(device=torch.device("cpu"), dtype=torch.float32))
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    cfg = AugmentOpConfig(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    params = draw_params(2, cfg, torch.Generator().manual_seed(0))
    with pytest.raises(dispatch.BackendError, match="native"):
        augment_batch(x, cfg, params=params, backend="native")
    auto = augment_batch(x, cfg, params=params)
    assert torch.equal(auto, augment_batch(x, cfg, params=params, backend="torch"))


def _fake_C(**attrs):
    mod = types.ModuleType("fastclip._C")
    mod.__file__ = "/elsewhere/fastclip/_C.so"
    for k, v in {"__version__": fastclip.__version__, "ABI": extension.ABI, "SOURCES_SHA256": "",
                 "CLONES": False, **attrs}.items():
        setattr(mod, k, v)
    return mod


def test_a_foreign_version_is_refused(fresh):
    fresh.setitem(sys.modules, "fastclip._C", _fake_C(__version__="0.0.1"))
    _refused(f"was built for fastclip 0.0.1, this is fastclip {fastclip.__version__}")


def test_another_binding_abi_is_refused(fresh):
    fresh.setitem(sys.modules, "fastclip._C", _fake_C(ABI=extension.ABI + 1))
    _refused(f"has binding ABI {extension.ABI + 1}")


def test_a_C_outside_this_package_is_not_used(fresh):
    fresh.setitem(sys.modules, "fastclip._C", _fake_C())  # right version and ABI, another directory
    _refused("the fastclip._C found (/elsewhere/fastclip/_C.so) is not this fastclip's")


def test_a_stale_in_place_build_is_refused(fresh):
    if extension.source_root() is None:
        pytest.skip("fastclip is installed, not run from a checkout with csrc/")
    mod = _fake_C(SOURCES_SHA256="0" * 64)
    mod.__file__ = str(Path(extension.__file__).with_name("_C.so"))
    fresh.setitem(sys.modules, "fastclip._C", mod)
    _refused("was built from other sources than")


def test_a_missing_extension_is_a_reason(fresh):
    fresh.setitem(sys.modules, "fastclip._C", None)  # import fastclip._C raises ModuleNotFoundError
    _refused("fastclip._C")
    assert "not" in extension.reason()


def test_disabled_by_environment(fresh):
    fresh.setenv("FASTCLIP_NATIVE", "0")
    _refused("disabled by FASTCLIP_NATIVE=0")


def test_the_verdict_is_kept_until_reset(fresh):
    first = extension.load()
    fresh.setenv("FASTCLIP_NATIVE", "0")
    assert extension.load() == first  # remembered: the backend's check and its run agree
    extension.reset()
    assert extension.reason() == "disabled by FASTCLIP_NATIVE=0"


def test_info_says_whether_C_loaded(fresh):
    from fastclip.info import report, report_dict
    status = report_dict()["extension"]
    assert set(status) == {"loaded", "reason", "path", "version", "abi", "cpu_isa"}
    line = next(line for line in report().splitlines() if "fastclip._C" in line)
    assert ("loaded (fastclip" in line) if status["loaded"] else ("not loaded: " in line)
    fresh.setenv("FASTCLIP_NATIVE", "0")
    extension.reset()
    assert "fastclip._C  not loaded: disabled by FASTCLIP_NATIVE=0" in report()
    assert "native     not usable: the C++ extension is not available: disabled" in report()


# ----------------------------------------------------------------------------------------------
# The loss tile kernels' bindings (fastclip.ops.tiles calls them)
# ----------------------------------------------------------------------------------------------
def _tile_args(m=4, k=6):
    return {"z": np.zeros((m, k), np.float32), "row_out": np.empty(m, np.float64), "col_out": np.empty(k, np.float64)}


def _pair_args(m=4, k=6):
    return {"z": np.zeros((m, k), np.float32), "row_stat": np.zeros(m, np.float64),
            "col_stat": np.zeros(k, np.float32), "out": np.empty((m, k), np.float32)}


TILE_BAD = [
    ("tile_lse_rows_cols", "z", np.zeros((4, 6), np.float64), TypeError, "z must be float32, got float64"),
    ("tile_lse_rows_cols", "z", np.zeros(24, np.float32), ValueError, r"z must be a 2-D tile \[m, k\]"),
    ("tile_lse_rows_cols", "z", np.zeros((4, 12), np.float32)[:, ::2], ValueError, "z must be C-contiguous"),
    ("tile_lse_rows_cols", "z", np.zeros((4, 0), np.float32), ValueError, "z must have at least one column"),
    ("tile_lse_rows_cols", "z", torch.zeros(4, 6), TypeError, "z must be a CPU array with the buffer protocol"),
    ("tile_lse_rows_cols", "row_out", np.empty(5, np.float64), ValueError, r"row_out must have shape \[m\] = \(4,\)"),
    ("tile_lse_rows_cols", "row_out", np.empty(4, np.float32), TypeError, "row_out must be float64, got float32"),
    ("tile_lse_rows_cols", "col_out", _read_only(np.empty(6, np.float64)), ValueError, "col_out must be writable"),
    ("tile_lse_rows_cols", "col_out", np.empty(12, np.float64)[::2], ValueError, "col_out must be C-contiguous"),
    ("tile_softmax_pair", "row_stat", np.zeros(4, np.float16), TypeError, "row_stat must be float32 or float64"),
    ("tile_softmax_pair", "row_stat", np.zeros((4, 1), np.float64), ValueError, r"row_stat must have shape \[m\]"),
    ("tile_softmax_pair", "col_stat", np.zeros(7, np.float32), ValueError, r"col_stat must have shape \[k\] = \(6,\)"),
    ("tile_softmax_pair", "out", np.empty((4, 6), np.float64), TypeError, "out must be float32, got float64"),
    ("tile_softmax_pair", "out", np.empty((4, 5), np.float32), ValueError, r"out must have shape \[m, k\]"),
    ("tile_softmax_pair", "out", _read_only(np.empty((4, 6), np.float32)), ValueError, "out must be writable"),
]


@pytest.mark.parametrize("fn,name,value,exc,match", TILE_BAD, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(TILE_BAD)])
def test_tile_bindings_refuse_bad_arguments_naming_them(fn, name, value, exc, match):
    ext = _ext()
    args = _tile_args() if fn == "tile_lse_rows_cols" else _pair_args()
    args[name] = value
    with pytest.raises(exc, match=match):
        getattr(ext, fn)(**args)


def test_tile_bindings_refuse_a_bad_thread_count_and_a_partly_overlapping_out():
    ext = _ext()
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        ext.tile_lse_rows_cols(**_tile_args(), threads=0)
    buf = np.zeros(5 * 6, np.float32)
    z, out = buf[:24].reshape(4, 6), buf[6:].reshape(4, 6)
    with pytest.raises(ValueError, match="out must be z itself or not overlap it"):
        ext.tile_softmax_pair(z, np.zeros(4, np.float32), np.zeros(6, np.float32), out)


def test_tile_bindings_write_the_callers_memory():
    ext = _ext()
    z = np.log(np.arange(1, 7, dtype=np.float32)).reshape(2, 3)  # exp(z) = 1..6
    row, col = np.full(2, np.nan), np.full(3, np.nan)
    ext.tile_lse_rows_cols(z, row, col)
    np.testing.assert_allclose(row, np.log([6.0, 15.0]), rtol=1e-6)
    np.testing.assert_allclose(col, np.log([5.0, 7.0, 9.0]), rtol=1e-6)
    out = np.full((2, 3), np.nan, np.float32)
    ext.tile_softmax_pair(z, row, col, out)
    np.testing.assert_allclose(out, np.exp(z) / np.array([[6.0], [15.0]]) + np.exp(z) / np.array([5.0, 7.0, 9.0]),
                               rtol=1e-6)
