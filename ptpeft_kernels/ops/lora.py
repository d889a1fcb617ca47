"""LoRA linear: ``y = x W^T + b + scaling * (dropout(x) A^T) B^T``.

Shapes (DESIGN.md): ``x`` (..., in), ``weight`` (out, in), ``bias`` (out,) or None,
``lora_A`` (r, in), ``lora_B`` (out, r). The base weight is frozen in PEFT use, but its
gradient is computed whenever it requires one.

This file holds, in order: the reference, the ``torch`` backend, the custom ops with
their fake and autograd registrations, and the public function. The Triton kernels live
in ``ops/triton_impl/lora.py``.

Dropout: the mask is drawn from a generator seeded by ``seed`` (itself drawn from
PyTorch's default generator, so ``torch.manual_seed`` makes runs repeatable) and is
regenerated in the backward instead of being stored.
"""

import math
from functools import partial

import torch
from torch import Tensor

from .. import backends
from .._checks import autocast_inputs, check_dim, check_same, check_scalar, check_tensor, describe
from ._eager import eager_function

__all__ = ["lora_linear", "lora_linear_ref", "dropout_mask", "draw_dropout_seed"]

OP = "lora_linear"


# ----------------------------------------------------------------------------- reference


def draw_dropout_seed() -> int:
    """The dropout seed of one call, drawn from PyTorch's default CPU generator."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """The keep-mask (bool) used by the ``torch`` backend for dropout probability ``p`` and ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= p


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    dropout_keep: Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = True,
) -> Tensor:
    """The definition in plain PyTorch (float64 when ``upcast``); ``dropout_keep``: explicit bool mask."""
    dtype = torch.float64 if upcast else x.dtype
    xc = x.to(dtype)
    y = xc @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    xd = xc if dropout_keep is None else xc * dropout_keep / (1.0 - dropout_p)
    y = y + scaling * ((xd @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- input checks


def _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> tuple[float, float]:
    check_tensor("x", x)
    check_tensor("weight", weight, 2)
    check_tensor("lora_A", lora_A, 2)
    check_tensor("lora_B", lora_B, 2)
    if x.dim() < 1:
        raise ValueError("x must be (..., in_features), got a 0-D tensor")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_same(name, t, "x", x)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x must end with in_features = {in_f} (weight is {tuple(weight.shape)}), got {describe(x)}"
        )
    rank = lora_A.shape[0]  # 0 is allowed: a plain linear, as PyTorch's matmuls give it
    check_dim("lora_A", lora_A, 1, in_f, "in_features")
    if tuple(lora_B.shape) != (out_f, rank):
        raise ValueError(f"lora_B must be (out_features, r) = {(out_f, rank)}, got {tuple(lora_B.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_same("bias", bias, "x", x)
        check_dim("bias", bias, 0, out_f, "out_features")
    scaling = check_scalar("scaling", scaling)
    dropout_p = check_scalar("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    return scaling, dropout_p


# ----------------------------------------------------------------------------- torch backend
#
# Saved for the backward: x and the rank-r activation h = dropout(x) A^T (tokens x r) —
# nothing of size tokens x out. The LoRA term is accumulated into the base GEMM's output
# in place (addmm_), so the forward allocates one tokens x out tensor, as a plain linear does.


def _dropped(x2: Tensor, dropout_p: float, keep: Tensor | None) -> Tensor:
    return x2 if keep is None else x2 * keep / (1.0 - dropout_p)


@backends.register(OP, "torch", kind="dropout_mask")
def _torch_dropout_mask(shape, dropout_p, seed, device):
    return dropout_mask(shape, dropout_p, seed, device) if dropout_p > 0.0 else None


def _rows(t: Tensor) -> Tensor:
    """(..., F) -> (tokens, F); ``reshape(-1, F)`` is ambiguous for a tensor with no elements."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


@backends.register(OP, "torch")
def _torch_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    x2 = _rows(x)
    keep = _torch_dropout_mask(x2.shape, dropout_p, seed, x2.device)
    h = _dropped(x2, dropout_p, keep) @ lora_A.t()
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    y.addmm_(h, lora_B.t(), alpha=scaling)
    return y.view(*x.shape[:-1], weight.shape[0]), h


@backends.register(OP, "torch", kind="backward")
def _torch_backward(dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_bb = needs
    x2, dy2 = _rows(x), _rows(dy)
    dx, dw, db, da, dbb = (x.new_empty(0) for _ in range(5))
    if need_x or need_a:
        keep = _torch_dropout_mask(x2.shape, dropout_p, seed, x2.device)  # regenerated once, not stored
        dh = (dy2 @ lora_B).mul_(scaling)  # tokens x r
        if need_x:
            dx = dy2 @ weight
            if keep is None:
                dx.addmm_(dh, lora_A)
            else:
                dx.add_((dh @ lora_A).mul_(keep).div_(1.0 - dropout_p))
            dx = dx.view(x.shape)
        if need_a:
            da = dh.t() @ _dropped(x2, dropout_p, keep)
    if need_w:
        dw = dy2.t() @ x2
    if need_b:
        db = dy2.sum(0)
    if need_bb:
        dbb = (dy2.t() @ h).mul_(scaling)
    return dx, dw, db, da, dbb


# ----------------------------------------------------------------------------- custom ops


def _backend_for(x: Tensor, weight: Tensor, lora_A: Tensor, backend: str) -> str:
    """Empty dimensions (tokens, in, out or rank = 0) run the PyTorch path on every backend: its matmuls
    give them PyTorch's results (a bias-only or empty output, zero or empty gradients), while kernel
    launchers differ on empty grids and the null pointers of empty tensors."""
    return "torch" if x.numel() == 0 or weight.numel() == 0 or lora_A.shape[0] == 0 else backend


def _forward_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    backend = _backend_for(x, weight, lora_A, backend)
    backend = backends.guarded(OP, backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    return backends.get_impl(OP, backend)(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


_lora_linear_op = torch.library.custom_op("ptpeft::lora_linear", mutates_args=())(_forward_impl)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    tokens = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(tokens, lora_A.shape[0])


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    h: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    backend = backends.guarded(
        OP, _backend_for(x, weight, lora_A, backend), x, weight, bias, lora_A, lora_B, scaling, dropout_p,
        kind="backward",
    )
    impl = backends.get_impl(OP, backend, kind="backward")
    return impl(dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs)


_lora_linear_backward_op = torch.library.custom_op("ptpeft::lora_linear_backward", mutates_args=())(
    _backward_impl
)


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, needs, backend):
    shapes = (x.shape, weight.shape, (weight.shape[0],), lora_A.shape, lora_B.shape)
    return tuple(x.new_empty(s) if need else x.new_empty(0) for s, need in zip(shapes, needs, strict=True))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    _, h = output
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, h)
    ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = scaling, dropout_p, seed, backend
    ctx.mark_non_differentiable(h)


def _backward_with(run, ctx, dy, _dh):
    x, weight, bias, lora_A, lora_B, h = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    if bias is None:
        needs[2] = False
    grads = run(
        dy, x, weight, bias, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, ctx.seed, needs, ctx.backend
    )
    grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return (*grads, None, None, None, None)


# torch.compile traces the custom op (backward through the backward op); eager calls skip the dispatch.
_lora_linear_op.register_autograd(
    partial(_backward_with, _lora_linear_backward_op), setup_context=_setup_context
)
_LoRALinearEager = eager_function(
    "_LoRALinearEager", _forward_impl, _setup_context, partial(_backward_with, _backward_impl)
)


# ----------------------------------------------------------------------------- public function


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    backend: str | None = "auto",
) -> Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T`` with one output-sized allocation.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features); bias: (out_features,) or None.
        lora_A: (r, in_features); lora_B: (out_features, r).
        scaling: the LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout probability on the LoRA branch's input (pass 0 in eval mode).
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``; ``auto`` follows ``PTPEFT_BACKEND``
            when it is set, else takes the first that runs of cuda, triton, torch.

    Returns:
        (..., out_features) in ``x.dtype``.
    """
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    scaling, dropout_p = _check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    name = backends.resolve(OP, backend, x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    run = _lora_linear_op if torch.compiler.is_compiling() else _LoRALinearEager.apply
    return run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, name)[0]
