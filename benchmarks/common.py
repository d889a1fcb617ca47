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

Providers (:class:`Provider`) go through :func:`run_providers`: each is first checked against
the float64 reference (one that disagrees gets a ``wrong`` row, untimed), then each mode is
called once (a mode the provider cannot run, such as FlexAttention's backward on the CPU, gets
an ``unsupported`` row; a provider absent here gets a ``skipped`` row), then the rest are timed.
Every row names its status, so a table or a report never silently lacks a provider.

Sweeps: :func:`sweep_points` (one axis at a time around a base point) and
:func:`product_points` (every combination of the values given); each row records the swept
parameters as columns and the axes it belongs to in ``sweep``, which ``plot.py`` and
``report.py`` read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import functools
import importlib.metadata
import itertools
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
# inference: forward without autograd; forward: the training forward (saves for backward);
# backward: backward alone over a kept graph; full: forward + backward.
MODES = ("inference", "forward", "backward", "full")
TRAINING_MODES = ("forward", "backward", "full")


@dataclass
class Row:
    benchmark: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_mib: float | None
    tflops: float | None = None
    status: str = "ok"  # ok | wrong: ... | unsupported: ... | skipped: ... (then the figures are None)
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


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null: the CPU profiler's C++ side prints two log lines per use
    (``profiler_start`` / ``profiler_stop``), hundreds per sweep, through no setting we can reach."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    """Rows grouped by mode; ``vs <baseline>`` is the time ratio (lower is faster) to that provider.

    A provider that was not timed shows its status (wrong / unsupported / skipped) instead of figures.
    """
    header = (
        f"{'mode':9} {'provider':22} {'median ms':>10} {'p20':>9} {'p80':>9} {'peak MiB':>9} {'TFLOP/s':>8}"
    )
    if baseline:
        header += f" {'vs ' + baseline:>14}"
    print(header)
    print("-" * len(header))
    for mode in MODES:
        group = [r for r in rows if r.mode == mode]
        base = next((r for r in group if r.provider == baseline and r.status == "ok"), None)
        for r in group:
            if r.status != "ok":
                print(f"{r.mode:9} {r.provider:22} {r.status}")
                continue
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


_PROCESS_RUN_ID = f"{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def run_id() -> str:
    """``PTPEFT_RUN_ID`` when set (gpu_suite.py sets it), else one id for this process: the rows of
    one invocation (a whole sweep) share it, so plot.py and report.py can tell runs apart."""
    return os.environ.get(RUN_ID_VAR) or _PROCESS_RUN_ID


@functools.cache
def git_revision() -> str:
    """The checkout's commit (12 hex digits), ``+dirty`` when tracked files outside
    ``benchmarks/results`` differ from it (the results are what runs write); "" without git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return ""
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)benchmarks/results",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def append_csv(rows: list[Row], path: Path, device: torch.device) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "run_id": run_id(),
        "timestamp": stamp,
        "device": device_name(device),
        "versions": versions(),
        "git": git_revision(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
    }
    records = []
    for row in rows:
        record = {**meta, **{k: v for k, v in asdict(row).items() if k != "extra"}}
        clash = sorted(set(row.extra) & set(record))
        if clash:  # a parameter named like a column (``shape``, say) would silently replace it
            raise ValueError(
                f"row extra columns {clash} would overwrite the CSV's own columns of those names"
            )
        record.update(row.extra)
        records.append(record)
    fields = list(dict.fromkeys(name for record in records for name in record))  # union, first-seen order
    new = not path.exists() or path.stat().st_size == 0
    if not new:  # an older file may lack a column (run_id, say): appended rows must not shift under it
        fields = _widen_header(path, fields)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(records)
    print(f"appended {len(records)} rows to {path}")


def common_args(
    parser: argparse.ArgumentParser, csv_name: str, modes: Iterable[str] = TRAINING_MODES
) -> None:
    """The options every benchmark script shares; ``modes``: its default ``--modes``."""
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
        default=list(modes),
        choices=MODES,
        help="inference (forward without autograd), forward (training forward), backward (backward "
        f"only), full (both); default: {' '.join(modes)}",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--sweep", action="store_true", help="the full sweep for this device (one axis at a time, see above)"
    )
    size.add_argument("--quick", action="store_true", help="a representative subset: minutes on a 2-core CPU")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs before timing (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs (default 15; 10 with --sweep, 5 with --quick)"
    )
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
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10 if args.sweep else 15
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return torch.device(args.device), getattr(torch, args.dtype)


def provider_error(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor) -> str | None:
    """Why ``out`` is not the benchmarked function, or None when it is: its error against the float64
    reference must be at most 3x that of the same-dtype PyTorch reference (``same_dtype``), plus a
    floor of 4 units in the last place of the largest reference value."""
    if out.shape != ref64.shape:
        return f"provider {name} returned shape {tuple(out.shape)}, the reference {tuple(ref64.shape)}"
    out64, same64 = out.detach().double(), same_dtype.detach().double()
    scale = ref64.abs().max().item()
    err = (out64 - ref64).abs().max().item() if torch.isfinite(out64).all() else float("inf")
    bound = 3 * (same64 - ref64).abs().max().item() + 4 * torch.finfo(out.dtype).eps * scale
    if err <= bound:
        return None
    return (
        f"provider {name} does not compute the benchmarked function: max error {err:.3e} against "
        f"the float64 reference exceeds {bound:.3e} (3x the same-dtype reference's + 4 ulp)"
    )


def check_provider(name: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor) -> None:
    """Stop the benchmark unless ``out`` computes the function (see :func:`provider_error`).
    Timing a wrong provider would publish a meaningless figure."""
    error = provider_error(name, out, ref64, same_dtype)
    if error:
        raise SystemExit(error)


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
    fwd: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
    modes: list[str],
    infer: Callable[[], torch.Tensor] | None = None,
) -> dict[str, Callable[[], object]]:
    """inference / forward / backward-only / full callables over a function producing one output.

    ``infer`` is the forward without autograd (default: ``fwd`` under ``torch.no_grad``). The
    backward-only callable is built lazily, on its first call, so building it never runs the
    forward of a provider that cannot run it.
    """
    out: dict[str, Callable[[], object]] = {}
    if "inference" in modes:
        if infer is None:

            def infer():
                with torch.no_grad():
                    return fwd()

        out["inference"] = infer
    if "forward" in modes:
        out["forward"] = fwd
    if "backward" in modes:
        kept: list = []

        def backward():
            if not kept:
                y = fwd()
                kept.extend([y, torch.randn_like(y)])
            return torch.autograd.grad(kept[0], inputs, kept[1], retain_graph=True)

        out["backward"] = backward
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


@dataclass
class Provider:
    """One way to compute the benchmarked function.

    ``fn(*args)`` is the training forward; ``grad_inputs`` are what backward differentiates
    (the inputs that require grad and the trained parameters). Inference calls ``fn`` on
    detached ``args`` under ``torch.no_grad`` (FlexAttention on the CPU refuses inputs that
    require grad even then). ``flops``: forward FLOPs of the useful work (backward counts 2.5x).
    ``skipped``: why this machine cannot run it (the row says so; nothing is timed).
    ``compiled``: its first call compiles; the first call's time, less the median, is recorded
    as ``compile_s`` and is never part of the timings.
    """

    fn: Callable[..., torch.Tensor]
    args: tuple = ()
    grad_inputs: list[torch.Tensor] = field(default_factory=list)
    flops: float | None = None
    skipped: str | None = None
    compiled: bool = False

    def calls(self, modes: list[str]) -> dict[str, Callable[[], object]]:
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in self.args)

        def infer():
            with torch.no_grad():
                return self.fn(*detached)

        return modes_for(lambda: self.fn(*self.args), self.grad_inputs, modes, infer)

    def mode_flops(self, mode: str) -> float | None:
        if self.flops is None:
            return None
        return self.flops * {"inference": 1.0, "forward": 1.0, "backward": 2.5, "full": 3.5}[mode]


def run_providers(
    benchmark: str,
    providers: dict[str, Provider],
    check: Callable[[str, torch.Tensor], str | None],
    modes: list[str],
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    repeats: int,
    extra: dict | None = None,
) -> list[Row]:
    """Check, probe and time every provider in every mode; one row each (timed or with its status).

    ``check(name, output)`` returns why a provider's inference output is not the function (or None);
    a provider that fails it is reported, not timed. A mode whose first call raises
    ``NotImplementedError`` (FlexAttention's backward on the CPU) is reported as unsupported.
    Other exceptions propagate: a crash of a provider that should run is a bug to see, not a row.
    """
    dtype_name = str(dtype).replace("torch.", "")

    def status_row(name: str, mode: str, status: str) -> Row:
        return Row(benchmark, name, mode, shape, dtype_name, None, None, None, None, status=status)

    rows, calls, first_call = [], [], {}
    for name, provider in providers.items():
        if provider.skipped:
            rows += [status_row(name, mode, f"skipped: {provider.skipped}") for mode in modes]
            continue
        fns = provider.calls(list(dict.fromkeys(["inference", *modes])))
        start = time.perf_counter()
        try:
            error = check(name, fns["inference"]())  # also the first call: a compiled provider compiles here
        except NotImplementedError as e:
            error = f"unsupported: {e}"
        first_call[(name, "inference")] = time.perf_counter() - start
        if error:
            status = error if error.startswith("unsupported:") else f"wrong: {error}"
            print(f"{name}: {status}", file=sys.stderr)
            rows += [status_row(name, mode, status) for mode in modes]
            continue
        for mode in modes:
            start = time.perf_counter()
            try:
                fns[mode]()
                _sync(device)
            except NotImplementedError as e:
                rows.append(status_row(name, mode, f"unsupported: {' '.join(str(e).split())}"))
                continue
            first_call.setdefault((name, mode), time.perf_counter() - start)
            calls.append((name, mode, fns[mode], provider.mode_flops(mode)))
    timed = measure(benchmark, calls, shape, dtype, device, max(warmup - 1, 0), repeats) if calls else []
    for row in timed:
        if providers[row.provider].compiled:
            row.extra["compile_s"] = max(first_call[(row.provider, row.mode)] - row.median_ms / 1e3, 0.0)
    rows += timed
    order = {name: i for i, name in enumerate(providers)}
    rows.sort(key=lambda r: (order[r.provider], modes.index(r.mode)))
    for row in rows:
        row.extra = {**(extra or {}), **row.extra}
    return rows


# ----------------------------------------------------------------------------- sweeps


def sweep_points(base: dict, axes: dict[str, list]) -> list[tuple[dict, list[str]]]:
    """One axis at a time around ``base``: for each axis, ``base`` with that axis at each value.

    Returns (parameters, axes the point belongs to); a point shared by several axes (the base
    itself) appears once, listing all of them, so it is measured once.
    """
    points: dict[tuple, tuple[dict, list[str]]] = {}
    for axis, values in axes.items():
        if axis not in base:
            raise ValueError(f"sweep axis {axis!r} is not a parameter of the base point {sorted(base)}")
        for value in values:
            params = {**base, axis: value}
            key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
            points.setdefault(key, (params, []))[1].append(axis)
    return list(points.values())


def product_points(values: dict[str, list]) -> list[tuple[dict, list[str]]]:
    """Every combination of ``values``; the axes with more than one value are the swept ones."""
    swept = [axis for axis, options in values.items() if len(options) > 1]
    return [(dict(zip(values, combo, strict=True)), swept) for combo in itertools.product(*values.values())]


def point_extra(params: dict, axes: list[str]) -> dict:
    """The CSV columns of one point: its parameters and ``sweep`` (the axes it lies on, comma-joined)."""
    return {**params, "sweep": ",".join(axes)}
