"""Every CUDA source compiles for sm_80 and sm_90 without a GPU, within its resource limits.

The nvcc compile of all sources for two architectures takes about a minute of CPU, so it
runs in its own CI step (``.ci/run``: ``PTPEFT_CUDA_COMPILE_CHECK=1 pytest tests/cuda/test_compile.py``,
after ``python -m ptpeft_kernels.build_cuda --fetch-headers`` has cached the CUDA build of
torch's headers for bindings.cpp); the default test command skips it. The parsing and limit
logic is checked below on a fixed ptxas report in every run.
"""

import csv
import os
from pathlib import Path

import pytest

from ptpeft_kernels import build_cuda

ARCHS = ["80", "90"]
RESOURCES_CSV = build_cuda.ROOT / "benchmarks" / "results" / "cuda_resources.csv"

compile_check = pytest.mark.skipif(
    os.environ.get("PTPEFT_CUDA_COMPILE_CHECK") != "1" or build_cuda.nvcc() is None,
    reason="the nvcc compile check runs in its own CI step: set PTPEFT_CUDA_COMPILE_CHECK=1 (needs nvcc)",
)


@pytest.fixture(scope="module")
def compiled():
    include = build_cuda.torch_headers_dir() / "torch" / "include"
    include = include if include.exists() else None
    rows, problems = build_cuda.check(ARCHS, include, jobs=2)
    return rows, problems, include


@compile_check
def test_every_kernel_source_compiles_for_sm80_and_sm90(compiled):
    rows, _, _ = compiled
    sources = {str(p.relative_to(build_cuda.ROOT)) for p in build_cuda.sources() if p.suffix == ".cu"}
    assert sources and {r.source for r in rows} == sources
    for source in sources:
        kernels = {r.kernel for r in rows if r.source == source}
        for arch in ARCHS:
            assert {r.kernel for r in rows if r.source == source and r.arch == arch} == kernels


@compile_check
def test_resources_within_limits(compiled):
    _, problems, _ = compiled
    assert not problems, "\n".join(problems)


@compile_check
def test_committed_resource_table_names_every_kernel(compiled):
    rows, _, _ = compiled
    with RESOURCES_CSV.open() as fh:
        committed = {(r["kernel"], r["arch"]) for r in csv.DictReader(fh)}
    built = {(r.kernel, r.arch) for r in rows}
    assert committed == built, (
        "benchmarks/results/cuda_resources.csv is stale: run python -m ptpeft_kernels.build_cuda --check "
        f"--csv {RESOURCES_CSV.relative_to(build_cuda.ROOT)} (missing {sorted(built - committed)[:5]}, "
        f"extra {sorted(committed - built)[:5]})"
    )


@compile_check
def test_binding_compiled_against_cuda_torch_headers(compiled):
    _, _, include = compiled
    if include is None:
        pytest.skip("no cached CUDA torch headers: run python -m ptpeft_kernels.build_cuda --fetch-headers")
    assert (Path(include) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists()


# ----------------------------------------------------------------------------- always run

PTXAS_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    8 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 50000 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5smallv' for 'sm_80'
ptxas info    : Function properties for _Z5smallv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_resource_report_parsing_and_limits():
    rows = build_cuda.parse_resource_usage(PTXAS_REPORT, "csrc/x.cu")
    assert [(r.arch, r.registers, r.spill_store_bytes, r.spill_load_bytes, r.smem_bytes) for r in rows] == [
        ("90", 255, 40, 36, 50000),
        ("80", 12, 0, 0, 0),
    ]
    assert (
        rows[0].kernel.startswith("kernel(") or rows[0].kernel == "_Z6kernelPf"
    )  # demangled where c++filt exists
    problems = build_cuda.resource_problems(rows)
    assert (
        len(problems) == 2 and "spills 40 B stored + 36 B loaded" in problems[0] and "50000 B" in problems[1]
    )
    assert build_cuda.resource_problems(rows[1:]) == []


def test_arch_list_parsing():
    assert build_cuda.archs("80;90") == ["80", "90"]
    assert build_cuda.archs("9.0, 8.0 sm_86") == ["80", "86", "90"]
    with pytest.raises(ValueError, match="PTPEFT_CUDA_ARCHS entries must look like"):
        build_cuda.archs("hopper")
    assert build_cuda.gencode_flags(["90"]) == ["-gencode=arch=compute_90,code=sm_90"]


def test_extension_sources_are_the_csrc_tree():
    kwargs = build_cuda.extension_kwargs(["90"])
    assert kwargs["name"] == "ptpeft_kernels._C"
    assert "csrc/bindings.cpp" in kwargs["sources"]
    assert all(s.endswith((".cu", ".cpp")) for s in kwargs["sources"])
    assert not any(
        f.startswith("-std") for f in kwargs["extra_compile_args"]["nvcc"]
    )  # torch picks the standard
