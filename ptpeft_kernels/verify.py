"""The first-use guard: no silently wrong numbers from a kernel never run on this GPU architecture.

Our Triton (and CUDA) kernels are tested in CI under the CPU interpreter and compiled for
sm_80 / sm_90 there, but a user's GPU may be the first place one of them ever runs. So, on
the first call of each *case* in a process — (op, backend, device architecture, and what
selects the kernel variant: dtype, head-dim / rank bucket, decode or prefill, causal, mask
and prefix kind, GQA; see ``ops/_probes.py``) — the kernel is run once more at a small shape
of that case against the float64 reference, beside the torch backend in the same dtype as
the yardstick. If the kernel's error exceeds ``FACTOR`` times the torch backend's (or the
dtype's floor), or it raises, the guard warns once (:class:`KernelVerificationWarning`) and
routes that case to the torch backend for the rest of the process: correct, slower.
Forward and backward are checked (the backward when an input requires grad, or at the
first backward call otherwise).

Switch (``PTPEFT_VERIFY``, see :mod:`ptpeft_kernels._env`): ``1`` (default) checks CUDA
devices whose (backend, architecture) is not in :data:`VALIDATED`; ``0`` turns the guard off;
``all`` checks every case on every device (the CPU interpreter and validated architectures
too). The torch backend is never checked: it is the yardstick.

Cost: one small forward (+ backward) of the kernel, of the torch backend and of the float64
reference per case and process, then a dictionary lookup per call. Measured figures are in
the README's GPU section; ``python -m ptpeft_kernels.verify`` probes a standard set of cases
on this machine and prints each case's verdict and cost.

What it catches: a kernel that computes a wrong result for a case on this architecture
(miscompilation, an arithmetic or masking bug the interpreter hid, a config this GPU runs
differently). What it cannot: a bug that shows only at large shapes (the probe is small; the
GPU test suite covers those) or a probe that happens to agree by chance.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from ._env import verify_mode
from .backends import has_impl

__all__ = ["VALIDATED", "KernelVerificationWarning", "Verdict", "route", "verdicts", "reset", "main"]

# (backend, architecture) pairs a committed GPU run has validated; those skip the guard under
# PTPEFT_VERIFY=1. Add a pair only with the run that shows it: the GPU suite's summary under
# benchmarks/results/ (tests and guard phases passed on that architecture, this code, bf16 and
# fp32), e.g. ("triton", "sm_90"): "benchmarks/results/gpu-H100-2026-12-01/summary.md".
# Empty: no kernel of ours has run on a GPU yet.
VALIDATED: dict[tuple[str, str], str] = {}


class KernelVerificationWarning(RuntimeWarning):
    """A kernel disagreed with the reference on this device; its case now runs on the torch backend."""


@dataclass
class Verdict:
    """What the guard found for one case: which directions it checked and whether they agreed."""

    op: str
    backend: str
    arch: str
    case: tuple
    checked: set[str] = field(default_factory=set)
    ok: bool = True
    detail: str = ""
    seconds: float = 0.0  # the probes' wall time for this case, summed


_verdicts: dict[tuple, Verdict] = {}
_lock = threading.Lock()


@functools.cache
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def arch_of(device: torch.device) -> str:
    """``sm_XY`` of a CUDA device (read on first use); else the device type (``cpu``: the interpreter)."""
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def _wanted(mode: str, backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "torch" or mode == "0":
        return False, ""
    arch = arch_of(device)
    if mode == "all":
        return True, arch
    return device.type == "cuda" and (backend, arch) not in VALIDATED, arch


def route(op: str, backend: str, args: tuple, kind: str = "forward") -> str:
    """``backend``, or ``"torch"`` where the guard found ``backend``'s kernel wrong for this case.

    ``args`` are the op's forward arguments as its backends receive them; ``kind`` is
    ``"forward"`` or ``"backward"`` (the call about to run). Cheap after the first call of a case.
    """
    wanted, arch = _wanted(verify_mode(), backend, args[0].device)
    if not wanted:
        return backend
    spec = _probes()[op]
    key = (op, backend, arch, spec.case(*args))
    # A forward-only backend (the CUDA decode kernel, say) is checked forward only, even when an
    # input requires grad under no_grad (generation with trainable prefixes).
    grad = kind == "backward" or (spec.needs_grad(*args) and has_impl(op, backend, "backward"))
    need = {"forward", "backward"} if grad else {"forward"}
    verdict = _verdicts.get(key)
    if verdict is None or not need <= verdict.checked:
        with _lock:
            verdict = _check(key, spec, args, need)
    return backend if verdict.ok else "torch"


@functools.cache
def _probes() -> dict:
    from .ops._probes import PROBES  # imported on first need: the ops import this module's callers

    return PROBES


def _check(key: tuple, spec, args: tuple, need: set[str]) -> Verdict:
    op, backend, arch, case = key
    verdict = _verdicts.setdefault(key, Verdict(op, backend, arch, case))
    todo = need - verdict.checked
    if not todo or not verdict.ok:
        return verdict
    start = time.perf_counter()
    failure = None
    try:
        # The ops call this from autograd.Function.forward (grad off), maybe under inference_mode:
        # the probe's float64 reference needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            checks = spec.probe(backend, args, "backward" in todo)
    except Exception as exc:  # a kernel that cannot run here is as unusable as a wrong one
        checks, failure = [], f"the probe raised {type(exc).__name__}: {exc}"
    verdict.seconds += time.perf_counter() - start
    verdict.checked |= todo | ({"forward"} if "backward" in todo else set())
    bad = [(name, err, bound) for name, err, bound in checks if not err <= bound]  # NaN fails too
    if bad or failure:
        verdict.ok = False
        verdict.detail = failure or "; ".join(
            f"{name}: relative error {err:.3g} > bound {bound:.3g}" for name, err, bound in bad
        )
        warnings.warn(
            f"ptpeft_kernels: the {backend} kernel of {op} disagrees with the float64 reference on this "
            f"device ({arch}) for the case {case}: {verdict.detail}. This case now runs on the torch "
            f"backend (correct, slower) for the rest of the process. Please report it with your GPU and "
            f"versions; PTPEFT_VERIFY=0 turns this check off.",
            KernelVerificationWarning,
            stacklevel=2,
        )
    else:
        worst = max(checks, key=lambda c: c[1] / c[2] if c[2] > 0 else 0.0, default=None)
        verdict.detail = "" if worst is None else f"worst {worst[0]}: {worst[1]:.3g} (bound {worst[2]:.3g})"
    return verdict


def verdicts() -> list[Verdict]:
    """Every case the guard has checked in this process."""
    return list(_verdicts.values())


def reset() -> None:
    """Forget every verdict (tests; or after changing kernels in a running process)."""
    with _lock:
        _verdicts.clear()


# ----------------------------------------------------------------------------- command line

CSV_FIELDS = [
    "timestamp", "run_id", "device", "arch", "what", "op", "backend", "case", "checked", "ok",
    "seconds", "detail",
]  # fmt: skip


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"


def _write_row(path: str | None, row: dict) -> None:
    if path is None:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv: list[str] | None = None) -> int:
    """Probe a standard set of cases on this machine; exit 1 if any kernel disagrees."""
    from .backends import available_backends
    from .ops._probes import standard_calls

    parser = argparse.ArgumentParser(
        prog="python -m ptpeft_kernels.verify",
        description="Check every standard kernel case against the float64 reference on this device "
        "(what the first-use guard does on a first call), with its cost.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every non-torch backend here")
    parser.add_argument("--smoke", action="store_true", help="tiny cases (the CPU interpreter)")
    parser.add_argument("--csv", default=None, help="append one row per case (with $PTPEFT_RUN_ID)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    chosen = args.backends or [b for b in available_backends() if b != "torch"]
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        chosen = [b for b in chosen if b != "triton"]
    os.environ["PTPEFT_VERIFY"] = "all"  # this command checks whatever the default would skip
    meta = {"run_id": os.environ.get("PTPEFT_RUN_ID", ""), "device": _device_name(device)}
    failed = 0
    if not chosen:
        print("no non-torch backend runs here: nothing to verify")
    for backend in chosen:
        for op, call in standard_calls(device, args.smoke):
            stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            try:
                routed = route(op, backend, call, "backward")
            except Exception as exc:  # noqa: BLE001  (an op this backend does not register, e.g.)
                print(f"{backend:7} {op:17} could not be probed: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            v = _verdicts[(op, backend, arch_of(device), _probes()[op].case(*call))]
            failed += routed != backend
            verdict = "ok  " if v.ok else "FAIL"
            print(f"{backend:7} {op:17} {str(v.case):70} {verdict} {v.seconds:7.2f} s  {v.detail}")
            row = {**meta, "timestamp": stamp, "arch": v.arch, "what": "probe", "op": op, "backend": backend}
            row.update(case=" ".join(map(str, v.case)), checked="+".join(sorted(v.checked)), ok=int(v.ok))
            _write_row(args.csv, {**row, "seconds": f"{v.seconds:.4f}", "detail": v.detail})
            sys.stdout.flush()
        lookup_us = _lookup_cost_us(backend, device, args.smoke)
        print(f"{backend:7} per-call cost of a checked case's lookup: {lookup_us:.2f} us")
        row = {**meta, "arch": arch_of(device), "what": "lookup", "backend": backend, "ok": 1}
        _write_row(args.csv, {**row, "timestamp": stamp, "seconds": f"{lookup_us * 1e-6:.9f}"})
    return 1 if failed else 0


def _lookup_cost_us(backend: str, device: torch.device, smoke: bool, calls: int = 2000) -> float:
    """Microseconds ``route`` adds to a call whose case is already checked (the steady-state cost)."""
    from .ops._probes import standard_calls

    op, call = next(iter(standard_calls(device, smoke)))
    route(op, backend, call)
    start = time.perf_counter()
    for _ in range(calls):
        route(op, backend, call)
    return (time.perf_counter() - start) / calls * 1e6


if __name__ == "__main__":
    sys.exit(main())
