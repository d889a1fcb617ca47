"""prefix_attention, triton backend: forward and all five gradients against the float64 reference.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py), so the
shapes are small but span several tiles of every kind the kernels distinguish: the prefix
tail, key tiles every row sees whole, the causal diagonal band, tiles skipped past it, and
partial query/key tiles. On a CUDA machine the same cases run natively with longer sequences.
The reference is ``tests.helpers.attention_reference`` (the definition, no library code).
"""

import dataclasses
import importlib

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from ptpeft_kernels.ops.prefix_attention import prefix_attention_ref
from ptpeft_kernels.ops.triton_impl.configs import ATTN_BWD, ATTN_DECODE, ATTN_FWD
from tests.helpers import (
    CUDA,
    DEVICE,
    DTYPE_TOLS,
    GRAD_FACTOR,
    assert_close,
    attention_reference,
    leaf,
    noncontiguous,
    triton_marks,
)
from tests.ops.test_prefix_attention import Case, make_inputs, run

pytestmark = triton_marks()
OP = "prefix_attention"
TRITON_PA = importlib.import_module("ptpeft_kernels.ops.triton_impl.prefix_attention")
COMMON = importlib.import_module("ptpeft_kernels.ops.triton_impl._common")


def scaled(case: Case) -> Case:
    """Longer sequences on a GPU (single-query decode cases stay single-query)."""
    if not CUDA:
        return case
    return dataclasses.replace(case, n=case.n if case.n == 1 else case.n * 8, m=case.m * 8)


CASES = [
    Case(n=37, m=45, p=5),  # GQA 4/2, shared prefix, causal band + skipped key tiles, partial tiles
    Case(n=40, m=40, p=0, d=64),  # an empty prefix
    Case(n=33, m=33, p=1, shared=False, causal=False),
    Case(n=48, m=48, p=None),  # no prefix at all
    Case(n=20, m=41, p=7, hkv=1, causal=False),  # multi-query, odd prefix, M > N without causality
    Case(n=41, m=17, p=2, causal=False),  # cross-attention with M < N
    Case(n=1, m=40, p=3),  # one decode step
    Case(n=5, m=40),  # decode-like M >> N, bottom-right causal
    Case(n=24, m=40, p=3, mask="keypad"),
    Case(n=24, m=40, p=None, mask="keypad_empty"),  # a fully padded sample: rows see nothing
    Case(n=24, m=40, p=2, mask="keypad_empty"),  # ... but still see the prefix
    Case(n=24, m=40, p=3, mask="full1", causal=False),
    Case(n=24, m=40, p=None, mask="fullh"),
    Case(n=24, m=40, p=None, mask="full_empty_rows", causal=False),
    Case(n=24, m=40, p=4, mask="full_empty_rows", shared=False),
    Case(n=24, m=40, mask="bcast"),
    Case(n=24, m=40, p=5, noncontig=True),
    Case(n=24, m=40, noncontig=True, mask="keypad", shared=False, hkv=1),
    Case(n=20, m=28, p=3, d=32, hq=2, hkv=1),
    Case(n=20, m=28, p=3, d=80, hq=2, hkv=2),
    Case(n=18, m=18, p=2, d=96, b=1),
    Case(n=20, m=20, p=2, d=128, hq=2, hkv=1, b=1),
]

LOWP_CASES = [  # bfloat16 on the mask / layout variants, float16 on one (the interpreter is slow)
    (Case(n=37, m=45, p=5), torch.bfloat16),
    (Case(n=40, m=40, p=0, d=64), torch.bfloat16),
    (Case(n=24, m=40, p=3, mask="keypad"), torch.bfloat16),
    (Case(n=24, m=40, p=4, mask="full_empty_rows", shared=False), torch.bfloat16),
    (Case(n=24, m=40, p=5, noncontig=True), torch.bfloat16),
    (Case(n=37, m=45, p=5), torch.float16),
    # The benchmarked shape class (bf16, D=128, P=32): the D=128 tiles and a prefix of two key tiles.
    (Case(n=33, m=40, p=32, d=128, hq=2, hkv=1), torch.bfloat16),
]


def to_device(tensors, mask):
    if not CUDA:
        return tensors, mask
    strided = not tensors[0].is_contiguous()  # .to() would make a strided view contiguous again
    moved = [t.detach().to(DEVICE) for t in tensors]
    moved = [(noncontiguous(t) if strided else t).requires_grad_() for t in moved]
    return moved, None if mask is None else mask.to(DEVICE)


def check(case: Case, dtype, atol, rtol, scale=None):
    case = scaled(case)
    tensors, mask = to_device(*make_inputs(case, dtype))
    kwargs = {} if scale is None else {"scale": scale}
    out = run(pk.prefix_attention, tensors, mask, case.causal, backend="triton", **kwargs)
    assert out.dtype == dtype and out.shape == (case.b, case.hq, case.n, case.d)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got = torch.autograd.grad(out, tensors, grad_out)

    ref_in = [leaf(t.detach().cpu().double()) for t in tensors]
    mask_cpu = None if mask is None else mask.cpu()
    ref = run(attention_reference, ref_in, mask_cpu, case.causal, **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.cpu().double())
    lowp = lowp_grads = None
    if dtype in (torch.bfloat16, torch.float16):
        lowp_in = [leaf(t.detach().cpu()) for t in tensors]
        lowp = run(attention_reference, lowp_in, mask_cpu, case.causal, dtype=dtype, **kwargs)
        lowp_grads = torch.autograd.grad(lowp, lowp_in, grad_out.cpu())

    assert_close("out", out.cpu(), ref, atol=atol, rtol=rtol, ref_lowp=lowp)
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for i, (name, g, r) in enumerate(zip(names, got, ref_grads, strict=False)):
        assert g.shape == tensors[i].shape, name
        lg = None if lowp_grads is None else lowp_grads[i]
        assert_close(name, g.cpu(), r, atol=atol, rtol=rtol, ref_lowp=lg, factor=GRAD_FACTOR)
    return out, got


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference_float32(case):
    """Mutation it guards against: the kernel's causal band shifted by one (``offs_n[None, :] <=
    offs_m[:, None] + diag`` -> ``<`` in the forward)."""
    _, atol, rtol = DTYPE_TOLS[0]
    check(case, torch.float32, atol, rtol)


@pytest.mark.parametrize("case,dtype", LOWP_CASES, ids=[f"{c}-{d}" for c, d in LOWP_CASES])
def test_low_precision_error_is_within_the_same_dtype_reference_rule(case, dtype):
    check(case, dtype, None, None)


def test_custom_scale():
    check(Case(n=20, m=30, p=3), torch.float32, 2e-5, 2e-5, scale=0.3)


def test_rows_with_nothing_visible_are_zero_with_finite_gradients():
    case = Case(n=24, m=40, p=None, mask="keypad_empty")
    tensors, mask = to_device(*make_inputs(case, torch.float32))
    out = run(pk.prefix_attention, tensors, mask, True, backend="triton")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    grads = torch.autograd.grad(out.sum(), tensors)
    assert all(torch.isfinite(g).all() for g in grads)
    # Padded keys of the empty sample get no gradient at all.
    assert torch.equal(grads[1][0], torch.zeros_like(grads[1][0]))


def test_lse_is_the_log_sum_exp_over_visible_keys():
    """The (out, lse) contract the backward relies on, against the torch backend's values."""
    case = Case(n=24, m=40, p=3, mask="full_empty_rows", shared=False)
    (q, k, v, pk_, pv_), mask = to_device(*make_inputs(case, torch.float32))
    mask[0, :, :, :] = False  # sample 0: only the prefix is visible; no-prefix rows come below
    scale = case.d**-0.5
    out, lse = backends.get_impl(OP, "triton")(q, k, v, pk_, pv_, mask, True, scale)
    ref_out, ref_lse = backends.get_impl(OP, "torch")(q.cpu(), k.cpu(), v.cpu(), pk_.cpu(), pv_.cpu(),
                                                      mask.cpu(), True, scale)  # fmt: skip
    assert lse.dtype == torch.float32 and lse.shape == (case.b, case.hq, case.n)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=2e-5)
    _, lse_none = backends.get_impl(OP, "triton")(q, k, v, None, None, mask, True, scale)
    assert torch.isneginf(lse_none[0]).all() and torch.isfinite(lse_none[1]).any()


def test_shared_prefix_gradient_is_the_batch_sum_of_per_batch_prefix_gradients():
    case = Case(n=20, m=33, p=5)
    (q, k, v, pk_, pv_), _ = to_device(*make_inputs(case, torch.float32))
    out = pk.prefix_attention(q, k, v, pk_, pv_, backend="triton")
    dpk, dpv = torch.autograd.grad(out.sum(), [pk_, pv_])
    pkb = leaf(pk_.expand(case.b, -1, -1, -1))
    pvb = leaf(pv_.expand(case.b, -1, -1, -1))
    out_b = pk.prefix_attention(q, k, v, pkb, pvb, backend="triton")
    dpkb, dpvb = torch.autograd.grad(out_b.sum(), [pkb, pvb])
    torch.testing.assert_close(out, out_b, rtol=0, atol=0)
    torch.testing.assert_close(dpk, dpkb.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpv, dpvb.sum(0), rtol=1e-5, atol=1e-5)


def test_launchers_write_every_element_of_nan_filled_outputs():
    """The public op allocates its outputs; the launchers take them, so pre-fill them with NaN."""
    impl = TRITON_PA
    case = Case(n=37, m=45, p=5, mask="full_empty_rows")
    (q, k, v, pk_, pv_), mask = to_device(*make_inputs(case, torch.float32))
    q, k, v, pk_, pv_ = (t.detach() for t in (q, k, v, pk_, pv_))
    scale = case.d**-0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    impl._launch_forward(q, k, v, pk_, pv_, mask, True, scale, out, lse)
    ref_out, ref_lse = backends.get_impl(OP, "torch")(*(t.cpu() for t in (q, k, v, pk_, pv_)), mask.cpu(),
                                                      True, scale)  # fmt: skip
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=2e-5)

    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.device)
    bufs = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    # The shared prefix's per-batch float32 partials.
    bufs += [torch.full((case.b, *pk_.shape), float("nan"), device=q.device) for _ in range(2)]
    impl._launch_backward(dout, q, k, v, pk_, pv_, mask, out, lse, True, scale, *bufs)
    ref = backends.get_impl(OP, "torch", "backward")(
        dout.cpu(), *(t.cpu() for t in (q, k, v, pk_, pv_)), mask.cpu(), ref_out, ref_lse, True, scale
    )
    got = [*bufs[:3], bufs[3].sum(0), bufs[4].sum(0)]
    for name, g, r in zip(["dq", "dk", "dv", "dpk", "dpv"], got, ref, strict=True):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g.cpu(), r, atol=1e-5, rtol=1e-5, msg=name)


def test_prefix_only_attention_with_no_sequence_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 20, 40, generator=gen, device="cpu").to(DEVICE).requires_grad_()
    k = v = torch.zeros(1, 2, 0, 40, device=DEVICE)
    pk_ = torch.randn(2, 5, 40, generator=gen).to(DEVICE).requires_grad_()
    pv_ = torch.randn(2, 5, 40, generator=gen).to(DEVICE).requires_grad_()
    out = pk.prefix_attention(q, k, v, pk_, pv_, causal=False, backend="triton")
    got = torch.autograd.grad(out.sum(), [q, pk_, pv_])
    ref_in = [leaf(t.detach().cpu().double()) for t in (q, pk_, pv_)]
    ref = attention_reference(ref_in[0], k.cpu().double(), v.cpu().double(), *ref_in[1:], causal=False)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    assert_close("out", out.cpu(), ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(got, ref_grads, strict=True):
        assert_close("grad", g.cpu(), r, atol=2e-5, rtol=2e-5)


def check_launchers(case: Case, dtype, *, fwd=None, bwd=None, split_keys=None, backward=True):
    """The launchers with forced tile configs, into NaN-filled outputs, against the float64 reference.

    ``fwd`` forces the forward config (of the small-N kernel when N <= 16, with ``split_keys`` keys
    per range), ``bwd`` the backward's; the output, the LSE and all five gradients are compared.
    """
    tensors, mask = to_device(*make_inputs(case, dtype))
    q, k, v, *prefix = (t.detach() for t in tensors)
    pk_, pv_ = prefix if prefix else (None, None)
    scale = case.d**-0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    TRITON_PA.launch_any_forward(q, k, v, pk_, pv_, mask, case.causal, scale, out, lse, fwd, split_keys)

    ref_in = [leaf(t.cpu().double()) for t in (q, k, v, *prefix)]
    mask_cpu = None if mask is None else mask.cpu()
    ref = run(prefix_attention_ref, ref_in, mask_cpu, case.causal, scale=scale)
    _, ref_lse = backends.get_impl(OP, "torch")(*(t.detach() for t in ref_in), *([None] * (2 - len(prefix))),
                                               mask_cpu, case.causal, scale)  # fmt: skip
    lowp_in = lowp = None
    if dtype in (torch.bfloat16, torch.float16):
        lowp_in = [leaf(t.cpu()) for t in (q, k, v, *prefix)]
        lowp = run(prefix_attention_ref, lowp_in, mask_cpu, case.causal, upcast=False, scale=scale)
    tol = DTYPE_TOLS[0][1]
    assert_close("out", out.cpu(), ref, atol=tol, rtol=tol, ref_lowp=lowp)
    # The LSE is float32 arithmetic on the (possibly bf16) inputs in every case.
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert_close("lse", lse.cpu()[finite].double(), ref_lse[finite], atol=5e-5, rtol=5e-5)
    if not backward:
        return
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(q.device)
    got = TRITON_PA.backward(dout, q, k, v, pk_, pv_, mask, out, lse, case.causal, scale, tiles=bwd)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.cpu().double())
    lowp_grads = [None] * 5
    if lowp is not None:
        lowp_grads = torch.autograd.grad(lowp, lowp_in, dout.cpu())
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, g, r, lg in zip(names, got, ref_grads, lowp_grads, strict=False):
        assert_close(name, g.cpu(), r, atol=tol, rtol=tol, ref_lowp=lg, factor=GRAD_FACTOR)


def _every_config():
    """(kernel, dtype class, head bucket, tiles) for every config of every attention tile table."""
    params = []
    for kernel, table in (("fwd", ATTN_FWD), ("bwd", ATTN_BWD), ("decode", ATTN_DECODE)):
        for (dclass, bucket), tiles in table.items():
            for t in tiles:
                # The interpreter runs one class, cheaply and with exact float32 products: fp32, D <= 64.
                skip = not CUDA and (dclass, bucket) != ("fp32", 64)
                marks = [pytest.mark.skip(reason="runs on a GPU; the interpreter runs the fp32 D<=64 class")]
                name = f"{kernel}-{dclass}-d{bucket}-{t.name}-sm{'+'.join(map(str, t.archs))}"
                params.append(pytest.param(kernel, dclass, bucket, t, id=name, marks=marks if skip else []))
    return params


@pytest.mark.parametrize("kernel,dclass,bucket,tiles", _every_config())
def test_every_tile_config_is_correct_at_an_odd_shape(kernel, dclass, bucket, tiles):
    """Each config of each shape class, forced (not the tuner's pick), against float64 at one odd shape."""
    if CUDA and COMMON.arch_of(torch.device(DEVICE)) not in tiles.archs:
        pytest.skip(f"listed for sm_{tiles.archs} only")  # it may spill here: compile_check checks that
    dtype = torch.float32 if dclass == "fp32" else torch.bfloat16
    d = 40 if bucket == 64 else 128
    if kernel == "decode":
        check_launchers(Case(n=3, m=45, p=5, d=d, b=1, hq=4, hkv=1, mask="keypad"), dtype, fwd=tiles,
                        backward=False)  # fmt: skip
    else:
        case = Case(n=21, m=38, p=5, d=d, b=1, mask="keypad")
        check_launchers(case, dtype, **({"fwd": tiles} if kernel == "fwd" else {"bwd": tiles}),
                        backward=kernel == "bwd")  # fmt: skip


# ----------------------------------------------------------------------------- what it refuses


def test_explicit_triton_refuses_an_unsupported_head_dim():
    q = torch.randn(1, 2, 4, 256, device=DEVICE)
    with pytest.raises(pk.BackendUnavailableError, match="head dims up to 128, got 256"):
        pk.prefix_attention(q, q, q, backend="triton")


def test_explicit_triton_refuses_float64():
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(pk.BackendUnavailableError, match="float64"):
        pk.prefix_attention(q, q, q, backend="triton")


def test_auto_never_picks_triton_for_cpu_tensors():
    q = torch.randn(1, 2, 4, 16)
    pk_ = torch.randn(2, 3, 16)
    assert backends.resolve(OP, "auto", q, q, q, pk_, pk_, None, True, 0.25) == "torch"
    # ... although triton itself could run them here (explicitly, under the interpreter).
    if not CUDA:
        assert backends.resolve(OP, "triton", q, q, q, pk_, pk_, None, True, 0.25) == "triton"


@pytest.mark.skipif(not CUDA, reason="a CPU-tensor refusal only exists where triton is compiled for a GPU")
def test_explicit_triton_refuses_cpu_tensors_on_a_gpu_machine(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(pk.BackendUnavailableError, match="CUDA tensors"):
        pk.prefix_attention(q, q, q, backend="triton")
