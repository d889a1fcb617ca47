"""The environment switches of the kernels, read in one place (at call time, never at import).

``PTPEFT_AUTOTUNE``  ``1`` (default): the Triton kernels autotune on a GPU, once per shape class;
                     ``0``: each kernel takes one pinned config per shape class, so a process
                     compiles one variant instead of every candidate (the GPU suite's default,
                     whose whole run has a few minutes).
``PTPEFT_VERIFY``    ``1`` (default): the first-use guard (:mod:`ptpeft_kernels.verify`) checks a
                     kernel against the torch reference on the first call of each case on a GPU
                     architecture that no committed GPU run has validated; ``0``: off;
                     ``all``: every case on every device, the CPU interpreter and validated
                     architectures included (how the guard is tested and its cost measured).
"""

from __future__ import annotations

import os

AUTOTUNE_VAR = "PTPEFT_AUTOTUNE"
VERIFY_VAR = "PTPEFT_VERIFY"
VERIFY_MODES = ("0", "1", "all")


def _read(name: str, allowed: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {os.environ.get(name)!r}")
    return value


def autotune_enabled() -> bool:
    """Whether the Triton kernels should autotune (``PTPEFT_AUTOTUNE``, default on).

    Off, a kernel launcher uses one pinned config per shape class. The launchers decide what
    a shape class is; this only reads the switch, so every kernel reads it the same way.
    """
    return _read(AUTOTUNE_VAR, ("0", "1"), "1") == "1"


def verify_mode() -> str:
    """``PTPEFT_VERIFY``: ``"0"`` (off), ``"1"`` (default: unvalidated GPU architectures) or ``"all"``."""
    return _read(VERIFY_VAR, VERIFY_MODES, "1")
