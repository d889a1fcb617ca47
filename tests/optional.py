"""Optional test dependencies (hypothesis, trl, accelerate, bitsandbytes, peft): import them, or skip.

CI and the dev venv install every one of them (``pip install -e ".[test]"``); there a missing one must
fail loudly, never quietly turn its tests into skips. The GPU image that ``benchmarks/gpu_suite.py``
runs on has only torch, triton, transformers, peft, pytest and pytest-xdist: the suite sets
``PTPEFT_SKIP_MISSING_TEST_DEPS=1``, and then a test module that needs a missing package is skipped
with a reason naming it, instead of failing to import at collection, which would stop the whole
correctness phase (pytest runs no test after a collection error).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

SKIP_MISSING = "PTPEFT_SKIP_MISSING_TEST_DEPS"


def skipping_missing() -> bool:
    """Whether a missing optional test dependency skips its tests (only where the GPU suite says so)."""
    return os.environ.get(SKIP_MISSING, "") == "1"


def require(module: str, needed_for: str, package: str | None = None) -> ModuleType:
    """Import ``module`` (``package``: its pip name, default ``module``) for tests of ``needed_for``.

    Under ``PTPEFT_SKIP_MISSING_TEST_DEPS=1`` a missing module skips the calling test, or the whole test
    module when called at its top; anywhere else it raises ``ModuleNotFoundError`` as a plain import does.
    """
    if skipping_missing():
        reason = f"{package or module} is not installed: {needed_for} need it ({SKIP_MISSING}=1)"
        return pytest.importorskip(module, reason=reason)
    return importlib.import_module(module)
