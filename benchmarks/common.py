"""Shared benchmark harness: timing, peak memory, the results table and the CSV log.

Timing: ``repeats`` runs after ``warmup`` runs, the providers interleaved run by run;
reported as median, p20 and p80 in milliseconds. On CUDA each run is timed by CUDA events
recorded around the call on the current stream, after a write of 256 MB that evicts the L2
cache (so no run reads what the previous one left there; the flush is outside the events);
on the CPU by ``time.perf_counter`` around the call. Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` above what was allocated before the call; on the
CPU, the high-water mark of the allocator events PyTorch's profiler records during the
call (every tensor allocation, including those inside fused kernels), again above the
starting point. Memory is measured in a separate run from timing so the profiler's
overhead never reaches the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("forward", "backward", "full")


@dataclass
class Row:
    benchmark: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float
    tflops: float | None = None
    extra: dict = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"{model or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("triton", "transformers", "peft"):  # read from the metadata: importing peft takes seconds
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{name} {importlib.metadata.version(name)}")
    import ptpeft_kernels

    parts.append(f"ptpeft_kernels {ptpeft_kernels.__version__}")
    return ", ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


L2_FLUSH_BYTES = 256 * 2**20  # above every current GPU's L2 (H100 50 MB, H200 60 MB, B200 126 MB)
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _flush_buffers[device]


def _cuda_times_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """GPU time of each of ``repeats`` calls, from CUDA events; the L2 cache flushed before each."""
    flush = _l2_flush_buffer(device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _cuda_times_ms(fn, device, repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during ``fn`` above the level at its start, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak / 2**20


def measure(
    benchmark: str,
    calls: list[tuple[str, str, Callable[[], object], float | None]],
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> list[Row]:
    """Time every (provider, mode, fn, flops) call, interleaved: repeat r runs each call once in turn.

    Interleaving spreads slow drifts of the machine (frequency, neighbours) over every
    provider alike instead of charging them to whichever happened to run during them.
    """
    for _, _, fn, _ in calls:
        time_ms(fn, device, warmup, 0)
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (_, _, fn, _) in enumerate(calls):
            times[i].extend(time_ms(fn, device, 0, 1))
    rows = []
    for (provider, mode, fn, flops), t in zip(calls, times, strict=True):
        median = statistics.median(t)
        rows.append(
            Row(
                benchmark,
                provider,
                mode,
                shape,
                str(dtype).replace("torch.", ""),
                median,
                quantile(t, 0.2),
                quantile(t, 0.8),
                peak_memory_mib(fn, device),
                None if flops is None else flops / (median * 1e-3) / 1e12,
            )
        )
    return rows


def print_table(rows: list[Row], baseline: str | None = None) -> None:
    """Rows grouped by mode; ``vs <baseline>`` is the time ratio (lower is faster) to that provider."""
    header = (
        f"{'mode':9} {'provider':22} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak MiB':>9} {'TFLOP/s':>8}"
    )
    if baseline:
        header += f" {'vs ' + baseline:>14}"
    print(header)
    print("-" * len(header))
    for mode in MODES:
        group = [r for r in rows if r.mode == mode]
        base = next((r for r in group if r.provider == baseline), None)
        for r in group:
            line = (
                f"{r.mode:9} {r.provider:22} {r.median_ms:10.3f} {r.p20_ms:9.3f} {r.p80_ms:9.3f} "
                f"{r.peak_mib:9.1f} {'' if r.tflops is None else f'{r.tflops:8.3f}':>8}"
            )
            if baseline:
                ratio = "" if base is None else f"{r.median_ms / base.median_ms:.3f}x"
                line += f" {ratio:>14}"
            print(line)


RUN_ID_VAR = "PTPEFT_RUN_ID"  # set by gpu_suite.py: its summary reads only the rows of its own run


def _widen_header(path: Path, fields: list[str]) -> list[str]:
    """The CSV's header extended by any of ``fields`` it lacks (file rewritten atomically); its fields."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [name for name in fields if name not in header]
        if not missing:
            return header
        rows = list(reader)
    header += missing
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return header


def append_csv(rows: list[Row], path: Path, device: torch.device) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "run_id": os.environ.get(RUN_ID_VAR, ""),
        "timestamp": stamp,
        "device": device_name(device),
        "versions": versions(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
    records = []
    for row in rows:
        record = {**meta, **{k: v for k, v in asdict(row).items() if k != "extra"}}
        record.update(row.extra)
        records.append(record)
    fields = list(records[0])
    new = not path.exists() or path.stat().st_size == 0
    if not new:  # an older file may lack a column (run_id, say): appended rows must not shift under it
        fields = _widen_header(path, fields)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(records)
    print(f"appended {len(records)} rows to {path}")


def common_args(parser: argparse.ArgumentParser, csv_name: str) -> None:
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to run on (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="input dtype (default float32)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="forward (training forward), backward (backward only), full (both)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs (default 15)")
    parser.add_argument(
        "--csv",
        type=Path,
        default=RESULTS_DIR / csv_name,
        help=f"CSV to append results to (default benchmarks/results/{csv_name})",
    )
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return torch.device(args.device), getattr(torch, args.dtype)


def check_provider(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor) -> None:
    """Stop the benchmark unless ``out`` computes the function: its error against the float64
    reference at most 3x that of the same-dtype PyTorch reference (``same_dtype``), plus a floor
    of 4 units in the last place of the largest reference value. Timing a wrong provider would
    publish a meaningless figure."""
    out64, same64 = out.detach().double(), same_dtype.detach().double()
    scale = ref64.abs().max().item()
    err = (out64 - ref64).abs().max().item() if torch.isfinite(out64).all() else float("inf")
    bound = 3 * (same64 - ref64).abs().max().item() + 4 * torch.finfo(out.dtype).eps * scale
    if not err <= bound:
        raise SystemExit(
            f"provider {name} does not compute the benchmarked function: max error {err:.3e} against "
            f"the float64 reference exceeds {bound:.3e} (3x the same-dtype reference's + 4 ulp)"
        )


def assert_same_function(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The providers must compute the same function before their times are compared.

    float32 within 1e-4; bfloat16 / float16 within torch's default tolerances for those
    dtypes (different accumulation orders differ by about one rounding step there).
    """
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def modes_for(
    fwd: Callable[[], torch.Tensor], inputs: list[torch.Tensor], modes: list[str]
) -> dict[str, Callable[[], object]]:
    """forward / backward-only / full callables over a function producing one output."""
    out = {}
    if "forward" in modes:
        out["forward"] = fwd
    if "backward" in modes:
        y = fwd()
        grad = torch.randn_like(y)
        out["backward"] = lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True)
    if "full" in modes:
        grad_full = None

        def full():
            nonlocal grad_full
            y = fwd()
            if grad_full is None:
                grad_full = torch.randn_like(y)
            return torch.autograd.grad(y, inputs, grad_full)

        out["full"] = full
    return out
