"""``python -m ptpeft_kernels.reproduce``: the paper's comparison, small-scale, end to end.

Trains every method on the built-in pre-trained model and its shifted synthetic downstream task
with the training driver (:func:`ptpeft_kernels.train.run.train`, one call per method and seed,
equal step budgets), then writes into ``--output-dir``:

- ``reproduce.md``: the table (trainable parameters, downstream score, remaining rank ratio,
  spectrum deviation and CKA against the pre-trained model, time; mean ± std over seeds), the
  paper's BLIP-2 rank ratios side by side and the verdict on each of its claims;
- ``reproduce.csv`` (one row per method) and ``reproduce_runs.csv`` (one row per run);
- ``reproduce.png``: score vs rank ratio, score vs deviation, and the cumulative spectra;
- ``runs/<method>-seed<k>/``: the driver's run directories (``report.json`` ...) and ``driver.log``.

A run directory that already holds a finished ``report.json`` of the same settings is reused, one
that holds an unfinished run is continued from its last checkpoint (``--resume``), so an
interrupted reproduction picks up where it stopped when given the same ``--output-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .train.checkpoint import atomic_write_text
from .train.config import METHODS, TASKS, _HelpFormatter, _positive_int, parse_args, resolve
from .train.config import build_parser as build_train_parser

DEFAULT_SEEDS = 3
# Idle 2-core CPU, one run at a time, empty cache (pre-training included): the default took
# 1114-1214 s (limit 25 min; 600 steps would need an estimated 28 min, the driver's default of
# 1200 about 56), --quick 228-296 s (limit 6 min; 150 steps took 310 s).
DEFAULT_STEPS = 400
QUICK_STEPS = 120
QUICK_SEEDS = 1

# Driver options that reproduce sets itself for every run.
_OWNED = {
    "--method": "--methods",
    "--seed": "--seeds",
    "--steps": "--steps",
    "--epochs": "--steps",
    "--task": "--task",
    "--output-dir": "--output-dir",
    "--resume": "--output-dir (runs are continued automatically)",
    "--quiet": "--quiet",
    "--cache-dir": "--cache-dir",
    "--builtin-preset": "--builtin-preset",
    "--model": "(reproduce uses the built-in model)",
}
# Config keys that may differ between a run on disk and the requested one without changing its results.
# "extra": the driver's bookkeeping (the budget options as typed, resume notes), implied by the
# compared keys; configs written before it existed hold none.
_IGNORED_KEYS = {
    "output_dir",
    "quiet",
    "cache_dir",
    "threads",
    "num_workers",
    "save_every",
    "log_every",
    "extra",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ptpeft_kernels.reproduce",
        formatter_class=_HelpFormatter,
        usage="%(prog)s [options] [-- TRAIN_OPTIONS ...]",
        description=(
            "Small-scale reproduction of the paper's comparison (Kim et al. 2024): trains every method "
            "(full, prefix, lora, adapter, pt-lora, pt-adapter) on the built-in pre-trained LLaVA-style "
            "model (pre-trained once and cached on first use) and its shifted synthetic downstream task, "
            "with equal step budgets and several seeds, then writes reproduce.md, reproduce.csv, "
            "reproduce_runs.csv and reproduce.png into --output-dir: per method trainable parameters, "
            "downstream score, remaining rank ratio, spectrum deviation and CKA against the pre-trained "
            "model and time (mean ± std over seeds), the paper's BLIP-2 rank ratios side by side and whether "
            "the result agrees with the paper's claims. Finished runs in --output-dir are reused and "
            "unfinished ones continued, so running the same command again resumes an interrupted "
            "reproduction."
        ),
        epilog=(
            "Options after a lone '--' go to every training run (python -m ptpeft_kernels.train --help), "
            "e.g. '-- --batch-size 16 --lora-r 4'; those reproduce sets itself (--method, --seed, --steps, "
            "--task, --output-dir, --resume, --quiet, --cache-dir, --builtin-preset, --model) are refused. "
            "Measured on an idle 2-core CPU (one run at a time): the default 1114-1214 s (18.6-20.2 min) and "
            "--quick 228-296 s with an empty cache (pre-training the built-in model once: 136-157 s "
            "of that), "
            "--quick 100-130 s with the model cached; docs/reproduce/ holds the default's tables and plot."
        ),
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to train and compare, any of {', '.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"seeds per method: 0 .. N-1 (default {DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"optimizer steps per run, the same for every method; pt-* spend half in stage 1 "
        f"(default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)",
    )
    p.add_argument(
        "--task",
        default="caption",
        choices=TASKS,
        help="downstream task: caption (scored by CIDEr-D) or vqa (VQA accuracy)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="where the tables, the plot and the runs go; an existing reproduction there is reused and "
        "continued (default: runs/reproduce-<time>)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a short version: {QUICK_STEPS} steps and {QUICK_SEEDS} seed per method unless --steps / "
        "--seeds say otherwise",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="training runs at once, each in its own process with one torch thread (the same numbers; on an "
        "idle 2-core machine 2 jobs took 72 s instead of 113 s for --quick --steps 120, but the per-run "
        "times in the table then include the contention; default 1)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="cache of the built-in model (default: $PTPEFT_CACHE, else ~/.cache/ptpeft_kernels)",
    )
    p.add_argument(
        "--builtin-preset",
        default="default",
        choices=("default", "tiny"),
        help="size of the built-in model (tiny: seconds, for tests; its numbers mean nothing)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the final table and verdicts (no per-run progress, no pre-training progress bar)",
    )
    return p


@dataclass
class PlannedRun:
    method: str
    seed: int
    run_dir: Path
    argv: list[str]
    status: str = "new"  # "new" | "resume" | "done"

    @property
    def name(self) -> str:
        return f"{self.method} seed {self.seed}"


def _split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _check_train_args(train_args: list[str]) -> None:
    known = [o for o in build_train_parser()._option_string_actions if o.startswith("--")]
    for a in train_args:
        opt = a.split("=", 1)[0]
        if not opt.startswith("--"):
            continue
        # The driver's parser takes unique prefixes (--meth = --method): resolve them the same way.
        matches = [opt] if opt in known else [o for o in known if o.startswith(opt)]
        if len(matches) == 1 and matches[0] in _OWNED:
            raise ValueError(
                f"training option {opt} after '--' is set by reproduce itself; use {_OWNED[matches[0]]}"
            )


def _config_diff(saved: dict, wanted: dict) -> list[str]:
    keys = (set(saved) | set(wanted)) - _IGNORED_KEYS
    return [
        f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now"
        for k in sorted(keys)
        if saved.get(k) != wanted.get(k)
    ]


def plan(args: argparse.Namespace, train_args: list[str], out: Path) -> list[PlannedRun]:
    """Every (method, seed) run with its driver arguments and whether it is new, to resume or done.

    Raises ``ValueError`` when a run directory holds a run with other settings, or when the
    driver rejects the options (checked for every run before any training starts).
    """
    runs = []
    for method in dict.fromkeys(args.methods):
        for seed in range(args.seeds):
            run_dir = out / "runs" / f"{method}-seed{seed}"
            argv = [
                "--method",
                method,
                "--task",
                args.task,
                "--steps",
                str(args.steps),
                "--seed",
                str(seed),
                "--output-dir",
                str(run_dir),
                "--builtin-preset",
                args.builtin_preset,
                "--quiet",
                *(["--cache-dir", args.cache_dir] if args.cache_dir else []),
                *train_args,
            ]
            try:
                wanted = resolve(parse_args(argv)).to_json()
            except SystemExit:
                raise ValueError(
                    f"the training driver rejected the options for {method}: {shlex.join(argv)}"
                ) from None
            except ValueError as exc:
                raise ValueError(f"{method}: {exc}") from None
            if wanted.get("rank_samples") == 0:
                raise ValueError("--rank-samples 0 leaves nothing to compare; reproduce needs the measures")
            run = PlannedRun(method, seed, run_dir, argv)
            cfg_path = run_dir / "config.json"
            if cfg_path.is_file():
                diff = _config_diff(json.loads(cfg_path.read_text()), wanted)
                if diff:
                    raise ValueError(
                        f"{run_dir} holds a run with other settings ({'; '.join(diff[:4])}); give another "
                        "--output-dir or the same settings"
                    )
                report = run_dir / "report.json"
                done = report.is_file() and json.loads(report.read_text()).get("complete") is True
                run.status = "done" if done else "resume"
            runs.append(run)
    return runs


def _train_one(argv: list[str], log_path: str) -> dict[str, Any]:
    """One driver run with its output (the driver's final table, warnings) in ``log_path``."""
    from .train.run import train

    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"$ python -m ptpeft_kernels.train {shlex.join(argv)}", flush=True)
        return train(argv)


def _worker_init() -> None:
    # A spawned worker would hand its DataLoader workers the "spawn" method too, which cannot pickle the
    # driver's collate function; the platform's default start method is what a driver run normally sees.
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        mp.set_start_method("fork", force=True)


def _argv_for(run: PlannedRun) -> list[str]:
    return ["--resume", str(run.run_dir), "--quiet"] if run.status == "resume" else run.argv


def _result_line(run: PlannedRun, report: dict[str, Any], seconds: float | None) -> str:
    last = report["stages"][-1]
    nan = float("nan")
    rep = last.get("representation") or {}
    primary = report["primary_metric"]
    took = f", {seconds:.0f} s" if seconds is not None else ""
    return (
        f"{run.name}: {primary} {last['scores'][primary]:.1f}, "
        f"rank ratio {rep.get('rank_ratio', nan):.1f} %, deviation {rep.get('deviation', nan):.3f}, "
        f"CKA {rep.get('cka', nan):.3f}{took}"
    )


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU ({name}), {cores} cores"


def reproduce(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the reproduction; returns paths and the summary. Raises ``ValueError`` on bad options."""
    from .analysis import reproduction as R

    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = _split_train_args(argv)
    args = build_parser().parse_args(own)
    _check_train_args(train_args)
    if args.seeds is None:
        args.seeds = QUICK_SEEDS if args.quick else DEFAULT_SEEDS
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    out = Path(args.output_dir or os.path.join("runs", f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}"))
    t0 = time.perf_counter()
    runs = plan(args, train_args, out)
    say = (lambda text: None) if args.quiet else (lambda text: print(f"[reproduce] {text}", flush=True))
    todo = [r for r in runs if r.status != "done"]
    say(
        f"{len(runs)} runs ({len(dict.fromkeys(args.methods))} methods x {args.seeds} seeds, "
        f"{args.steps} steps each) in {out}: {len(todo)} to train, {len(runs) - len(todo)} finished earlier"
    )
    out.mkdir(parents=True, exist_ok=True)
    pretrain_s = 0.0
    if todo:
        import torch

        from .train.builtin_model import ensure_pretrained, spec_with

        first = resolve(parse_args(todo[0].argv))
        if first.device != "cuda" and not torch.cuda.is_available():
            # The driver pre-trains with its CPU thread setting (1 by default); so does this, so the cached
            # model is the same bit for bit whichever command builds it first.
            torch.set_num_threads(first.threads or 1)
        spec = spec_with(first.builtin_preset, pretrain_steps=first.pretrain_steps)
        assets = ensure_pretrained(first.builtin_preset, args.cache_dir, quiet=args.quiet, spec=spec)
        pretrain_s = assets.build_seconds
        if assets.built_now:
            say(f"pre-trained the built-in model in {pretrain_s:.0f} s (cached in {assets.root})")
    reports: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(runs):
        if r.status == "done":
            reports[i] = json.loads((r.run_dir / "report.json").read_text())
            say(f"[{i + 1}/{len(runs)}] {_result_line(r, reports[i], None)} (finished earlier, reused)")

    def started(i: int, r: PlannedRun) -> None:
        verb = "continuing" if r.status == "resume" else "training"
        say(f"[{i + 1}/{len(runs)}] {verb} {r.name} ({args.steps} steps) ...")

    pending = [(i, r) for i, r in enumerate(runs) if r.status != "done"]
    for _, r in pending:
        r.run_dir.mkdir(parents=True, exist_ok=True)
    if args.jobs == 1:
        for i, r in pending:
            started(i, r)
            t = time.perf_counter()
            reports[i] = _train_one(_argv_for(r), str(r.run_dir / "driver.log"))
            gc.collect()
            say(f"[{i + 1}/{len(runs)}] {_result_line(r, reports[i], time.perf_counter() - t)}")
    elif pending:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init
        ) as pool:
            futures = {
                pool.submit(_train_one, _argv_for(r), str(r.run_dir / "driver.log")): (i, r)
                for i, r in pending
            }
            say(f"{len(pending)} runs queued, {args.jobs} at a time")
            for fut in as_completed(futures):
                i, r = futures[fut]
                reports[i] = fut.result()
                # Its own time (training and evaluation), not the time since it was queued.
                say(f"[{i + 1}/{len(runs)}] {_result_line(r, reports[i], reports[i]['total_time_s'])}")

    results = [R.RunResult(r.method, r.seed, str(r.run_dir), reports[i]) for i, r in enumerate(runs)]
    summary = R.summarize(results)
    wall = time.perf_counter() - t0
    command = "python -m ptpeft_kernels.reproduce" + (f" {shlex.join(argv)}" if argv else "")
    meta = {
        "command": f"`{command}`",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "device": f"{_device()}, one torch thread per run, {args.jobs} run(s) at a time",
        "model": f"{reports[0]['model']}, LLaVA-style, pre-trained on synthetic shapes",
        "task": f"{summary.task}: {reports[0]['train_examples']} training and {reports[0]['eval_examples']} "
        f"evaluation examples, scored by {summary.primary}",
        "wall time of this command": f"{wall:.0f} s ({wall / 60:.1f} min), of which pre-training the "
        f"built-in model {pretrain_s:.0f} s; {len(todo)} of {len(runs)} runs trained by this command"
        + ("" if len(todo) == len(runs) else " (the others were reused, so this is not the full cost)"),
        "sum of the runs' own times": f"{sum(r.time_s for r in results):.0f} s (training and evaluation, "
        "as recorded in their reports)",
        "seeds": " ".join(str(s) for s in range(args.seeds)),
    }
    # Each invocation on this --output-dir, so a reproduction finished in several goes still shows its cost.
    history_path = out / "reproduce_log.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    if history:
        meta["earlier invocations on this output directory"] = "; ".join(
            f"{h['date']}: {h['wall_s']:.0f} s, {h['trained']} runs trained" for h in history
        )
    history.append(
        {
            "date": meta["date"],
            "command": command,
            "wall_s": round(wall, 1),
            "pretrain_s": round(pretrain_s, 1),
            "trained": len(todo),
            "reused": len(runs) - len(todo),
            "jobs": args.jobs,
        }
    )
    atomic_write_text(history_path, json.dumps(history, indent=1) + "\n")
    plot_path = out / "reproduce.png"
    R.plot(summary, plot_path)
    md = R.markdown(summary, meta, plot_path.name)
    atomic_write_text(out / "reproduce.md", md)
    R.write_csv(out / "reproduce.csv", summary)
    R.write_runs_csv(out / "reproduce_runs.csv", summary)
    vs = R.verdicts(summary)
    print()
    print(R.text_table(R.result_rows(summary)))
    print()
    print(f"paper (BLIP-2) by rank ratio: {R.paper_ordering()}")
    print(f"this run by rank ratio:       {R.ordering(summary)}")
    print(R.overall(vs))
    for v in vs:
        print(f"  {v.claim}: {v.status}")
    print(
        f"wall time {wall:.0f} s; written: {out / 'reproduce.md'}, reproduce.csv, reproduce_runs.csv, "
        "reproduce.png"
    )
    return {
        "output_dir": str(out),
        "summary": summary,
        "verdicts": vs,
        "wall_time_s": wall,
        "pretrain_s": pretrain_s,
        "trained": len(todo),
        "reused": len(runs) - len(todo),
    }


def main(argv: list[str] | None = None) -> int:
    try:
        reproduce(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
