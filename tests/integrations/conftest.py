"""Shared fixtures: one tiny model per family and worker, handed out as deep copies.

Building a model costs ~0.1 s and the first forward pass of a family a few hundred ms of
lazy set-up; caching per worker keeps the whole directory well inside its time budget.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.tiny import FAMILIES, family_kind, tiny_inputs, tiny_model

# Every family of issue 3 that routes its attention through the registry (GIT does not: tested apart).
SUPPORTED = [f for f in FAMILIES if f != "git"]
GENERATIVE = [f for f in SUPPORTED if family_kind(f) != "encoder"]
# Families whose own (eager) generation gives a left-padded row the same logits as the row alone:
# Kosmos-2 and Florence-2's BART encoder count positions from the padded start (0.23 / 1e-3 apart).
LEFT_PAD_FAITHFUL = [f for f in GENERATIVE if f not in ("kosmos2", "florence2")]
PRIORITY = ["llama", "qwen2", "opt", "bert", "llava", "blip2", "qwen2_vl"]

_cache: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: with two xdist workers on two cores, two OpenMP threads each spin against each
    # other (LLaVA forward 137 ms vs 3.3 ms with one thread, measured on the 2-core CI machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # transformers' deprecation chatter (is_gradient_checkpointing, ...) is not what these tests check.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def base_model(family: str) -> torch.nn.Module:
    """A fresh deep copy of the cached tiny model of ``family`` (eval mode, seed 0)."""
    if family not in _cache:
        _cache[family] = tiny_model(family)
    return copy.deepcopy(_cache[family])


def forward_inputs(family: str, pads=(0, 2), seed: int = 0) -> dict:
    """Inputs for a training-style forward (seq2seq models get decoder_input_ids)."""
    batch = tiny_inputs(family, batch=len(pads), pads=list(pads), seed=seed)
    if family_kind(family) == "seq2seq":
        g = torch.Generator().manual_seed(seed + 1)
        batch["decoder_input_ids"] = torch.randint(3, 100, (len(pads), 4), generator=g)
    return batch


def valid_positions(family: str, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Bool mask over logits' (B, T) positions that are real tokens (pad-position outputs are arbitrary)."""
    if family_kind(family) == "seq2seq":
        return torch.ones(logits.shape[:2], dtype=torch.bool)
    return batch["attention_mask"].bool()


def randomize_added(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give the zero-initialised parts (LoRA B, adapter up) and prefixes non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pk.LoRALinear):
                m.lora_B.weight.normal_(0.0, std, generator=g)
            elif isinstance(m, pk.BottleneckAdapter):
                m.up.weight.normal_(0.0, std, generator=g)
                m.up.bias.normal_(0.0, std, generator=g)
        bank = getattr(model, "ptpeft_prefix", None)
        if bank is not None:
            for p in bank.parameters():
                p.normal_(0.0, 0.5, generator=g)


def apply_method(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """Apply one of the four set-ups the family tests cover."""
    if method in ("prefix", "prefix+lora"):
        pk.apply_prefix(model, num_prefix=3, reparam_hidden=16)
    if method in ("lora", "prefix+lora"):
        pk.apply_lora(model, r=4, alpha=8)
    if method == "adapter":
        pk.apply_adapter(model, bottleneck=4, placement="houlsby")
    return model


_ROW_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "image_embeds_position_mask",
    "token_type_ids",
)


def select_row(family: str, batch: dict, i: int, pad: int) -> dict:
    """Row ``i`` of a left-padded batch, without its ``pad`` padding tokens (and its own image)."""
    row = {}
    for key, value in batch.items():
        if key in _ROW_KEYS:
            row[key] = value[i : i + 1, pad:]
        elif key == "pixel_values" and family.startswith("qwen"):
            per = value.shape[0] // batch["input_ids"].shape[0]  # patches are flattened over the batch
            row[key] = value[i * per : (i + 1) * per]
        else:
            row[key] = value[i : i + 1]
    return row
