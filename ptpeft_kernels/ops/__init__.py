"""Functional ops; each dispatches through :mod:`ptpeft_kernels.backends`."""

from .adapter import adapter, adapter_ref
from .lora import lora_linear, lora_linear_ref
from .prefix_attention import prefix_attention, prefix_attention_ref

__all__ = [
    "adapter",
    "adapter_ref",
    "lora_linear",
    "lora_linear_ref",
    "prefix_attention",
    "prefix_attention_ref",
]
