"""fastclip.lazy: optional imports as (module, reason), cached per process; require_module; plotting."""
import sys
import uuid

import pytest

from fastclip import lazy


def fresh_name():
    """A module name nothing has imported (or cached) yet in this process."""
    return f"_fastclip_lazy_test_{uuid.uuid4().hex}"


def test_a_present_module_is_returned():
    import json
    assert lazy.optional_module("json") == (json, None)
    assert lazy.package_reason("json") is None
    assert lazy.require_module("json", "reading configs") is json


def test_a_missing_module_gives_none_and_a_reason_naming_it():
    name = fresh_name()
    mod, why = lazy.optional_module(name)
    assert mod is None
    assert why.startswith(f"cannot import {name}: ModuleNotFoundError") and name in why
    assert lazy.package_reason(name) == why


def test_a_broken_install_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    """Any exception at import (a wheel built for another CUDA, a missing shared library) degrades."""
    name = fresh_name()
    (tmp_path / f"{name}.py").write_text("raise OSError('libcudart.so.99: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod, why = lazy.optional_module(name)
    assert mod is None and why == f"cannot import {name}: OSError: libcudart.so.99: cannot open shared object file"
    sys.modules.pop(name, None)


def test_the_answer_is_cached_for_the_process(tmp_path, monkeypatch):
    name = fresh_name()
    first = lazy.optional_module(name)
    assert first[0] is None
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")  # installed after the first question
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lazy.optional_module(name) is first, "the failed import is not retried"
    present = lazy.optional_module("json")
    assert lazy.optional_module("json") is present


def test_require_module_raises_import_error_naming_the_purpose():
    name = fresh_name()
    with pytest.raises(ImportError, match=rf"^the score histogram needs the optional package '{name}': "
                                          rf"cannot import {name}: ModuleNotFoundError"):
        lazy.require_module(name, "the score histogram")


def test_plotting_gives_a_file_ready_pyplot_or_the_reason(tmp_path):
    plt, why = lazy.plotting()
    assert lazy.plotting() == (plt, why)  # cached
    if lazy.optional_module("matplotlib")[0] is None:
        assert plt is None and why.startswith("cannot import matplotlib")
        return
    assert why is None and plt.__name__ == "matplotlib.pyplot"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "plot.png")  # no display needed
    plt.close(fig)
    assert (tmp_path / "plot.png").stat().st_size > 0
