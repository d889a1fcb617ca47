"""Build and check the CUDA extension ``ptpeft_kernels._C`` (the ``cuda`` backend).

    python -m ptpeft_kernels.build_cuda                  # build in place (needs CUDA torch + nvcc)
    python -m ptpeft_kernels.build_cuda --archs 90       # only sm_90 (the GPU you are on)
    python -m ptpeft_kernels.build_cuda --check          # compile-only check, no GPU needed
    python -m ptpeft_kernels.build_cuda --fetch-headers  # cache CUDA torch's headers for --check

Building in place runs ``setup.py build_ext --inplace`` (the same ``CUDAExtension`` + ninja
build ``pip install -e . --no-build-isolation`` does; ninja keeps the objects in ``build/``,
so a second build recompiles only what changed) and leaves ``ptpeft_kernels/_C*.so`` next to
this file. Environment: ``PTPEFT_CUDA_ARCHS`` (default ``80;90``), ``MAX_JOBS`` (ninja's
parallelism, read by torch's build).

``--check`` needs only ``nvcc`` and a host compiler: every ``.cu`` under ``csrc/`` is compiled
to an object for each architecture with ptxas' resource report (registers, spills, static
shared memory), which is checked against limits and written as CSV; ``bindings.cpp`` is
compiled against the headers of a CUDA build of torch (the CPU wheel lacks the generated
``c10/cuda`` headers), which ``--fetch-headers`` takes from ``pip download torch==X`` and
caches. Nothing runs on a GPU.

This module imports only the standard library at the top: ``setup.py`` loads it by path
before torch or the package may be importable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90"
# The torch whose CUDA headers --check compiles bindings.cpp against (the GPU machines' build).
TORCH_HEADERS_VERSION = "2.14.1"
# Limits the check enforces. Spills: a few bytes of local memory are tolerable, a kernel
# that spills its accumulators is not. Shared memory: the kernels use static __shared__
# arrays only, whose limit is 48 KiB per block on every architecture (more needs an opt-in
# dynamic allocation; the per-arch maxima are recorded for reference).
MAX_SPILL_BYTES = 64
STATIC_SMEM_LIMIT = 48 * 1024
SMEM_OPT_IN_LIMIT = {"80": 163 * 1024, "86": 99 * 1024, "89": 99 * 1024, "90": 227 * 1024}


def sources() -> list[Path]:
    """Every C++/CUDA source of the extension, sorted."""
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))


def archs(value: str | None = None) -> list[str]:
    """Compute capabilities from ``value`` or ``PTPEFT_CUDA_ARCHS``: "80;90", "8.0 9.0", "sm_90"."""
    raw = value if value is not None else os.environ.get("PTPEFT_CUDA_ARCHS", DEFAULT_ARCHS)
    out = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        digits = item.lower().removeprefix("sm_").replace(".", "")
        if not digits.isdigit() or len(digits) not in (2, 3):
            raise ValueError(
                f"PTPEFT_CUDA_ARCHS entries must look like 80, 8.0 or sm_80, got {item!r} in {raw!r}"
            )
        out.append(digits)
    if not out:
        raise ValueError(f"PTPEFT_CUDA_ARCHS names no architecture: {raw!r}")
    return sorted(set(out), key=int)


def gencode_flags(arch_list: list[str]) -> list[str]:
    # SASS only, no PTX: a GPU the build did not target fails to launch ("no kernel image")
    # instead of JIT-compiling code that has never been checked on it.
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_list]


def nvcc_flags(arch_list: list[str]) -> list[str]:
    return ["-O3", "-lineinfo", *gencode_flags(arch_list)]


def extension_kwargs(arch_list: list[str]) -> dict:
    """Keyword arguments of ``torch.utils.cpp_extension.CUDAExtension`` (no ``-std``: torch picks it)."""
    return {
        "name": "ptpeft_kernels._C",
        "sources": [str(p.relative_to(ROOT)) for p in sources()],
        "include_dirs": [str(CSRC)],
        "extra_compile_args": {"cxx": ["-O3"], "nvcc": nvcc_flags(arch_list)},
    }


def built_library() -> Path | None:
    """The in-place or installed extension file, if any."""
    found = sorted((ROOT / "ptpeft_kernels").glob("_C*.so"))
    return found[0] if found else None


def build_inplace(arch_list: list[str], verbose: bool = False) -> Path:
    """Run the setup.py build in place; returns the built library's path."""
    env = {**os.environ, "PTPEFT_CUDA_ARCHS": ";".join(arch_list)}
    env.pop("PTPEFT_SKIP_CUDA_BUILD", None)
    if not env.get("CUDA_HOME") and not env.get("CUDA_PATH"):
        # torch takes CUDA_HOME from nvcc's location, which a wrapper script on PATH (as on the
        # CI machines: /usr/local/bin/nvcc) gets wrong; point it at the toolkit holding the headers.
        include = cuda_include_dir()
        if include is not None:
            env["CUDA_HOME"] = str(include.parent)
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=not verbose, text=True)
    lib = built_library()
    if done.returncode != 0 or lib is None:
        log = "" if verbose else (done.stdout or "")[-3000:] + (done.stderr or "")[-6000:]
        raise RuntimeError(f"building the CUDA extension failed ({' '.join(cmd)}):\n{log}")
    return lib


# ----------------------------------------------------------------------------- compile check


@dataclass
class Resources:
    source: str
    kernel: str
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(home) / "bin" / "nvcc"
        found = str(candidate) if candidate.exists() else None
    return found


def nvcc_version() -> str:
    tool = nvcc()
    if tool is None:
        return "none"
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return found.group(2) if found else "unknown"


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_resource_usage(text: str, source: str) -> list[Resources]:
    """ptxas' ``--resource-usage`` report -> one row per (kernel, arch)."""
    rows: list[Resources] = []
    current: dict | None = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if entry:
            current = {"kernel": entry.group(1), "arch": entry.group(2).removeprefix("sm_")}
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.update(stack=int(frame.group(1)), stores=int(frame.group(2)), loads=int(frame.group(3)))
            continue
        used = re.search(r"Used (\d+) registers", line)
        if used:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append(
                Resources(
                    source=source,
                    kernel=current["kernel"],
                    arch=current["arch"],
                    registers=int(used.group(1)),
                    stack_bytes=current.get("stack", 0),
                    spill_store_bytes=current.get("stores", 0),
                    spill_load_bytes=current.get("loads", 0),
                    smem_bytes=int(smem.group(1)) if smem else 0,
                )
            )
            current = None
    for row, name in zip(rows, _demangle([r.kernel for r in rows]), strict=True):
        row.kernel = name
    return rows


def resource_problems(rows: list[Resources]) -> list[str]:
    problems = []
    for r in rows:
        where = f"{r.kernel} (sm_{r.arch}, {r.source})"
        if r.spill_store_bytes + r.spill_load_bytes > MAX_SPILL_BYTES:
            problems.append(
                f"{where} spills {r.spill_store_bytes} B stored + {r.spill_load_bytes} B loaded "
                f"(at most {MAX_SPILL_BYTES} B allowed)"
            )
        if r.smem_bytes > STATIC_SMEM_LIMIT:
            problems.append(
                f"{where} uses {r.smem_bytes} B of static shared memory (limit {STATIC_SMEM_LIMIT})"
            )
    return problems


def compile_kernel_source(path: Path, arch_list: list[str], out_dir: Path) -> tuple[list[Resources], str]:
    """nvcc -c one .cu for every arch; returns (resource rows, compiler output). Raises on errors."""
    tool = nvcc()
    if tool is None:
        raise RuntimeError("nvcc not found")
    obj = out_dir / (path.relative_to(CSRC).as_posix().replace("/", "__") + ".o")
    cmd = [
        tool,
        "-std=c++17",
        *nvcc_flags(arch_list),
        "--resource-usage",
        "-Werror",
        "all-warnings",
        f"-I{CSRC}",
        "-c",
        str(path),
        "-o",
        str(obj),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path.relative_to(ROOT)}:\n{' '.join(cmd)}\n{text[-6000:]}")
    return parse_resource_usage(text, str(path.relative_to(ROOT))), text


def torch_headers_dir(version: str = TORCH_HEADERS_VERSION) -> Path:
    """Where --fetch-headers caches ``torch/include`` (``PTPEFT_CACHE`` or ~/.cache/ptpeft)."""
    base = Path(os.environ.get("PTPEFT_CACHE", Path.home() / ".cache" / "ptpeft"))
    return base / f"torch-{version}-include"


def fetch_torch_headers(version: str = TORCH_HEADERS_VERSION) -> Path:
    """``torch/include`` of the CUDA build of torch ``version``, via ``pip download``; cached."""
    target = torch_headers_dir(version)
    marker = target / "torch" / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if marker.exists():
        return target / "torch" / "include"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            f"torch=={version}",
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download torch=={version} failed:\n{done.stdout}{done.stderr}")
        staging = Path(
            tempfile.mkdtemp(prefix="torch-include-", dir=target.parent if target.parent.exists() else None)
        )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(staging, [n for n in wheel.namelist() if n.startswith("torch/include/")])
        if not (staging / "torch" / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(
                f"torch=={version} from pip is not a CUDA build (no c10/cuda/impl/cuda_cmake_macros.h)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a half-extracted cache is never seen
    return target / "torch" / "include"


def cuda_include_dir() -> Path | None:
    tool = nvcc()
    if tool is None:
        return None
    real = Path(
        subprocess.run(["readlink", "-f", tool], capture_output=True, text=True).stdout.strip() or tool
    )
    for candidate in (
        real.parent.parent / "include",
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include",
    ):
        if (candidate / "cuda_runtime_api.h").exists():
            return candidate
    return None


def compile_binding(path: Path, torch_include: Path, out_dir: Path) -> str:
    """Compile a binding .cpp as torch's build would (host compiler, C++20); raises on errors."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    cuda_inc = cuda_include_dir()
    if cxx is None or cuda_inc is None:
        raise RuntimeError("compiling the binding needs g++ (or $CXX) and the CUDA toolkit's headers")
    obj = out_dir / (path.stem + ".o")
    cmd = [
        cxx,
        "-std=c++20",
        "-O1",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-Wno-unused-parameter",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-I{CSRC}",
        f"-I{torch_include}",
        f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{cuda_inc}",
        f"-I{sysconfig.get_paths()['include']}",
        "-c",
        str(path),
        "-o",
        str(obj),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path.relative_to(ROOT)} failed against {torch_include}:\n{done.stderr[-6000:]}")
    return done.stderr


def write_resources_csv(rows: list[Resources], path: Path) -> None:
    """The resource table, replaced whole (one row per kernel and arch) with the nvcc version and date."""
    stamp = dt.date.today().isoformat()
    version = nvcc_version()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        names = [f.name for f in fields(Resources)] + ["nvcc", "date"]
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (r.source, r.kernel, int(r.arch))):
            writer.writerow({**asdict(row), "nvcc": version, "date": stamp})
    os.replace(tmp, path)


def check(
    arch_list: list[str], torch_include: Path | None, jobs: int = 2
) -> tuple[list[Resources], list[str]]:
    """Compile every source without a GPU; returns (resource rows, problems). Raises on compile errors."""
    cu = [p for p in sources() if p.suffix == ".cu"]
    cpp = [p for p in sources() if p.suffix == ".cpp"]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        out = Path(tmp)
        kernel_jobs = [pool.submit(compile_kernel_source, p, arch_list, out) for p in cu]
        binding_jobs = (
            [pool.submit(compile_binding, p, torch_include, out) for p in cpp] if torch_include else []
        )
        rows = [row for job in kernel_jobs for row in job.result()[0]]
        for job in binding_jobs:
            job.result()
    problems = resource_problems(rows)
    return rows, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archs", default=None, help=f"e.g. '80;90' (default: $PTPEFT_CUDA_ARCHS or {DEFAULT_ARCHS})"
    )
    parser.add_argument("--check", action="store_true", help="compile-only check of every source (no GPU)")
    parser.add_argument(
        "--fetch-headers", action="store_true", help=f"cache torch {TORCH_HEADERS_VERSION}'s headers"
    )
    parser.add_argument("--csv", type=Path, default=None, help="with --check: write the resource table here")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    arch_list = archs(args.archs)
    include = None
    if args.fetch_headers:
        include = fetch_torch_headers()
        print(f"torch {TORCH_HEADERS_VERSION} headers: {include}")
    if args.check:
        if nvcc() is None:
            print("nvcc not found: nothing to check", file=sys.stderr)
            return 2
        if include is None:
            cached = torch_headers_dir() / "torch" / "include"
            include = cached if cached.exists() else None
        if include is None:
            print("bindings.cpp skipped: no CUDA torch headers (run with --fetch-headers)", file=sys.stderr)
        rows, problems = check(arch_list, include, jobs=args.jobs)
        for r in rows:
            print(
                f"sm_{r.arch} {r.registers:4d} regs {r.spill_store_bytes + r.spill_load_bytes:5d} B spilled "
                f"{r.smem_bytes:6d} B smem  {r.kernel}"
            )
        if args.csv is not None:
            write_resources_csv(rows, args.csv)
        for problem in problems:
            print("FAIL " + problem, file=sys.stderr)
        print(f"{len(rows)} kernel builds checked for sm_{', sm_'.join(arch_list)}; {len(problems)} problems")
        return 1 if problems else 0
    if not args.fetch_headers:
        lib = build_inplace(arch_list, verbose=args.verbose)
        print(f"built {lib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
