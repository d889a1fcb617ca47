"""ptpeft_kernels: fused kernels and a PT-PEFT training driver for large multi-modal models."""

from . import analysis
from .backends import BackendUnavailableError, available_backends
from .layers import BottleneckAdapter, LoRALinear, PrefixEncoder
from .ops import adapter, adapter_ref, lora_linear, lora_linear_ref, prefix_attention, prefix_attention_ref

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "analysis",
    "BackendUnavailableError",
    "BottleneckAdapter",
    "LoRALinear",
    "PrefixEncoder",
    "adapter",
    "adapter_ref",
    "available_backends",
    "lora_linear",
    "lora_linear_ref",
    "prefix_attention",
    "prefix_attention_ref",
]
