"""Deterministic synthetic "shapes" data in the COCO / VQAv2 file formats.

Images are a 3 x 3 grid of cells with one to four coloured shapes (circle, square,
triangle) of two sizes. Two *distributions* share the vocabulary but differ in what the
images look like and in how they are described, so that adapting a model pre-trained on
one to the other is a real distribution shift:

``pretrain``  black background, one or two shapes, captions such as
              "a small red circle at the top left and a blue square in the center .",
              questions about colour and position only.
``downstream`` dark slate background, one to four shapes, count-first captions such as
              "two shapes : a red circle top left , a blue square center .",
              and also counting, yes/no and "what shape" questions.

Everything is written to disk in the formats of the real data sets so that the very
loaders used for COCO / VQAv2 serve it (:func:`write_split`): images as
``<root>/images/<subtype>/COCO_<subtype>_<id:012d>.jpg``, a Karpathy ``dataset_coco.json``,
``captions_<subtype>.json`` files and VQAv2 ``v2_OpenEnded_mscoco_<subtype>_questions.json``
/ ``v2_mscoco_<subtype>_annotations.json`` pairs. A given ``(seed, distribution, split,
index)`` always yields the same image and texts (string-seeded ``random.Random``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 45, 45),
    "green": (45, 185, 70),
    "blue": (55, 90, 235),
    "yellow": (235, 215, 45),
    "purple": (160, 70, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Grid cell -> (row word, column word); None where the phrase omits that axis.
ROWS = ("top", None, "bottom")
COLS = ("left", None, "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
DISTRIBUTIONS = ("pretrain", "downstream")

# Prompts of the built-in model; their words are in the tokenizer's vocabulary.
CAPTION_PROMPT = "describe the image ."
VQA_PROMPT = "question : {question} answer :"


def position_words(cell: int) -> str:
    """'top left', 'top', 'center', ... for a cell index 0..8 (row-major)."""
    row, col = ROWS[cell // 3], COLS[cell % 3]
    words = [w for w in (row, col) if w is not None]
    return " ".join(words) if words else "center"


def position_phrase(cell: int) -> str:
    """The pre-training captions' prepositional phrase: 'at the top left', 'in the center', 'on the left'."""
    pos = position_words(cell)
    if pos == "center":
        return "in the center"
    if pos in ("left", "right"):
        return f"on the {pos}"
    return f"at the {pos}"


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    cell: int


@dataclass(frozen=True)
class SceneSpec:
    """What one distribution's images look like."""

    background: tuple[int, int, int]
    min_shapes: int
    max_shapes: int


SCENES = {
    "pretrain": SceneSpec(background=(0, 0, 0), min_shapes=1, max_shapes=2),
    "downstream": SceneSpec(background=(48, 48, 56), min_shapes=1, max_shapes=4),
}


def _rng(seed: int, distribution: str, split: str, index: int) -> random.Random:
    return random.Random(f"ptpeft-shapes/{seed}/{distribution}/{split}/{index}")


def sample_scene(rng: random.Random, distribution: str) -> list[Shape]:
    spec = SCENES[distribution]
    count = rng.randint(spec.min_shapes, spec.max_shapes)
    cells = sorted(rng.sample(range(9), count))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), c) for c in cells]


def render(shapes: Iterable[Shape], distribution: str, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene; colours and centres are jittered a little so pixels are not memorised."""
    background = SCENES[distribution].background
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    for s in shapes:
        row, col = divmod(s.cell, 3)
        jitter = cell * 0.08
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        half = cell * (0.22 if s.size == "small" else 0.42)
        color = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLORS[s.color])
        box = (cx - half, cy - half, cx + half, cy + half)
        if s.shape == "circle":
            draw.ellipse(box, fill=color)
        elif s.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    return img


# ----------------------------------------------------------------------------------- texts


def _pretrain_caption(shapes: list[Shape], rng: random.Random, variant: int) -> str:
    order = list(shapes)
    if variant % 2 == 1:
        rng.shuffle(order)
    parts = []
    for s in order:
        size = "" if variant >= 3 else f"{s.size} "
        parts.append(f"a {size}{s.color} {s.shape} {position_phrase(s.cell)}")
    return " and ".join(parts) + " ."


def _downstream_caption(shapes: list[Shape], rng: random.Random, variant: int) -> str:
    n = len(shapes)
    head = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} :"
    order = list(shapes)
    if variant == 4:
        rng.shuffle(order)
    parts = []
    for s in order:
        size = f"{s.size} " if variant in (2, 3) else ""
        parts.append(f"a {size}{s.color} {s.shape} {position_words(s.cell)}")
    return f"{head} {' , '.join(parts)} ."


def captions(shapes: list[Shape], distribution: str, rng: random.Random, count: int = 5) -> list[str]:
    """``count`` reference captions (COCO has five per image) in the distribution's style."""
    make = _pretrain_caption if distribution == "pretrain" else _downstream_caption
    return [make(shapes, rng, v) for v in range(count)]


def questions(shapes: list[Shape], distribution: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, answer_type) triples about the scene, two or three per image."""
    out: list[tuple[str, str, str]] = []
    by_shape: dict[str, list[Shape]] = {}
    for s in shapes:
        by_shape.setdefault(s.shape, []).append(s)
    unique = [s for s in shapes if len(by_shape[s.shape]) == 1]
    if unique:
        s = rng.choice(unique)
        out.append((f"what color is the {s.shape} ?", s.color, "other"))
    s = rng.choice(shapes)
    out.append((f"where is the {s.color} {s.shape} ?", position_words(s.cell), "other"))
    if distribution == "pretrain":
        return out
    kind = rng.randrange(4)
    if kind == 0:
        out.append(("how many shapes are there ?", str(len(shapes)), "number"))
    elif kind == 1:
        color = rng.choice(list(COLORS))
        n = sum(s.color == color for s in shapes)
        out.append((f"how many {color} shapes are there ?", str(n), "number"))
    elif kind == 2:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        yes = any(s.color == color and s.shape == shape for s in shapes)
        out.append((f"is there a {color} {shape} ?", "yes" if yes else "no", "yes/no"))
    else:
        s = rng.choice(shapes)
        out.append((f"what shape is {position_phrase(s.cell)} ?", s.shape, "other"))
    return out


def annotator_answers(answer: str, rng: random.Random) -> list[str]:
    """Ten annotator answers, as in VQAv2: mostly the truth, numbers sometimes spelled out."""
    answers = []
    for _ in range(10):
        if answer.isdigit() and rng.random() < 0.3:
            answers.append(NUMBER_WORDS[int(answer)])
        else:
            answers.append(answer)
    return answers


def vocabulary() -> list[str]:
    """Every word the generator and the built-in prompts can produce (sorted, deterministic)."""
    words = set(COLORS) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS)
    words |= {w for w in ROWS + COLS if w} | {"center"}
    words |= {"a", "the", "at", "in", "on", "and", "shape", "shapes", ".", ",", ":", "?"}
    words |= {"what", "color", "is", "where", "how", "many", "are", "there", "yes", "no"}
    words |= set(CAPTION_PROMPT.split()) | set(VQA_PROMPT.replace("{question}", "").split())
    words |= {str(i) for i in range(10)}
    return sorted(words)


# ----------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SplitFiles:
    """Paths of one written split, in the real data sets' layouts."""

    root: Path
    image_dir: Path
    subtype: str
    captions: Path
    questions: Path
    annotations: Path


def image_file_name(subtype: str, image_id: int) -> str:
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def _dump_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_split(
    root: str | os.PathLike,
    distribution: str,
    split: str,
    num_images: int,
    *,
    seed: int = 0,
    image_size: int = 48,
    first_id: int = 1,
    karpathy_split: str | None = None,
) -> tuple[SplitFiles, list[dict]]:
    """Write ``num_images`` images of ``distribution`` and their texts for one split.

    Returns the files (``captions_<subtype>.json``, the VQAv2 pair) and the Karpathy image
    entries, which :func:`write_dataset` gathers into one ``dataset_coco.json``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")
    root = Path(root)
    subtype = f"{split}2014"
    image_dir = root / "images"
    (image_dir / subtype).mkdir(parents=True, exist_ok=True)
    coco_images, coco_anns, karpathy, vqa_qs, vqa_anns = [], [], [], [], []
    for i in range(num_images):
        rng = _rng(seed, distribution, split, i)
        image_id = first_id + i
        shapes = sample_scene(rng, distribution)
        name = image_file_name(subtype, image_id)
        img = render(shapes, distribution, image_size, rng)
        # Chroma kept at full resolution: 4:2:0 subsampling would smear the colours of small shapes.
        img.save(image_dir / subtype / name, quality=95, subsampling=0)
        refs = captions(shapes, distribution, rng)
        coco_images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
        sentences = []
        for k, text in enumerate(refs):
            sent_id = image_id * len(refs) + k  # unique across splits, as in COCO
            coco_anns.append({"image_id": image_id, "id": sent_id, "caption": text})
            sentences.append({"tokens": text.split(), "raw": text, "imgid": i, "sentid": sent_id})
        karpathy.append(
            {
                "filepath": subtype,
                "filename": name,
                "imgid": i,
                "split": karpathy_split or split,
                "sentences": sentences,
                "cocoid": image_id,
                "sentids": [s["sentid"] for s in sentences],
            }
        )
        for j, (q, a, atype) in enumerate(questions(shapes, distribution, rng)):
            qid = image_id * 10 + j
            vqa_qs.append({"image_id": image_id, "question": q, "question_id": qid})
            answers = annotator_answers(a, rng)
            vqa_anns.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": " ".join(q.split()[:2]),
                    "answer_type": atype,
                    "multiple_choice_answer": a,
                    "answers": [
                        {"answer": ans, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, ans in enumerate(answers)
                    ],
                }
            )
    info = {"description": f"ptpeft_kernels synthetic shapes ({distribution}, seed {seed})"}
    files = SplitFiles(
        root=root,
        image_dir=image_dir,
        subtype=subtype,
        captions=root / f"captions_{subtype}.json",
        questions=root / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
        annotations=root / f"v2_mscoco_{subtype}_annotations.json",
    )
    _dump_json(files.captions, {"info": info, "images": coco_images, "annotations": coco_anns})
    common = {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype}
    _dump_json(files.questions, {**common, "questions": vqa_qs})
    _dump_json(files.annotations, {**common, "annotations": vqa_anns})
    return files, karpathy


@dataclass(frozen=True)
class SyntheticDataset:
    """A written synthetic data set: the Karpathy file plus per-split files."""

    root: Path
    image_dir: Path
    karpathy: Path
    splits: dict[str, SplitFiles]


def write_dataset(
    root: str | os.PathLike,
    distribution: str,
    sizes: dict[str, int],
    *,
    seed: int = 0,
    image_size: int = 48,
) -> SyntheticDataset:
    """Write every split of ``sizes`` ({"train": n, "val": m, ...}) under ``root``.

    Image ids are unique across splits. ``dataset_coco.json`` lists every image with its
    Karpathy split (the split name itself).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    karpathy_images: list[dict] = []
    splits: dict[str, SplitFiles] = {}
    first_id = 1
    for split, n in sizes.items():
        files, entries = write_split(
            root, distribution, split, n, seed=seed, image_size=image_size, first_id=first_id
        )
        for e in entries:
            e["imgid"] = len(karpathy_images)
            for s in e["sentences"]:
                s["imgid"] = e["imgid"]
            karpathy_images.append(e)
        splits[split] = files
        first_id += n
    karpathy_path = root / "dataset_coco.json"
    _dump_json(karpathy_path, {"dataset": "coco", "images": karpathy_images})
    return SyntheticDataset(root=root, image_dir=root / "images", karpathy=karpathy_path, splits=splits)
