"""Shared fixtures of the training-driver tests.

Every run uses the ``tiny`` built-in preset (a real pre-training run of a tiny model, a few
seconds) built once per test process into a temporary cache (``PTPEFT_CACHE``), so nothing
outside the temporary directories is read or written. Two xdist workers each run one torch
thread: two threads per worker on two cores would oversubscribe them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# Small everything: a smoke run is a few optimizer steps and a handful of evaluation samples.
TINY = [
    "--builtin-preset",
    "tiny",
    "--batch-size",
    "4",
    "--eval-batch-size",
    "8",
    "--max-new-tokens",
    "4",
    "--rank-samples",
    "4",
    "--quiet",
]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ptpeft-cache")
    os.environ["PTPEFT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_assets(cache_dir):
    from ptpeft_kernels.train.builtin_model import ensure_pretrained

    return ensure_pretrained("tiny", cache_dir, quiet=True)


def run_cli(
    args: list[str], *, env_extra: dict | None = None, timeout: float = 240, module: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m ptpeft_kernels.train ARGS`` in a subprocess (one torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, *(module or ["-m", "ptpeft_kernels.train"]), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
