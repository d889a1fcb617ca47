"""COCO captioning and VQAv2 loaders, and collation through the model's own processor.

Formats (exactly those of the public releases):

* Karpathy ``dataset_coco.json``: ``{"images": [{"filepath", "filename", "split",
  "cocoid", "sentences": [{"raw"}]}]}``; splits ``train`` (+ ``restval``), ``val``, ``test``.
  Image: ``<image_dir>/<filepath>/<filename>`` or ``<image_dir>/<filename>``.
* COCO ``captions_<subtype>.json``: ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``; one file per split. Image: ``<image_dir>/<file_name>`` or
  ``<image_dir>/<subtype>/<file_name>`` (subtype read from ``COCO_<subtype>_<id>.jpg``).
* VQAv2: a questions file ``{"data_subtype", "questions": [{"image_id", "question",
  "question_id"}]}`` and an annotations file ``{"annotations": [{"question_id",
  "multiple_choice_answer", "answers": [{"answer"}]}]}``. Image: ``--image-pattern`` (a
  ``str.format`` pattern with ``{image_id}`` and ``{data_subtype}``) relative to the image
  folder, by default ``<subtype>/COCO_<subtype>_<id:012d>.jpg`` or the same file directly
  in the folder.

Malformed files raise ``ValueError`` naming the file and the missing key; a missing image
raises ``FileNotFoundError`` naming the image and its record unless ``skip_missing`` is set,
in which case the record is dropped and counted (``.missing``). Whether the images that exist
can be decoded is checked separately, for every image of a run at once (:mod:`.images`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One item: an image, the task prompt (before the model family's template) and texts.

    ``target`` is the training answer / caption; ``references`` the evaluation references
    (all captions of the image, or the ten VQA answers); ``key`` the image id (captioning)
    or question id (VQA) the prediction is reported under.
    """

    image_path: str
    prompt: str
    target: str
    references: tuple[str, ...]
    key: int | str


@dataclass
class LoadedData:
    """Records of one split, the annotation files they came from, and skipped records."""

    examples: list[Example]
    source: str
    missing: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- json


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse ``path``; errors name ``what`` (e.g. "--captions") and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from None


def _get(obj: Any, key: str, path: Path | str, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{path}: {where} has no key {key!r}")
    return obj[key]


def _list(obj: Any, key: str, path: Path | str, where: str) -> list:
    value = _get(obj, key, path, where)
    if not isinstance(value, list):
        raise ValueError(f"{path}: {where} key {key!r} must be a list, got {type(value).__name__}")
    return value


_SUBTYPE = re.compile(r"^COCO_([A-Za-z]+\d*)_\d+\.\w+$")


def _resolve(candidates: Sequence[Path]) -> Path | None:
    for c in candidates:
        if c.is_file():
            return c
    return None


class _MissingImages:
    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.records: list[str] = []

    def handle(self, candidates: Sequence[Path], record: str) -> Path | None:
        found = _resolve(candidates)
        if found is not None:
            return found
        tried = ", ".join(str(c) for c in candidates)
        if not self.skip:
            raise FileNotFoundError(
                f"image not found for {record}: tried {tried} (pass --skip-missing to skip such records)"
            )
        self.records.append(f"{record}: {candidates[0]}")
        return None


# ----------------------------------------------------------------------------------- captions

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def is_karpathy(data: Any) -> bool:
    """A Karpathy ``dataset_coco.json`` keeps its captions (and a ``split`` field) inside each
    image; a COCO ``captions_*.json`` keeps them under a top-level ``annotations`` list."""
    return isinstance(data, dict) and "annotations" not in data


def load_captions(
    path: str | os.PathLike,
    image_dir: str | os.PathLike,
    split: str | None = None,
    *,
    skip_missing: bool = False,
    what: str = "--captions",
    data: Any = None,
) -> tuple[list[tuple[str, list[str], int]], list[str]]:
    """Read a Karpathy ``dataset_coco.json`` (``split`` selects train/val/test) or a COCO
    ``captions_*.json`` (the whole file; ``split`` ignored). ``data``: the file's parsed JSON,
    when the caller has read it already.

    Returns ``([(image_path, captions, image_id)], missing_records)``.
    """
    path = Path(path)
    image_dir = Path(image_dir)
    if data is None:
        data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    images = _list(data, "images", path, "the top level")
    missing = _MissingImages(skip_missing)
    out: list[tuple[str, list[str], int]] = []
    if is_karpathy(data):
        if split is not None and split not in KARPATHY_SPLITS:
            raise ValueError(f"split must be one of {sorted(KARPATHY_SPLITS)} for {path}, got {split!r}")
        wanted = KARPATHY_SPLITS[split] if split else None
        for i, img in enumerate(images):
            where = f"images[{i}]"
            fname = _get(img, "filename", path, where)
            img_split = _get(img, "split", path, where)
            if wanted is not None and img_split not in wanted:
                continue
            sentences = _list(img, "sentences", path, where)
            caps = [str(_get(s, "raw", path, f"{where}.sentences[{j}]")) for j, s in enumerate(sentences)]
            image_id = img.get("cocoid", img.get("imgid", i))
            fp = img.get("filepath", "")
            cands = [image_dir / fp / fname, image_dir / fname] if fp else [image_dir / fname]
            found = missing.handle(cands, f"{path.name} images[{i}] (cocoid {image_id}, {fname})")
            if found is not None and caps:
                out.append((str(found), caps, int(image_id)))
        return out, missing.records
    # COCO captions_*.json
    anns = _list(data, "annotations", path, "the top level")
    by_image: dict[int, list[str]] = {}
    for j, a in enumerate(anns):
        where = f"annotations[{j}]"
        by_image.setdefault(_get(a, "image_id", path, where), []).append(str(_get(a, "caption", path, where)))
    for i, img in enumerate(images):
        where = f"images[{i}]"
        image_id = _get(img, "id", path, where)
        fname = _get(img, "file_name", path, where)
        cands = [image_dir / fname]
        m = _SUBTYPE.match(Path(fname).name)
        if m:
            cands.append(image_dir / m.group(1) / fname)
        found = missing.handle(cands, f"{path.name} images[{i}] (id {image_id}, {fname})")
        if found is not None and by_image.get(image_id):
            out.append((str(found), by_image[image_id], int(image_id)))
    return out, missing.records


def caption_examples(records: list[tuple[str, list[str], int]], prompt: str, *, train: bool) -> list[Example]:
    """Training: one example per (image, caption). Evaluation: one per image, all captions as refs."""
    out = []
    for image_path, caps, image_id in records:
        refs = tuple(caps)
        if train:
            out.extend(Example(image_path, prompt, c, refs, image_id) for c in caps)
        else:
            out.append(Example(image_path, prompt, caps[0], refs, image_id))
    return out


# ----------------------------------------------------------------------------------- VQA


def load_vqa(
    questions_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    prompt: str,
    image_pattern: str | None = None,
    skip_missing: bool = False,
    what: tuple[str, str] = ("--questions", "--annotations"),
) -> tuple[list[Example], list[str]]:
    """Read a VQAv2 questions + annotations pair; ``prompt`` is a pattern with ``{question}``.

    Each example's target is the ``multiple_choice_answer``; its references are the
    annotators' ``answers``. Questions without an annotation are an error (the files do
    not belong together).
    """
    qpath, apath, image_dir = Path(questions_path), Path(annotations_path), Path(image_dir)
    qdata = read_json(qpath, what[0])
    adata = read_json(apath, what[1])
    questions = _list(qdata, "questions", qpath, "the top level")
    annotations = _list(adata, "annotations", apath, "the top level")
    subtype = qdata.get("data_subtype", "") if isinstance(qdata, dict) else ""
    by_qid: dict[Any, dict] = {}
    first_at: dict[Any, int] = {}
    for j, a in enumerate(annotations):
        qid = _get(a, "question_id", apath, f"annotations[{j}]")
        if qid in by_qid:
            # The later one would silently replace the earlier one's answers.
            raise ValueError(
                f"{apath}: question_id {qid!r} is annotated twice (annotations[{first_at[qid]}] and "
                f"annotations[{j}]); keep one"
            )
        by_qid[qid], first_at[qid] = a, j
    missing = _MissingImages(skip_missing)
    out: list[Example] = []
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        qid = _get(q, "question_id", qpath, where)
        image_id = _get(q, "image_id", qpath, where)
        text = str(_get(q, "question", qpath, where))
        if qid not in by_qid:
            raise ValueError(f"{apath}: no annotation with question_id {qid!r} (asked in {qpath} {where})")
        ann = by_qid[qid]
        awhere = f"the annotation of question_id {qid}"
        answers = [
            str(_get(a, "answer", apath, f"{awhere} answers[{k}]"))
            for k, a in enumerate(_list(ann, "answers", apath, awhere))
        ]
        target = str(ann.get("multiple_choice_answer") or (answers[0] if answers else ""))
        if not target:
            raise ValueError(f"{apath}: {awhere} has no key 'multiple_choice_answer' and no answers")
        if image_pattern:
            try:
                rel = image_pattern.format(image_id=image_id, data_subtype=subtype)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"--image-pattern {image_pattern!r}: cannot format with image_id and data_subtype ({exc})"
                ) from None
            cands = [image_dir / rel]
        else:
            name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
            cands = [image_dir / subtype / name, image_dir / name]
        found = missing.handle(cands, f"{qpath.name} {where} (question_id {qid}, image_id {image_id})")
        if found is None:
            continue
        out.append(Example(str(found), prompt.format(question=text), target, tuple(answers or [target]), qid))
    return out, missing.records


# ----------------------------------------------------------------------------------- collation


class UnreadableImageError(ValueError):
    """An image file exists but cannot be opened or decoded (corrupt, truncated, not an image)."""


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB; a file PIL cannot read raises :class:`UnreadableImageError`
    naming it (PIL's own message for a truncated JPEG does not)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(
            f"cannot read image {path}: {type(exc).__name__}: {exc} (the run checks every image before "
            "training; this file changed since, or the check was skipped)"
        ) from None


class Collator:
    """Turns a list of :class:`Example` into model inputs with the model's own processor.

    ``mode="train"``: right padding, the prompt formatted by ``template`` followed by
    ``" " + target + end_text``; labels are the input ids with the prompt part (as the
    processor tokenises the prompt alone, so image-token expansion is counted) and padding
    set to -100. ``mode="generate"``: left padding, prompts only; the batch also carries
    ``"keys"`` and ``"references"`` (Python lists, not tensors) for scoring.
    """

    def __init__(self, processor: Any, template: str, end_text: str, mode: str) -> None:
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        if "{prompt}" not in template:
            raise ValueError(f"template must contain '{{prompt}}', got {template!r}")
        self.processor = processor
        self.template = template
        self.end_text = end_text
        self.mode = mode

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def _call(self, images: list, texts: list[str], side: str) -> dict:
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = side
        try:
            return self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = old

    def __call__(self, batch: list[Example]) -> dict:
        images = [load_image(e.image_path) for e in batch]
        prompts = [self.template.format(prompt=e.prompt) for e in batch]
        if self.mode == "generate":
            enc = dict(self._call(images, prompts, "left"))
            enc["keys"] = [e.key for e in batch]
            enc["references"] = [list(e.references) for e in batch]
            return enc
        full = [f"{p} {e.target}{self.end_text}" for p, e in zip(prompts, batch, strict=False)]
        enc = dict(self._call(images, full, "right"))
        prompt_ids = self._call(images, prompts, "right")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.clone()
        p_ids, p_mask = prompt_ids["input_ids"], prompt_ids["attention_mask"]
        for i in range(ids.shape[0]):
            plen = int(p_mask[i].sum())
            # The prompt must tokenise to a prefix of prompt + target; where a tokenizer merges
            # across the boundary, the label starts after the longest common prefix.
            n = min(plen, ids.shape[1])
            same = (ids[i, :n] == p_ids[i, :n]).long().cumprod(0).sum().item()
            labels[i, : int(same)] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        enc["labels"] = labels
        return enc


def model_inputs(batch: dict, device: torch.device | str) -> dict:
    """The tensor entries of a collated batch, moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
