"""``LoRALinear``: an ``nn.Linear`` plus a low-rank update, run through the fused ``lora_linear`` op."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.lora import lora_linear
from ._validate import check_int, check_prob


class LoRALinear(nn.Module):
    """Wraps a frozen-or-not ``nn.Linear``: ``y = base(x) + scaling * lora_B(lora_A(dropout(x)))``.

    Attributes follow PEFT's naming so checkpoints map one to one: ``base_layer``,
    ``lora_A`` (``nn.Linear(in, r)``), ``lora_B`` (``nn.Linear(r, out)``), ``scaling``
    (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``). ``lora_A`` is
    Kaiming-uniform initialised and ``lora_B`` zero, so a fresh layer equals its base.
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
        kwargs = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
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
        """``scaling * B @ A`` (out, in), computed in float32 or better and cast to the base dtype."""
        acc = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        delta = self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc) * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base_layer.weight``; the forward then runs the base layer alone."""
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
        return lora_linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"rslora={self.use_rslora}, merged={self.merged}"
        )
