"""``nn.Module`` layers over the fused ops."""

from .adapter import BottleneckAdapter
from .lora import LoRALinear
from .prefix import PrefixEncoder

__all__ = ["BottleneckAdapter", "LoRALinear", "PrefixEncoder"]
