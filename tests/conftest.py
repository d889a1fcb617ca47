"""Shared test setup.

Triton kernels run on the CPU under its interpreter, which must be switched on before
Triton is first imported; CUDA machines run them natively. The first-use guard is off
(tests/test_verify.py switches it on where it tests it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests compare every kernel with float64 themselves. The first-use guard would reroute a kernel
# that fails on this GPU to the torch backend, and its tests would then pass on torch's numbers.
os.environ.setdefault("PTPEFT_VERIFY", "0")

torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
