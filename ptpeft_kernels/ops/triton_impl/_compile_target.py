"""Compile a Triton kernel for an NVIDIA architecture without a GPU and read what it uses.

Triton's front end, its NVIDIA lowering and ptxas (bundled with the Triton wheel) run for
``sm_<arch>`` behind a stand-in driver that only names the target, so no CUDA device or driver
is needed. Registers and spills come from ptxas's own ``-v`` report (the figures the driver
later reports as ``n_regs``; Triton's ``n_spills`` is the local-memory size, ``stack_bytes``
here); shared memory is what the launch requests (``metadata.shared``) plus any static shared
memory ptxas reports. Uses Triton internals (the driver class, ``warmup``, the ptxas knobs),
so it may need adjusting for other Triton releases.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

# Shared memory one block may use after opting in (cudaDevAttrMaxSharedMemoryPerBlockOptin), per
# the CUDA C++ Programming Guide's compute-capability table: 8.0 (A100) 163 KB, 8.6 / 8.9 99 KB,
# 9.0 (H100 / H200) 227 KB, 12.0 (consumer Blackwell) 99 KB. Triton refuses a launch above it
# (OutOfResources).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
MAX_REGISTERS = 255  # per thread, every architecture here; a kernel at the cap usually spills


def fake_driver(arch: int):
    """A Triton CUDA driver that targets ``sm_<arch>`` and loads no CUDA library."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class TargetOnlyDriver(CudaDriver):
        def __init__(self):  # no CUDA library is loaded
            pass

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    return TargetOnlyDriver()


def use_target(arch: int) -> None:
    from triton.runtime.driver import driver

    driver.set_active(fake_driver(arch))


@dataclass
class Usage:
    regs: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    static_shared: int


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Usage | None:
    """Registers, spills, stack and static shared memory from a ``ptxas -v`` log (one kernel)."""
    regs, spill, smem = _REGS.search(log), _SPILL.search(log), _SMEM.search(log)
    if regs is None or spill is None:
        return None
    stack, stores, loads = (int(x) for x in spill.groups())
    return Usage(int(regs.group(1)), stores, loads, stack, int(smem.group(1)) if smem else 0)


def _ptxas_log(ptx: str, arch: int) -> str:
    """Run ptxas -v on ``ptx`` the way Triton does (for a kernel that came out of Triton's cache)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", gpu, src, "-o", f"{src}.o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_and_measure(kernel, args: tuple, kwargs: dict, arch: int) -> tuple[object, Usage, float | None]:
    """``kernel.warmup`` for the active target; returns (compiled kernel, usage, compile seconds), the
    seconds None when the kernel came from Triton's cache (ptxas did not run)."""
    from triton import knobs

    log = io.StringIO()
    start = time.time()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v report when it compiles
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    seconds = time.time() - start
    usage = parse_ptxas(log.getvalue())
    if usage is None:  # from the cache: ask ptxas again
        seconds = None
        usage = parse_ptxas(_ptxas_log(compiled.asm["ptx"], arch))
    if usage is None:
        raise RuntimeError(f"no ptxas register report for {kernel.fn.__name__}")
    return compiled, usage, seconds
