"""Build script: the pure-Python package always, the CUDA extension ``ptpeft_kernels._C`` when it can.

The extension is built only when torch is importable in the build environment (use
``pip install --no-build-isolation``), torch was built with CUDA and nvcc is found.
Otherwise it is skipped with one line and the ``triton`` and ``torch`` backends serve every
op. ``PTPEFT_SKIP_CUDA_BUILD=1`` forces the skip; ``PTPEFT_CUDA_ARCHS`` (default ``80;90``)
picks the GPU architectures and ``MAX_JOBS`` ninja's parallelism. Sources, flags and the
in-place build command live in ``ptpeft_kernels/build_cuda.py``.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    # Loaded by path: the package itself (and its dependencies) need not be importable here.
    spec = importlib.util.spec_from_file_location(
        "_ptpeft_build_cuda", ROOT / "ptpeft_kernels" / "build_cuda.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _skip(reason: str) -> dict:
    print(
        f"ptpeft_kernels: skipping the CUDA extension ({reason}); the triton and torch backends remain.",
        file=sys.stderr,
    )
    return {}


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("PTPEFT_SKIP_CUDA_BUILD", "0") == "1":
        return _skip("PTPEFT_SKIP_CUDA_BUILD=1")
    config = _build_config()
    if not config.sources():
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
    ext = CUDAExtension(**config.extension_kwargs(config.archs()))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
