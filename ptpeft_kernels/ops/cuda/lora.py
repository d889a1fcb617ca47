"""cuda backend of ``lora_linear``: ``y = x W^T + b + s * (dropout(x) A^T) B^T`` (csrc/lora/).

The frozen base GEMM runs in cuBLAS through ATen; the rank-r products run in the skinny
GEMM kernel (``torch.ops.ptpeft_cuda.lora_gemm``), which regenerates the dropout mask from
the seed wherever it is applied — the Triton backend's Philox stream, element (token,
feature) of x, so both backends drop the same elements for a seed.

Forward: ``h = drop(x) A^T / (1-p)`` (saved for the backward), then the expand writes
``y = s h B^T + bias`` and cuBLAS accumulates the base into it (``y.addmm_(x, W^T)``, beta = 1):
the base GEMM reads y as its C operand while it is compute-bound, instead of a separate
read-modify-write pass of y after it. One (tokens, out) allocation, as a plain linear.

Backward: ``dh = s dy B``; ``dx = drop(dh A)/(1-p)`` then ``dx += dy W`` in cuBLAS;
``dA = (dh^T drop(x))/(1-p)`` and ``dB = s dy^T h`` as split-K skinny GEMMs over tokens;
``dW`` (cuBLAS) and ``db`` only when the base weight / bias require gradients.

The orchestration takes the GEMM primitive as an argument so the host-side tests run this
very code on CPU tensors with the kernel's block code compiled for the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ... import backends
from ..lora import OP
from ._common import device_reason, dtype_reason, empty_reason

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128
DROP_NONE, DROP_A, DROP_B, DROP_C = 0, 1, 2, 3
_TILE_I, _TILE_J = 64, 32  # csrc/lora/skinny_gemm.h


def supports(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> str | None:
    reason = device_reason(x, weight, bias, lora_A, lora_B) or dtype_reason(x.dtype, DTYPES)
    if reason is None and lora_A.shape[0] > MAX_RANK:
        reason = f"the cuda backend supports LoRA ranks up to {MAX_RANK}, got r={lora_A.shape[0]}"
    return reason or empty_reason(x, weight)


def _cuda_gemm(a, b, c, alpha=1.0, bias=None, accumulate=False, drop=None, splits=1):
    p, seed, on, transposed = drop if drop is not None else (0.0, 0, DROP_NONE, False)
    torch.ops.ptpeft_cuda.lora_gemm(
        a, b, c, float(alpha), bias, accumulate, float(p), int(seed), on, transposed, splits
    )


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(i: int, j: int, k: int, device: torch.device) -> int:
    """Split-K slices for a reduction over ``k`` tokens: enough blocks for ~4 per SM, >= 256 tokens each."""
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 4
    )
    tiles = -(-i // _TILE_I) * -(-j // _TILE_J)
    want = -(-4 * sms // tiles)
    return max(1, min(want, k // 256, 64))


Gemm = Callable[..., None]


def forward_with(gemm: Gemm, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    x2 = x.reshape(-1, x.shape[-1])
    tokens, rank, out_f = x2.shape[0], lora_A.shape[0], weight.shape[0]
    drop = (dropout_p, seed, DROP_A, False) if dropout_p > 0.0 else None
    h = torch.empty((tokens, rank), dtype=x.dtype, device=x.device)
    gemm(x2, lora_A, h, alpha=1.0 / (1.0 - dropout_p), drop=drop)
    y = torch.empty((tokens, out_f), dtype=x.dtype, device=x.device)
    gemm(h, lora_B, y, alpha=scaling, bias=bias)
    y.addmm_(x2, weight.t())
    return y.view(*x.shape[:-1], out_f), h


def backward_with(gemm: Gemm, dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    tokens, in_f, rank, out_f = x2.shape[0], x2.shape[1], lora_A.shape[0], weight.shape[0]
    dx, dw, db, da, dbb = (x.new_empty(0) for _ in range(5))
    inv_keep = 1.0 / (1.0 - dropout_p)
    if need_x or need_a:
        dh = torch.empty((tokens, rank), dtype=x.dtype, device=x.device)
        gemm(dy2, lora_B.t(), dh, alpha=scaling)  # dh[t, j] = s sum_o dy[t, o] B[o, j]
        if need_x:
            dx = torch.empty((tokens, in_f), dtype=x.dtype, device=x.device)
            drop = (dropout_p, seed, DROP_C, False) if dropout_p > 0.0 else None
            gemm(dh, lora_A.t(), dx, alpha=inv_keep, drop=drop)  # dx[t, c] = sum_j dh[t, j] A[j, c]
            dx.addmm_(dy2, weight)
            dx = dx.view(x.shape)
        if need_a:
            da = torch.empty((rank, in_f), dtype=x.dtype, device=x.device)
            drop = (dropout_p, seed, DROP_A, True) if dropout_p > 0.0 else None  # A-operand (c, t) is x^T
            splits = split_k(in_f, rank, tokens, x.device)
            gemm(x2.t(), dh.t(), da.t(), alpha=inv_keep, drop=drop, splits=splits)
    if need_bb:
        dbb = torch.empty((out_f, rank), dtype=x.dtype, device=x.device)
        gemm(dy2.t(), h.t(), dbb, alpha=scaling, splits=split_k(out_f, rank, tokens, x.device))
    if need_w:
        dw = dy2.t() @ x2
    if need_b:
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return dx, dw, db, da, dbb


@backends.register(OP, "cuda", supports=supports)
def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return forward_with(_cuda_gemm, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@backends.register(OP, "cuda", kind="backward")
def backward(dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs):
    return backward_with(_cuda_gemm, dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs)


@backends.register(OP, "cuda", kind="dropout_mask")
def dropout_mask(shape, dropout_p, seed, device):
    """The keep-mask the kernels draw for ``seed``: element (token, feature) of ``x`` viewed as 2-D."""
    if dropout_p <= 0.0:
        return None
    shape = torch.Size(shape)
    cols = shape[-1] if len(shape) else 1
    rows = shape.numel() // max(1, cols)
    keep = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    torch.ops.ptpeft_cuda.lora_dropout_mask(keep, float(dropout_p), int(seed))
    return keep.view(shape).bool()
