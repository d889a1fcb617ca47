"""``LoRALinear``: an ``nn.Linear`` plus a low-rank update, run through the fused ``lora_linear`` op."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..ops.lora import draw_dropout_seed, dropout_mask, lora_linear
from ._validate import check_int, check_prob


def is_4bit_linear(module: object) -> bool:
    """A bitsandbytes ``Linear4bit`` (NF4 / FP4); checked without importing bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


class LoRALinear(nn.Module):
    """Wraps a frozen-or-not ``nn.Linear``: ``y = base(x) + scaling * lora_B(lora_A(dropout(x)))``.

    Attributes follow PEFT's naming so checkpoints map one to one: ``base_layer``,
    ``lora_A`` (``nn.Linear(in, r)``), ``lora_B`` (``nn.Linear(r, out)``), ``scaling``
    (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``). ``lora_A`` is
    Kaiming-uniform initialised and ``lora_B`` zero, so a fresh layer equals its base.

    A bitsandbytes ``Linear4bit`` base (QLoRA) keeps its own 4-bit GEMM: the forward is
    ``base_layer(x)`` plus the LoRA term computed here, the quantised weight gets no gradient,
    and ``lora_A`` / ``lora_B`` are float32 (a 4-bit weight has no float dtype to copy).
    Such a layer cannot :meth:`merge` in place; ``merge_lora(model, dequantize=True)``
    replaces its base by a dequantised ``nn.Linear`` first.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        check_int("r", r, low=1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise TypeError(f"alpha must be a finite number, got {alpha!r}")
        self.dropout = check_prob("dropout", dropout)
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.quantized = is_4bit_linear(base_layer)
        dtype = torch.float32 if self.quantized else base_layer.weight.dtype
        kwargs = {"device": base_layer.weight.device, "dtype": dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **kwargs)
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (out, in), computed in float32 or better and cast to the base dtype
        (float32 over a 4-bit base)."""
        acc = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        delta = self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc) * self.scaling
        return delta.to(self.lora_A.weight.dtype if self.quantized else self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base_layer.weight``; the forward then runs the base layer alone."""
        if self.quantized:
            raise ValueError(
                "cannot merge LoRA into a 4-bit (bitsandbytes Linear4bit) base weight in place: adding the "
                "update would need a re-quantisation that changes the result. Use "
                "merge_lora(model, dequantize=True) to merge into dequantised weights"
            )
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the base dtype's rounding)."""
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.quantized:
            return self._forward_4bit(x)
        return lora_linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes dequantises W blockwise inside its own kernel: there is no float W for the
        # fused op, so the base GEMM is bitsandbytes' and the rank-r term is added to its output.
        y = self.base_layer(x)
        p = self.dropout if self.training else 0.0
        xl = x.to(self.lora_A.weight.dtype)
        if p > 0.0:
            # The fused op's mask recipe (ops/lora.py): one seed per call from the default generator.
            xl = xl * dropout_mask(xl.shape, p, draw_dropout_seed(), xl.device) / (1.0 - p)
        delta = nn.functional.linear(nn.functional.linear(xl, self.lora_A.weight), self.lora_B.weight)
        return y + (delta * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"rslora={self.use_rslora}, merged={self.merged}, quantized={self.quantized}"
        )
