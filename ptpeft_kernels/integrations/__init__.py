"""Hugging Face ``transformers`` integration: the ``"ptpeft"`` attention, prefixes, LoRA, adapters,
trainability, checkpoints and merging. Nothing here edits modelling code.

Importing this package does not import ``transformers``; the first call that needs it does
(``PTPEFTTrainer``, a ``transformers.Trainer`` subclass, is built on first access).
"""

from .adapter import apply_adapter
from .attention import ATTN_IMPLEMENTATION, enable_ptpeft_attention, register_attention, set_attention
from .checkpoint import import_peft_prefix, load_adapters, save_adapters
from .hf_trainer import PTPEFTTrainerMixin
from .lora import apply_lora
from .merge import merge_lora
from .model_info import AttentionSite, find_attention_sites
from .prefix import PrefixBank, apply_prefix, fold_prefix
from .stages import TrainableSummary, mark_trainable, trainable_summary

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionSite",
    "PTPEFTTrainer",
    "PTPEFTTrainerMixin",
    "PrefixBank",
    "TrainableSummary",
    "apply_adapter",
    "apply_lora",
    "apply_prefix",
    "enable_ptpeft_attention",
    "find_attention_sites",
    "fold_prefix",
    "import_peft_prefix",
    "load_adapters",
    "mark_trainable",
    "merge_lora",
    "register_attention",
    "save_adapters",
    "set_attention",
    "trainable_summary",
]


def __getattr__(name: str):
    if name == "PTPEFTTrainer":  # a transformers.Trainer subclass, built on first use (hf_trainer.py)
        from . import hf_trainer

        return hf_trainer.PTPEFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
