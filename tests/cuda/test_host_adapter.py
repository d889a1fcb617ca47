"""The cuda backend's adapter path on the CPU: csrc/adapter's epilogue element code and the
activations (host-compiled) under the very orchestration of ptpeft_kernels/ops/cuda/adapter.py,
against the float64 reference."""

import ctypes

import pytest
import torch

from ptpeft_kernels.ops import adapter_ref
from ptpeft_kernels.ops.activations import ACTIVATIONS, activate, activation_grad
from ptpeft_kernels.ops.cuda import adapter as cuda_adapter
from tests.helpers import assert_close

from . import emulate, host_lib

pytestmark = pytest.mark.skipif(host_lib.compiler() is None, reason="needs a host C++ compiler (g++)")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_derivatives_match_the_reference_formulas(activation):
    lib = host_lib.load()
    lib.ptpeft_activate.restype = ctypes.c_float
    lib.ptpeft_activation_grad.restype = ctypes.c_float
    code = cuda_adapter.ACTIVATION_CODES[activation]
    xs = torch.cat(
        [torch.linspace(-12, 12, 961), torch.tensor([-100.0, -30.0, -1e-6, 0.0, 1e-6, 30.0, 100.0])]
    )
    got = torch.tensor(
        [lib.ptpeft_activate(ctypes.c_float(x), code) for x in xs.tolist()], dtype=torch.float64
    )
    grad = torch.tensor(
        [lib.ptpeft_activation_grad(ctypes.c_float(x), code) for x in xs.tolist()], dtype=torch.float64
    )
    x64 = xs.double()
    assert_close(f"{activation}", got, activate(x64, activation), atol=2e-6, rtol=2e-6)
    assert_close(f"{activation}'", grad, activation_grad(x64, activation), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_adapter_forward_and_backward_against_float64(activation, with_residual, with_bias):
    g = torch.Generator().manual_seed(len(activation) + 2 * with_residual + with_bias)
    x = torch.randn(2, 7, 24, generator=g)
    wd, bd = torch.randn(5, 24, generator=g) / 24**0.5, torch.randn(5, generator=g)
    d_out = 16 if with_residual else 24
    wu, bu = torch.randn(d_out, 5, generator=g), torch.randn(d_out, generator=g)
    res = torch.randn(2, 7, d_out, generator=g) if with_residual else None
    bd, bu = (bd, bu) if with_bias else (None, None)
    scaling = 0.7
    epi = emulate.Epilogues()
    y, h = cuda_adapter.forward_with(epi, x, wd, bd, wu, bu, activation, scaling, res)
    inputs = [x, wd, bd, wu, bu, res]
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref = adapter_ref(*leaves[:5], activation=activation, scaling=scaling, residual=leaves[5])
    assert_close("y", y, ref, atol=2e-5, rtol=2e-5)
    dy = torch.randn(y.shape, generator=g)
    h_before = h.clone()
    needs = [True, True, with_bias, True, with_bias]
    grads = cuda_adapter.backward_with(
        epi, dy, x, wd, bd, wu, bu, h, activation, scaling, with_residual, needs
    )
    assert torch.equal(h, h_before)  # the backward recomputes act(h) without touching the saved h
    wanted = [t for t in leaves[:5] if t is not None]
    ref_grads = iter(torch.autograd.grad(ref, wanted, dy.double()))
    for name, got, leaf in zip(("dx", "dWd", "dbd", "dWu", "dbu"), grads, leaves[:5], strict=True):
        if leaf is not None:
            assert_close(name, got, next(ref_grads), atol=1e-4, rtol=1e-4)
