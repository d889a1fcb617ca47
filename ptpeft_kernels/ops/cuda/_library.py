"""Loading the compiled extension ``ptpeft_kernels._C``, once, with the reason when it cannot load."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

BUILD_HINT = "build it with: python -m ptpeft_kernels.build_cuda (or pip install -e . --no-build-isolation)"


@functools.cache
def load_reason() -> str | None:
    """``None`` once the extension is loaded and its ops are registered; otherwise why not.

    Loading runs the library's static initialisers, which register ``torch.ops.ptpeft_cuda.*``.
    Call only where CUDA is available: a CUDA extension cannot load next to a CPU build of torch.
    """
    if importlib.util.find_spec("ptpeft_kernels._C") is None:
        return f"the CUDA extension ptpeft_kernels._C is not built ({BUILD_HINT})"
    try:
        importlib.import_module("ptpeft_kernels._C")
    except (ImportError, OSError) as exc:  # built against another torch / CUDA, missing libraries
        return f"the CUDA extension ptpeft_kernels._C failed to load ({exc}); rebuild it: {BUILD_HINT}"
    if not hasattr(torch.ops.ptpeft_cuda, "decode_attention"):
        return "the CUDA extension ptpeft_kernels._C loaded but registered no ops (stale build?)"
    return None
