"""Entry points: :func:`train` (raises on bad input) and :func:`main` (the CLI; exit codes)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from .builtin_model import ensure_pretrained, spec_with
from .checkpoint import atomic_write_text, latest_checkpoint
from .config import RunConfig, load_run_config, parse_args, resolve
from .loop import NonFiniteLossError, Trainer, check_resume_fingerprint, load_run_data
from .models import family_for, fingerprint, load_processor
from .quantized import load_base_model
from .report import format_table
from .sharded_checkpoint import latest_sharded_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``python -m ptpeft_kernels.train`` with ``argv``; returns the report (``report.json``)."""
    args = parse_args(argv)
    if args.estimate_memory:  # issue 12: no training, no data, no weights (train/estimate.py)
        from .estimate import run_estimate

        return run_estimate(args)
    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
        cfg.quiet = args.quiet
        # Testing aids act once: a resumed run neither kills itself again nor injects the NaN.
        cfg.kill_at_step = cfg.fail_at_step = None
    else:
        cfg = resolve(args)
        run_dir = Path(cfg.output_dir)
        if (run_dir / "config.json").exists():
            raise ValueError(
                f"--output-dir {run_dir} already holds a run (config.json); "
                f"continue it with --resume {run_dir} "
                "or choose another directory"
            )
    if cfg.quiet:
        _quiet_libraries()
    # Forked DataLoader workers and the tokenizer's own thread pool do not mix.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist = D.setup(cfg.device)
    if dist.device.type == "cpu":
        threads = cfg.threads or (1 if cfg.model is None else 0)
        if threads:
            torch.set_num_threads(threads)
    try:
        return _run(cfg, run_dir, dist, resuming=bool(args.resume))
    finally:
        D.teardown()


def _run(cfg: RunConfig, run_dir: Path, dist: D.DistInfo, resuming: bool) -> dict[str, Any]:
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
        if not resuming or not (run_dir / "config.json").exists():
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
        print(f"run directory: {run_dir}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        train(argv)
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
