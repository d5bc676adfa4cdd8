"""Build script: the optional native extension ``fastclip._C``; everything else is pure Python.

``pip install .`` and ``python -m build`` compile ``csrc/*.cpp`` into ``fastclip._C`` with
setuptools and pybind11, the only build requirements (never torch: the extension does not link
libtorch; fastclip hands it CPU tensors as numpy views).  The wheel is then a platform wheel that
carries ``_C``; an editable install (``pip install -e .``) builds it in place, as does
``python setup.py build_ext --inplace`` in a checkout.  Installing that wheel needs no compiler.

The extension is optional, and the package works without it (the ``augment`` op then runs its
torch backend):

- ``FASTCLIP_BUILD_EXT`` unset (the default): a missing compiler, a missing pybind11 or a failed
  compile leaves a pure-Python install.  The build prints one line saying why (pip shows it with
  ``pip install -v .``) and writes the reason into the package (``fastclip/_C_build.txt``), where
  ``python -m fastclip.info`` reads it.
- ``FASTCLIP_BUILD_EXT=0``: not built (a ``py3-none-any`` wheel), with the same line and note.
- ``FASTCLIP_BUILD_EXT=1``: required; a failed build fails the install.

``MAX_JOBS`` caps the parallel compile jobs (default: every core).  On x86-64 the augment kernel
is built in per-CPU vector widths (GCC/clang ``target_clones``: AVX-512, AVX2, baseline, chosen
at load time); a toolchain that refuses them gets one rebuild without (``FASTCLIP_NO_CLONES``).
The module records the fastclip version, an ABI number and a hash of ``csrc/``;
``fastclip.extension`` refuses a ``_C`` built for anything else (another version, edited sources).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
NOTE = "_C_build.txt"  # in the package: why _C was not built (read by fastclip.extension)
MODE = os.environ.get("FASTCLIP_BUILD_EXT", "").strip().lower()
SKIP = MODE in ("0", "false", "no", "off")
REQUIRED = MODE in ("1", "true", "yes", "on")
WINDOWS = sys.platform == "win32"
CLONES = not WINDOWS and platform.machine().lower() in ("x86_64", "amd64")  # csrc/clones.h agrees


def say(message: str) -> None:
    print(f"fastclip: {message}", file=sys.stderr, flush=True)


def package_version() -> str:
    text = (ROOT / "fastclip" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def sources_sha256(root: Path) -> str:
    """A hash of csrc/ (names and bytes of the .cpp and .h files); fastclip.extension computes
    the same to tell a stale in-place build from a current one."""
    h = hashlib.sha256()
    for path in sorted((root / "csrc").glob("*")):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def max_jobs() -> int:
    """``MAX_JOBS`` (0: every core)."""
    raw = os.environ.get("MAX_JOBS", "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        say(f"ignoring MAX_JOBS={raw!r} (expected a positive integer); compiling on every core")
        return 0
    return int(raw)


def extension_plan():
    """(extensions, build_ext base class, why none) for this build."""
    if SKIP:
        return [], _setuptools_build_ext, f"skipped by FASTCLIP_BUILD_EXT={os.environ['FASTCLIP_BUILD_EXT']}"
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], _setuptools_build_ext, "csrc/ is missing from this source tree"
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
        from pybind11.setup_helpers import build_ext as pybind11_build_ext
    except ImportError as exc:
        return [], _setuptools_build_ext, f"pybind11 is not installed in the build environment ({exc})"
    # Every object is rebuilt whenever the extension is (it is rebuilt when csrc/, the version or
    # this file changed): the version and the hash are compiled in as macros.
    ParallelCompile(default=max_jobs(), needs_recompile=lambda obj, src: True).install()
    ext = Pybind11Extension(
        "fastclip._C", sources, cxx_std=17,
        depends=sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.h"))
        + ["fastclip/__init__.py", "setup.py"],
        define_macros=[("FASTCLIP_VERSION", f'"{package_version()}"'),
                       ("FASTCLIP_SOURCES_SHA256", f'"{sources_sha256(ROOT)}"')],
        extra_compile_args=[] if WINDOWS else ["-O3"])
    return [ext], pybind11_build_ext, None


EXTENSIONS, BUILD_EXT_BASE, NOT_PLANNED = extension_plan()
if REQUIRED and NOT_PLANNED:
    sys.exit(f"fastclip: FASTCLIP_BUILD_EXT=1 requires fastclip._C, but {NOT_PLANNED}")


def _built_files(directory: Path) -> list:
    patterns = ("_C.*.so", "_C.so", "_C.*.pyd", "_C.pyd", NOTE)
    return [p for pattern in patterns for p in directory.glob(pattern)]


def _missing_compiler(compiler) -> str | None:
    """Why ``compiler`` cannot run (its executable is not found), or None."""
    for attr in ("compiler_so", "compiler_so_cxx", "compiler_cxx"):
        argv = getattr(compiler, attr, None)
        if argv and shutil.which(argv[0]) is None:
            where = "does not exist" if os.sep in argv[0] else "is not on the PATH"
            return f"no C++ compiler found ({argv[0]!r} {where}; CC and CXX choose the compilers)"
    return None


def _brief(exc: Exception) -> str:
    """A compile error in a few words (setuptools' message holds the whole command line)."""
    text = str(exc)
    failed = re.search(r"Command '\['([^']+)'.*returned non-zero exit status (\d+)", text, re.S)
    if failed:
        return f"{failed.group(1)} exited with status {failed.group(2)}"
    return text if len(text) <= 200 else text[:200] + "..."


class BuildPy(build_py):
    """Copies the package and clears what an earlier build left in it (a ``_C`` this build may not
    make, an old note); records the reason when the extension is not planned."""

    def run(self):
        super().run()
        package = Path(self.build_lib) / "fastclip"
        for stale in _built_files(package):
            stale.unlink()
        if NOT_PLANNED:
            say(f"building without the native extension fastclip._C: {NOT_PLANNED}")
            package.mkdir(parents=True, exist_ok=True)
            (package / NOTE).write_text(NOT_PLANNED + "\n", encoding="utf-8")


class _NotBuilt(Exception):
    """Raised past setuptools' in-place copy once the reason is recorded."""


class BuildExt(BUILD_EXT_BASE):
    """pybind11's build_ext (C++17 flags), made optional: a missing compiler or a failed compile
    prints one line and leaves the pure-Python package, unless FASTCLIP_BUILD_EXT=1."""

    def run(self):
        # Where _C goes: the source tree for --inplace and editable installs, else the build tree.
        # (setuptools clears self.inplace while it builds, then copies the result into place.)
        self._package = ROOT / "fastclip" if self.inplace else Path(self.build_lib) / "fastclip"
        try:
            super().run()
        except _NotBuilt:
            return
        note = self._package / NOTE
        if note.exists():
            note.unlink()

    def _without(self, why: str) -> None:
        if REQUIRED:
            raise SystemExit(f"fastclip: FASTCLIP_BUILD_EXT=1 requires fastclip._C, but {why}")
        say(f"building without the native extension fastclip._C: {why}")
        for stale in _built_files(self._package):
            stale.unlink()
        self._package.mkdir(parents=True, exist_ok=True)
        (self._package / NOTE).write_text(why + "\n", encoding="utf-8")
        raise _NotBuilt(why)

    def build_extensions(self):
        from setuptools.errors import BaseError, CCompilerError  # BaseError: distutils' DistutilsError
        errors = (CCompilerError, BaseError, OSError)
        why = _missing_compiler(self.compiler)
        if why:
            self._without(why)
        try:
            super().build_extensions()
        except errors as exc:
            if not CLONES or any(m[0] == "FASTCLIP_NO_CLONES" for m in self.extensions[0].define_macros):
                self._without(f"the compile failed ({_brief(exc)}; the compiler's messages are above)")
            say(f"the build with per-CPU vector widths failed ({_brief(exc)}); "
                "retrying with FASTCLIP_NO_CLONES")
            for ext in self.extensions:
                ext.define_macros.append(("FASTCLIP_NO_CLONES", "1"))
            self.force = True
            try:
                super().build_extensions()
            except errors as exc2:
                self._without(f"the compile failed ({_brief(exc2)}; the compiler's messages are above)")


setup(ext_modules=EXTENSIONS, cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
