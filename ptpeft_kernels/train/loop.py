"""The training run: stages, optimisation, evaluation, checkpoints and the report.

One optimizer step consumes one *global batch* of ``--batch-size`` examples, split into
``--grad-accum`` micro-batches and, under ``torchrun``, across processes. The loss of a
step is the mean over every target token of the global batch (each process scales its
token-sum by the all-reduced token count), so the gradient — and the run — is the same
for any split of the same global batch. The order of examples is a seeded permutation per
epoch and stage; the data position is therefore a function of the step, which is what a
checkpoint records (with the optimizer, scheduler and RNG states) for exact resumption.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._progress import progress
from . import distributed as D
from . import interrupt
from .checkpoint import Checkpoint, atomic_write_text, latest_checkpoint, save_checkpoint
from .config import RunConfig, StagePlan, stage_steps
from .data import Collator, Example, model_inputs
from .metrics import PRIMARY_METRIC, task_scores
from .models import Family, end_text, fingerprint, fingerprint_mismatch
from .report import MetricsLog, plot_losses, read_metrics, write_report
from .rundata import RunData, load_run_data


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped at ``step`` keeping its last checkpoint."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, stage: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"ptpeft-order/{seed}/{stage}/{epoch}").shuffle(order)
    return tuple(order)


def global_batch(n: int, seed: int, stage: int, step: int, batch_size: int) -> list[int]:
    """Example indices of global batch ``step`` of a stage: positions step*B .. step*B+B-1 of
    the stream of per-epoch permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, off = divmod(pos, n)
        out.append(_permutation(n, seed, stage, epoch)[off])
    return out


def local_micro_batches(indices: list[int], grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """This process's share of each micro-batch of a global batch."""
    per_micro = len(indices) // grad_accum
    per_rank = per_micro // world
    return [
        indices[m * per_micro + rank * per_rank : m * per_micro + (rank + 1) * per_rank]
        for m in range(grad_accum)
    ]


class _StepData(torch.utils.data.Dataset):
    """Item ``i``: the collated micro-batches of step ``first + i`` for this process."""

    def __init__(self, examples, collator, seed, stage, first, last, batch_size, grad_accum, rank, world):
        self.examples, self.collator = examples, collator
        self.args = (seed, stage, batch_size)
        self.first, self.last = first, last
        self.grad_accum, self.rank, self.world = grad_accum, rank, world

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, i: int) -> list[dict]:
        seed, stage, bs = self.args
        idx = global_batch(len(self.examples), seed, stage, self.first + i, bs)
        micro = local_micro_batches(idx, self.grad_accum, self.rank, self.world)
        return [self.collator([self.examples[j] for j in m]) for m in micro]


# ----------------------------------------------------------------------------------- stages


def integration_api():
    """The integration API (``pk.apply_prefix``, ``pk.apply_lora``, ...): the package's top level,
    or ``ptpeft_kernels.integrations`` where the top level does not re-export it (yet)."""
    import ptpeft_kernels as pk

    if hasattr(pk, "apply_prefix"):
        return pk
    from .. import integrations

    return integrations


def apply_stage(model: torch.nn.Module, stage: StagePlan, cfg: RunConfig) -> None:
    """Add the stage's modules (if any) and set which parameters train."""
    pk = integration_api()

    if stage.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    if stage.kind == "prefix":
        pk.apply_prefix(
            model,
            num_prefix=cfg.num_prefix,
            reparam_hidden=cfg.prefix_hidden or None,
            targets=cfg.prefix_targets,
        )
        pk.mark_trainable(model, prefix=True, lora=False, adapter=False)
    elif stage.kind == "lora":
        targets = cfg.lora_targets
        if targets is not None and len(targets) == 1 and any(c in targets[0] for c in "*.^$[]()|+?\\"):
            targets = targets[0]  # one regex (PEFT's rule for a string)
        pk.apply_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets
        )
        pk.mark_trainable(model, prefix=stage.train_prefix, lora=True, adapter=False)
    elif stage.kind == "adapter":
        pk.apply_adapter(model, bottleneck=cfg.adapter_bottleneck, placement=cfg.adapter_placement)
        pk.mark_trainable(model, prefix=stage.train_prefix, lora=False, adapter=True)
    else:
        raise ValueError(f"unknown stage kind {stage.kind!r}")


def make_scheduler(opt: torch.optim.Optimizer, steps: int, warmup_ratio: float, kind: str):
    warmup = int(round(steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        dist: D.DistInfo,
        model: torch.nn.Module,
        processor: Any,
        family: Family,
        data: RunData,
        run_dir: Path,
        model_desc: str,
        base_fingerprint: dict,
    ) -> None:
        self.cfg, self.dist, self.model, self.processor = cfg, dist, model, processor
        self.family, self.data, self.run_dir = family, data, run_dir
        self.model_desc, self.base_fingerprint = model_desc, base_fingerprint
        template = cfg.prompt_template or family.template
        end = end_text(family, processor)
        self.train_collator = Collator(processor, template, end, "train")
        self.gen_collator = Collator(processor, template, end, "generate")
        self.log = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main)
        self.show = dist.is_main and not cfg.quiet
        self.primary = PRIMARY_METRIC[cfg.task]
        self.base_features: dict[str, list[torch.Tensor]] | None = None
        self.autocast = cfg.bf16 and dist.device.type == "cuda"
        tok = getattr(processor, "tokenizer", processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.scored = 0  # examples scored by the latest evaluation

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        """bfloat16 autocast on the GPU under --bf16; nothing otherwise (no CUDA context on the CPU)."""
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def say(self, text: str) -> None:
        if self.show:
            print(f"[ptpeft] {text}", flush=True)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _stage_steps(self, stage: StagePlan) -> int:
        return stage_steps(stage, len(self.data.train), self.cfg.batch_size)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict[Any, str]]:
        """Generate for this process's share of the evaluation set; score on every process."""
        model = self.model
        model.eval()
        mine = self.data.eval[self.dist.rank :: self.dist.world_size]
        loader = torch.utils.data.DataLoader(
            mine,
            batch_size=self.cfg.eval_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
            collate_fn=self.gen_collator,
            num_workers=self.cfg.num_workers,
            worker_init_fn=interrupt.init_worker,
        )
        tok = getattr(self.processor, "tokenizer", self.processor)
        preds: dict[Any, str] = {}
        bar = progress(loader, desc="evaluating", disable=not self.show, leave=False)
        batches = iter(bar)
        while True:
            # Under torchrun the ranks stop together at the next training step instead: one rank
            # leaving the evaluation alone would leave the others waiting in the gather below.
            if not self.dist.enabled:
                interrupt.check("during an evaluation")
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:  # its workers ended by a SIGTERM to the process group (see _train_stage)
                if self.dist.enabled or interrupt.requested() is None:
                    raise
                interrupt.check("during an evaluation")
            inputs = model_inputs(batch, self.dist.device)
            with self._autocast():
                out = model.generate(
                    **inputs,
                    max_new_tokens=self.cfg.max_new_tokens,
                    num_beams=self.cfg.num_beams,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            for key, text in zip(
                batch["keys"], tok.batch_decode(new, skip_special_tokens=True), strict=False
            ):
                preds[key] = text.strip().split("\n")[0].strip()
        return self._score_predictions(preds)

    def _score_predictions(self, preds: dict[Any, str]) -> tuple[dict[str, float], dict[Any, str]]:
        """Gather every process's predictions, check one per evaluation example, and score them."""
        gathered: dict[Any, str] = {}
        for part in D.gather_objects(preds, self.dist):
            gathered.update(part)
        if len(gathered) != len(self.data.eval):  # ids are checked unique when the data is loaded
            raise RuntimeError(
                f"{len(gathered)} predictions for {len(self.data.eval)} evaluation examples: ids collided"
            )
        self.scored = len(gathered)
        refs = {e.key: list(e.references) for e in self.data.eval}
        return task_scores(self.cfg.task, gathered, refs), gathered

    def _rank_batches(self, examples: list[Example]) -> list[dict]:
        ex = examples[: self.cfg.rank_samples]
        if self.cfg.rank_length and self.cfg.rank_fill == "repeat":
            from dataclasses import replace

            from ..analysis.measures import repeated_text

            ex = [replace(e, target=repeated_text(e.target, self.cfg.rank_length)) for e in ex]
        bs = self.cfg.eval_batch_size
        return [self.train_collator(ex[i : i + bs]) for i in range(0, len(ex), bs)]

    @torch.no_grad()
    def representation(self, name: str = "eval") -> dict[str, Any] | None:
        """Rank ratio, effective rank, spectrum deviation and CKA of the last-layer hidden states
        against the pre-trained model's (with bootstrap intervals), on the first ``--rank-samples``
        evaluation examples and, nested under ``pretrain_distribution``, on as many examples of the
        pre-training distribution (see :mod:`ptpeft_kernels.analysis.measures`)."""
        if self.cfg.rank_samples == 0 or not self.dist.is_main:
            return None
        from ..analysis.measures import fixed_length_features, representation_report

        first = self.base_features is None
        if first:
            self.base_features = {}
        reports, replicates = {}, {}
        sets = {"downstream": self.data.eval, "pretrain": self.data.rank_pretrain}
        for dist_name, examples in sets.items():
            if not examples:
                continue
            feats, real = fixed_length_features(
                self.model, self._rank_batches(examples), self.cfg.rank_length, self.pad_id, self.dist.device
            )
            feats = [f.float() for f in feats]
            if first:
                self.base_features[dist_name] = feats
            base = self.base_features[dist_name]
            rep, reps = representation_report(
                base,
                base if first else feats,
                threshold=self.cfg.rank_threshold,
                resamples=self.cfg.rank_bootstrap,
                real_positions=real,
            )
            rep["fill"] = self.cfg.rank_fill if self.cfg.rank_length else "none (truncated to the shortest)"
            reports[dist_name] = rep
            replicates.update({f"{dist_name}/{k}": v.double() for k, v in reps.items()})
        from safetensors.torch import save_file

        if first:
            # The pre-trained model's features, kept (and saved, for --resume) to compare every stage with.
            flat = {
                f"{d}/{i}": f.contiguous() for d, fs in self.base_features.items() for i, f in enumerate(fs)
            }
            self._save_tensors(self.run_dir / "base_features.safetensors", flat, save_file)
        if replicates:
            # Bootstrap replicates, so reproduce can form intervals of means over seeds.
            self._save_tensors(self.run_dir / f"bootstrap-{name}.safetensors", replicates, save_file)
        out = reports["downstream"]
        if "pretrain" in reports:
            out["pretrain_distribution"] = reports["pretrain"]
        return out

    @staticmethod
    def _save_tensors(path: Path, tensors: dict, save_file) -> None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)

    def eval_point(self, name: str, global_step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.say(f"evaluating ({name}) on {len(self.data.eval)} examples")
        scores, preds = self.evaluate()
        rep = self.representation(name)
        rep = D.broadcast_object(rep, self.dist)
        seconds = time.perf_counter() - t0
        if self.dist.is_main:
            atomic_write_text(
                self.run_dir / f"predictions-{name}.json",
                json.dumps({str(k): v for k, v in preds.items()}, indent=1),
            )
        samples = [
            {"key": str(e.key), "prediction": preds.get(e.key), "reference": e.references[0]}
            for e in self.data.eval[:3]
        ]
        self.log.write(
            {
                "type": "eval",
                "stage": name,
                "global_step": global_step,
                "scores": scores,
                "representation": rep,
                "samples": samples,
            }
        )
        shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
        if rep:
            shown += (
                f", rank ratio {rep['rank_ratio']:.1f}% (n = {rep['spectrum_length']}), effective rank "
                f"{rep['effective_rank']:.1f}"
            )
        self.say(f"{name}: {shown}  (e.g. {samples[0]['prediction']!r} vs {samples[0]['reference']!r})")
        return {"scores": scores, "representation": rep, "eval_time_s": seconds}

    # ------------------------------------------------------------------ checkpoints

    def _save(self, global_step: int, opt, sched, state: dict, params: bool = True) -> None:
        if not self.dist.is_main:
            D.barrier(self.dist)
            return
        tensors = {n: p for n, p in self._trainable()} if params else {}
        save_checkpoint(
            self.run_dir,
            global_step,
            tensors,
            opt,
            sched,
            {**state, "metrics_lines": self.log.lines, "fingerprint": self.base_fingerprint},
        )
        D.barrier(self.dist)

    def _stop_requested(self) -> int | None:
        """The signal that asks this run to stop, agreed by every process (``None``: go on)."""
        local = interrupt.requested()
        if not self.dist.enabled:
            return local
        votes = D.all_sum(
            torch.tensor([1.0 if local else 0.0, float(local or 0)], dtype=torch.float64), self.dist
        )
        if votes[0] == 0:
            return None
        return local or int(round(float(votes[1] / votes[0])))

    def _interrupted(self, signum: int, what: str) -> interrupt.Interrupted:
        """The exception that ends the run after a checkpoint was written on a signal."""
        latest = self.run_dir / "checkpoints" / "latest"
        name = latest.read_text().strip() if latest.is_file() else "none"
        command = (
            "torchrun ... -m ptpeft_kernels.train" if self.dist.enabled else "python -m ptpeft_kernels.train"
        )
        return interrupt.Interrupted(
            signum,
            f"interrupted by {interrupt.signal_name(signum)}: {what}; checkpoint {name} written in "
            f"{self.run_dir}. Continue the run with:\n  {command} --resume {self.run_dir}",
        )

    # ------------------------------------------------------------------ hook points (train/fsdp.py overrides)

    def _apply_stages(self, first: int, last: int) -> None:
        """Add the modules of stages ``first`` .. ``last - 1``, each seeded as a fresh run seeds it."""
        for si in range(first, last):
            torch.manual_seed(self.cfg.seed * 1000 + si)
            apply_stage(self.model, self.cfg.stages[si], self.cfg)

    def _wrap_for_training(self, model: torch.nn.Module, stage: StagePlan):
        """What the step calls (with ``no_sync()`` for accumulation): DDP under torchrun, else the model."""
        if not self.dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            model,
            device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
            find_unused_parameters=stage.kind == "full",
        )

    def _load_optimizer(self, opt: torch.optim.Optimizer, opt_state: Any) -> None:
        opt.load_state_dict(opt_state)

    def _write_stage_output(self, stage: StagePlan) -> None:
        if self.dist.is_main:
            self._save_stage_output(stage)

    def _kill_here(self) -> bool:
        # Testing aid: PTPEFT_KILL_RANK=r makes --kill-at-step kill rank r only (one dead worker).
        only = os.environ.get("PTPEFT_KILL_RANK")
        return only is None or int(only) == self.dist.rank

    # ------------------------------------------------------------------ the run

    def run(self, resume: Checkpoint | None = None) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        stages = cfg.stages
        state: dict[str, Any]
        start_stage, start_step, opt_state, sched_state = 0, 0, None, None
        if resume is None:
            # A --resume of a run killed before its first checkpoint starts over: drop its partial log.
            self.log.truncate(0)
            torch.manual_seed(cfg.seed)
            try:
                pre = self.eval_point("pretrained", 0)
            except interrupt.Interrupted as exc:
                raise interrupt.Interrupted(
                    exc.signum,
                    f"interrupted by {interrupt.signal_name(exc.signum)} while evaluating the pre-trained "
                    f"model, before any training: nothing to lose. Start it again with:\n  "
                    f"python -m ptpeft_kernels.train --resume {self.run_dir}",
                ) from None
            summary = _summary(self.model)
            state = {
                "pretrained": {
                    "name": "pretrained",
                    **pre,
                    "trainable_params": 0,
                    "total_params": summary["total"],
                },
                "results": [],
                "global_step": 0,
                "stage_index": 0,
                "stage_step": 0,
                "stage_done": False,
                "log_window": [],
                "elapsed_s": 0.0,
                "stage_elapsed_s": 0.0,
            }
            self._save(0, None, None, state, params=False)
        else:
            state = dict(resume.state)
            self.log.truncate(int(state["metrics_lines"]))
            start_stage, start_step = int(state["stage_index"]), int(state["stage_step"])
            if state["stage_done"]:
                start_stage, start_step = start_stage + 1, 0
            # Rebuild the modules of every stage reached so far, then load the saved parameters.
            self._apply_stages(0, min(start_stage + (1 if start_step > 0 else 0), len(stages)))
            if resume.params:
                self._load_params(resume)
            if start_step > 0:
                opt_state, sched_state = resume.optimizer_state(), resume.state.get("scheduler")
            resume.restore_rng()
            if self.cfg.rank_samples and dist.is_main:
                self._restore_base_features()
            self.say(
                f"resuming at stage {min(start_stage, len(stages) - 1) + 1}/{len(stages)}, "
                f"step {start_step} (global step {state['global_step']})"
            )
        elapsed_before = float(state.get("elapsed_s", 0.0))
        t_session = time.perf_counter()

        for si in range(start_stage, len(stages)):
            stage = stages[si]
            steps = self._stage_steps(stage)
            first = start_step if si == start_stage else 0
            if first == 0:
                self._apply_stages(si, si + 1)
                state["stage_elapsed_s"] = 0.0
                state["log_window"] = []
            trainable = self._trainable()
            if not trainable:
                raise ValueError(f"stage {stage.name}: no parameter is trainable")
            opt = torch.optim.AdamW([p for _, p in trainable], lr=stage.lr, weight_decay=cfg.weight_decay)
            sched = make_scheduler(opt, steps, cfg.warmup_ratio, cfg.scheduler)
            if first > 0 and opt_state is not None:
                self._load_optimizer(opt, opt_state)
                sched.load_state_dict(sched_state)
            summary = _summary(self.model)
            self.say(
                f"stage {si + 1}/{len(stages)} {stage.name}: {steps} steps at lr {stage.lr:g}, "
                f"{summary['trainable']:,} trainable of {summary['total']:,} parameters"
            )
            if dist.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dist.device)
            state.update(stage_index=si, stage_done=False)
            t_stage = time.perf_counter() - float(state.get("stage_elapsed_s", 0.0))
            self._train_stage(si, stage, steps, first, opt, sched, state, t_stage, elapsed_before, t_session)
            train_time = time.perf_counter() - t_stage
            self._write_stage_output(stage)
            D.barrier(dist)
            try:
                point = self.eval_point(stage.name, state["global_step"])
            except interrupt.Interrupted as exc:
                # The stage's training is done: keep it (a resumed run only evaluates it).
                state.update(
                    stage_elapsed_s=train_time, elapsed_s=elapsed_before + time.perf_counter() - t_session
                )
                self._save(state["global_step"], opt, sched, state)
                raise self._interrupted(
                    exc.signum, f"stage {stage.name} had finished training, its evaluation had not"
                ) from None
            result = {
                "name": stage.name,
                "kind": stage.kind,
                "steps": steps,
                "lr": stage.lr,
                "trainable_params": summary["trainable"],
                "trainable_by_kind": summary["by_kind"],
                "total_params": summary["total"],
                **point,
                "train_time_s": train_time,
                "wall_time_s": train_time + point["eval_time_s"],
                "peak_memory_mb": _peak_memory_mb(dist.device),
                "final_loss": state.get("last_loss"),
            }
            state["results"].append(result)
            state.update(
                stage_step=steps, stage_done=True, elapsed_s=elapsed_before + time.perf_counter() - t_session
            )
            self._save(state["global_step"], None, None, state)
            if dist.is_main:
                write_report(self.run_dir, self._report(state, done=False))
            start_step = 0
        state["elapsed_s"] = elapsed_before + time.perf_counter() - t_session
        report = self._report(state, done=True)
        if dist.is_main:
            write_report(self.run_dir, report)
            records = read_metrics(self.run_dir / "metrics.jsonl")
            plot_losses(self.run_dir, records, self.primary)
        return report

    def _train_stage(self, si, stage, steps, first, opt, sched, state, t_stage, elapsed_before, t_session):
        cfg, dist = self.cfg, self.dist
        model = self.model
        params = [p for _, p in self._trainable()]
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ddp = self._wrap_for_training(model, stage)
        world = dist.world_size
        if cfg.batch_size % (cfg.grad_accum * world):
            raise ValueError(
                f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} "
                f"x {world} processes"
            )
        step_data = _StepData(
            self.data.train,
            self.train_collator,
            cfg.seed,
            si,
            first,
            steps,
            cfg.batch_size,
            cfg.grad_accum,
            dist.rank,
            world,
        )
        # An own generator: a DataLoader iterator otherwise draws its seed from the global RNG, and a
        # resumed run (which creates its iterator at another point) would see other dropout masks.
        loader = torch.utils.data.DataLoader(
            step_data,
            batch_size=None,
            shuffle=False,
            num_workers=cfg.num_workers,
            collate_fn=lambda x: x,
            generator=torch.Generator().manual_seed(cfg.seed),
            worker_init_fn=interrupt.init_worker,
        )
        bar = progress(total=steps, initial=first, desc=stage.name, disable=not self.show)
        window: list[float] = list(state.get("log_window", []))
        batches = iter(loader)

        def stop(signum: int, finished: str, save: bool) -> interrupt.Interrupted:
            bar.close()
            if save:
                state["stage_elapsed_s"] = time.perf_counter() - t_stage
                state["elapsed_s"] = elapsed_before + time.perf_counter() - t_session
                self._save(state["global_step"], opt, sched, state)
            return self._interrupted(signum, finished)

        for step in range(first, steps):
            try:
                micro = next(batches)
            except Exception:
                # A SIGTERM to the whole process group ends the loader's workers too; waiting for a
                # batch, this process learns it here, between two steps: RuntimeError "worker exited
                # unexpectedly", or EOFError when the worker ended while handing over a batch's shared
                # memory (seen in a test run). Single process only: under torchrun the ranks must
                # agree on the step (see _stop_requested).
                signum = interrupt.requested()
                if signum is None or dist.enabled:
                    raise
                # A step of this stage finished in this session: save it; else the latest checkpoint
                # is this very point (end of the previous stage, or the one resumed from).
                raise stop(signum, f"after global step {state['global_step']}", save=step > first) from None
            gstep = state["global_step"] + 1
            n_local = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
            n_total = int(D.all_sum(torch.tensor([n_local], dtype=torch.float64), dist).item())
            if n_total == 0:
                raise ValueError(
                    f"step {gstep}: the global batch has no target tokens (are the targets empty?)"
                )
            loss_sum_local = torch.zeros((), dtype=torch.float64)
            for m, mb in enumerate(micro):
                inputs = model_inputs(mb, dist.device)
                labels = inputs.pop("labels")
                sync = m == len(micro) - 1 or not dist.enabled
                ctx = ddp.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    with self._autocast():
                        out = ddp(**inputs, use_cache=False)
                    logits = out.logits
                    if logits.shape[1] != labels.shape[1]:
                        raise ValueError(
                            f"the model returned logits for {logits.shape[1]} positions but the batch has "
                            f"{labels.shape[1]} label positions; this model family needs its own label "
                            "alignment"
                        )
                    loss_sum = F.cross_entropy(
                        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                        labels[:, 1:].reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                    if cfg.fail_at_step is not None and gstep == cfg.fail_at_step:
                        loss_sum = loss_sum * float("nan")
                    (loss_sum * (world / n_total)).backward()
                loss_sum_local += loss_sum.detach().double().cpu()
            loss = float(D.all_sum(loss_sum_local, dist).item()) / n_total
            if not math.isfinite(loss):
                ckpt = self.run_dir / "checkpoints" / "latest"
                last = ckpt.read_text().strip() if ckpt.is_file() else "none"
                raise NonFiniteLossError(
                    f"loss is {loss} at global step {gstep} (stage {stage.name}, step {step + 1}); stopped "
                    f"without updating the weights. Last good checkpoint: {last} in {self.run_dir}. "
                    "Try a lower learning rate.",
                    gstep,
                )
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["global_step"] = gstep
            state["stage_step"] = step + 1
            state["last_loss"] = loss
            window.append(loss)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                mean = sum(window) / len(window)
                bar.set_postfix(loss=f"{mean:.4f}")
                self.log.write(
                    {
                        "type": "train",
                        "stage": stage.name,
                        "step": step + 1,
                        "global_step": gstep,
                        "loss": mean,
                        "lr": sched.get_last_lr()[0],
                        "examples_seen": (step + 1) * cfg.batch_size,
                    }
                )
                window = []
            state["log_window"] = window
            saved = False
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                state["stage_elapsed_s"] = time.perf_counter() - t_stage
                state["elapsed_s"] = elapsed_before + time.perf_counter() - t_session
                self._save(gstep, opt, sched, state)
                saved = True
            if cfg.kill_at_step is not None and gstep == cfg.kill_at_step and self._kill_here():
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            signum = self._stop_requested()
            if signum is not None:
                raise stop(
                    signum, f"finished global step {gstep} (stage {stage.name}, step {step + 1})", not saved
                )
        bar.close()
        # The DDP wrapper (and its gradient hooks) must not outlive its stage: the next stage wraps
        # the model again with another set of trainable parameters.
        del ddp, loader, batches
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()

    def _load_params(self, ck: Checkpoint) -> None:
        named = dict(self.model.named_parameters())
        unknown = [k for k in ck.params if k not in named]
        if unknown:
            raise ValueError(
                f"--resume: checkpoint {ck.path} holds parameters this model lacks: {unknown[:4]} "
                "(different base model or method?)"
            )
        with torch.no_grad():
            for k, v in ck.params.items():
                if named[k].shape != v.shape:
                    raise ValueError(
                        f"--resume: checkpoint {ck.path}: {k} has shape {tuple(v.shape)}, the model "
                        f"{tuple(named[k].shape)}"
                    )
                named[k].copy_(v.to(named[k].dtype))

    def _restore_base_features(self) -> None:
        path = self.run_dir / "base_features.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            d = load_file(str(path))
            by_set: dict[str, dict[int, torch.Tensor]] = {}
            for key, t in d.items():
                name, _, i = key.rpartition("/")
                by_set.setdefault(name or "downstream", {})[int(i)] = t
            self.base_features = {k: [v[i] for i in sorted(v)] for k, v in by_set.items()}

    def _save_stage_output(self, stage: StagePlan) -> None:
        out = self.run_dir / stage.name
        if stage.kind == "full":
            self.model.save_pretrained(out)
        else:
            integration_api().save_adapters(self.model, out)

    def _report(self, state: dict, done: bool) -> dict[str, Any]:
        cfg = self.cfg
        report = {
            "method": cfg.method,
            "task": cfg.task,
            "model": self.model_desc,
            "primary_metric": self.primary,
            "complete": done,
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
            "global_steps": state["global_step"],
            "pretrained": state["pretrained"],
            "stages": state["results"],
            "total_time_s": state.get("elapsed_s"),
            "train_examples": len(self.data.train),
            # The count scored by the latest evaluation (each id once: duplicates are refused at loading).
            "eval_examples": self.scored or len(self.data.eval),
            "evaluation_set": {
                "source": self.data.eval_source,
                "count": len(self.data.eval),
                "ids": [e.key for e in self.data.eval],
            },
            "skipped_missing": {
                "train": len(self.data.missing_train),
                "eval": len(self.data.missing_eval),
                "records": (self.data.missing_train + self.data.missing_eval)[:50],
            },
            "skipped_unreadable": {
                "train": len(self.data.unreadable_train),
                "eval": len(self.data.unreadable_eval),
                "records": (self.data.unreadable_train + self.data.unreadable_eval)[:50],
            },
            "resume_changes": cfg.extra.get("resume_changes", []),
            "versions": _versions(),
        }
        if state["results"]:
            first = state["pretrained"]["scores"].get(self.primary)
            last = state["results"][-1]["scores"].get(self.primary)
            report["improvement"] = {self.primary: (last - first) if None not in (first, last) else None}
        return report


def _summary(model: torch.nn.Module) -> dict[str, Any]:
    s = integration_api().trainable_summary(model)
    return {"trainable": s.trainable, "total": s.total, "by_kind": s.as_dict()}


def _versions() -> dict[str, str]:
    import platform

    import tokenizers
    import transformers
    from PIL import __version__ as pillow

    import ptpeft_kernels

    return {
        "ptpeft_kernels": ptpeft_kernels.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": pillow,
        "python": sys.version.split()[0],
        # Float results depend on these too (the CPU's matmul kernels, their thread count).
        "torch_threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_name() or platform.machine(),
    }


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def check_resume_fingerprint(ck: Checkpoint, fp: dict) -> None:
    expected = ck.state.get("fingerprint")
    if expected is None:
        raise ValueError(f"--resume: checkpoint {ck.path} records no base model; cannot check it")
    reason = fingerprint_mismatch(expected, fp)
    if reason:
        raise ValueError(
            f"--resume: checkpoint {ck.path} was trained from another base model ({reason}); "
            "refusing to continue it on this one"
        )


__all__ = [
    "NonFiniteLossError",
    "RunData",
    "Trainer",
    "apply_stage",
    "check_resume_fingerprint",
    "fingerprint",
    "global_batch",
    "latest_checkpoint",
    "load_run_data",
    "local_micro_batches",
]
