"""cuda backend of ``adapter``: ``y = residual + s * (act(x Wd^T + bd) Wu^T + bu)`` (csrc/adapter/).

The GEMMs run in cuBLAS through ATen; the fused epilogue kernels do the rest in one pass
each: after the down-projection ``h = g + bd`` (kept for the backward) and ``a = act(h)``;
after the up-projection ``y = residual + s * (u + bu)`` in place on u. Backward: ``a`` is
recomputed from h (never stored), ``dh = (dy Wu) * s * act'(h)`` in one epilogue pass, then
``dx = dh Wd (+ dy when the residual is x)``, ``dWd = dh^T x``, ``dWu = s dy^T a``; bias
gradients are column sums.

The orchestration takes the epilogue primitives as an argument so the host-side tests run
this very code on CPU tensors with the kernels' element code compiled for the CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ... import backends
from ..adapter import OP
from ._common import device_reason, dtype_reason, empty_reason

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATION_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}  # csrc/common/activations.h


def supports(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual) -> str | None:
    reason = device_reason(x, down_weight, down_bias, up_weight, up_bias, residual)
    return reason or dtype_reason(x.dtype, DTYPES) or empty_reason(x, down_weight, up_weight)


def _cuda_epilogues():
    ops = torch.ops.ptpeft_cuda
    return SimpleNamespace(
        bias_act=ops.adapter_bias_act, residual=ops.adapter_residual, act_grad=ops.adapter_act_grad
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def forward_with(epi, x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual):
    code = ACTIVATION_CODES[activation]
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ down_weight.t()  # cuBLAS; the bias joins in the epilogue
    act = torch.empty_like(h)
    epi.bias_act(h, down_bias, act, code)
    y = act @ up_weight.t()
    epi.residual(y, up_bias, _rows(x if residual is None else residual), float(scaling))
    return y.view(*x.shape[:-1], up_weight.shape[0]), h


def backward_with(
    epi, dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs
):
    need_x, need_wd, need_bd, need_wu, need_bu = needs
    code = ACTIVATION_CODES[activation]
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    h = h.contiguous()
    dx, dwd, dbd, dwu, dbu = (x.new_empty(0) for _ in range(5))
    if need_wu:
        act = torch.empty_like(h)
        epi.bias_act(h, None, act, code)  # recomputed, not stored
        dwu = torch.mm(dy2.t(), act).mul_(scaling)
    if need_bu:
        dbu = dy2.sum(0, dtype=torch.float32).mul_(scaling).to(dy.dtype)
    if need_x or need_wd or need_bd:
        dh = (dy2 @ up_weight).contiguous()
        epi.act_grad(dh, h, float(scaling), code)
        if need_x:
            dx = torch.addmm(dy2, dh, down_weight) if not has_residual else dh @ down_weight
            dx = dx.view(x.shape)
        if need_wd:
            dwd = dh.t() @ x2
        if need_bd:
            dbd = dh.sum(0, dtype=torch.float32).to(dh.dtype)
    return dx, dwd, dbd, dwu, dbu


@backends.register(OP, "cuda", supports=supports)
def forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual):
    return forward_with(
        _cuda_epilogues(), x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual
    )


@backends.register(OP, "cuda", kind="backward")
def backward(dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs):
    epi = _cuda_epilogues()
    return backward_with(
        epi, dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs
    )
