"""Checks shared by the cuda backend's ``supports`` functions."""

from __future__ import annotations

import torch


def device_reason(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            return f"the tensors are on {t.device}; the cuda backend needs CUDA tensors"
    return None


def dtype_reason(dtype: torch.dtype, allowed: tuple[torch.dtype, ...]) -> str | None:
    if dtype not in allowed:
        return f"the cuda backend supports dtypes {allowed} here, got {dtype}"
    return None


def empty_reason(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.numel() == 0:
            return f"an empty input {tuple(t.shape)} (the torch backend handles empty shapes)"
    return None


def grad_reason(*tensors: torch.Tensor | None) -> str | None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "a gradient is needed and the cuda kernel is forward-only"
    return None
