"""Build script: the pure-Python package always, the CUDA extension ``ptpeft_kernels._C`` when it can.

The extension is built only when torch is importable in the build environment (use
``pip install --no-build-isolation``), torch was built with CUDA, nvcc is found and
``csrc/`` holds sources. Otherwise it is skipped with one line and the ``triton`` and
``torch`` backends serve every op. ``PTPEFT_SKIP_CUDA_BUILD=1`` forces the skip.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _skip(reason: str) -> dict:
    print(
        f"ptpeft_kernels: skipping the CUDA extension ({reason}); the triton and torch backends remain.",
        file=sys.stderr,
    )
    return {}


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("PTPEFT_SKIP_CUDA_BUILD", "0") == "1":
        return _skip("PTPEFT_SKIP_CUDA_BUILD=1")
    sources = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp")
    )
    if not sources:
        return _skip("no sources under csrc/")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable in the build environment; use --no-build-isolation")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} was built without CUDA")
    if CUDA_HOME is None:
        return _skip("nvcc / CUDA_HOME not found")
    ext = CUDAExtension(
        name="ptpeft_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
