"""Builds and loads the host-side test library: csrc/'s kernel code compiled for the CPU.

Every ``tests/cuda/host/*.cpp`` is compiled with the host C++ compiler (g++, or ``$CXX``)
together with the headers under ``csrc/`` into one shared library, cached in the temp
directory under a hash of all the sources, and loaded with ctypes. The build is written
to a temporary name and renamed, so parallel test workers can race safely.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_DIR = Path(__file__).resolve().parent / "host"
CSRC = ROOT / "csrc"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _sources() -> list[Path]:
    return sorted(HOST_DIR.glob("*.cpp"))


def _digest(cxx: str) -> str:
    h = hashlib.sha256(cxx.encode())
    for path in sorted([*_sources(), *CSRC.rglob("*.h")]):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def load() -> ctypes.CDLL:
    """The compiled library (built on first use); raises RuntimeError if the build fails."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++ or $CXX) found")
    target = Path(tempfile.gettempdir()) / f"ptpeft-host-{_digest(cxx)}" / "libptpeft_host.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
               f"-I{CSRC}", *map(str, _sources()), "-o", str(partial)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"host build failed: {' '.join(cmd)}\n{done.stderr[-4000:]}")
        os.replace(partial, target)
    return ctypes.CDLL(str(target))
