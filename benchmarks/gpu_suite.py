"""Everything a session with a GPU should run, in one command, with the results in one folder.

GPU time is scarce here (some sessions get 30 minutes of an H100/H200, most none), so this
script does the GPU-only checks in one go and writes what a later commit needs:

  env.txt         device, driver, versions (nvidia-smi, torch, triton, transformers, peft);
  tests.log       the op / layer / backend tests run natively on the GPU (the Triton
                  backend compiled, not interpreted), with their pass/fail summary;
  attn.csv        prefix attention at the Triton issue's target shape, bf16, plus the
                  forward+backward peak memory at N = 1024, 2048, 4096 ("linear in N");
  lora.csv        fused LoRA at the target shape (x 8192x4096, W 4096x4096, r 16);
  adapter.csv     fused adapter at the target shape (8192x4096, bottleneck 64);
  train_step.csv  the built-in model's training step, our LoRA against PEFT's;
  summary.md      each target of the Triton issue with the measured ratio and met / missed.

Each phase runs in its own process so one failure does not lose the others; the summary
says which phase failed. Copy the folder's CSVs and summary under ``benchmarks/results/``
with the device and date in the name (the CSV rows already carry device, versions, time).

Example (repository root, on the GPU machine):
  python benchmarks/gpu_suite.py --out /tmp/gpu-results              # everything, ~10 min
  python benchmarks/gpu_suite.py --out /tmp/r --phases bench summary  # benchmarks only
  python benchmarks/gpu_suite.py --out /tmp/r --phases bench summary --smoke --repeats 2  # CPU check
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("env", "tests", "bench", "summary")

# The Triton issue's target shapes (bf16); --smoke swaps in tiny ones to test the plumbing on a CPU.
SHAPES = {
    "target": {
        "attn": ["--batch", "8", "--heads", "16", "--prefix", "32", "--head-dim", "128"],
        "attn_seq": 2048,
        "memory_seqs": (1024, 2048, 4096),
        "lora": ["--tokens", "8192", "--features", "4096", "4096", "--rank", "16"],
        "adapter": ["--tokens", "8192", "--width", "4096", "--bottleneck", "64"],
        "train_step": [],
    },
    "smoke": {
        "attn": ["--batch", "1", "--heads", "2", "--prefix", "3", "--head-dim", "8"],
        "attn_seq": 16,
        "memory_seqs": (16, 32),
        "lora": ["--tokens", "2", "8", "--features", "16", "16", "--rank", "4"],
        "adapter": ["--tokens", "2", "8", "--width", "16", "--bottleneck", "4"],
        "train_step": ["--preset", "tiny", "--batch", "4"],
    },
}
# (CSV, target, baseline provider, largest allowed ours / baseline time, fwd+bwd medians)
TARGETS = [
    ("attn.csv", "attn >= 1.3x faster than the PEFT path", "peft-sdpa", 1 / 1.3),
    ("attn.csv", "attn >= 0.9x of SDPA without prefix", "sdpa-noprefix", 1 / 0.9),
    ("lora.csv", "LoRA <= 1.15x the frozen base linear", "base-linear", 1.15),
    ("adapter.csv", "adapter >= 1.5x faster than unfused", "unfused", 1 / 1.5),
]
OURS = ("ptpeft-cuda", "ptpeft-triton", "ptpeft-torch")


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` from the repository root, stdout+stderr appended to ``log``; (exit code, seconds)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)  # compile the kernels; the interpreter is for CPU machines
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            code = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu_suite] timed out after {timeout:.0f} s\n")
            code = 124
    seconds = time.perf_counter() - start
    print(f"  {'ok ' if code == 0 else f'rc={code}'} {seconds:7.1f} s  {' '.join(cmd[1:4])} ...", flush=True)
    return code, seconds


def phase_env(out: Path, args) -> int:
    log = out / "env.txt"
    code, _ = _run(["nvidia-smi"], log, 60)
    probe = (
        "import torch, triton, transformers; import ptpeft_kernels as pk\n"
        "print('torch', torch.__version__, 'cuda', torch.version.cuda)\n"
        "print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())\n"
        "print('triton', triton.__version__, 'transformers', transformers.__version__)\n"
        "print('available backends', pk.available_backends())\n"
        "try:\n    import peft; print('peft', peft.__version__)\n"
        "except ImportError as e:\n    print('peft missing:', e)\n"
    )
    code2, _ = _run([sys.executable, "-c", probe], log, 120)
    return code or code2


def phase_tests(out: Path, args) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(args.workers)]
    cmd += ["tests/ops", "tests/layers", "tests/test_backends.py"]
    code, _ = _run(cmd, out / "tests.log", args.tests_timeout)
    return code


def phase_bench(out: Path, args) -> int:
    log = out / "bench.log"
    shapes = SHAPES["smoke" if args.smoke else "target"]
    timing = ["--repeats", str(args.repeats), "--warmup", str(min(5, args.repeats))]
    dtype = ["--dtype", "bfloat16"]

    def attn(seq: int) -> list[str]:
        return ["benchmarks/attn.py", *shapes["attn"], "--seq", str(seq), *dtype]

    runs = [
        [*attn(shapes["attn_seq"]), *timing, "--csv", str(out / "attn.csv")],
        ["benchmarks/lora.py", *shapes["lora"], *dtype, *timing, "--csv", str(out / "lora.csv")],
        ["benchmarks/adapter.py", *shapes["adapter"], *dtype, *timing, "--csv", str(out / "adapter.csv")],
    ]
    memory = ["--modes", "full", "--repeats", "2", "--warmup", "1", "--csv", str(out / "attn_memory.csv")]
    runs += [[*attn(seq), *memory] for seq in shapes["memory_seqs"]]
    runs.append(
        ["benchmarks/train_step.py", *shapes["train_step"], *timing, "--csv", str(out / "train_step.csv")]
    )
    worst = 0
    for cmd in runs:
        code, _ = _run([sys.executable, *cmd], log, args.bench_timeout)
        worst = worst or code
    return worst


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _full_median(rows: list[dict], provider: str) -> float | None:
    row = next((r for r in rows if r["provider"] == provider and r["mode"] == "full"), None)
    return None if row is None else float(row["median_ms"])


def phase_summary(out: Path, args, codes: dict[str, int]) -> int:
    tables = {name: _rows(out / name) for name in {t[0] for t in TARGETS}}
    device = next((r["device"] for rows in tables.values() for r in rows), "unknown device")
    lines = [f"# GPU suite on {device}", "", f"Phases (exit codes): {codes}", ""]
    lines += [
        "| target | provider | fwd+bwd median, ours vs baseline | ratio | verdict |",
        "|---|---|---|---|---|",
    ]
    for csv_name, what, baseline, bound in TARGETS:
        rows = tables[csv_name]
        theirs = _full_median(rows, baseline)
        measured = [(p, _full_median(rows, p)) for p in OURS if _full_median(rows, p) is not None]
        if theirs is None or not measured:
            lines.append(f"| {what} | - | not measured | - | - |")
        for provider, ours in measured if theirs is not None else []:
            ratio = ours / theirs
            verdict = "met" if ratio <= bound else "MISSED"
            cells = [
                what,
                provider,
                f"{ours:.3f} vs {theirs:.3f} ms",
                f"{ratio:.3f}x (needs <= {bound:.3f}x)",
            ]
            lines.append("| " + " | ".join([*cells, verdict]) + " |")
    memory = _rows(out / "attn_memory.csv")
    seqs = sorted({int(r["shape"].split(" N", 1)[1].split()[0]) for r in memory})
    lines += ["", "Prefix attention fwd+bwd peak memory (MiB) by sequence length N:", ""]
    lines += ["| provider | " + " | ".join(f"N={n}" for n in seqs) + " |", "|---|" + "---|" * len(seqs)]
    for provider in sorted({r["provider"] for r in memory}):
        cells = []
        for n in seqs:
            row = next((r for r in memory if r["provider"] == provider and f" N{n} " in r["shape"]), None)
            cells.append("-" if row is None else f"{float(row['peak_mib']):.1f}")
        lines.append(f"| {provider} | " + " | ".join(cells) + " |")
    tests_log = out / "tests.log"
    if tests_log.exists():
        tail = [line for line in tests_log.read_text().splitlines() if " passed" in line or " failed" in line]
        lines += ["", f"Tests: {tail[-1] if tail else 'no pytest summary line (see tests.log)'}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the logs, CSVs and summary.md")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="default: all")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per benchmark call (default 30)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes: checks the suite itself on any machine in seconds"
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="pytest-xdist workers for the tests (default 8)"
    )
    parser.add_argument(
        "--tests-timeout", type=float, default=300, help="seconds for the test phase (default 300)"
    )
    parser.add_argument(
        "--bench-timeout", type=float, default=150, help="seconds per benchmark script (default 150)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    codes: dict[str, int] = {}
    for phase in args.phases:
        print(f"[gpu_suite] {phase}", flush=True)
        if phase == "summary":
            phase_summary(args.out, args, codes)
        else:
            codes[phase] = {"env": phase_env, "tests": phase_tests, "bench": phase_bench}[phase](
                args.out, args
            )
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
