"""The cuda backend's LoRA path on the CPU: csrc/lora's block code (host-compiled) under the
very orchestration of ptpeft_kernels/ops/cuda/lora.py, against the float64 reference; and its
dropout stream, bit for bit the Triton backend's."""

import ctypes

import pytest
import torch

from ptpeft_kernels import backends
from ptpeft_kernels.ops import lora_linear_ref
from ptpeft_kernels.ops.cuda import lora as cuda_lora
from tests.helpers import assert_close

from . import emulate, host_lib

pytestmark = pytest.mark.skipif(host_lib.compiler() is None, reason="needs a host C++ compiler (g++)")


def test_philox_matches_the_published_known_answers():
    # Philox4x32-10 known-answer vectors (Salmon et al., Random123 kat_vectors): first output word.
    lib = host_lib.load()
    fn = lib.ptpeft_philox_first_word
    fn.restype = ctypes.c_uint32
    u32 = ctypes.c_uint32
    cases = [
        ((0, 0, 0, 0), (0, 0), 0x6627E8D5),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), 0x408F276D),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 0xD16CFE09),
    ]
    for counter, (key_lo, key_hi), first in cases:
        seed = ctypes.c_uint64(key_lo | (key_hi << 32))
        assert fn(seed, *map(u32, counter)) == first


@pytest.mark.skipif("triton" not in backends.available_backends(), reason="needs triton (interpreter)")
@pytest.mark.parametrize(
    "shape,p,seed", [((7, 33), 0.1, 12345), ((3, 5, 64), 0.5, 2**40 + 3), ((1, 1), 0.9, 1)]
)
def test_dropout_stream_is_the_triton_backends(shape, p, seed):
    triton_mask = backends.get_impl("lora_linear", "triton", "dropout_mask")(
        torch.Size(shape), p, seed, "cpu"
    )
    cols = shape[-1]
    ours = emulate.dropout_keep_mask(triton_mask.numel() // cols, cols, p, seed).view(shape)
    assert torch.equal(ours, triton_mask)


def test_dropout_mask_statistics():
    keep = emulate.dropout_keep_mask(256, 512, 0.3, 99)
    assert abs(keep.float().mean().item() - 0.7) < 0.01  # 131072 draws: 5 sigma is 0.006
    other = emulate.dropout_keep_mask(256, 512, 0.3, 100)
    assert 0.55 < (keep == other).float().mean().item() < 0.61  # independent seeds agree at 0.7^2 + 0.3^2


def _ref_gemm(a, b, alpha=1.0, bias=None, base=None, keep=None, drop_on=0):
    a64, b64 = a.double(), b.double()
    if drop_on == 1:
        a64 = a64 * keep
    if drop_on == 2:
        b64 = b64 * keep
    c = alpha * (a64 @ b64.t())
    if drop_on == 3:
        c = c * keep
    if bias is not None:
        c = c + bias.double()
    return c if base is None else c + base.double()


@pytest.mark.parametrize("i,j,k", [(1, 1, 1), (65, 33, 17), (130, 16, 300)])
def test_gemm_tiles_strides_bias_and_accumulate(i, j, k):
    g = torch.Generator().manual_seed(i + j + k)
    a = torch.randn(k, i, generator=g).t() / k**0.5  # i-major: the loads walk i
    b = torch.randn(j, 2 * k, generator=g)[:, ::2]  # strided k
    bias = torch.randn(j, generator=g)
    base = torch.randn(j, i, generator=g)
    c = base.clone().t()  # a transposed output view, accumulated into
    emulate.lora_gemm(a, b, c, alpha=0.7, bias=bias, accumulate=True)
    assert_close("c", c, _ref_gemm(a, b, 0.7, bias, base.t()), atol=1e-5, rtol=1e-5)
    fresh = torch.full((i, j), float("nan"))
    emulate.lora_gemm(a, b, fresh, alpha=0.7, reverse=True)
    assert_close("fresh", fresh, _ref_gemm(a, b, 0.7), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 3, 64])
def test_split_k_slices_sum_to_the_whole(splits):
    g = torch.Generator().manual_seed(splits)
    # Scaled so the sums are O(1): float32 accumulation over K keys then errs by ~sqrt(K) ulp.
    a, b = torch.randn(70, 500, generator=g) / 500**0.5, torch.randn(9, 500, generator=g)
    c = torch.full((70, 9), float("nan"))
    emulate.lora_gemm(a, b, c, alpha=1.5, splits=splits)
    assert_close("c", c, _ref_gemm(a, b, 1.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("on,transposed", [(1, False), (1, True), (2, False), (3, False), (3, True)])
def test_dropout_keys_follow_the_x_coordinates(on, transposed):
    g = torch.Generator().manual_seed(on)
    i, j, k, p, seed = 40, 24, 36, 0.4, 777
    a, b = torch.randn(i, k, generator=g), torch.randn(j, k, generator=g)
    x_shape = {1: (i, k), 2: (j, k), 3: (i, j)}[on]
    rows, cols = x_shape[::-1] if transposed else x_shape
    keep = emulate.dropout_keep_mask(rows, cols, p, seed).double()
    keep = keep.t() if transposed else keep
    c = torch.full((i, j), float("nan"))
    emulate.lora_gemm(a, b, c, alpha=2.0, drop=(p, seed, on, transposed))
    assert_close("c", c, _ref_gemm(a, b, 2.0, keep=keep, drop_on=on), atol=1e-5, rtol=1e-5)


def _lora_inputs(tokens, in_f, out_f, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    bias = torch.randn(out_f, generator=g)
    a = torch.randn(r, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, r, generator=g)
    return x, w, bias, a, b


@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_forward_and_backward_against_float64(r, dropout_p, with_bias, monkeypatch):
    # Many tokens so the split-K path of dA / dB runs (split_k takes 4 SMs off the GPU).
    x, w, bias, a, b = _lora_inputs(300, 40, 24, r, seed=r)
    bias = bias if with_bias else None
    scaling, seed = 0.5, 4242
    y, h = cuda_lora.forward_with(emulate.lora_gemm, x, w, bias, a, b, scaling, dropout_p, seed)
    keep = None
    if dropout_p > 0:
        keep = emulate.dropout_keep_mask(600, 40, dropout_p, seed).view(x.shape)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, bias if with_bias else w, a, b)]
    ref = lora_linear_ref(
        leaves[0], leaves[1], leaves[2] if with_bias else None, leaves[3], leaves[4], scaling,
        dropout_keep=keep, dropout_p=dropout_p,
    )  # fmt: skip
    assert_close("y", y, ref, atol=2e-5, rtol=2e-5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    needs = [True, True, with_bias, True, True]
    assert cuda_lora.split_k(40, r, 600, torch.device("cpu")) > 1
    grads = cuda_lora.backward_with(
        emulate.lora_gemm, dy, x, w, bias, a, b, h, scaling, dropout_p, seed, needs
    )
    ref_grads = torch.autograd.grad(ref, leaves, dy.double(), allow_unused=True)
    for name, got, want, need in zip(("dx", "dW", "db", "dA", "dB"), grads, ref_grads, needs, strict=True):
        if need:
            assert_close(name, got, want, atol=1e-4, rtol=1e-4)


def test_lora_backward_skips_what_is_not_needed():
    x, w, bias, a, b = _lora_inputs(5, 16, 8, 4)
    _, h = cuda_lora.forward_with(emulate.lora_gemm, x, w, bias, a, b, 1.0, 0.0, 0)
    dy = torch.randn(2, 5, 8)
    grads = cuda_lora.backward_with(
        emulate.lora_gemm, dy, x, w, bias, a, b, h, 1.0, 0.0, 0, [False, False, False, True, True]
    )
    assert [g.numel() for g in grads] == [0, 0, 0, a.numel(), b.numel()]
