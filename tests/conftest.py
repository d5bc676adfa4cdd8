"""Test-session set-up.

Triton kernels are tested on CPU through the interpreter; TRITON_INTERPRET must be set before
Triton is first imported, so it is set here (only when no CUDA device is present).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
