"""Building fastclip._C as users get it (setup.py, in a copy of the source tree): the platform wheel
carries it; installed into a fresh virtual environment with no compiler on the PATH, it loads and
passes the augment op's tests; a ``_C`` built for another version is refused there; without a
compiler, or with FASTCLIP_BUILD_EXT=0, the build is pure Python and says why in one line.

About 30 s on a 2-core CPU (one compile of the extension, ~5 s with MAX_JOBS=2)."""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fastclip: "  # setup.py's own lines
pytestmark = pytest.mark.skipif(not (ROOT / "csrc").is_dir() or not (ROOT / "setup.py").is_file(),
                                reason="needs fastclip's source tree (csrc/, setup.py)")


def _why_no_build() -> str | None:
    """Why this environment cannot build the wheel without isolation, or None."""
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (the test extra installs it)"
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        if shutil.which("wheel") is None:
            return "neither setuptools >= 70.1 nor the wheel package is installed"
    cxx = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    if shutil.which(os.environ.get("CXX", cxx).split()[0]) is None:
        return f"no C++ compiler ({cxx}) on the PATH"
    return None


def _copy_source(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "_C.*", "_C_build.txt", "*.egg-info", "build")
    dst.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("csrc", "fastclip"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "PYTHONPATH", "FASTCLIP_BUILD_EXT")}
    env.update(MAX_JOBS="2", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(argv, **kw) -> subprocess.CompletedProcess:
    """``argv`` in a subprocess; pass ``cwd`` away from the checkout whenever the checkout's own
    fastclip must not be importable (``python -c`` puts the working directory first on sys.path)."""
    kw.setdefault("env", _env())
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300, **kw)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _our_lines(proc: subprocess.CompletedProcess) -> list:
    lines = (line.strip() for line in (proc.stdout + proc.stderr).splitlines())
    return [line for line in lines if line.startswith(PREFIX)]


def _pip_wheel(src: Path, dist: Path, **env) -> tuple[Path, subprocess.CompletedProcess]:
    proc = _ok(_run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                     "--no-index", "-w", str(dist), str(src)], env=_env(**env)))
    (wheel,) = dist.glob("fastclip-*.whl")
    return wheel, proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """The platform wheel, installed into a fresh venv whose PATH holds no compiler; torch, numpy
    and pytest come from this environment's site-packages, after the venv's own."""
    why = _why_no_build()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("wheel")
    wheel, _ = _pip_wheel(_copy_source(tmp / "src"), tmp / "dist")
    home = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(home)]))
    python = home / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
              str(wheel)]))
    purelib = Path(_ok(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
                   .stdout.strip())
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    (purelib / "_outer_env.pth").write_text("\n".join(outer) + "\n")
    bare = tmp / "bin"  # the PATH: this directory only (no cc, gcc, c++ or clang)
    bare.mkdir()
    env = _env(PATH=str(bare))
    return {"wheel": wheel, "python": str(python), "home": home.resolve(), "purelib": purelib, "env": env}


def test_the_wheel_is_a_platform_wheel_carrying_C(venv):
    wheel = venv["wheel"]
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("fastclip/_C.") for n in names), names
    assert "fastclip/_C_build.txt" not in names


def test_the_wheel_installs_and_C_loads_without_a_compiler(venv):
    code = ("import json, shutil, fastclip, fastclip.extension as e; "
            "print(json.dumps({'file': fastclip.__file__, 'status': e.status(), "
            "'cc': [shutil.which(c) for c in ('cc', 'gcc', 'c++', 'clang')]}))")
    got = json.loads(_ok(_run([venv["python"], "-c", code], env=venv["env"], cwd=venv["home"])).stdout)
    assert got["cc"] == [None] * 4
    assert Path(got["file"]).resolve().is_relative_to(venv["home"]), got
    assert got["status"]["loaded"], got["status"]
    assert Path(got["status"]["path"]).resolve().is_relative_to(venv["home"]), got


def test_the_augment_and_binding_tests_pass_against_the_built_C(venv, tmp_path):
    """tests/ops/test_augment.py's native cases (every one that calls _C) and tests/test_extension.py
    (the binding's refusals), run by the venv's Python against the wheel's _C.  (Where the test
    run imports fastclip from the checkout, as CI's does, the checkout has no _C built in place
    and those cases skip there: here they run.)"""
    for test in ("ops/test_augment.py", "test_extension.py"):
        shutil.copy2(ROOT / "tests" / test, tmp_path / Path(test).name)
    (tmp_path / "conftest.py").write_text(
        "import fastclip.extension as e\n"
        "def pytest_sessionstart(session):\n"
        f"    assert e.reason() is None and e.status()['path'].startswith({str(venv['home'])!r}), \\\n"
        "        e.status()\n")
    proc = _run([venv["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                 "-k", "native or test_extension", str(tmp_path)], env=venv["env"], cwd=tmp_path)
    tail = proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == 0 and " passed" in tail and "failed" not in tail, tail


def test_a_C_built_for_another_version_is_refused_at_load(venv):
    init = venv["purelib"] / "fastclip" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace('__version__ = "', '__version__ = "9.9.9+other-', 1))
    try:
        code = ("import torch, fastclip.extension as e; from fastclip.ops.augment import AugmentOpConfig, "
                "augment_batch; x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8); "
                "c = AugmentOpConfig(jitter_p=1.0, blur_p=1.0); "
                "print(e.reason()); "
                "print(torch.equal(augment_batch(x, c), augment_batch(x, c, backend='torch')))")
        reason, same = _ok(_run([venv["python"], "-c", code], env=venv["env"], cwd=venv["home"])).stdout \
            .strip().splitlines()
    finally:
        init.write_text(text)
    assert "was built for fastclip 0.1.0, this is fastclip 9.9.9+other-0.1.0" in reason, reason
    assert same == "True"  # automatic selection fell back to the torch backend


@pytest.mark.parametrize("how", ["empty PATH", "CC=/nonexistent"])
def test_without_a_compiler_the_build_is_pure_python_and_says_why(tmp_path, how):
    src = _copy_source(tmp_path / "src")
    if how == "empty PATH":
        (tmp_path / "bin").mkdir()
        env = _env(PATH=str(tmp_path / "bin"))
    else:
        env = _env(CC="/nonexistent", CXX="/nonexistent")
    proc = _ok(_run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env))
    lines = _our_lines(proc)
    assert len(lines) == 1, lines
    assert "building without the native extension fastclip._C: no C++ compiler found" in lines[0], lines
    assert not list((src / "fastclip").glob("_C.*"))
    assert "no C++ compiler found" in (src / "fastclip" / "_C_build.txt").read_text()
    if how == "empty PATH":  # the package runs, and says why it has no _C
        code = "import fastclip, fastclip.extension as e; print(fastclip.__file__); print(e.reason())"
        where, reason = _ok(_run([sys.executable, "-c", code], cwd=src, env=_env(PYTHONPATH=str(src)))) \
            .stdout.strip().splitlines()
        assert Path(where).resolve().is_relative_to(src.resolve())
        # (where fastclip is also installed in editable mode, its import hook finds that checkout's
        # _C, which is not used, and the reason says so first)
        assert "fastclip._C was not built when fastclip was installed: no C++ compiler" in reason, reason
    # FASTCLIP_BUILD_EXT=1 makes the extension required: the same build fails, saying why
    env["FASTCLIP_BUILD_EXT"] = "1"
    proc = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env)
    assert proc.returncode != 0, proc.stdout
    assert "FASTCLIP_BUILD_EXT=1 requires fastclip._C, but no C++ compiler" in proc.stderr, proc.stderr


def test_FASTCLIP_BUILD_EXT_0_gives_a_pure_wheel(tmp_path):
    try:
        import setuptools.command.bdist_wheel  # noqa: F401
    except ImportError:
        pytest.skip("setuptools >= 70.1 is not installed")
    wheel, proc = _pip_wheel(_copy_source(tmp_path / "src"), tmp_path / "dist", FASTCLIP_BUILD_EXT="0")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.startswith("fastclip/_C.")]
        assert z.read("fastclip/_C_build.txt").decode().strip() == "skipped by FASTCLIP_BUILD_EXT=0"
    assert _our_lines(proc) == ["fastclip: building without the native extension fastclip._C: "
                                "skipped by FASTCLIP_BUILD_EXT=0"]
