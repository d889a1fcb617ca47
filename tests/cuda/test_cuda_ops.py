"""The compiled cuda backend on a GPU: every op against float64 and the Triton backend.

Skipped unless ``cuda`` is among ``available_backends()`` (a GPU, and ``ptpeft_kernels._C``
built and loaded: ``python -m ptpeft_kernels.build_cuda``). Low-precision outputs follow
DESIGN.md's rule (tests/helpers.assert_close): the error against float64 at most 2x (forward)
/ 3x (gradients) that of the same-dtype PyTorch reference.
"""

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from ptpeft_kernels.ops import adapter_ref, lora_linear_ref
from ptpeft_kernels.ops.activations import ACTIVATIONS
from ptpeft_kernels.ops.lora import draw_dropout_seed
from ptpeft_kernels.ops.prefix_attention import prefix_attention_ref
from tests.helpers import GRAD_FACTOR, assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in pk.available_backends(), reason="needs a GPU and the built extension"),
]
DEV = "cuda"
HALVES = [torch.float16, torch.bfloat16]


def _check(name, got, ref64, ref_lowp, factor=2.0):
    if got.dtype in (torch.float16, torch.bfloat16):
        assert_close(name, got, ref64, ref_lowp=ref_lowp, factor=factor)
    else:
        assert_close(name, got, ref64, atol=5e-5, rtol=5e-5)


# ----------------------------------------------------------------------------- decode attention


def _decode_inputs(b, hq, hkv, n, m, p, d, dtype, shared=True, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEV).to(dtype)

    lead = (hkv,) if shared else (b, hkv)
    pk_, pv_ = (rnd(*lead, p, d), rnd(*lead, p, d)) if p is not None else (None, None)
    return rnd(b, hq, n, d), rnd(b, hkv, m, d), rnd(b, hkv, m, d), pk_, pv_


def _attention_case(q, k, v, pk_, pv_, mask=None, causal=True, num_splits=0):
    """Kernel output (sentinel-prefilled) checked against float64, the same-dtype reference and Triton."""
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEV)
    scale = q.shape[-1] ** -0.5
    torch.ops.ptpeft_cuda.decode_attention(q, k, v, pk_, pv_, mask, causal, scale, num_splits, out, lse)
    ref64 = prefix_attention_ref(q, k, v, pk_, pv_, attn_mask=mask, causal=causal).double()
    lowp = prefix_attention_ref(q, k, v, pk_, pv_, attn_mask=mask, causal=causal, upcast=False)
    _check("out", out, ref64, lowp)
    assert not torch.isnan(lse).any()
    triton_out = pk.prefix_attention(q, k, v, pk_, pv_, attn_mask=mask, causal=causal, backend="triton")
    err_ours = (out.double() - ref64).abs().max().item()
    err_triton = (triton_out.double() - ref64).abs().max().item()
    assert err_ours <= 2 * err_triton + 4 * torch.finfo(q.dtype).eps * ref64.abs().max().item()
    return out, lse


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("m", [1, 17, 4095])
@pytest.mark.parametrize("p", [0, 1, 7, 32])
def test_decode_cache_lengths_and_prefixes(dtype, m, p):
    _attention_case(*_decode_inputs(2, 8, 2, 1, m, p, 128, dtype, seed=m + p))


@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("n", [1, 4, 16])
def test_decode_head_dims_gqa_and_query_counts(d, groups, n):
    _attention_case(
        *_decode_inputs(3, 8, 8 // groups, n, 300, 5, d, torch.bfloat16, shared=False, seed=d + n)
    )


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_decode_forced_splits_agree(splits):
    _attention_case(*_decode_inputs(1, 4, 1, 2, 2000, 32, 128, torch.float16), num_splits=splits)


@pytest.mark.parametrize("form", ["padding", "full"])
def test_decode_masks(form):
    b, hq, n, m = 4, 8, 3, 257
    q, k, v, pk_, pv_ = _decode_inputs(b, hq, 2, n, m, 7, 64, torch.bfloat16)
    g = torch.Generator(device=DEV).manual_seed(3)
    if form == "padding":
        mask = torch.rand(b, m, generator=g, device=DEV) > 0.2
        mask[1] = False  # all padded: rows see only the prefix
    else:
        mask = torch.rand(b, hq, n, m, generator=g, device=DEV) > 0.5
    _attention_case(q, k, v, pk_, pv_, mask=mask)
    _attention_case(q, k, v, None, None, mask=mask, causal=False)  # some rows see nothing: zeros


def test_decode_through_the_public_function_and_fallthrough():
    q, k, v, pk_, pv_ = _decode_inputs(2, 4, 2, 1, 64, 4, 64, torch.float16)
    with torch.no_grad():
        assert backends.resolve("prefix_attention", "auto", q, k, v, pk_, pv_, None, True, 0.125) == "cuda"
        out = pk.prefix_attention(q, k, v, pk_, pv_, backend="cuda")
    ref = prefix_attention_ref(q, k, v, pk_, pv_).double()
    _check("out", out, ref, prefix_attention_ref(q, k, v, pk_, pv_, upcast=False))
    long_q = torch.randn(2, 4, 17, 64, device=DEV, dtype=torch.float16)  # prefill: not the cuda kernel's
    assert backends.resolve("prefix_attention", "auto", long_q, k, v, pk_, pv_, None, True, 0.125) != "cuda"
    q.requires_grad_(True)  # forward-only: a gradient falls through, an explicit request raises
    assert backends.resolve("prefix_attention", "auto", q, k, v, pk_, pv_, None, True, 0.125) != "cuda"
    with pytest.raises(pk.BackendUnavailableError, match="forward-only"):
        pk.prefix_attention(q, k, v, pk_, pv_, backend="cuda")


def test_decode_rejects_bad_arguments_with_messages():
    q, k, v, _, _ = _decode_inputs(1, 2, 1, 1, 8, None, 64, torch.float16)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 1, device=DEV)
    with pytest.raises(RuntimeError, match="head dim must be 64, 80, 96 or 128, got 32"):
        torch.ops.ptpeft_cuda.decode_attention(q[..., :32], k[..., :32], v[..., :32], None, None, None, True,
                                               1.0, 0, out[..., :32], lse)  # fmt: skip
    with pytest.raises(RuntimeError, match="lse must be float32"):
        torch.ops.ptpeft_cuda.decode_attention(q, k, v, None, None, None, True, 1.0, 0, out, lse.half())


# ----------------------------------------------------------------------------- LoRA


def _lora_inputs(dtype, tokens=(3, 70), in_f=96, out_f=80, r=16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    weight, lora_a = rnd(out_f, in_f, scale=in_f**-0.5), rnd(r, in_f, scale=in_f**-0.5)
    return rnd(*tokens, in_f), weight, rnd(out_f), lora_a, rnd(out_f, r)


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
@pytest.mark.parametrize("r", [1, 8, 64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_lora_forward_and_gradients(dtype, r, dropout_p):
    x, w, bias, a, b = _lora_inputs(dtype, r=r, seed=r)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias, a, b)]
    torch.manual_seed(11)
    y = pk.lora_linear(*leaves, 0.5, dropout_p=dropout_p, backend="cuda")
    torch.manual_seed(11)
    seed = draw_dropout_seed() if dropout_p > 0 else 0
    keep = backends.get_impl("lora_linear", "cuda", "dropout_mask")(x.shape, dropout_p, seed, x.device)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [t.detach().double().requires_grad_() for t in (x, w, bias, a, b)]
    ref = lora_linear_ref(*l64, 0.5, dropout_keep=keep, dropout_p=dropout_p)
    lowp_leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias, a, b)]
    lowp = lora_linear_ref(*lowp_leaves, 0.5, dropout_keep=keep, dropout_p=dropout_p, upcast=False)
    _check("y", y, ref, lowp)
    ref_grads = torch.autograd.grad(ref, l64, dy.double())
    lowp_grads = torch.autograd.grad(lowp, lowp_leaves, dy)
    for name, got, want, lo in zip(("dx", "dW", "db", "dA", "dB"), grads, ref_grads, lowp_grads, strict=True):
        _check(name, got, want, lo, factor=GRAD_FACTOR)


def test_lora_dropout_stream_matches_triton():
    cuda_mask = backends.get_impl("lora_linear", "cuda", "dropout_mask")
    triton_mask = backends.get_impl("lora_linear", "triton", "dropout_mask")
    for shape, p, seed in [((5, 77, 96), 0.1, 123), ((1024, 4096), 0.5, 2**50 + 7)]:
        assert torch.equal(cuda_mask(shape, p, seed, DEV), triton_mask(shape, p, seed, DEV))


def test_lora_frozen_weight_gets_no_gradient_work():
    x, w, bias, a, b = _lora_inputs(torch.bfloat16)
    a.requires_grad_(True)
    b.requires_grad_(True)
    y = pk.lora_linear(x, w, None, a, b, 2.0, backend="cuda")
    y.sum().backward()
    assert w.grad is None and a.grad is not None and b.grad is not None


# ----------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_adapter_forward_and_gradients(dtype, activation, with_residual):
    g = torch.Generator(device=DEV).manual_seed(len(activation))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    d_out = 48 if with_residual else 64
    inputs = [rnd(4, 33, 64), rnd(16, 64, scale=0.125), rnd(16), rnd(d_out, 16, scale=0.25), rnd(d_out)]
    residual = rnd(4, 33, d_out) if with_residual else None
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = pk.adapter(*leaves, activation=activation, scaling=0.5, residual=residual, backend="cuda")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [t.double().requires_grad_() for t in inputs]
    res64 = residual.double() if residual is not None else None
    ref = adapter_ref(*l64, activation=activation, scaling=0.5, residual=res64)
    low = [t.clone().requires_grad_() for t in inputs]
    lowp = adapter_ref(*low, activation=activation, scaling=0.5, residual=residual, upcast=False)
    _check("y", y, ref, lowp)
    for name, got, want, lo in zip(
        ("dx", "dWd", "dbd", "dWu", "dbu"), grads, torch.autograd.grad(ref, l64, dy.double()),
        torch.autograd.grad(lowp, low, dy), strict=True,
    ):  # fmt: skip
        _check(name, got, want, lo, factor=GRAD_FACTOR)


# ----------------------------------------------------------------------------- generate()


def test_generate_with_the_cuda_backend_gives_the_torch_backends_tokens(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Head dim 64 (hidden 128, 2 heads, GQA 2:1), a prompt of 9 tokens: every attention call,
    # prefill included, has N <= 16 and no gradient, so the pinned cuda backend serves them all.
    sizes = dict(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2)
    config = LlamaConfig(**sizes, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = pk.apply_prefix(LlamaForCausalLM(config), num_prefix=5, reparam_hidden=16)
    model = model.to(DEV, torch.float16).eval()
    prompt = torch.randint(0, 97, (2, 9), device=DEV)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    tokens = {}
    for backend in ("torch", "cuda"):
        monkeypatch.setenv("PTPEFT_BACKEND", backend)
        with torch.no_grad():
            tokens[backend] = model.generate(input_ids=prompt, attention_mask=mask, **kwargs)
    assert torch.equal(tokens["cuda"], tokens["torch"])
