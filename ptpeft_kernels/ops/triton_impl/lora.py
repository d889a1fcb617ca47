"""Triton backend of ``lora_linear``: ``y = x W^T + b + s * (dropout(x) A^T) B^T``.

Forward, two launches: ``h = dropout(x) A^T`` (tokens x r, read x once, the dropout mask
drawn in-register from the seed), then the base GEMM ``x W^T`` whose output tile gets the
rank-r slab ``s * h B^T`` and the bias added before its single write — no tokens x out
intermediate, no second pass over y. ``h`` is saved for the backward.

Backward: ``dh = s * dy B`` (tokens x r); ``dx = dy W + drop(dh A) / (1 - p)`` as one GEMM
with the rank-r slab in its epilogue (the mask regenerated per output element);
``dA = dh^T drop(x)`` and ``dB = s * dy^T h`` as split-K GEMMs over tokens, the latter also
giving ``db = sum_t dy`` from the same pass over dy; ``dW = dy^T x`` only when requested.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from ..lora import OP
from ._common import device_guard, device_reason, dropout_keep, dtype_reason
from .gemm import gemm


def supports(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    return device_reason(x, weight, bias, lora_A, lora_B) or dtype_reason(x.dtype)


@triton.jit
def _keep_mask_kernel(OUT, rows, cols, seed, p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = dropout_keep(seed, offs_r[:, None], offs_c[None, :], p)
    ok = (offs_r < rows)[:, None] & (offs_c < cols)[None, :]
    offsets = offs_r.to(tl.int64)[:, None] * cols + offs_c.to(tl.int64)[None, :]
    tl.store(OUT + offsets, keep.to(tl.int8), mask=ok)


@backends.register(OP, "triton", kind="dropout_mask")
def dropout_mask(shape, dropout_p, seed, device):
    """The keep-mask the kernels draw for ``seed``: element (token, feature) of ``x`` viewed as 2-D."""
    if dropout_p <= 0.0:
        return None
    shape = torch.Size(shape)
    cols = shape[-1] if len(shape) else 1
    rows = shape.numel() // max(1, cols)
    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        with device_guard(out.device):
            _keep_mask_kernel[grid](out, rows, cols, int(seed), float(dropout_p), BLOCK_R=32, BLOCK_C=32)
    return out.view(shape).bool()


@backends.register(OP, "triton", supports=supports)
def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    x2 = x.reshape(-1, x.shape[-1])
    drop = ("a", dropout_p, seed) if dropout_p > 0.0 else None
    h, _ = gemm(x2, lora_A.t(), alpha=1.0 / (1.0 - dropout_p), dropout=drop)
    y, _ = gemm(x2, weight.t(), bias=bias, extra=(h, lora_B.t(), scaling))
    return y.view(*x.shape[:-1], weight.shape[0]), h


@backends.register(OP, "triton", kind="backward")
def backward(dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx, dw, db, da, dbb = (x.new_empty(0) for _ in range(5))
    inv_keep = 1.0 / (1.0 - dropout_p)
    if need_x or need_a:
        dh, _ = gemm(dy2, lora_B, alpha=scaling)  # tokens x r, in x.dtype like the torch backend
        if need_x:
            drop = ("extra", dropout_p, seed) if dropout_p > 0.0 else None
            dx, _ = gemm(dy2, weight, extra=(dh, lora_A, inv_keep), dropout=drop)
            dx = dx.view(x.shape)
        if need_a:
            drop = ("b", dropout_p, seed) if dropout_p > 0.0 else None
            da, _ = gemm(dh.t(), x2, alpha=inv_keep, dropout=drop)
    bias_sum = None
    if need_bb:
        dbb, bias_sum = gemm(dy2.t(), h, alpha=scaling, row_sum=need_b)
    if need_w:
        dw, rows = gemm(dy2.t(), x2, row_sum=need_b and bias_sum is None)
        bias_sum = rows if bias_sum is None else bias_sum
    if need_b:
        db = (bias_sum if bias_sum is not None else dy2.sum(0, dtype=torch.float32)).to(dy.dtype)
    return dx, dw, db, da, dbb
