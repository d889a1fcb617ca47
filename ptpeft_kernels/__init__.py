"""ptpeft_kernels: fused kernels and a PT-PEFT training driver for large multi-modal models."""

from . import analysis
from .backends import BackendUnavailableError, available_backends
from .integrations import (
    PTPEFTTrainerMixin,
    apply_adapter,
    apply_lora,
    apply_prefix,
    enable_ptpeft_attention,
    fold_prefix,
    import_peft_prefix,
    load_adapters,
    mark_trainable,
    merge_lora,
    register_attention,
    save_adapters,
    set_attention,
    trainable_summary,
)
from .layers import BottleneckAdapter, LoRALinear, PrefixEncoder
from .ops import adapter, adapter_ref, lora_linear, lora_linear_ref, prefix_attention, prefix_attention_ref

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "analysis",
    "BackendUnavailableError",
    "BottleneckAdapter",
    "LoRALinear",
    "PTPEFTTrainer",
    "PTPEFTTrainerMixin",
    "PrefixEncoder",
    "adapter",
    "adapter_ref",
    "apply_adapter",
    "apply_lora",
    "apply_prefix",
    "available_backends",
    "enable_ptpeft_attention",
    "fold_prefix",
    "import_peft_prefix",
    "load_adapters",
    "mark_trainable",
    "merge_lora",
    "register_attention",
    "save_adapters",
    "set_attention",
    "trainable_summary",
    "lora_linear",
    "lora_linear_ref",
    "prefix_attention",
    "prefix_attention_ref",
]


def __getattr__(name: str):
    # PTPEFTTrainer subclasses transformers.Trainer (an import of seconds): built on first access.
    if name == "PTPEFTTrainer":
        from .integrations import hf_trainer

        return hf_trainer.PTPEFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
