"""Shared test setup.

Triton kernels run on the CPU under its interpreter, which must be switched on before
Triton is first imported; CUDA machines run them natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
