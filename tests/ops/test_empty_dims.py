"""Empty and size-1 dimensions: every op, on the torch and Triton backends, forward and backward,
against the float64 reference (issue 15 item 6: ``prefix_attention`` with N = 0 killed the process
with SIGFPE; LoRA / adapters refused rank / bottleneck 0 and crashed on in / out features 0).

A property test per op over dimensions drawn from {0, 1, 2}, plus pinned examples for each empty
dimension alone. Few examples on Triton: on the CPU it runs in the slow interpreter.
"""

from __future__ import annotations

import pytest
import torch

from tests.optional import require

require("hypothesis", "the empty-dimension property tests")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ptpeft_kernels as pk  # noqa: E402
from ptpeft_kernels.ops.adapter import adapter_ref  # noqa: E402
from ptpeft_kernels.ops.lora import lora_linear_ref  # noqa: E402
from ptpeft_kernels.ops.prefix_attention import prefix_attention_ref  # noqa: E402
from tests.helpers import assert_close, triton_marks  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=triton_marks())]
EXAMPLES = {"torch": 40, "triton": 12}
TOL = dict(atol=2e-5, rtol=2e-5)
SIZE = st.sampled_from([0, 1, 2])


def _settings(backend: str):
    return settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        derandomize=True,  # the same examples on every run and machine
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )


def _check(outputs_and_grads: list, references: list, names: list[str]) -> None:
    for name, got, want in zip(names, outputs_and_grads, references, strict=True):
        assert_close(name, got, want, **TOL)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    # allow_unused: an input with no elements may not be reached by the reference's graph at all.
    got = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, inputs, strict=True)]


def _leaves(tensors: list[torch.Tensor | None], dtype=torch.float32) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------- prefix_attention


@st.composite
def attention_dims(draw):
    dims = dict(
        b=draw(SIZE),
        hkv=draw(SIZE),
        groups=draw(st.sampled_from([1, 2])),
        n=draw(SIZE),
        m=draw(SIZE),
        p=draw(st.sampled_from([None, 0, 1, 2])),
        d=draw(st.sampled_from([0, 1, 4])),
        causal=draw(st.booleans()),
        shared=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "keypad", "full"])),
    )
    dims["causal"] = dims["causal"] and dims["m"] >= dims["n"]
    return dims


def _attention_case(backend: str, dims: dict) -> None:
    b, hkv, n, m, p, d = (dims[k] for k in ("b", "hkv", "n", "m", "p", "d"))
    hq = hkv * dims["groups"]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, m, d, generator=g)
    v = torch.randn(b, hkv, m, d, generator=g)
    lead = (hkv,) if dims["shared"] else (b, hkv)
    pk_ = pv_ = None
    if p is not None:
        pk_, pv_ = torch.randn(*lead, p, d, generator=g), torch.randn(*lead, p, d, generator=g)
    mask = None
    if dims["mask"] == "keypad":
        mask = torch.rand(b, m, generator=g) > 0.4
    elif dims["mask"] == "full":
        mask = torch.rand(b, 1, n, m, generator=g) > 0.4
    inputs = [q, k, v, pk_, pv_]
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    kwargs = dict(attn_mask=mask, causal=dims["causal"], scale=None if d else 1.0)
    out = pk.prefix_attention(*ours, backend=backend, **kwargs)
    want = prefix_attention_ref(*ref, upcast=True, **kwargs)
    assert out.shape == (b, hq, n, d)
    dout = torch.randn(out.shape, generator=g)
    used = [t for t in ours if t is not None]
    _check(
        [out, *_grads(out, used, dout)],
        [want, *_grads(want, [t for t in ref if t is not None], dout.double())],
        ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"][: 1 + len(used)],
    )


_BASE = dict(b=2, hkv=1, groups=2, n=2, m=2, p=1, d=4, causal=True, shared=True, mask=None)


def _alone(**zero) -> dict:
    return {**_BASE, **zero}


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_attention_empty_and_size_one_dims(backend):
    @_settings(backend)
    @given(dims=attention_dims())
    @example(dims=_alone(n=0))  # the SIGFPE of the issue, with a prefix ...
    @example(dims=_alone(n=0, p=None, causal=False))  # ... and without
    @example(dims=_alone(m=0, causal=False))  # only prefix keys
    @example(dims=_alone(m=0, p=0, causal=False))  # nothing to attend to: zeros
    @example(dims=_alone(b=0, mask="keypad"))
    @example(dims=_alone(p=0, shared=False))
    @example(dims=_alone(d=0))
    @example(dims=_alone(hkv=0))
    @example(dims={**_BASE, "b": 1, "hkv": 1, "groups": 1, "n": 1, "m": 1, "d": 1})
    def run(dims):
        _attention_case(backend, dims)

    run()


# ----------------------------------------------------------------------------- lora_linear


@st.composite
def lora_dims(draw):
    return dict(
        lead=draw(st.lists(SIZE, min_size=1, max_size=2)),  # the token dimensions (..., in)
        fin=draw(SIZE),
        fout=draw(SIZE),
        r=draw(st.sampled_from([0, 1, 2])),
        bias=draw(st.booleans()),
    )


def _lora_case(backend: str, dims: dict) -> None:
    g = torch.Generator().manual_seed(0)
    fin, fout, r = dims["fin"], dims["fout"], dims["r"]
    x = torch.randn(*dims["lead"], fin, generator=g)
    weight, lora_a, lora_b = (
        torch.randn(fout, fin, generator=g),
        torch.randn(r, fin, generator=g),
        torch.randn(fout, r, generator=g),
    )
    bias = torch.randn(fout, generator=g) if dims["bias"] else None
    inputs = [x, weight, bias, lora_a, lora_b]
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    out = pk.lora_linear(*ours, 0.7, backend=backend)
    want = lora_linear_ref(*ref, 0.7, upcast=True)
    assert out.shape == (*dims["lead"], fout)
    dout = torch.randn(out.shape, generator=g)
    used = [t for t in ours if t is not None]
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    _check(
        [out, *_grads(out, used, dout)],
        [want, *_grads(want, [t for t in ref if t is not None], dout.double())],
        ["out", *(f"d{n}" for n, t in zip(names, inputs, strict=True) if t is not None)],
    )


_LORA = dict(lead=[3], fin=2, fout=2, r=2, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_empty_and_size_one_dims(backend):
    @_settings(backend)
    @given(dims=lora_dims())
    @example(dims={**_LORA, "lead": [0]})
    @example(dims={**_LORA, "lead": [2, 0]})
    @example(dims={**_LORA, "fin": 0})  # y = bias
    @example(dims={**_LORA, "fout": 0})
    @example(dims={**_LORA, "r": 0})  # a plain linear
    @example(dims={**_LORA, "lead": [1], "fin": 1, "fout": 1, "r": 1})
    def run(dims):
        _lora_case(backend, dims)

    run()


# ----------------------------------------------------------------------------- adapter


@st.composite
def adapter_dims(draw):
    residual = draw(st.booleans())
    d_in = draw(SIZE)
    return dict(
        lead=draw(st.lists(SIZE, min_size=1, max_size=2)),
        d_in=d_in,
        d_out=draw(SIZE) if residual else d_in,
        r=draw(st.sampled_from([0, 1, 2])),
        biases=draw(st.booleans()),
        residual=residual,
        activation=draw(st.sampled_from(["gelu", "relu", "silu", "gelu_tanh"])),
    )


def _adapter_case(backend: str, dims: dict) -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r = dims["d_in"], dims["d_out"], dims["r"]
    x = torch.randn(*dims["lead"], d_in, generator=g)
    down, up = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    down_b = torch.randn(r, generator=g) if dims["biases"] else None
    up_b = torch.randn(d_out, generator=g) if dims["biases"] else None
    residual = torch.randn(*dims["lead"], d_out, generator=g) if dims["residual"] else None
    inputs = [x, down, down_b, up, up_b, residual]
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    kwargs = dict(activation=dims["activation"], scaling=0.5)
    out = pk.adapter(*ours[:5], residual=ours[5], backend=backend, **kwargs)
    want = adapter_ref(*ref[:5], residual=ref[5], upcast=True, **kwargs)
    assert out.shape == (*dims["lead"], d_out)
    dout = torch.randn(out.shape, generator=g)
    used = [t for t in ours if t is not None]
    names = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "residual"]
    _check(
        [out, *_grads(out, used, dout)],
        [want, *_grads(want, [t for t in ref if t is not None], dout.double())],
        ["out", *(f"d{n}" for n, t in zip(names, inputs, strict=True) if t is not None)],
    )


_ADAPTER = dict(lead=[3], d_in=2, d_out=2, r=2, biases=True, residual=False, activation="gelu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_empty_and_size_one_dims(backend):
    @_settings(backend)
    @given(dims=adapter_dims())
    @example(dims={**_ADAPTER, "lead": [0]})
    @example(dims={**_ADAPTER, "d_in": 0, "d_out": 0})
    @example(dims={**_ADAPTER, "d_out": 0, "residual": True})
    @example(dims={**_ADAPTER, "r": 0})  # the output is the residual (+ up_bias)
    @example(dims={**_ADAPTER, "lead": [1], "d_in": 1, "d_out": 1, "r": 1})
    def run(dims):
        _adapter_case(backend, dims)

    run()
