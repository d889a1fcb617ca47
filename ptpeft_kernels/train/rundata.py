"""The examples a run trains and evaluates on, and the guarantees about them.

* The evaluation examples never include a training example. A Karpathy file's own
  ``split`` field chooses both sets
  (``--train-split`` / ``--eval-split``); a COCO ``captions_*.json`` or a VQAv2 pair has no
  split field, so an evaluation file (``--val-captions``, ``--val-questions`` +
  ``--val-annotations``) is required, or ``--holdout F`` holds out a fraction of the
  training file's *images* (all their captions / questions), chosen by a hash of the image
  file name: the same images on every machine and for every ``--seed``. A run whose two
  sets still share an image (captions) or an image-and-question (VQA) stops, naming them.
* Evaluation ids (image ids for captions, question ids for VQA) are unique: predictions are
  reported per id, so a duplicate would overwrite another prediction and fewer examples
  would be scored than counted.
* Every image is decodable (:func:`screen_images`): bad files stop the run before any work,
  all of them named, or are skipped under ``--skip-missing`` and counted.

:attr:`RunData.eval_source` says in words where the evaluation examples came from; the
report records it with the scored ids.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .data import Example, caption_examples, is_karpathy, load_captions, load_vqa, read_json
from .images import check_images
from .models import Family


@dataclass
class RunData:
    train: list[Example]
    eval: list[Example]
    missing_train: list[str] = field(default_factory=list)
    missing_eval: list[str] = field(default_factory=list)
    description: str = ""
    eval_source: str = ""
    unreadable_train: list[str] = field(default_factory=list)
    unreadable_eval: list[str] = field(default_factory=list)
    # Samples of the model's pre-training distribution, measured beside the downstream ones.
    rank_pretrain: list[Example] = field(default_factory=list)


def _holdout_names(names: list[str], fraction: float) -> set[str]:
    """The ``ceil(fraction * n)`` names (at least 1, at most n - 1) of smallest hash."""
    distinct = sorted(set(names))
    if len(distinct) < 2:
        raise ValueError(
            f"--holdout {fraction}: the training file has {len(distinct)} image(s); a hold-out needs "
            "at least 2"
        )
    k = min(len(distinct) - 1, max(1, math.ceil(fraction * len(distinct))))
    ranked = sorted(distinct, key=lambda n: hashlib.sha256(f"ptpeft-holdout/{n}".encode()).hexdigest())
    return set(ranked[:k])


def _split_by_image(examples: list[Example], held: set[str]) -> tuple[list[Example], list[Example]]:
    keep = [e for e in examples if Path(e.image_path).name not in held]
    out = [e for e in examples if Path(e.image_path).name in held]
    return keep, out


def _no_split_refusal(flag: str, what: str, path: str) -> ValueError:
    return ValueError(
        f"{what} {path} has no split field, and no evaluation file was given: the run would score the "
        f"examples it trains on. Give {flag}, or --holdout F to hold out a fraction F of its images "
        "(e.g. --holdout 0.05) for evaluation"
    )


def _caption_data(cfg: RunConfig, family: Family, files: dict) -> tuple[list, list, list, list, str, str]:
    prompt = cfg.caption_prompt or family.caption_prompt
    image_dir = cfg.image_dir or files.get("image_dir")
    val_image_dir = cfg.val_image_dir or image_dir
    captions = cfg.captions or files.get("karpathy")
    raw = read_json(captions, "--captions")
    karpathy = is_karpathy(raw)
    if karpathy and cfg.holdout is not None:
        raise ValueError(
            f"--holdout: --captions {captions} is a Karpathy file, which carries its own split; choose the "
            "evaluation images with --eval-split instead"
        )
    train_split = cfg.train_split if karpathy else None
    train_recs, miss_t = load_captions(
        captions, image_dir, train_split, skip_missing=cfg.skip_missing, what="--captions", data=raw
    )
    if cfg.val_captions:
        if cfg.holdout is not None:
            raise ValueError("--holdout and --val-captions both choose the evaluation images; give one")
        val_raw = read_json(cfg.val_captions, "--val-captions")
        # A Karpathy file given as --val-captions holds every split: evaluate on --eval-split of it.
        val_split = cfg.eval_split if is_karpathy(val_raw) else None
        eval_recs, miss_e = load_captions(
            cfg.val_captions,
            val_image_dir,
            val_split,
            skip_missing=cfg.skip_missing,
            what="--val-captions",
            data=val_raw,
        )
        source = f"--val-captions {cfg.val_captions}" + (f" (split {val_split!r})" if val_split else "")
        del val_raw
    elif karpathy:
        eval_recs, miss_e = load_captions(
            captions,
            val_image_dir,
            cfg.eval_split,
            skip_missing=cfg.skip_missing,
            what="--captions",
            data=raw,
        )
        source = f"split {cfg.eval_split!r} of the Karpathy file {captions}"
    elif cfg.holdout is not None:
        held = _holdout_names([Path(r[0]).name for r in train_recs], cfg.holdout)
        eval_recs = [r for r in train_recs if Path(r[0]).name in held]
        train_recs = [r for r in train_recs if Path(r[0]).name not in held]
        miss_e = []
        source = (
            f"--holdout {cfg.holdout}: {len(held)} images of {captions} held out of training (chosen by a "
            "hash of the file name)"
        )
    else:
        raise _no_split_refusal("--val-captions (e.g. captions_val2014.json)", "--captions", captions)
    del raw
    train = caption_examples(train_recs, prompt, train=True)
    evals = caption_examples(eval_recs, prompt, train=False)
    return train, evals, miss_t, miss_e, f"captions {captions}", source


def _vqa_data(cfg: RunConfig, family: Family, files: dict) -> tuple[list, list, list, list, str, str]:
    prompt = cfg.vqa_prompt or family.vqa_prompt
    image_dir = cfg.image_dir or files.get("image_dir")
    val_image_dir = cfg.val_image_dir or image_dir
    q = cfg.questions or files.get("train_questions")
    a = cfg.annotations or files.get("train_annotations")
    if cfg.holdout is not None and (cfg.val_questions or not cfg.questions):
        raise ValueError(
            "--holdout applies to --questions / --annotations without an evaluation pair; "
            + (
                "--val-questions already chooses the evaluation questions"
                if cfg.val_questions
                else "the built-in task has its own evaluation split (--eval-split)"
            )
        )
    train, miss_t = load_vqa(
        q, a, image_dir, prompt=prompt, image_pattern=cfg.image_pattern, skip_missing=cfg.skip_missing
    )
    miss_e: list[str] = []
    if cfg.val_questions:
        evals, miss_e = load_vqa(
            cfg.val_questions,
            cfg.val_annotations,
            val_image_dir,
            prompt=prompt,
            image_pattern=cfg.image_pattern,
            skip_missing=cfg.skip_missing,
            what=("--val-questions", "--val-annotations"),
        )
        source = f"--val-questions {cfg.val_questions} / --val-annotations {cfg.val_annotations}"
    elif cfg.questions:
        if cfg.holdout is None:
            raise _no_split_refusal("--val-questions and --val-annotations", "--questions", q)
        held = _holdout_names([Path(e.image_path).name for e in train], cfg.holdout)
        train, evals = _split_by_image(train, held)
        source = (
            f"--holdout {cfg.holdout}: the {len(evals)} questions on {len(held)} images of {q} held out of "
            "training (images chosen by a hash of the file name)"
        )
    else:
        vq, va = files.get(f"{cfg.eval_split}_questions"), files.get(f"{cfg.eval_split}_annotations")
        evals, miss_e = load_vqa(
            vq,
            va,
            val_image_dir,
            prompt=prompt,
            image_pattern=cfg.image_pattern,
            skip_missing=cfg.skip_missing,
        )
        source = f"split {cfg.eval_split!r} of the built-in task ({vq})"
    return train, evals, miss_t, miss_e, f"VQA {q}", source


def _check_unique_ids(evals: list[Example], task: str, source: str) -> None:
    counts = Counter(e.key for e in evals)
    dup = [(k, n) for k, n in counts.items() if n > 1]
    if dup:
        what = "image id" if task == "caption" else "question_id"
        shown = ", ".join(f"{k!r} ({n} times)" for k, n in dup[:10])
        more = f" and {len(dup) - 10} more" if len(dup) > 10 else ""
        raise ValueError(
            f"evaluation examples ({source}): {len(dup)} {what}s occur more than once: {shown}{more}. "
            "Predictions are reported per id, so duplicates would overwrite each other and fewer examples "
            "would be scored than counted; remove the duplicates"
        )


def _check_disjoint(train: list[Example], evals: list[Example], task: str, source: str) -> None:
    """No evaluation example may be a training example: same image (captions), or same image
    and question (VQA: other questions about a training image are new examples)."""
    if task == "caption":
        seen = {e.image_path for e in train}
        shared = [e.image_path for e in evals if e.image_path in seen]
        what = "images"
    else:
        seen_pairs = {(e.image_path, e.prompt) for e in train}
        shared = [f"{e.image_path} ({e.key})" for e in evals if (e.image_path, e.prompt) in seen_pairs]
        what = "image-and-question pairs"
    if shared:
        shown = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise ValueError(
            f"{len(shared)} of the {len(evals)} evaluation {what} ({source}) are also training examples "
            f"(e.g. {shown}): the scores would be measured on data the model trained on. Evaluate on a "
            "disjoint set (--val-captions / --val-questions, another --eval-split, or --holdout)"
        )


def load_run_data(cfg: RunConfig, family: Family, builtin_files: dict | None) -> RunData:
    """Training and evaluation examples of the configured task (the built-in task's files by default)."""
    files = builtin_files or {}
    if cfg.task == "caption":
        train, evals, miss_t, miss_e, desc, source = _caption_data(cfg, family, files)
    else:
        train, evals, miss_t, miss_e, desc, source = _vqa_data(cfg, family, files)
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        evals = evals[: cfg.max_eval_samples]
        source += f", first {cfg.max_eval_samples}"
    if not train:
        raise ValueError(f"no training examples in {desc} (split {cfg.train_split!r})")
    if not evals:
        raise ValueError(f"no evaluation examples in {source}")
    _check_unique_ids(evals, cfg.task, source)
    _check_disjoint(train, evals, cfg.task, source)
    data = RunData(train, evals, miss_t, miss_e, desc, source)
    data.rank_pretrain = _rank_pretrain_examples(cfg, family, files)
    return data


def _rank_pretrain_examples(cfg: RunConfig, family: Family, files: dict) -> list[Example]:
    """The first --rank-samples captions of the pre-training distribution (none when unknown)."""
    path = cfg.rank_pretrain_captions or files.get("pretrain_karpathy")
    if not path or not cfg.rank_samples:
        return []
    default_dir = (cfg.image_dir or files.get("image_dir")) if cfg.rank_pretrain_captions else None
    img = cfg.rank_pretrain_image_dir or default_dir or files["pretrain_image_dir"]
    recs, _ = load_captions(path, img, "train", what="--rank-pretrain-captions")
    prompt = cfg.caption_prompt or family.caption_prompt
    return caption_examples(recs[: cfg.rank_samples], prompt, train=False)


def screen_images(data: RunData, *, skip: bool, show: bool) -> RunData:
    """Decode every image of ``data`` once; bad ones stop the run (``ValueError`` naming every
    file) or, with ``skip``, their examples are dropped and recorded in ``data.unreadable_*``."""
    bad = check_images([e.image_path for e in data.train + data.eval + data.rank_pretrain], show=show)
    if not bad:
        return data
    if not skip:
        listing = "\n".join(f"  {p}: {why}" for p, why in bad.items())
        raise ValueError(
            f"{len(bad)} image file(s) cannot be read:\n{listing}\nReplace or remove them, or pass "
            "--skip-missing to skip the records that use them (counted in report.json)"
        )

    def drop(examples: list[Example]) -> tuple[list[Example], list[str]]:
        kept = [e for e in examples if e.image_path not in bad]
        dropped = [f"{e.key}: {e.image_path} ({bad[e.image_path]})" for e in examples if e.image_path in bad]
        return kept, dropped

    data.train, data.unreadable_train = drop(data.train)
    data.eval, data.unreadable_eval = drop(data.eval)
    data.rank_pretrain, dropped_pretrain = drop(data.rank_pretrain)
    data.unreadable_eval += dropped_pretrain  # measured like evaluation samples
    if not data.train:
        raise ValueError(f"no training examples left after skipping {len(bad)} unreadable images")
    if not data.eval:
        raise ValueError(f"no evaluation examples left after skipping {len(bad)} unreadable images")
    return data
