"""Bottleneck adapter: ``y = residual + scaling * up(act(down(x)))``, ``residual`` defaulting to ``x``.

Shapes: ``x`` (..., d_in); ``down_weight`` (r, d_in), ``down_bias`` (r,) or None;
``up_weight`` (d_out, r), ``up_bias`` (d_out,) or None; ``residual`` (..., d_out) or None
(then ``d_out == d_in``). Activations: ``gelu``, ``gelu_tanh``, ``relu``, ``silu``.

This file holds, in order: the reference, the ``torch`` backend, the custom ops with
their fake and autograd registrations, and the public function. The Triton kernels live
in ``ops/triton_impl/adapter.py``.
"""

import math
from functools import partial

import torch
from torch import Tensor

from .. import backends
from .._checks import autocast_inputs, check_dim, check_same, check_scalar, check_tensor, describe
from ._eager import eager_function
from .activations import activate, activation_grad, check_activation

__all__ = ["adapter", "adapter_ref"]

OP = "adapter"


# ----------------------------------------------------------------------------- reference


def _activation_ref(h: Tensor, activation: str) -> Tensor:
    """The activations from their formulas, apart from the backends' ``activate`` (which they check)."""
    if activation == "gelu":  # x * Phi(x), Phi the standard normal CDF
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if activation == "gelu_tanh":  # the tanh approximation of GELU
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if activation == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(f"activation must be one of gelu, gelu_tanh, relu, silu, got {activation!r}")


def adapter_ref(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    *,
    activation: str = "gelu",
    scaling: float = 1.0,
    residual: Tensor | None = None,
    upcast: bool = True,
) -> Tensor:
    """The definition in plain PyTorch (float64 when ``upcast``)."""
    dtype = torch.float64 if upcast else x.dtype
    h = x.to(dtype) @ down_weight.to(dtype).t()
    if down_bias is not None:
        h = h + down_bias.to(dtype)
    # Rounded once from float32 in low precision, as PyTorch's own bf16 / fp16 activations are.
    act = _activation_ref(h.to(torch.promote_types(dtype, torch.float32)), activation).to(dtype)
    u = act @ up_weight.to(dtype).t()
    if up_bias is not None:
        u = u + up_bias.to(dtype)
    base = x if residual is None else residual
    return (base.to(dtype) + scaling * u).to(x.dtype)


# ----------------------------------------------------------------------------- input checks


def _check_args(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual) -> float:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must be (..., d_in), got a 0-D tensor")
    check_tensor("down_weight", down_weight, 2)
    check_tensor("up_weight", up_weight, 2)
    check_same("down_weight", down_weight, "x", x)
    check_same("up_weight", up_weight, "x", x)
    check_activation(activation)
    scaling = check_scalar("scaling", scaling)
    bottleneck, d_in = down_weight.shape  # bottleneck 0 is allowed: the output is the residual (+ up_bias)
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x must end with d_in = {d_in} (down_weight is {tuple(down_weight.shape)}), got {describe(x)}"
        )
    check_dim("up_weight", up_weight, 1, bottleneck, "the bottleneck size")
    d_out = up_weight.shape[0]
    for name, bias, size in (("down_bias", down_bias, bottleneck), ("up_bias", up_bias, d_out)):
        if bias is not None:
            check_tensor(name, bias, 1)
            check_same(name, bias, "x", x)
            check_dim(name, bias, 0, size, "size")
    if residual is None:
        if d_out != d_in:
            raise ValueError(
                f"without residual, up_weight must map back to d_in = {d_in}, "
                f"got up_weight {tuple(up_weight.shape)}"
            )
    else:
        check_tensor("residual", residual)
        check_same("residual", residual, "x", x)
        want = (*x.shape[:-1], d_out)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must be (..., d_out) = {want}, got {tuple(residual.shape)}")
    return scaling


# ----------------------------------------------------------------------------- torch backend
#
# Saved for the backward: x and the pre-activation h (tokens x bottleneck); the activation
# is recomputed from h. The output is written once (addmm into the residual's copy).


def _rows(t: Tensor) -> Tensor:
    """(..., F) -> (tokens, F); ``reshape(-1, F)`` is ambiguous for a tensor with no elements."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


@backends.register(OP, "torch")
def _torch_forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual):
    x2 = _rows(x)
    h = torch.addmm(down_bias, x2, down_weight.t()) if down_bias is not None else x2 @ down_weight.t()
    base = x2 if residual is None else _rows(residual)
    y = torch.addmm(base, activate(h, activation), up_weight.t(), alpha=scaling)
    if up_bias is not None:
        y.add_(up_bias, alpha=scaling)
    return y.view(*x.shape[:-1], up_weight.shape[0]), h


@backends.register(OP, "torch", kind="backward")
def _torch_backward(
    dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs
):
    need_x, need_wd, need_bd, need_wu, need_bu = needs
    x2, dy2 = _rows(x), _rows(dy)
    dx, dwd, dbd, dwu, dbu = (x.new_empty(0) for _ in range(5))
    if need_wu:
        dwu = (dy2.t() @ activate(h, activation)).mul_(scaling)
    if need_bu:
        dbu = dy2.sum(0).mul_(scaling)
    if need_x or need_wd or need_bd:
        # The bottleneck-sized chain runs in float32 at least: it is tiny, and bf16 rounding of act'(h) hurts.
        acc = torch.promote_types(h.dtype, torch.float32)
        dh = ((dy2 @ up_weight).to(acc) * activation_grad(h.to(acc), activation)).mul_(scaling).to(h.dtype)
        if need_x:
            dx = dh @ down_weight
            if not has_residual:
                dx.add_(dy2)
            dx = dx.view(x.shape)
        if need_wd:
            dwd = dh.t() @ x2
        if need_bd:
            dbd = dh.sum(0)
    return dx, dwd, dbd, dwu, dbu


# ----------------------------------------------------------------------------- custom ops


def _backend_for(x: Tensor, down_weight: Tensor, up_weight: Tensor, backend: str) -> str:
    """Empty dimensions (tokens, d_in, d_out or bottleneck = 0) run the PyTorch path on every backend:
    its matmuls give them PyTorch's results, while kernel launchers differ on empty grids and the
    null pointers of empty tensors."""
    empty = x.numel() == 0 or down_weight.numel() == 0 or up_weight.numel() == 0
    return "torch" if empty else backend


def _forward_impl(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    activation: str,
    scaling: float,
    residual: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    backend = backends.guarded(
        OP, _backend_for(x, down_weight, up_weight, backend),
        x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual,
    )
    impl = backends.get_impl(OP, backend)
    return impl(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual)


_adapter_op = torch.library.custom_op("ptpeft::adapter", mutates_args=())(_forward_impl)


@_adapter_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, backend):
    tokens = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], up_weight.shape[0]), x.new_empty(tokens, down_weight.shape[0])


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    h: Tensor,
    activation: str,
    scaling: float,
    has_residual: bool,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The guard keys the case on the forward's arguments; dy stands in for the residual (same shape).
    residual = dy if has_residual else None
    backend = backends.guarded(
        OP,
        _backend_for(x, down_weight, up_weight, backend),
        x,
        down_weight,
        down_bias,
        up_weight,
        up_bias,
        activation,
        scaling,
        residual,
        kind="backward",
    )
    impl = backends.get_impl(OP, backend, kind="backward")
    return impl(
        dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs
    )


_adapter_backward_op = torch.library.custom_op("ptpeft::adapter_backward", mutates_args=())(_backward_impl)


@_adapter_backward_op.register_fake
def _(
    dy, x, down_weight, down_bias, up_weight, up_bias, h, activation, scaling, has_residual, needs, backend
):
    shapes = (x.shape, down_weight.shape, (down_weight.shape[0],), up_weight.shape, (up_weight.shape[0],))
    return tuple(x.new_empty(s) if need else x.new_empty(0) for s, need in zip(shapes, needs, strict=True))


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, backend = inputs
    _, h = output
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias, h)
    ctx.activation, ctx.scaling, ctx.backend = activation, scaling, backend
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(h)


def _backward_with(run, ctx, dy, _dh):
    x, down_weight, down_bias, up_weight, up_bias, h = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [
        bool(n[0]),
        bool(n[1]),
        down_bias is not None and bool(n[2]),
        bool(n[3]),
        up_bias is not None and bool(n[4]),
    ]
    grads = run(
        dy,
        x,
        down_weight,
        down_bias,
        up_weight,
        up_bias,
        h,
        ctx.activation,
        ctx.scaling,
        ctx.has_residual,
        needs,
        ctx.backend,
    )
    dx, dwd, dbd, dwu, dbu = (g if need else None for g, need in zip(grads, needs, strict=True))
    dres = dy if ctx.has_residual and n[7] else None  # the residual enters as an identity
    return dx, dwd, dbd, dwu, dbu, None, None, dres, None


# torch.compile traces the custom op (backward through the backward op); eager calls skip the dispatch.
_adapter_op.register_autograd(partial(_backward_with, _adapter_backward_op), setup_context=_setup_context)
_AdapterEager = eager_function(
    "_AdapterEager", _forward_impl, _setup_context, partial(_backward_with, _backward_impl)
)


# ----------------------------------------------------------------------------- public function


def adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    *,
    activation: str = "gelu",
    scaling: float = 1.0,
    residual: Tensor | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """``residual + scaling * (act(x Wd^T + bd) Wu^T + bu)``.

    Args:
        x: (..., d_in).
        down_weight: (r, d_in); down_bias: (r,) or None.
        up_weight: (d_out, r); up_bias: (d_out,) or None.
        activation: ``gelu`` | ``gelu_tanh`` | ``relu`` | ``silu``.
        scaling: multiplies the adapter branch.
        residual: (..., d_out); defaults to ``x`` (then ``d_out == d_in``).
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``; ``auto`` follows ``PTPEFT_BACKEND``
            when it is set, else takes the first that runs of cuda, triton, torch.

    Returns:
        (..., d_out) in ``x.dtype``.
    """
    x, down_weight, down_bias, up_weight, up_bias, residual = autocast_inputs(
        x, down_weight, down_bias, up_weight, up_bias, residual
    )
    scaling = _check_args(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual)
    name = backends.resolve(
        OP, backend, x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual
    )
    run = _adapter_op if torch.compiler.is_compiling() else _AdapterEager.apply
    return run(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual, name)[0]
