"""Entry points: :func:`train` (raises on bad input) and :func:`main` (the CLI; exit codes)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .._progress import is_terminal
from . import distributed as D
from . import interrupt
from .builtin_model import ensure_pretrained, spec_with
from .checkpoint import atomic_write_text, latest_checkpoint, read_latest_state
from .config import RunConfig, absolute_path, load_run_config, parse_args, resolve
from .loop import NonFiniteLossError, Trainer, check_resume_fingerprint
from .models import MissingDependencyError, family_for, fingerprint, load_processor
from .quantized import load_base_model
from .report import format_table
from .resume import apply_resume_options, explicit_options
from .rundata import load_run_data, screen_images
from .sharded_checkpoint import latest_sharded_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quiet_libraries(*, bars_only: bool = False) -> None:
    """Silence transformers' warnings and progress bars (``bars_only``: its bars only, which
    redraw with carriage returns where stderr is a log file rather than a terminal)."""
    import transformers

    if not bars_only:
        transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def check_output_dir(path: Path, flag: str) -> None:
    """Stop before any work unless ``path`` is, or can be made, a writable directory; creates nothing."""
    probe_in = path
    while not probe_in.exists() and not probe_in.is_symlink() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ValueError(f"{flag} {path}: {probe_in} is not a directory (a file is in the way)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ptpeft-probe-", dir=probe_in))
    except OSError as exc:
        raise ValueError(
            f"{flag} {path}: cannot create files under {probe_in} ({exc.strerror or exc}); choose a "
            "writable directory"
        ) from None


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``python -m ptpeft_kernels.train`` with ``argv``; returns the report (``report.json``)."""
    args = parse_args(argv)
    notes: list[str] = []
    if args.estimate_memory:  # issue 12: no training, no data, no weights (train/estimate.py)
        from .estimate import run_estimate

        return run_estimate(args)
    if args.resume:
        run_dir = Path(absolute_path(args.resume))
        cfg = load_run_config(run_dir)
        # Testing aids act once: a resumed run neither kills itself again nor injects the NaN.
        cfg.kill_at_step = cfg.fail_at_step = None
        state = read_latest_state(run_dir)
        notes = apply_resume_options(cfg, explicit_options(argv), state)
        cfg.quiet = args.quiet  # how this invocation prints, not part of the run
        check_output_dir(run_dir, "--resume")
        if notes:
            step = state["global_step"] if state else 0
            cfg.extra = {
                **cfg.extra,
                "resume_changes": [
                    *cfg.extra.get("resume_changes", []),
                    {"global_step": step, "changes": notes},
                ],
            }
    else:
        cfg = resolve(args)
        run_dir = Path(cfg.output_dir)
        check_output_dir(run_dir, "--output-dir")
        if (run_dir / "config.json").exists():
            raise ValueError(
                f"--output-dir {run_dir} already holds a run (config.json); "
                f"continue it with --resume {run_dir} "
                "or choose another directory"
            )
    if cfg.quiet or not is_terminal(sys.stderr):
        _quiet_libraries(bars_only=not cfg.quiet)
    # Forked DataLoader workers and the tokenizer's own thread pool do not mix.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A caller that set up the process group itself (reproduce under torchrun, several runs) keeps it.
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = D.setup(cfg.device)
    if not owns_group:
        # The caller's group runs several trainings in a row (reproduce under torchrun), with no
        # rendezvous between them: without this, rank 0 could write this run's config.json before a
        # slower rank had checked that the directory is new, and that rank refused the run (seen in CI).
        D.barrier(dist)  # every rank has checked the output directory
    if dist.device.type == "cpu" and cfg.dtype == "float16":
        D.teardown()
        raise ValueError(
            "--dtype float16 is not supported on the CPU (training in float16 there ends in a NaN loss); "
            "use --dtype float32 or bfloat16 on the CPU, float16 on a GPU (--device cuda)"
        )
    if dist.device.type == "cpu":
        threads = cfg.threads or (1 if cfg.model is None else 0)
        if threads:
            torch.set_num_threads(threads)
    for note in notes if dist.is_main else []:
        print(f"[ptpeft] applied on resume: {note}", file=sys.stderr, flush=True)
    try:
        with interrupt.handle_signals():
            return _run(cfg, run_dir, dist, resuming=bool(args.resume), rewrite_config=bool(notes))
    finally:
        if owns_group:
            D.teardown()


def _run(
    cfg: RunConfig, run_dir: Path, dist: D.DistInfo, resuming: bool, rewrite_config: bool = False
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.batch_size % (cfg.grad_accum * dist.world_size):
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} x "
            f"{dist.world_size} processes (it is the global batch)"
        )
    files = None
    if cfg.model is None:
        spec = spec_with(cfg.builtin_preset, pretrain_steps=cfg.pretrain_steps)
        assets = ensure_pretrained(
            cfg.builtin_preset, cfg.cache_dir, quiet=cfg.quiet or not dist.is_main, spec=spec
        )
        model_path = assets.model_dir
        model_desc = f"built-in ({cfg.builtin_preset}, {assets.root.name})"
        files = assets.downstream_files()
        build_s = assets.build_seconds
    else:
        model_path = Path(cfg.model)
        model_desc = str(model_path)
        build_s = 0.0
    _, family = family_for(model_path)
    processor = load_processor(model_path)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None:  # batching needs one; the padded positions carry no labels
        tok.pad_token = tok.eos_token
    data = load_run_data(cfg, family, files)
    data = screen_images(data, skip=cfg.skip_missing, show=dist.is_main and not cfg.quiet)
    # issue 12: a 4-bit base (--load-in-4bit) loads through bitsandbytes; under --fsdp the model is
    # loaded on the CPU and sharding moves each rank's shards to its device (train/fsdp.py).
    model = load_base_model(
        model_path,
        DTYPES[cfg.dtype],
        torch.device("cpu") if cfg.fsdp else dist.device,
        load_in_4bit=cfg.load_in_4bit,
        double_quant=cfg.double_quant,
    )
    model.eval()
    fp = fingerprint(model)
    checkpoint = None
    if resuming:
        checkpoint = (latest_sharded_checkpoint if cfg.fsdp else latest_checkpoint)(run_dir)
        if checkpoint is not None:
            check_resume_fingerprint(checkpoint, fp)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if rewrite_config or not resuming or not (run_dir / "config.json").exists():
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_json(), indent=2) + "\n")
    D.barrier(dist)
    if cfg.fsdp:
        from .fsdp import FSDPTrainer

        def build_base() -> torch.nn.Module:
            return load_base_model(model_path, DTYPES[cfg.dtype], torch.device("cpu"))

        trainer = FSDPTrainer(
            cfg, dist, model, processor, family, data, run_dir, model_desc, fp, build_base=build_base
        )
    else:
        trainer = Trainer(cfg, dist, model, processor, family, data, run_dir, model_desc, fp)
    report = trainer.run(checkpoint)
    report["startup_s"] = round(build_s, 1)
    report["command_time_s"] = round(time.perf_counter() - t0, 1)
    if dist.is_main:
        from .report import write_report

        write_report(run_dir, report)
        # The final table prints under --quiet too: it is the result of the run.
        print()
        print(format_table(report))
        if data.missing_train or data.missing_eval:
            print(
                f"skipped {len(data.missing_train)} training and {len(data.missing_eval)} evaluation "
                "records with missing images (listed in report.json)"
            )
        if data.unreadable_train or data.unreadable_eval:
            print(
                f"skipped {len(data.unreadable_train)} training and {len(data.unreadable_eval)} evaluation "
                "records with unreadable images (listed in report.json)"
            )
        print(f"evaluated on {report['eval_examples']} examples: {data.eval_source}")
        print(f"run directory: {run_dir}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
    except interrupt.Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(
            "error: interrupted (a second Ctrl-C, or one before the run started): stopped at once, without "
            "a new checkpoint; --resume DIR continues from the last one",
            file=sys.stderr,
        )
        return 130
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, FileNotFoundError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
