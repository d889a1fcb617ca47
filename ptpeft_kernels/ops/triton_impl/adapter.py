"""Triton backend of ``adapter``: ``y = residual + s * (act(x Wd^T + bd) Wu^T + bu)``.

Forward, two launches: the down-projection with its bias writes the pre-activation ``h``
(tokens x bottleneck, saved for the backward); the up-projection applies the activation to
its ``h`` tiles as they are loaded (recomputing act from h costs bottleneck-wide elementwise
work per output tile, far less than storing and re-reading act(h)), and adds the bias, the
scale and the residual in its epilogue, writing y once.

Backward: ``dWu = s * dy^T act(h)`` (activation recomputed on load; ``dbu`` from the same
pass over dy), ``dh = s * (dy Wu) * act'(h)`` with act' in the epilogue,
``dx = dh Wd (+ dy when the residual is x)`` with the identity path in the epilogue, and
``dWd = dh^T x`` with ``dbd`` as its row sums. Weight gradients reduce over tokens with split-K.
"""

from __future__ import annotations

import torch

from ... import backends
from ..adapter import OP
from ._common import device_reason, dtype_reason
from .gemm import gemm


def supports(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual):
    return device_reason(x, down_weight, down_bias, up_weight, up_bias, residual) or dtype_reason(x.dtype)


@backends.register(OP, "triton", supports=supports)
def forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual):
    x2 = x.reshape(-1, x.shape[-1])
    h, _ = gemm(x2, down_weight.t(), bias=down_bias)
    base = x2 if residual is None else residual.reshape(-1, residual.shape[-1])
    y, _ = gemm(h, up_weight.t(), alpha=scaling, bias=up_bias, act_a=activation, residual=base)
    return y.view(*x.shape[:-1], up_weight.shape[0]), h


@backends.register(OP, "triton", kind="backward")
def backward(dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs):
    need_x, need_wd, need_bd, need_wu, need_bu = needs
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx, dwd, dbd, dwu, dbu = (x.new_empty(0) for _ in range(5))
    if need_wu:
        dwu, rows = gemm(dy2.t(), h, alpha=scaling, act_b=activation, row_sum=need_bu)
        if need_bu:
            dbu = rows.mul_(scaling).to(dy.dtype)
    elif need_bu:
        dbu = dy2.sum(0, dtype=torch.float32).mul_(scaling).to(dy.dtype)
    if need_x or need_wd or need_bd:
        dh, _ = gemm(dy2, up_weight, alpha=scaling, act_grad=activation, aux=h, out_dtype=h.dtype)
        if need_x:
            dx, _ = gemm(dh, down_weight, residual=None if has_residual else dy2)
            dx = dx.view(x.shape)
        if need_wd:
            dwd, rows = gemm(dh.t(), x2, row_sum=need_bd)
            if need_bd:
                dbd = rows.to(dh.dtype)
        elif need_bd:
            dbd = dh.sum(0, dtype=torch.float32).to(dh.dtype)
    return dx, dwd, dbd, dwu, dbu
