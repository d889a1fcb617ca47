"""Everything a session with a GPU should run, in one command, within a wall-time budget.

GPU time comes in windows of 15 minutes of machine time in all, so one run of this suite must
finish in at most 6 minutes on one H100/H200, compilation included, and say what it reached.

  python benchmarks/gpu_suite.py --out DIR             # the whole suite, --budget-s 360
  python benchmarks/gpu_suite.py --out DIR --smoke     # tiny shapes on the CPU: checks the plumbing

Phases run in value order (correctness first), each a list of commands in their own process
groups, under one budget (``--budget-s``) that they share: a phase may use its share of the
budget plus whatever earlier phases left unused, never more than what is left, and a command
past its phase's allowance is killed with its whole process group (pytest-xdist workers
included). A phase the budget cannot start is "not reached". Any non-zero exit, a signal
(negative code) included, a cut or an unreached phase fails the suite (exit 1); missed
performance targets are reported, not failures.

Every phase shares one Triton cache (``DIR/triton-cache``) and runs with ``PTPEFT_AUTOTUNE=0``
(one pinned config per shape class: each kernel variant compiles once, in the tests phase, and
the benchmarks reuse it) unless ``--autotune`` is given; with it, tuned results are cached on disk
(``TRITON_CACHE_AUTOTUNING=1``) so a shape is tuned once across processes. The tests and
benchmarks run with ``PTPEFT_VERIFY=0`` (the guard must not reroute a kernel under test to the
torch backend; they compare against float64 themselves); the ``guard`` phase measures the guard.

Each invocation has a run id (``PTPEFT_RUN_ID``), written into every CSV row it produces; the
summary reads only this run's rows, so reruns into one ``--out`` report their own figures. Logs
go to ``DIR/logs/<run id>/<phase>.log``; ``DIR/summary.md`` (also copied next to the logs) lists
every target with its measured figure and met / missed / not reached, each phase's status, and
what was skipped (a missing ``nvidia-smi``, ``pytest-xdist`` or ``peft`` never ends the run, nor does
a missing optional test dependency: ``hypothesis``, ``trl``, ``accelerate``, ``bitsandbytes``; the tests
run with ``PTPEFT_SKIP_MISSING_TEST_DEPS=1``, so tests that need one skip, naming it).

Adding a phase (the CUDA extension's, say) is one entry in ``PHASES`` and, for its verdicts,
entries in ``TARGETS``::

    Phase("cuda", 0.15, "build the extension in place, its tests, decode/LoRA benchmarks",
          lambda run: [Step([PY, "-m", "ptpeft_kernels.build_cuda"], needs=("exe:nvcc",)),
                       Step(run.pytest("tests/cuda")),
                       Step([PY, "benchmarks/decode.py", *run.bench_args("decode.csv")])]),
    Target("decode attention >= 70 % of copy bandwidth", "cuda", my_evaluate),

then give the shares a look: they sum to at most 1 (the rest is the summary's reserve).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TARGET_WALL_S = 360.0  # the GPU-readiness issue's limit for the whole suite on one H100/H200
SUMMARY_RESERVE_S = 2.0  # kept back from the phases for the summary
MIN_PHASE_S = 1.0  # a phase with less than this left is not started ("not reached")
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL to a timed-out process group
# Test dependencies CI installs (the test extra) that a GPU image may lack: with
# PTPEFT_SKIP_MISSING_TEST_DEPS=1 (tests/optional.py) their tests skip, naming the package, instead of
# failing to import at collection, which would stop the whole tests phase (import name = pip name).
OPTIONAL_TEST_DEPS = ("hypothesis", "trl", "accelerate", "bitsandbytes", "peft")


@dataclass(frozen=True)
class Step:
    """One command of a phase. ``needs``: Python modules, or ``exe:NAME`` executables, without which
    the step is skipped (and the summary says so) instead of failing."""

    argv: list[str]
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of --budget-s; time an earlier phase left unused is added to it
    reports: str  # what the phase measures (the summary's phase table)
    steps: Callable[[Run], list[Step]]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class PhaseResult:
    status: str  # ok | failed | cut | not reached | skipped
    seconds: float = 0.0
    allowance: float = 0.0
    codes: list[int | None] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class Target:
    """``evaluate(run)`` -> [(measured figure, "met" | "missed" | "not reached")]; [] = nothing measured.

    "not reached" with a figure: measured in part (a phase cut before the end) without a miss.
    """

    name: str
    phase: str
    evaluate: Callable[[Run], list[tuple[str, str]]]


# ----------------------------------------------------------------------------- the run


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.id = f"{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.logs = args.out / "logs" / self.id
        self.shapes = SHAPES["smoke" if args.smoke else "target"]
        self.results: dict[str, PhaseResult] = {}
        self.skipped: list[str] = []
        self.started = time.monotonic()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def csv(self, name: str) -> str:
        return str(self.out / name)

    def rows(self, name: str) -> list[dict]:
        """This run's rows of ``DIR/name`` (rows of earlier runs into the same folder are ignored)."""
        path = self.out / name
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("run_id") == self.id]

    def has(self, need: str) -> bool:
        if need.startswith("exe:"):
            return shutil.which(need[4:]) is not None
        return importlib.util.find_spec(need) is not None

    def pytest(self, *paths: str) -> list[str]:
        cmd = [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--color=no"]
        if self.args.workers > 0:
            if self.has("xdist"):
                cmd += ["-n", str(self.args.workers)]
            else:
                self.skip("pytest-xdist is not installed: the tests ran in one process")
        for package in OPTIONAL_TEST_DEPS:
            if not self.has(package):
                self.skip(f"{package} is not installed: the tests that need it were skipped (see the log)")
        return [*cmd, *paths]

    def bench_args(self, csv_name: str, repeats: int | None = None, warmup: int | None = None) -> list[str]:
        repeats = self.args.repeats if repeats is None else repeats
        warmup = min(5, repeats) if warmup is None else warmup
        timing = ["--repeats", str(repeats), "--warmup", str(warmup)]
        return ["--dtype", "bfloat16", *timing, "--csv", self.csv(csv_name)]

    def skip(self, note: str) -> None:
        if note not in self.skipped:
            self.skipped.append(note)

    def env(self, phase: Phase) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "PTPEFT_RUN_ID": self.id,
            "TRITON_CACHE_DIR": str(self.out / "triton-cache"),
            "TRITON_CACHE_AUTOTUNING": "1",
            "PTPEFT_AUTOTUNE": "1" if self.args.autotune else "0",
            "PTPEFT_VERIFY": "0",
            "PTPEFT_SKIP_MISSING_TEST_DEPS": "1",  # tests/optional.py
            "PYTHONUNBUFFERED": "1",
        }
        if self.args.smoke:
            env["TRITON_INTERPRET"] = "1"  # the CPU check runs the Triton kernels interpreted
        else:
            env.pop("TRITON_INTERPRET", None)  # compile them: the interpreter is for CPU machines
        return {**env, **phase.env}


# ----------------------------------------------------------------------------- phases

SHAPES = {
    "target": {  # the Triton issue's target shapes (bf16)
        "attn": ["--batch", "8", "--heads", "16", "--prefix", "32", "--head-dim", "128", "--seq", "2048"],
        "memory": ["--batch", "8", "--heads", "16", "--prefix", "32", "--head-dim", "128"],
        "memory_seqs": ["1024", "2048", "4096"],
        "lora": ["--tokens", "8192", "--features", "4096", "4096", "--rank", "16"],
        "adapter": ["--tokens", "8192", "--width", "4096", "--bottleneck", "64"],
        "train_step": [],
        "tests": ["tests/ops", "tests/layers", "tests/test_backends.py", "tests/test_verify.py"],
    },
    "smoke": {
        "attn": ["--batch", "1", "--heads", "2", "--prefix", "3", "--head-dim", "8", "--seq", "16"],
        "memory": ["--batch", "1", "--heads", "2", "--prefix", "3", "--head-dim", "8"],
        "memory_seqs": ["16", "32"],
        "lora": ["--tokens", "2", "8", "--features", "16", "16", "--rank", "4"],
        "adapter": ["--tokens", "2", "8", "--width", "16", "--bottleneck", "4"],
        "train_step": ["--preset", "tiny", "--batch", "2", "--modes", "full"],
        "tests": ["tests/test_backends.py::test_auto_uses_torch_for_cpu_tensors"],
    },
}

ENV_PROBE = """
import importlib.metadata as md, importlib.util, sys, torch
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), 'sm_%d%d' % torch.cuda.get_device_capability())
elif sys.argv[1] == 'require-cuda':
    sys.exit('no CUDA device: this suite measures a GPU (use --smoke to check the plumbing on a CPU)')
else:
    print('device', 'CPU (smoke run)')
for name in ('triton', 'transformers', 'peft', 'pytest', 'pytest-xdist', 'numpy', 'pillow', 'hypothesis'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'missing')
print('cuda extension built:', importlib.util.find_spec('ptpeft_kernels._C') is not None)
"""


def _bench(script: str, shape_key: str, csv_name: str, *extra: str, needs: tuple[str, ...] = ()):
    def steps(run: Run) -> list[Step]:
        return [
            Step(
                [PY, f"benchmarks/{script}", *run.shapes[shape_key], *extra, *run.bench_args(csv_name)], needs
            )
        ]

    return steps


# FlexAttention compiles per shape (tens of seconds, forward and backward): more than an attention
# phase's share of the budget. `attn.py --sweep` on a GPU measures it.
NO_FLEX = ("--exclude", "flex-attention")


def _memory(run: Run) -> list[Step]:
    argv = [
        PY,
        "benchmarks/attn.py",
        *run.shapes["memory"],
        "--seq",
        *run.shapes["memory_seqs"],
        "--modes",
        "full",
        *NO_FLEX,
    ]
    # 5 timed runs, not 2: the N=4096 rows also give the fwd+bwd speed targets
    return [Step([*argv, *run.bench_args("attn_memory.csv", repeats=5, warmup=1)])]


def _cuda(run: Run) -> list[Step]:
    if run.args.smoke:  # no CUDA torch on a CPU: the extension cannot build, its host-side tests can run
        run.skip("cuda: extension build, GPU tests and benchmarks need a GPU (smoke ran the host-side tests)")
        return [Step(run.pytest("tests/cuda/test_host_math.py"))]
    return [
        Step([PY, "-m", "ptpeft_kernels.build_cuda", "--archs", "native"], needs=("exe:nvcc",)),
        Step(run.pytest("tests/cuda")),
        Step(
            [PY, "benchmarks/cuda_ops.py", "--csv", run.csv("cuda_ops.csv")]
            + ["--summary", str(run.logs / "cuda_summary.md")]
        ),
    ]


PHASES: list[Phase] = [
    Phase(
        "env",
        0.03,
        "device, driver, versions, available backends",
        lambda run: [
            Step(["nvidia-smi"], needs=("exe:nvidia-smi",)),
            Step([PY, "-c", ENV_PROBE, "smoke" if run.args.smoke else "require-cuda"]),
        ],
    ),
    Phase(
        "tests",
        0.36,
        "op, layer, backend and guard tests on the GPU (Triton compiled), pass/fail counts",
        lambda run: [Step(run.pytest(*run.shapes["tests"]))],
    ),
    Phase(
        "guard",
        0.07,
        "first-use guard: each standard kernel case against float64; probe cost per case",
        lambda run: [
            Step(
                [PY, "-m", "ptpeft_kernels.verify", "--csv", run.csv("verify.csv")]
                + ["--smoke"] * run.args.smoke
            )
        ],
    ),
    Phase(
        "attn",
        0.09,
        "prefix attention at the target shape, bf16",
        _bench("attn.py", "attn", "attn.csv", *NO_FLEX),
    ),
    Phase("lora", 0.07, "fused LoRA at the target shape, bf16", _bench("lora.py", "lora", "lora.csv")),
    Phase(
        "adapter",
        0.06,
        "fused adapter at the target shape, bf16",
        _bench("adapter.py", "adapter", "adapter.csv"),
    ),
    Phase("memory", 0.07, "attention fwd+bwd peak memory at three N, bf16", _memory),
    Phase("cuda", 0.15, "CUDA extension: in-place build, tests, decode / LoRA / adapter benchmarks", _cuda),
    Phase(
        "train_step",
        0.08,
        "the built-in model's stage-2 training step against PEFT's, bf16",
        # the built-in model's batch is drawn and processed as images: PIL (pillow) too
        _bench("train_step.py", "train_step", "train_step.csv", needs=("peft", "transformers", "PIL")),
    ),
]


# ----------------------------------------------------------------------------- running


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which run nothing, do not count:
    an orphan's zombie lingers until PID 1 reaps it, up to a second or more in containers)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    """End ``proc``'s whole process group: SIGTERM, then SIGKILL after a grace period.

    Also run after a normal exit, so no leftover (an xdist worker, a compile helper) keeps
    using the GPU during the next phase.
    """
    pgid = proc.pid  # start_new_session: the child leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader as soon as it exits, or the group never looks empty
        if not _group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        # SIGKILL is delivered asynchronously: wait (bounded) until the group has stopped
        # running, so the next phase never starts beside a dying one that still holds the GPU.
        deadline = time.monotonic() + KILL_GRACE_S
        while _group_alive(pgid) and time.monotonic() < deadline:
            proc.poll()
            time.sleep(0.05)
    proc.wait()


def run_step(argv: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ``argv`` from the repository root in its own process group, output appended to ``log``.

    Returns (exit code, or None when it was still running at ``timeout`` and was killed; seconds).
    """
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            code = None
        except BaseException:  # Ctrl-C: take the group down with us
            _kill_group(proc)
            raise
        _kill_group(proc)
        seconds = time.monotonic() - start
        if code is None:
            out.write(f"\n[gpu_suite] cut by the budget after {seconds:.1f} s; process group killed\n")
    return code, seconds


def _label(argv: list[str]) -> str:
    """A short name for a command: the interpreter dropped, at most 60 characters, one line."""
    words = argv[1:] if argv and argv[0] == PY else argv
    text = " ".join(shlex.join(words).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(code: int | None) -> str:
    if code is None:
        return "killed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"rc={code}"


def run_phase(run: Run, phase: Phase, allowance: float) -> PhaseResult:
    log = run.logs / f"{phase.name}.log"
    result = PhaseResult("ok", allowance=allowance)
    steps = phase.steps(run)
    ran = 0
    env = run.env(phase)
    for step in steps:
        missing = [need.removeprefix("exe:") for need in step.needs if not run.has(need)]
        if missing:
            run.skip(f"{phase.name}: `{_label(step.argv)}` skipped, {', '.join(missing)} not found")
            continue
        left = allowance - result.seconds
        code, seconds = run_step(step.argv, log, left, env)
        ran += 1
        result.seconds += seconds
        result.codes.append(code)
        if code != 0:  # negative codes (signals) and cuts fail the phase as much as a positive one
            result.status = "cut" if code is None else "failed"
            when = f"at its {allowance:.0f} s allowance" if code is None else f"after {result.seconds:.0f} s"
            result.note = f"{_describe(code)} {when}: {_label(step.argv)}"
            break
    if ran == 0:
        result.status = "skipped"
    return result


def run_suite(run: Run, phases: list[Phase]) -> int:
    budget = run.args.budget_s
    deadline = run.started + budget
    carry = 0.0
    run.logs.mkdir(parents=True, exist_ok=True)
    for phase in phases:
        left = deadline - time.monotonic() - SUMMARY_RESERVE_S
        allowance = min(phase.share * budget + carry, left)
        if allowance < MIN_PHASE_S:
            run.results[phase.name] = PhaseResult("not reached", note="the budget was spent")
            print(f"[gpu_suite] {phase.name}: not reached (budget spent)", flush=True)
            continue
        print(f"[gpu_suite] {phase.name} (up to {allowance:.0f} s)", flush=True)
        result = run_phase(run, phase, allowance)
        run.results[phase.name] = result
        carry = max(0.0, allowance - result.seconds)
        print(
            f"[gpu_suite] {phase.name}: {result.status} in {result.seconds:.1f} s {result.note}", flush=True
        )
    return 0 if all(r.status in ("ok", "skipped") for r in run.results.values()) else 1


# ----------------------------------------------------------------------------- targets


def _timed(row: dict) -> bool:
    """A row with figures: status ok (rows written before the status column have none)."""
    return row.get("status") in (None, "", "ok")


def _full_median(rows: list[dict], provider: str) -> float | None:
    row = next((r for r in rows if r["provider"] == provider and r["mode"] == "full" and _timed(r)), None)
    return None if row is None else float(row["median_ms"])


def _untimed(rows: list[dict], provider: str) -> str | None:
    """The status of ``provider``'s fwd+bwd row when the benchmark reported it instead of timing it."""
    row = next((r for r in rows if r["provider"] == provider and r["mode"] == "full" and not _timed(r)), None)
    return None if row is None else row["status"]


OURS = ("ptpeft-cuda", "ptpeft-triton", "ptpeft-torch")


def ratio_target(
    csv_name: str,
    baseline: str,
    bound: float,
    ours: tuple[str, ...] = OURS,
    shape_has: Callable[[Run], str] | None = None,
):
    """Each of ``ours`` providers' fwd+bwd median over ``baseline``'s, met when at most ``bound``; only
    rows whose shape has the word ``shape_has(run)`` (``N4096``, say) when given. One of ours that the
    benchmark did not time (it disagreed with float64) is a miss."""

    def evaluate(run: Run) -> list[tuple[str, str]]:
        rows = run.rows(csv_name)
        if shape_has:
            word = shape_has(run)
            rows = [r for r in rows if word in r["shape"].split()]
        theirs = _full_median(rows, baseline)
        found = []
        for provider in ours:
            status = _untimed(rows, provider)
            if status and not status.startswith("skipped"):
                found.append((f"{provider}: not timed ({status})", "missed"))
                continue
            mine = _full_median(rows, provider)
            if mine is None or theirs is None:
                continue
            ratio = mine / theirs
            figure = f"{provider}: {mine:.3f} vs {theirs:.3f} ms = {ratio:.3f}x (needs <= {bound:.3f}x)"
            found.append((figure, "met" if ratio <= bound else "missed"))
        return found

    return evaluate


def _largest_memory_n(run: Run) -> str:
    """The shape word of the memory phase's largest N: the benchmarks issue's GPU speed targets are at
    N=4096 (D=128, bf16), the largest N of that phase; in a smoke run, its largest tiny N."""
    return f"N{max(int(n) for n in run.shapes['memory_seqs'])}"


def _memory_linear(run: Run) -> list[tuple[str, str]]:
    """Peak memory growth from the smallest to the largest N within 1.25x of linear growth."""
    rows = run.rows("attn_memory.csv")
    found = []
    for provider in [p for p in OURS if any(r["provider"] == p for r in rows)]:
        by_n = {
            int(re.search(r"\bN(\d+)\b", r["shape"]).group(1)): float(r["peak_mib"])
            for r in rows
            if r["provider"] == provider and r["mode"] == "full" and _timed(r)
        }
        if len(by_n) < 2:
            continue
        lo, hi = min(by_n), max(by_n)
        growth, linear = by_n[hi] / max(by_n[lo], 1e-9), hi / lo
        cells = ", ".join(f"N={n}: {mib:.1f} MiB" for n, mib in sorted(by_n.items()))
        figure = f"{provider}: {cells}; x{growth:.2f} for x{linear:g} N (needs <= x{1.25 * linear:.2f})"
        found.append((figure, "met" if growth <= 1.25 * linear else "missed"))
    return found


_PYTEST_TOTALS = re.compile(r"=+ (.*\b(?:passed|failed|error|errors|skipped|no tests ran)\b.*) in [\d.]+s")
_PYTEST_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def tests_outcome(log: Path) -> tuple[str, int]:
    """(pytest's totals line, or counts of the per-test lines when it was cut; failures + errors)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    totals = _PYTEST_TOTALS.findall(text)
    if totals:
        failures = sum(int(n) for n in re.findall(r"(\d+) (?:failed|errors?)\b", totals[-1]))
        return totals[-1], failures
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = _PYTEST_OUTCOME.search(line)
        if match and "::" in line:
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    failures = counts.get("FAILED", 0) + counts.get("ERROR", 0)
    seen = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items())) or "no test finished"
    return f"before the cut: {seen}", failures


def _tests(run: Run) -> list[tuple[str, str]]:
    result = run.results.get("tests")
    if result is None or result.status in ("not reached", "skipped"):
        return []
    line, failures = tests_outcome(run.logs / "tests.log")
    return [(line, "missed" if failures else "met" if result.status == "ok" else "not reached")]


def _guard(run: Run) -> list[tuple[str, str]]:
    rows = run.rows("verify.csv")
    probes = [r for r in rows if r["what"] == "probe"]
    if not probes:
        return []
    agree = sum(r["ok"] == "1" for r in probes)
    seconds = [float(r["seconds"]) for r in probes]
    lookups = [float(r["seconds"]) * 1e6 for r in rows if r["what"] == "lookup"]
    figure = (
        f"{agree} of {len(probes)} cases agree; first-call probe median {statistics.median(seconds):.2f} s, "
        f"max {max(seconds):.2f} s (Triton cache warm from the tests phase)"
    )
    if lookups:
        figure += f"; then {max(lookups):.1f} us per call"
    wrong = [f"{r['backend']} {r['op']} {r['case']}" for r in probes if r["ok"] != "1"]
    if wrong:
        figure += "; disagree: " + "; ".join(wrong)
    complete = run.results.get("guard", PhaseResult("")).status == "ok"
    return [(figure, "missed" if wrong else "met" if complete else "not reached")]


def _cuda_targets(run: Run) -> list[tuple[str, str]]:
    """cuda_ops.py's own verdict lines ("TARGET name: figure -> met|MISSED") from this run's log."""
    log = run.logs / "cuda.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.findall(r"^TARGET (.+) -> (met|MISSED)$", text, flags=re.M)
    return [(figure, "met" if verdict == "met" else "missed") for figure, verdict in found]


def _wall(run: Run) -> list[tuple[str, str]]:
    wall = time.monotonic() - run.started
    return [
        (f"{wall:.0f} s (budget {run.args.budget_s:.0f} s)", "met" if wall <= TARGET_WALL_S else "missed")
    ]


TARGETS: list[Target] = [
    Target("op / layer / backend / guard tests pass on the GPU", "tests", _tests),
    Target("every kernel case agrees with float64 on this GPU (first-use guard)", "guard", _guard),
    Target("attn >= 1.3x faster than the PEFT path", "attn", ratio_target("attn.csv", "peft-sdpa", 1 / 1.3)),
    Target("attn >= 0.9x of SDPA without prefix", "attn", ratio_target("attn.csv", "sdpa-noprefix", 1 / 0.9)),
    Target(
        "attn fwd+bwd >= 1.5x faster than the PEFT path at the memory phase's largest N (4096)",
        "memory",
        ratio_target("attn_memory.csv", "peft-sdpa", 1 / 1.5, shape_has=_largest_memory_n),
    ),
    Target(
        "attn fwd+bwd >= 0.9x of SDPA without prefix at the memory phase's largest N (4096)",
        "memory",
        ratio_target("attn_memory.csv", "sdpa-noprefix", 1 / 0.9, shape_has=_largest_memory_n),
    ),
    Target("LoRA <= 1.15x the frozen base linear", "lora", ratio_target("lora.csv", "base-linear", 1.15)),
    Target("adapter >= 1.5x faster than unfused", "adapter", ratio_target("adapter.csv", "unfused", 1 / 1.5)),
    Target("attn fwd+bwd peak memory linear in N", "memory", _memory_linear),
    Target(
        "stage-2 train step no slower than PEFT's LoRA step",
        "train_step",
        ratio_target("train_step.csv", "peft-lora", 1.0, ("ptpeft-stage2", "ptpeft-lora")),
    ),
    Target("CUDA decode / LoRA targets (benchmarks/cuda_ops.py)", "cuda", _cuda_targets),
    Target(f"whole suite <= {TARGET_WALL_S / 60:g} min wall", "", _wall),
]


# ----------------------------------------------------------------------------- summary


def _device(run: Run) -> str:
    env_log = run.logs / "env.log"
    if env_log.exists():
        for line in env_log.read_text(errors="replace").splitlines():
            if line.startswith("device "):
                return line.removeprefix("device ")
    return "unknown device (env phase did not report one)"


def _status(result: PhaseResult) -> str:
    return f"{result.status} ({result.note})" if result.note else result.status


def write_summary(run: Run, phases: list[Phase], targets: list[Target], code: int) -> str:
    args = run.args
    tuning = (
        "on (PTPEFT_AUTOTUNE=1, tuned results cached on disk across phases)"
        if args.autotune
        else "PTPEFT_AUTOTUNE=0 (one pinned config per shape class, in the launchers that read the switch)"
    )
    lines = [
        f"# GPU suite on {_device(run)}",
        "",
        f"Run `{run.id}`, started {run.started_at}, {time.monotonic() - run.started:.0f} s wall "
        f"of a {args.budget_s:.0f} s budget; exit code {code}. Autotuning: "
        f"{tuning}"
        f"{'; SMOKE run (tiny shapes, CPU)' if args.smoke else ''}.",
        "",
        "Skipped: " + ("; ".join(run.skipped) if run.skipped else "nothing"),
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for target in targets:
        found = target.evaluate(run)
        if not found:
            result = run.results.get(target.phase)
            why = "phase not run" if result is None else f"{target.phase}: {_status(result)}"
            lines.append(f"| {target.name} | - | not reached ({why}) |")
        for figure, verdict in found:
            lines.append(f"| {target.name} | {figure} | {verdict} |")
    lines += ["", "| phase | status | seconds | allowance | reports |", "|---|---|---|---|---|"]
    for phase in phases:
        r = run.results.get(phase.name, PhaseResult("not run"))
        status = _status(r)
        lines.append(f"| {phase.name} | {status} | {r.seconds:.1f} | {r.allowance:.0f} | {phase.reports} |")
    lines += ["", f"Logs: `logs/{run.id}/`. CSV rows of this run carry run_id `{run.id}`."]
    text = "\n".join(lines) + "\n"
    for path in (run.out / "summary.md", run.logs / "summary.md"):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return text


def main(
    argv: list[str] | None = None, phases: list[Phase] | None = None, targets: list[Target] | None = None
) -> int:
    """Run the suite; ``phases`` / ``targets`` replace the built-in lists (the suite's own tests)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the logs, CSVs and summary.md")
    parser.add_argument(
        "--budget-s", type=float, default=360.0, help="wall-time budget of the whole run (360)"
    )
    parser.add_argument("--phases", nargs="+", default=None, help="run only these phases (default: all)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per benchmark call (default 30)")
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (8; 0 in --smoke)")
    parser.add_argument(
        "--autotune", action="store_true", help="autotune the kernels (default: pinned configs)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: checks the suite itself"
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 0 if args.smoke else 8
    phases = PHASES if phases is None else phases
    if args.phases:
        unknown = set(args.phases) - {p.name for p in phases}
        if unknown:
            parser.error(f"unknown phases {sorted(unknown)}; known: {[p.name for p in phases]}")
        phases = [p for p in phases if p.name in args.phases]
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args)
    print(f"[gpu_suite] run {run.id}, budget {args.budget_s:.0f} s, logs in {run.logs}", flush=True)
    try:
        code = run_suite(run, phases)
    except KeyboardInterrupt:
        code = 130
    print(write_summary(run, phases, TARGETS if targets is None else targets, code))
    return code


if __name__ == "__main__":
    sys.exit(main())
