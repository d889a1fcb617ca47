"""The built-in LMM and its cached, deterministic pre-training.

A small LLaVA-style model — a CLIP-like ViT vision tower, a two-layer projector and a
Llama-like decoder — built from configs (``transformers.LlavaForConditionalGeneration``),
with a word-level tokenizer over the synthetic language (``tokenizers``) and a
``LlavaProcessor`` around a PIL image processor. It is saved as an ordinary Hugging Face
checkpoint directory (``config.json``, ``model.safetensors``, tokenizer and processor
files), loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

:func:`ensure_pretrained` builds, once per (preset, options) and cache directory:

* the synthetic data of both distributions (:mod:`.synthetic`),
* the model pre-trained from scratch on the ``pretrain`` distribution (captions and
  colour/position questions), so that the ``downstream`` task is a shifted distribution
  for a model with a real pre-trained representation space.

The cache lives under ``--cache-dir``, else ``$PTPEFT_CACHE``, else
``~/.cache/ptpeft_kernels``; building happens in a temporary directory renamed into place
(concurrent runs wait on a file lock), so a killed build never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .._progress import progress
from . import interrupt, synthetic
from . import minilm as _minilm  # noqa: F401 - registers the MiniLM preset's model type with transformers
from .data import Collator, caption_examples, load_captions, load_vqa, model_inputs
from .models import Family, end_text, write_train_meta

# Bump when the generator, the model recipe or the pre-training procedure changes, so old
# caches are not reused.
RECIPE_VERSION = 2

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
BUILTIN_FAMILY = Family(
    template="<image> {prompt}",
    caption_prompt=synthetic.CAPTION_PROMPT,
    vqa_prompt=synthetic.VQA_PROMPT,
)


@dataclass(frozen=True)
class BuiltinSpec:
    """Sizes of the built-in model, its synthetic data and its pre-training."""

    image_size: int = 48
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    pretrain_images: int = 3000
    pretrain_steps: int = 1200
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    downstream_train: int = 1500
    downstream_val: int = 150
    downstream_test: int = 150
    seed: int = 0
    # "scratch": the Llama-like decoder above, pre-trained with everything else; "minilm": the
    # pre-trained MiniLM-L6 (text_* sizes unused), frozen while the vision tower, projector and LM
    # head are aligned to it (LLaVA's stage 1; see :mod:`.minilm`).
    language_model: str = "scratch"

    def key(self) -> str:
        blob = json.dumps({"recipe": RECIPE_VERSION, **asdict(self), **build_environment()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Pre-training runs at this many torch threads whatever --threads says: the thread count changes
# the float rounding of the CPU kernels (tiny preset, 30 steps: weights 6e-6 apart at 1 vs 2
# threads), and over 1,200 steps such differences grow into another model. One thread is also
# what the README's figures were measured with.
PRETRAIN_THREADS = 1


def build_environment() -> dict[str, str]:
    """What besides the spec decides the pre-trained weights bit for bit: the library versions
    that draw the images, tokenise, preprocess and compute, and the instruction set torch's CPU
    kernels use (AVX2 and AVX-512 kernels round differently). Part of the cache key, so a cache
    built by another install is never taken for this one's."""
    import numpy
    import PIL
    import tokenizers
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pretrain_threads": str(PRETRAIN_THREADS),
    }


PRESETS: dict[str, BuiltinSpec] = {
    "default": BuiltinSpec(),
    # For tests: seconds to build, still a real pre-training run of a real (tiny) model.
    "tiny": BuiltinSpec(
        image_size=32,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_kv_heads=1,
        pretrain_images=32,
        pretrain_steps=6,
        pretrain_batch=8,
        downstream_train=24,
        downstream_val=8,
        downstream_test=8,
    ),
    # A language model with real pre-trained weights (MiniLM-L6, 6 layers, width 384), its vision tower
    # and projector aligned to it on the synthetic pre-training data with the language model frozen.
    # MINILM_NOTE in the README records what it costs.
    "minilm": BuiltinSpec(
        language_model="minilm",
        pretrain_images=2000,
        pretrain_steps=300,
        pretrain_batch=16,
        pretrain_lr=2e-3,
    ),
}


def default_cache_dir() -> Path:
    env = os.environ.get("PTPEFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ptpeft_kernels"


# ----------------------------------------------------------------------------------- building


def build_tokenizer():
    """A word-level fast tokenizer over the synthetic vocabulary (BOS prepended, no EOS)."""
    from .word_tokenizer import word_level_tokenizer

    return word_level_tokenizer(
        list(SPECIAL_TOKENS), synthetic.vocabulary(), unk="<unk>", pad="<pad>", bos="<s>", eos="</s>"
    )


def build_processor(spec: BuiltinSpec, tokenizer=None):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    size = {"height": spec.image_size, "width": spec.image_size}
    image_processor = CLIPImageProcessorPil(
        size=size,
        crop_size=size,
        do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


def build_config(spec: BuiltinSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=3 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(spec: BuiltinSpec, seed: int | None = None):
    """A built-in model and its processor (deterministic in ``seed``): randomly initialised, except
    for the MiniLM preset's language model, which holds the pre-trained weights."""
    from transformers import LlavaForConditionalGeneration

    if spec.language_model == "minilm":
        return _build_minilm(spec, seed)
    processor = build_processor(spec)
    config = build_config(spec, processor.tokenizer)
    with _seeded(spec.seed if seed is None else seed):
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor


def _build_minilm(spec: BuiltinSpec, seed: int | None):
    from transformers import LlavaForConditionalGeneration

    from . import minilm

    tokenizer = minilm.build_tokenizer(synthetic.vocabulary())
    processor = build_processor(spec, tokenizer)
    bert_config, state, rows = minilm.pretrained_rows(tokenizer)
    config = build_config(spec, tokenizer)
    config.text_config = minilm.decoder_config(bert_config, len(tokenizer), tokenizer)
    config.tie_word_embeddings = False
    with _seeded(spec.seed if seed is None else seed):
        model = LlavaForConditionalGeneration(config)
    minilm.load_pretrained_language_model(model, rows, state)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tokenizer, k))
    return model, processor


def trainable_in_pretraining(model, spec: BuiltinSpec) -> list[torch.nn.Parameter]:
    """What pre-training trains: everything (from scratch), or for MiniLM everything but the language
    model (vision tower, projector, LM head: LLaVA's stage-1 alignment; the LM stays frozen)."""
    if spec.language_model != "minilm":
        return list(model.parameters())
    frozen = {id(p) for p in model.model.language_model.parameters()}
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    return [p for p in model.parameters() if id(p) not in frozen]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------- pre-training


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def _stop_on_lost_workers() -> Iterator[None]:
    """A SIGTERM to the whole process group also ends the DataLoader's workers; the loader then
    raises here (RuntimeError, or EOFError mid-transfer), which is the requested stop (nothing
    to save: not yet cached)."""
    try:
        yield
    except Exception:
        interrupt.check("while pre-training the built-in model (it is cached only when complete)")
        raise


def pretrain(
    model,
    processor,
    data: synthetic.SyntheticDataset,
    spec: BuiltinSpec,
    *,
    quiet: bool,
    num_workers: int = 1,
) -> list[float]:
    """Train every parameter on the pre-training distribution; returns the loss per step."""
    split = data.splits["train"]
    records, _ = load_captions(data.karpathy, data.image_dir, "train")
    examples = caption_examples(records, BUILTIN_FAMILY.caption_prompt, train=True)
    vqa, _ = load_vqa(split.questions, split.annotations, data.image_dir, prompt=BUILTIN_FAMILY.vqa_prompt)
    examples += vqa
    collate = Collator(processor, BUILTIN_FAMILY.template, end_text(BUILTIN_FAMILY, processor), "train")
    rng = random.Random(spec.seed)
    order: list[int] = []
    batches: list[list[int]] = []
    for _ in range(spec.pretrain_steps):
        if len(order) < spec.pretrain_batch:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order.extend(perm)
        batches.append(order[: spec.pretrain_batch])
        order = order[spec.pretrain_batch :]
    # One worker process prepares the next batches (image decoding, processor) beside the one
    # compute thread: about 15% off the wall time on two cores. Its own generator leaves the
    # global RNG alone.
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        collate_fn=lambda idx: collate([examples[i] for i in idx]),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(spec.seed),
        worker_init_fn=interrupt.init_worker,
    )
    params = trainable_in_pretraining(model, spec)
    opt = torch.optim.AdamW(params, lr=spec.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, spec.pretrain_steps // 20)
    losses = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        with _seeded(spec.seed), _stop_on_lost_workers():
            bar = progress(total=spec.pretrain_steps, desc="pre-training the built-in model", disable=quiet)
            for step, batch in enumerate(loader):
                interrupt.check("while pre-training the built-in model (it is cached only when complete)")
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, spec.pretrain_steps, spec.pretrain_lr, warmup)
                loss = model(**model_inputs(batch, "cpu")).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"built-in pre-training: loss is {loss.item()} at step {step}")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.close()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():  # a saved model carries no frozen flags; the driver sets its own
        p.requires_grad_(True)
    return losses


# ----------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class BuiltinAssets:
    """Where a built (cached) built-in model and its synthetic data live."""

    root: Path
    model_dir: Path
    pretrain_data: synthetic.SyntheticDataset
    downstream_data: synthetic.SyntheticDataset
    spec: BuiltinSpec
    built_now: bool = False
    build_seconds: float = 0.0

    def downstream_files(self) -> dict:
        d = self.downstream_data
        return {
            "image_dir": str(d.image_dir),
            "karpathy": str(d.karpathy),
            # The pre-training distribution, where the representation measures are also taken.
            "pretrain_karpathy": str(self.pretrain_data.karpathy),
            "pretrain_image_dir": str(self.pretrain_data.image_dir),
            **{f"{s}_questions": str(f.questions) for s, f in d.splits.items()},
            **{f"{s}_annotations": str(f.annotations) for s, f in d.splits.items()},
            **{f"{s}_captions": str(f.captions) for s, f in d.splits.items()},
        }


def _datasets(root: Path, spec: BuiltinSpec) -> tuple[synthetic.SyntheticDataset, synthetic.SyntheticDataset]:
    def ds(name: str, sizes: dict[str, int]) -> synthetic.SyntheticDataset:
        base = root / name
        splits = {
            s: synthetic.SplitFiles(
                root=base,
                image_dir=base / "images",
                subtype=f"{s}2014",
                captions=base / f"captions_{s}2014.json",
                questions=base / f"v2_OpenEnded_mscoco_{s}2014_questions.json",
                annotations=base / f"v2_mscoco_{s}2014_annotations.json",
            )
            for s in sizes
        }
        return synthetic.SyntheticDataset(base, base / "images", base / "dataset_coco.json", splits)

    pre = ds("pretrain_data", {"train": spec.pretrain_images})
    down = ds(
        "downstream_data",
        {"train": spec.downstream_train, "val": spec.downstream_val, "test": spec.downstream_test},
    )
    return pre, down


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_pretrained(
    preset: str = "default",
    cache_dir: str | os.PathLike | None = None,
    *,
    quiet: bool = False,
    spec: BuiltinSpec | None = None,
) -> BuiltinAssets:
    """Return the cached built-in model and data, building (and pre-training) them first if needed."""
    if spec is None:
        if preset not in PRESETS:
            raise ValueError(f"--builtin-preset must be one of {sorted(PRESETS)}, got {preset!r}")
        spec = PRESETS[preset]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    root = cache / "builtin" / f"{preset}-{spec.key()}"
    done = root / "DONE"
    start = time.perf_counter()
    built_now = False
    if not done.is_file():
        with _file_lock(cache / "builtin" / f".{root.name}.lock"):
            if not done.is_file():
                _build(root, spec, quiet=quiet)
                built_now = True
    pre, down = _datasets(root, spec)
    return BuiltinAssets(
        root=root,
        model_dir=root / "model",
        pretrain_data=pre,
        downstream_data=down,
        spec=spec,
        built_now=built_now,
        build_seconds=time.perf_counter() - start if built_now else 0.0,
    )


def _build(root: Path, spec: BuiltinSpec, *, quiet: bool) -> None:
    # Under the lock: any temporary folder of this key was left by a killed build.
    for stale in root.parent.glob(f"{root.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    else:
        print(f"[ptpeft] building the built-in model and synthetic data in {root} (once; cached)", flush=True)
    pre = synthetic.write_dataset(
        tmp / "pretrain_data",
        "pretrain",
        {"train": spec.pretrain_images},
        seed=spec.seed,
        image_size=spec.image_size,
    )
    synthetic.write_dataset(
        tmp / "downstream_data",
        "downstream",
        {"train": spec.downstream_train, "val": spec.downstream_val, "test": spec.downstream_test},
        seed=spec.seed + 1,
        image_size=spec.image_size,
    )
    model, processor = build_model(spec)
    losses = pretrain(model, processor, pre, spec, quiet=quiet)
    out = tmp / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_train_meta(out, BUILTIN_FAMILY)
    (out / "ptpeft_builtin.json").write_text(
        json.dumps(
            {
                "recipe_version": RECIPE_VERSION,
                "spec": asdict(spec),
                "pretrain_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                "pretrain_seconds": round(time.perf_counter() - t0, 1),
                "environment": build_environment(),
            },
            indent=2,
        )
    )
    (tmp / "DONE").write_text("ok\n")
    os.replace(tmp, root)


def spec_with(preset: str, **overrides) -> BuiltinSpec:
    """``PRESETS[preset]`` with some fields replaced (``None`` values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"--builtin-preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
