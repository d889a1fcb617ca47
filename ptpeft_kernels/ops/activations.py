"""The adapter activations and their derivatives, by name (shared by the backends and the reference)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: object) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(h: Tensor, activation: str) -> Tensor:
    """d act(h) / dh, elementwise (``h`` is the pre-activation)."""
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(h * _INV_SQRT_2)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (h + 0.044715 * h * h * h)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "silu":
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
