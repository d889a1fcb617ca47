"""``BottleneckAdapter``: down-projection, activation, up-projection, scaled and added to a residual."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.activations import check_activation
from ..ops.adapter import adapter
from ._validate import check_int


class BottleneckAdapter(nn.Module):
    """``y = residual + scaling * up(act(down(x)))`` with ``residual`` defaulting to ``x``.

    ``up`` is zero-initialised (weight and bias), so a fresh adapter is the identity.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int = 64,
        activation: str = "gelu",
        scaling: float = 1.0,
        d_out: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, low=1)
        check_int("bottleneck", bottleneck, low=1)
        if d_out is not None:
            check_int("d_out", d_out, low=1)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise TypeError(f"scaling must be a finite number, got {scaling!r}")
        self.activation = check_activation(activation)
        self.scaling = float(scaling)
        self.down = nn.Linear(d_model, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, d_out or d_model, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return adapter(
            x,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            activation=self.activation,
            scaling=self.scaling,
            residual=residual,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation}, scaling={self.scaling:g}"
