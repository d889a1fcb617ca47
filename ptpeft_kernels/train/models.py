"""Model families the driver knows: how to load them and how to prompt them.

A *family* is a ``transformers`` ``model_type`` with a prompt template (where the image
goes and where the answer starts) and default task prompts. A checkpoint directory may
carry its own templates in ``ptpeft_train.json`` (the built-in model does), which win.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

TRAIN_META = "ptpeft_train.json"


@dataclass(frozen=True)
class Family:
    """``template`` wraps the task prompt (``{prompt}``); ``end`` closes a training target
    (``None``: the tokenizer's EOS token)."""

    template: str
    caption_prompt: str
    vqa_prompt: str
    end: str | None = None


_BLIP = Family("{prompt}", "a photo of", "Question: {question} Short answer:")
_LLAVA = Family(
    "USER: <image>\n{prompt} ASSISTANT:",
    "Provide a one-sentence caption for the provided image.",
    "{question}\nAnswer the question using a single word or phrase.",
)
_QWEN = Family(
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "Provide a one-sentence caption for the provided image.",
    "{question}\nAnswer the question using a single word or phrase.",
    end="<|im_end|>",
)

FAMILIES: dict[str, Family] = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "blip-2": _BLIP,
    "instructblip": _BLIP,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
}


def read_model_type(path: str | os.PathLike) -> str:
    cfg = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model: {path} is not a directory (a local Hugging Face checkpoint)")
    if not cfg.is_file():
        raise FileNotFoundError(
            f"--model: {path} has no config.json; is it a Hugging Face checkpoint directory?"
        )
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model: {cfg} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"--model: {cfg} has no key 'model_type'")
    return str(data["model_type"])


def family_for(path: str | os.PathLike) -> tuple[str, Family]:
    """The family of the checkpoint at ``path``; its own ``ptpeft_train.json`` templates win."""
    model_type = read_model_type(path)
    meta = Path(path) / TRAIN_META
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
            fam = Family(
                **{k: data[k] for k in ("template", "caption_prompt", "vqa_prompt")}, end=data.get("end")
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"--model: {meta} is malformed ({exc!r})") from None
        return model_type, fam
    if model_type not in FAMILIES:
        raise ValueError(
            f"--model: model family {model_type!r} (from {path}/config.json) is not supported by the "
            f"training driver; valid families: {', '.join(sorted(FAMILIES))}"
        )
    return model_type, FAMILIES[model_type]


def write_train_meta(path: str | os.PathLike, family: Family) -> None:
    (Path(path) / TRAIN_META).write_text(json.dumps(asdict(family), indent=2))


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load any image-text-to-text checkpoint from a local directory (never downloads)."""
    from transformers import AutoModelForImageTextToText

    from . import minilm  # noqa: F401 - registers the built-in MiniLM preset's language-model type

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True)


class MissingDependencyError(ImportError):
    """A package the checkpoint's processor or model needs is not installed; the message says
    which one and how to install it."""


def load_processor(path: str | os.PathLike) -> Any:
    """The checkpoint's own processor (``AutoProcessor``); a missing optional package (Qwen2-VL's
    video processor needs torchvision) raises :class:`MissingDependencyError` naming it."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except ImportError as exc:
        text = str(exc)
        if "torchvision" in text.lower():
            raise MissingDependencyError(
                f"--model {path}: its processor needs torchvision, which is not installed "
                f"({text.strip().splitlines()[0]}). Install the torchvision release built for torch "
                f"{torch.__version__.split('+')[0]} (pip install torchvision, from the same package index "
                "as torch; for a CPU-only torch, its CPU build)"
            ) from None
        raise MissingDependencyError(
            f"--model {path}: loading its processor needs a missing package: {text}"
        ) from None


def end_text(family: Family, processor: Any) -> str:
    if family.end is not None:
        return family.end
    tok = getattr(processor, "tokenizer", processor)
    return tok.eos_token or ""


# ----------------------------------------------------------------------------------- identity


def fingerprint(model: torch.nn.Module) -> dict:
    """A compact identity of a base model: its type, every parameter's name and shape (hashed),
    and a probe of values from a spread of parameters (compared with a tolerance, so the same
    weights loaded in another dtype still match)."""
    params = list(model.named_parameters())
    shapes = hashlib.sha256("\n".join(f"{n}:{tuple(p.shape)}" for n, p in params).encode()).hexdigest()[:16]
    step = max(1, len(params) // 16)
    probe = {}
    with torch.no_grad():
        for name, p in params[::step]:
            flat = p.detach().reshape(-1)
            probe[name] = [float(v) for v in flat[:8].float().cpu()] + [
                float(flat.float().abs().mean().cpu())
            ]
    return {
        "model_type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        "num_params": sum(p.numel() for _, p in params),
        "shapes": shapes,
        "probe": probe,
    }


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """``None`` if the fingerprints name the same base model, else the reason they do not."""
    if expected.get("model_type") != actual.get("model_type"):
        return f"model type {actual.get('model_type')!r} != {expected.get('model_type')!r}"
    if expected.get("shapes") != actual.get("shapes") or expected.get("num_params") != actual.get(
        "num_params"
    ):
        return (
            f"different architecture ({actual.get('num_params')} parameters vs {expected.get('num_params')}, "
            "or different parameter names/shapes)"
        )
    for name, ref in expected.get("probe", {}).items():
        got = actual.get("probe", {}).get(name)
        if got is None or len(got) != len(ref):
            return f"parameter {name} missing"
        for a, b in zip(got, ref, strict=False):
            if abs(a - b) > 1e-2 * abs(b) + 1e-6:  # bf16 rounding is ~4e-3 relative
                return f"different weights (parameter {name}: {a:.6g} vs {b:.6g})"
    return None
