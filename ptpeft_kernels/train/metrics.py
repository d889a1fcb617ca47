"""Task scores: CIDEr-D and BLEU-4 for captions, VQA accuracy for answers.

Captions are scored with the ``pycocoevalcap`` scorers (``Cider`` is CIDEr-D: clipped
counts, Gaussian length penalty with sigma 6, x10) after a pure-Python stand-in for the
PTB tokenizer the COCO toolkit runs through Java: lower-case, split off punctuation and
clitics, drop punctuation tokens. Scores are reported on the scale papers use (x100).

VQA answers are normalised as the official VQAv2 evaluation does (punctuation, number
words to digits, articles dropped, common contractions restored) and scored with
``min(#matching annotators / 3, 1)``, averaged over the ten leave-one-annotator-out
subsets exactly like the official script (so an answer given by 3 of 10 annotators
scores 0.9, by 4 or more 1.0); reported x100.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# --------------------------------------------------------------------------------- captions

# Tokens the COCO caption toolkit removes after PTB tokenisation.
_PTB_PUNCT = {
    "''",
    "'",
    "``",
    "`",
    "-lrb-",
    "-rrb-",
    "-lcb-",
    "-rcb-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
_CLITIC = re.compile(r"(?i)\b(\w+)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_SPLIT = re.compile(r"\.\.\.|--|[\w]+(?:[-'][\w]+)*|n't|'\w+|[^\w\s]")


def ptb_tokenize(text: str) -> str:
    """Lower-cased, space-joined tokens without punctuation, as the COCO toolkit compares them."""
    text = text.replace("\n", " ").replace("\t", " ").lower()
    text = _CLITIC.sub(r"\1 \2", text)
    tokens = _SPLIT.findall(text)
    return " ".join(t for t in tokens if t not in _PTB_PUNCT and t.strip())


def caption_scores(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """CIDEr-D and BLEU-4 (x100) of ``predictions`` {key: caption} against ``references``
    {key: [captions]}; both must have the same keys."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise ValueError(f"predictions and references differ in keys (missing {missing}, extra {extra})")
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    res, gts = {}, {}
    for key in predictions:
        refs = references[key]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{key!r}] must be a non-empty list of captions")
        res[key] = [ptb_tokenize(predictions[key])]
        gts[key] = [ptb_tokenize(r) for r in refs]
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3])}


# --------------------------------------------------------------------------------- VQA

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Contractions written without the apostrophe, restored (lower-case forms of the official list).
_CONTRACTIONS = {
    w.replace("'", ""): w
    for w in [
        "ain't",
        "aren't",
        "can't",
        "could've",
        "couldn't",
        "couldn't've",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hadn't've",
        "hasn't",
        "haven't",
        "he'd",
        "he'd've",
        "he's",
        "how'd",
        "how'll",
        "how's",
        "i'd've",
        "i'm",
        "i've",
        "isn't",
        "it'd",
        "it'd've",
        "it'll",
        "let's",
        "ma'am",
        "mightn't",
        "mightn't've",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "not've",
        "o'clock",
        "oughtn't",
        "shan't",
        "she'd",
        "she'd've",
        "she's",
        "should've",
        "shouldn't",
        "shouldn't've",
        "somebody'd",
        "somebody'll",
        "somebody's",
        "someone'd",
        "someone'll",
        "someone's",
        "something'd",
        "something'll",
        "that's",
        "there'd",
        "there're",
        "there's",
        "they'd",
        "they'll",
        "they're",
        "they've",
        "twas",
        "wasn't",
        "we'd",
        "we've",
        "weren't",
        "what'll",
        "what're",
        "what's",
        "what've",
        "when's",
        "where'd",
        "where's",
        "where've",
        "who'd",
        "who'll",
        "who's",
        "who've",
        "why'll",
        "why're",
        "why's",
        "won't",
        "would've",
        "wouldn't",
        "y'all",
        "you'd",
        "you'll",
        "you're",
        "you've",
    ]
    if "'" in w
}
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# Periods go unless a digit follows ("1.5" stays, "5." loses it), as the official script behaves.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # A mark next to a space, or any mark in a text with a thousands comma, is deleted;
        # otherwise it separates words.
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQAv2 answer normalisation (punctuation, numbers, articles, contractions)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _punctuation(text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotators' ``answers``."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of annotator answers")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(gts[0] == pred)
    accs = []
    for i in range(len(gts)):
        matches = sum(g == pred for j, g in enumerate(gts) if j != i)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_scores(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """Mean VQA accuracy (x100) of ``predictions`` {question_id: answer} against ``references``
    {question_id: [10 answers]}."""
    if set(predictions) != set(references):
        raise ValueError("predictions and references differ in question ids")
    if not predictions:
        raise ValueError("vqa_scores: no predictions to score")
    total = sum(vqa_accuracy(predictions[k], references[k]) for k in predictions)
    return {"VQA-acc": 100.0 * total / len(predictions)}


def task_scores(task: str, predictions: Mapping, references: Mapping) -> dict[str, float]:
    if task == "caption":
        return caption_scores(predictions, references)
    if task == "vqa":
        return vqa_scores(predictions, references)
    raise ValueError(f"task must be 'caption' or 'vqa', got {task!r}")


PRIMARY_METRIC = {"caption": "CIDEr", "vqa": "VQA-acc"}
