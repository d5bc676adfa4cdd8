"""Build script.

The package is pure Python today; the optional compiled extension (csrc/) arrives with a later
issue and will build only when asked for (FASTCLIP_BUILD_EXT=1) and a compiler is present, so a
plain `pip install .` never needs torch, CUDA or a compiler at build time.
"""
from setuptools import setup

setup()
