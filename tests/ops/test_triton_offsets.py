"""Pointer offsets past 2^31 elements, without allocating 4 GB.

Triton passes an integer argument as int32 when its value fits, so an index times a stride can wrap
in 32 bits (``h * stride_qh`` once H*N*D of one batch passes 2^31, a full mask's ``row * M`` once
N*M does). Each tensor here is a view whose head (or row) stride is 2^30 (or 2^28) elements over
one ``torch.empty`` buffer of 2^31+ elements whose untouched pages cost nothing. On the CPU the
interpreter runs in its debug mode, where every int32 add/sub/mul checks for overflow and raises;
the results must equal a run on contiguous copies bit for bit. On a GPU the buffer is a real 4 GB
allocation and a wrapped offset reads or writes the wrong place.
"""

import contextlib
import dataclasses
import importlib

import pytest
import torch

from tests.helpers import CUDA, DEVICE, triton_marks

pytestmark = triton_marks()
TRITON_PA = importlib.import_module("ptpeft_kernels.ops.triton_impl.prefix_attention")
GEMM = importlib.import_module("ptpeft_kernels.ops.triton_impl.gemm")


@contextlib.contextmanager
def int32_overflow_raises():
    """The interpreter's debug mode: every int32 add/sub/mul checks for overflow (a no-op on a GPU)."""
    if CUDA:
        yield
        return
    builder = importlib.import_module("triton.runtime.interpreter").interpreter_builder
    saved = builder.options
    builder.options = dataclasses.replace(saved, debug=True)
    try:
        yield
    finally:
        builder.options = saved


def spread(tensors, dim: int, stride: int) -> list[torch.Tensor]:
    """Copies of ``tensors`` (one dtype) as views whose ``dim`` has ``stride`` elements between entries.

    All views share one buffer; the other dims are packed, and view j starts after view j-1's packed
    block, so no two elements alias while every entry i of ``dim`` sits near ``i * stride``.
    """
    packed = [t.numel() // t.shape[dim] for t in tensors]
    assert sum(packed) <= stride
    entries = max(t.shape[dim] for t in tensors)
    buf = torch.empty((entries - 1) * stride + sum(packed), dtype=tensors[0].dtype, device=DEVICE)
    views, start = [], 0
    for t, size in zip(tensors, packed, strict=True):
        strides, inner = [0] * t.dim(), 1
        for i in reversed(range(t.dim())):
            if i != dim:
                strides[i], inner = inner, inner * t.shape[i]
        strides[dim] = stride
        view = buf.as_strided(t.shape, strides, start)
        view.copy_(t)
        views.append(view)
        start += size
    return views


def _attention_inputs(gen):
    b, h, n, m, p, d = 1, 3, 9, 11, 5, 16
    q = torch.randn(b, h, n, d, generator=gen)
    k, v = torch.randn(b, h, m, d, generator=gen), torch.randn(b, h, m, d, generator=gen)
    pk_, pv_ = torch.randn(b, h, p, d, generator=gen), torch.randn(b, h, p, d, generator=gen)
    mask = torch.rand(b, h, n, m, generator=gen) > 0.3
    mask[..., -1] = True
    dout = torch.randn(b, h, n, d, generator=gen)
    data = [t.to(torch.bfloat16) for t in (q, k, v, pk_, pv_, dout)]
    outputs = [torch.zeros_like(t) for t in (q, q, q, k, v, pk_, pv_)]  # out, out_dec, dq, dk, dv, dpk, dpv
    return data + [t.to(torch.bfloat16) for t in outputs], mask


def _attention(tensors, mask):
    q, k, v, pk_, pv_, dout, out, out_dec, dq, dk, dv, dpk, dpv = tensors
    lse = torch.empty(q.shape[:3], device=q.device)
    lse_dec = torch.empty(q.shape[:3], device=q.device)
    scale = q.shape[-1] ** -0.5
    TRITON_PA._launch_forward(q, k, v, pk_, pv_, mask, True, scale, out, lse)
    TRITON_PA.launch_decode(q, k, v, pk_, pv_, mask, True, scale, out_dec, lse_dec, split_keys=16)
    TRITON_PA._launch_backward(dout, q, k, v, pk_, pv_, mask, out, lse, True, scale, dq, dk, dv, dpk, dpv)
    return [out, lse, out_dec, lse_dec, dq, dk, dv, dpk, dpv]


def _same(got, want):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0, equal_nan=True, msg=f"result {i}")


@pytest.mark.parametrize("axis", ["head", "row"])
def test_attention_offsets_past_2_31_elements(axis):
    """Forward (general and small-N kernels), the delta pass and the backward with every tensor spread
    so that head 2 (axis=head, stride 2^30) or rows 8-10 (axis=row, stride 2^28) sit past 2^31."""
    dim, stride = (1, 2**30) if axis == "head" else (2, 2**28)
    tensors, mask = _attention_inputs(torch.Generator().manual_seed(0))
    want = _attention([t.to(DEVICE) for t in tensors], mask.to(DEVICE))
    (mask_view,) = spread([mask.view(torch.uint8)], dim, stride)
    with int32_overflow_raises():
        got = _attention(spread(tensors, dim, stride), mask_view.view(torch.bool))
    _same(got, want)


def test_gemm_column_offsets_past_2_31_elements():
    """The GEMM's epilogue operands (bias, residual, activation input, output) and the rank-r slab
    with column stride 2^28 at 9 columns; the K loop's pointer step with a K stride of 2^26."""
    gen = torch.Generator().manual_seed(0)
    m, k, n, r = 20, 33, 9, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    a, b, bias, a2, b2, res, aux = rnd(m, k), rnd(k, n), rnd(n), rnd(m, r), rnd(r, n), rnd(m, n), rnd(m, n)

    def both(b_, b2_, res_, aux_, out1, out2):
        GEMM.gemm(a_dev, b_, out=out1, alpha=0.5, bias=bias_dev, extra=(a2_dev, b2_, 0.3), residual=res_)
        GEMM.gemm(a_dev, b_, out=out2, act_grad="gelu", aux=aux_)
        return [out1, out2]

    a_dev, bias_dev, a2_dev = a.to(DEVICE), bias.to(DEVICE), a2.to(DEVICE)
    cols = [b, b2, res, aux, torch.zeros_like(res), torch.zeros_like(res)]
    want = both(*(t.to(DEVICE) for t in cols))
    with int32_overflow_raises():
        got = both(*spread(cols, 1, 2**28))
    _same(got, want)
    # K stride 2^26 over 33 columns: the pointer step BLOCK_K * stride_ak reaches 2^31 at BLOCK_K = 32.
    (a_wide,) = spread([a], 1, 2**26)
    want = GEMM.gemm(a_dev, b.to(DEVICE))[0]
    with int32_overflow_raises():
        got = GEMM.gemm(a_wide, b.to(DEVICE))[0]
    _same([got], [want])
