"""Build script.

Nothing is compiled at install time: a plain `pip install .` never needs torch, CUDA or a
compiler.  fastclip's CPU kernels in plain C (fastclip/csrc/*.c, shipped as package data) are
compiled with the system C compiler on first use and cached (fastclip/_native.py says why); a
CUDA/C++ extension, when an issue asks for one, will build here only when asked for
(FASTCLIP_BUILD_EXT=1) and its compiler is present.
"""
from setuptools import setup

setup()
