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
  python benchmarks/gpu_suite.py --out /tmp/r --phases bench          # benchmarks only
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

# The Triton issue's target shapes (bf16).
ATTN_TARGET = ["--batch", "8", "--heads", "16", "--seq", "2048", "--prefix", "32", "--head-dim", "128"]
LORA_TARGET = ["--tokens", "8192", "--features", "4096", "4096", "--rank", "16"]
ADAPTER_TARGET = ["--tokens", "8192", "--width", "4096", "--bottleneck", "64"]
MEMORY_SEQS = (1024, 2048, 4096)


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
    common = ["--dtype", "bfloat16", "--repeats", str(args.repeats), "--warmup", "5"]
    runs = [
        ["benchmarks/attn.py", *ATTN_TARGET, *common, "--csv", str(out / "attn.csv")],
        ["benchmarks/lora.py", *LORA_TARGET, *common, "--csv", str(out / "lora.csv")],
        ["benchmarks/adapter.py", *ADAPTER_TARGET, *common, "--csv", str(out / "adapter.csv")],
    ]
    for seq in MEMORY_SEQS:
        shape = ["--batch", "8", "--heads", "16", "--seq", str(seq), "--prefix", "32", "--head-dim", "128"]
        runs.append(
            [
                "benchmarks/attn.py",
                *shape,
                "--dtype",
                "bfloat16",
                "--modes",
                "full",
                "--repeats",
                "3",
                "--warmup",
                "2",
                "--csv",
                str(out / "attn_memory.csv"),
            ]
        )
    runs.append(
        ["benchmarks/train_step.py", "--repeats", str(args.repeats), "--csv", str(out / "train_step.csv")]
    )
    worst = 0
    for cmd in runs:
        code, _ = _run([sys.executable, *cmd], log, args.bench_timeout)
        worst = worst or code
    return worst


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _median(rows: list[dict], provider: str, mode: str = "full", shape_has: str = "") -> float | None:
    for row in rows:
        if row["provider"] == provider and row["mode"] == mode and shape_has in row["shape"]:
            return float(row["median_ms"])
    return None


def _target(lines: list[str], what: str, ours: float | None, theirs: float | None, ok, text: str) -> None:
    if ours is None or theirs is None:
        lines.append(f"| {what} | not measured | - | - |")
        return
    ratio = ours / theirs
    verdict = "met" if ok(ratio) else "MISSED"
    lines.append(f"| {what} | {ours:.3f} vs {theirs:.3f} ms | {ratio:.3f}x ({text}) | {verdict} |")


def phase_summary(out: Path, args, codes: dict[str, int]) -> int:
    attn, lora, adapter = _rows(out / "attn.csv"), _rows(out / "lora.csv"), _rows(out / "adapter.csv")
    device = next((r["device"] for r in attn + lora + adapter), "unknown device")
    lines = [f"# GPU suite on {device}", "", f"Phases: {codes}", ""]
    lines += ["| target | ours vs baseline (fwd+bwd median) | ratio | verdict |", "|---|---|---|---|"]
    ours_attn = _median(attn, "ptpeft-triton")
    _target(
        lines,
        "attn >= 1.3x faster than PEFT path",
        ours_attn,
        _median(attn, "peft-sdpa"),
        lambda r: r <= 1 / 1.3,
        "needs <= 0.769x",
    )
    _target(
        lines,
        "attn >= 0.9x of flash SDPA, no prefix",
        ours_attn,
        _median(attn, "sdpa-noprefix"),
        lambda r: r <= 1 / 0.9,
        "needs <= 1.111x",
    )
    _target(
        lines,
        "LoRA <= 1.15x frozen base linear",
        _median(lora, "ptpeft-triton"),
        _median(lora, "base-linear"),
        lambda r: r <= 1.15,
        "needs <= 1.15x",
    )
    _target(
        lines,
        "adapter >= 1.5x faster than unfused",
        _median(adapter, "ptpeft-triton"),
        _median(adapter, "unfused"),
        lambda r: r <= 1 / 1.5,
        "needs <= 0.667x",
    )
    memory = _rows(out / "attn_memory.csv")
    lines += ["", "Prefix attention fwd+bwd peak memory (MiB) by N, B8 H16 P32 D128 bf16:", ""]
    lines += [
        "| provider | " + " | ".join(f"N={n}" for n in MEMORY_SEQS) + " |",
        "|---|" + "---|" * len(MEMORY_SEQS),
    ]
    for provider in sorted({r["provider"] for r in memory}):
        cells = []
        for n in MEMORY_SEQS:
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
