"""prefix_attention, torch backend: forward and all five gradients against the float64 reference.

The reference is ``tests.helpers.attention_reference``, written from the definition without any
library code; the library's own ``prefix_attention_ref`` is checked against it here too.
"""

import sys
from dataclasses import dataclass

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.ops.prefix_attention import prefix_attention_ref
from tests.helpers import DTYPE_TOLS, GRAD_FACTOR, assert_close, attention_reference, leaf, noncontiguous


@dataclass(frozen=True)
class Case:
    b: int = 2
    hq: int = 4
    hkv: int = 2
    n: int = 6
    m: int = 6
    p: int | None = 3  # None: no prefix tensors at all
    d: int = 40
    causal: bool = True
    mask: str = "none"  # none | keypad | keypad_empty | full1 | fullh | full_empty_rows | bcast
    shared: bool = True
    noncontig: bool = False

    def __str__(self) -> str:
        return "-".join(f"{k}{v}" for k, v in self.__dict__.items())


CASES = [
    Case(),
    Case(p=0),
    Case(p=1),
    Case(p=None),
    Case(n=5, m=9),  # decode-like: M > N, bottom-right causal
    Case(n=1, m=7, p=5),  # one decode step
    Case(n=5, m=9, causal=False),
    Case(n=9, m=4, causal=False, p=2),  # cross-attention: M < N
    Case(hq=4, hkv=4, p=2, d=64),  # plain multi-head
    Case(hq=4, hkv=1, n=5, m=8, d=80),  # multi-query
    Case(d=128, n=4, m=4, p=2),
    Case(shared=False, n=5, m=9),
    Case(shared=False, p=1, causal=False),
    Case(mask="keypad", n=5, m=9),
    Case(mask="keypad", p=None, n=5, m=9),
    Case(mask="keypad_empty", p=None, n=5, m=9),  # a fully padded sample: rows see nothing
    Case(mask="keypad_empty", p=2, n=5, m=9),  # ... but still see the prefix
    Case(mask="keypad", causal=False, p=None),
    Case(mask="full1", n=5, m=9),
    Case(mask="fullh", n=5, m=9),  # per-head mask with a prefix (the joint path's concatenated mask)
    Case(mask="keypad", hkv=1, n=3, m=8, p=2, shared=False),  # multi-query, M > N, padding, prefix
    Case(mask="fullh", n=5, m=9, p=None),
    Case(mask="full_empty_rows", p=None, n=5, m=9),
    Case(mask="full_empty_rows", p=4, causal=False, n=5, m=9),
    Case(mask="bcast", n=5, m=9),  # (B, 1, 1, M) is a key-padding mask
    Case(noncontig=True, n=5, m=9),
    Case(noncontig=True, mask="keypad", shared=False, hkv=1),
]


def make_mask(case: Case, gen: torch.Generator) -> torch.Tensor | None:
    b, hq, n, m = case.b, case.hq, case.n, case.m
    if case.mask == "none":
        return None
    if case.mask.startswith("keypad"):
        mask = torch.rand(b, m, generator=gen) > 0.3
        mask[:, -1] = True
        if case.mask == "keypad_empty":
            mask[0] = False
        return mask
    if case.mask == "bcast":
        mask = torch.rand(b, 1, 1, m, generator=gen) > 0.3
        mask[..., -1] = True
        return mask
    heads = hq if case.mask == "fullh" else 1
    mask = torch.rand(b, heads, n, m, generator=gen) > 0.4
    if case.mask == "full_empty_rows":
        mask[0, :, 1] = False
        mask[1, :, -1] = False
    return mask


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = (
        rnd(case.b, case.hq, case.n, case.d),
        rnd(case.b, case.hkv, case.m, case.d),
        rnd(case.b, case.hkv, case.m, case.d),
    )
    prefix = None
    if case.p is not None:
        lead = (case.hkv,) if case.shared else (case.b, case.hkv)
        prefix = (rnd(*lead, case.p, case.d), rnd(*lead, case.p, case.d))
    tensors = [q, k, v] + (list(prefix) if prefix else [])
    if case.noncontig:
        tensors = [noncontiguous(t) for t in tensors]
    return [leaf(t) for t in tensors] if not case.noncontig else [
        t.requires_grad_() for t in tensors
    ], make_mask(case, gen)


PA = sys.modules["ptpeft_kernels.ops.prefix_attention"]


@pytest.fixture(params=["split", "joint"])
def cpu_path(request, monkeypatch):
    """Both CPU strategies for a prefix: split (sequence and prefix apart, merged by LSE) and
    joint (one fused call over concatenated keys, used below a size threshold). Yields a
    counter of joint calls so a test can check the path it asked for was taken."""
    for bound in ("_JOINT_MAX_SCORES", "_JOINT_MAX_COPY"):
        monkeypatch.setattr(PA, bound, 0 if request.param == "split" else 1 << 62)
    calls = []
    joint_part = PA._joint_part
    monkeypatch.setattr(PA, "_joint_part", lambda *a: calls.append(1) or joint_part(*a))
    return request.param, calls


def check_path(cpu_path, case) -> None:
    name, calls = cpu_path
    joint_expected = name == "joint" and bool(case.p)
    assert bool(calls) == joint_expected, f"asked for the {name} path, joint calls: {len(calls)}"


def run(fn, tensors, mask, causal, **kwargs):
    q, k, v, *prefix = tensors
    prefix_k, prefix_v = prefix if prefix else (None, None)
    return fn(q, k, v, prefix_k, prefix_v, attn_mask=mask, causal=causal, **kwargs)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_float64_reference(case, dtype, atol, rtol, cpu_path):
    """Split and joint CPU paths against the first-principles reference.

    Mutation it guards against: the joint path's causal rule shifted by one (``.tril(m - n)`` ->
    ``.tril(m - n + 1)`` in ``_sequence_visibility``). While the library reference built its mask
    with that same helper, 42 joint cases passed on it.
    """
    tensors, mask = make_inputs(case, dtype)
    out = run(pk.prefix_attention, tensors, mask, case.causal, backend="torch")
    assert out.dtype == dtype and out.shape == (case.b, case.hq, case.n, case.d)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, tensors, grad_out)

    ref_in = [leaf(t.double()) for t in tensors]
    ref = run(attention_reference, ref_in, mask, case.causal)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    lowp = lowp_grads = None
    if dtype in (torch.bfloat16, torch.float16):
        lowp_in = [leaf(t) for t in tensors]
        lowp = run(attention_reference, lowp_in, mask, case.causal, dtype=dtype)
        lowp_grads = torch.autograd.grad(lowp, lowp_in, grad_out)

    assert_close("out", out, ref, atol=atol, rtol=rtol, ref_lowp=lowp)
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for i, (name, g, r) in enumerate(zip(names, got, ref_grads, strict=False)):
        assert g.shape == tensors[i].shape
        assert_close(
            name,
            g,
            r,
            atol=atol,
            rtol=rtol,
            ref_lowp=None if lowp is None else lowp_grads[i],
            factor=GRAD_FACTOR,
        )
    check_path(cpu_path, case)


def test_rows_with_nothing_visible_are_zero_not_nan():
    case = Case(mask="keypad_empty", p=None, n=5, m=9)
    tensors, mask = make_inputs(case, torch.float32)
    out = run(pk.prefix_attention, tensors, mask, True, backend="torch")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    grads = torch.autograd.grad(out.sum(), tensors)
    assert all(torch.isfinite(g).all() for g in grads)


def test_shared_prefix_gradient_is_the_batch_sum_of_per_batch_prefixes(cpu_path):
    case = Case(n=5, m=9)
    (q, k, v, pk_, pv_), _ = make_inputs(case, torch.float64)
    out = pk.prefix_attention(q, k, v, pk_, pv_, backend="torch")
    dpk, dpv = torch.autograd.grad(out.sum(), [pk_, pv_])
    pkb, pvb = leaf(pk_.expand(case.b, -1, -1, -1)), leaf(pv_.expand(case.b, -1, -1, -1))
    out_b = pk.prefix_attention(q, k, v, pkb, pvb, backend="torch")
    dpkb, dpvb = torch.autograd.grad(out_b.sum(), [pkb, pvb])
    torch.testing.assert_close(out, out_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(dpk, dpkb.sum(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(dpv, dpvb.sum(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [
        Case(d=8, n=3, m=5, p=2),
        Case(d=8, n=3, m=3, p=None, mask="keypad"),
        Case(d=8, n=4, m=3, p=1, causal=False, mask="full_empty_rows", shared=False),
    ],
    ids=str,
)
def test_gradcheck_float64(case, cpu_path):
    tensors, mask = make_inputs(case, torch.float64)

    def fn(*ts):
        return run(pk.prefix_attention, list(ts), mask, case.causal, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-7)
    check_path(cpu_path, case)


@pytest.mark.parametrize(
    "case",
    [
        Case(n=5, m=9),
        Case(mask="full_empty_rows", n=5, m=9, shared=False),
        Case(mask="keypad_empty", p=None, n=5, m=9),
        Case(n=9, m=4, causal=False),
    ],
    ids=str,
)
def test_generic_engine_matches_reference(case, monkeypatch):
    """The device-agnostic path (used for non-CPU tensors by the torch backend), forced on the CPU."""
    monkeypatch.setattr(PA, "_use_fused_cpu", lambda q, part: False)
    tensors, mask = make_inputs(case, torch.float32)
    out = run(pk.prefix_attention, tensors, mask, case.causal, backend="torch")
    got = torch.autograd.grad(out.sum(), tensors)
    ref_in = [leaf(t.double()) for t in tensors]
    ref = run(attention_reference, ref_in, mask, case.causal)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    assert_close("out", out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(got, ref_grads, strict=True):
        assert_close("grad", g, r, atol=2e-5, rtol=2e-5)


def test_no_sequence_keys_attends_to_prefix_only():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=gen, dtype=torch.float64)
    k = v = torch.zeros(1, 2, 0, 8, dtype=torch.float64)
    pk_, pv_ = torch.randn(2, 2, 4, 8, generator=gen, dtype=torch.float64).unbind(0)
    out = pk.prefix_attention(q, k, v, pk_, pv_, causal=False, backend="torch")
    torch.testing.assert_close(out, attention_reference(q, k, v, pk_, pv_, causal=False))
    torch.testing.assert_close(prefix_attention_ref(q, k, v, pk_, pv_, causal=False), out)


def test_matches_sdpa_without_prefix():
    """Anchors the reference itself to PyTorch's SDPA (top-left == bottom-right when N == M)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 16, generator=gen, dtype=torch.float64).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_reference(q, k, v), expected)
    torch.testing.assert_close(prefix_attention_ref(q, k, v), expected)
    torch.testing.assert_close(pk.prefix_attention(q, k, v, backend="torch"), expected)


def test_custom_scale():
    case = Case(n=5, m=9)
    tensors, mask = make_inputs(case, torch.float64)
    out = run(pk.prefix_attention, tensors, mask, True, scale=0.3, backend="torch")
    ref = run(attention_reference, tensors, mask, True, scale=0.3)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, run(attention_reference, tensors, mask, True))
    torch.testing.assert_close(run(prefix_attention_ref, tensors, mask, True, scale=0.3), ref)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_library_reference_matches_first_principles(case):
    """``pk.prefix_attention_ref`` (what benchmarks and users compare against) is the definition.

    Mutation it guards against: the reference's own causal rule shifted by one
    (``key <= query + (m - n)`` -> ``key <= query + (m - n) + 1`` in ``_reference_visibility``).
    """
    tensors, mask = make_inputs(case, torch.float64)
    ref = run(prefix_attention_ref, tensors, mask, case.causal)
    expected = run(attention_reference, tensors, mask, case.causal)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(ref, tensors, grad_out)
    want = torch.autograd.grad(expected, tensors, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bad input


def _good():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 7, 8, generator=gen)
    return q, k, k.clone(), torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)


BAD = [
    ("q", dict(q=torch.randn(4, 5, 8)), ValueError, "q must be 4-D"),
    ("q int", dict(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), TypeError, "q must have a floating dtype"),
    ("q list", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("k dtype", dict(k=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, "k has dtype"),
    ("k/v shape", dict(v=torch.randn(2, 2, 6, 8)), ValueError, "k and v must have the same shape"),
    ("batch", dict(k=torch.randn(3, 2, 7, 8), v=torch.randn(3, 2, 7, 8)), ValueError, "batch size"),
    ("head dim", dict(k=torch.randn(2, 2, 7, 4), v=torch.randn(2, 2, 7, 4)), ValueError, "head dim"),
    ("gqa", dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), ValueError, "Hq % Hkv"),
    ("causal M<N", dict(k=torch.randn(2, 2, 3, 8), v=torch.randn(2, 2, 3, 8)), ValueError, "M >= N"),
    ("causal type", dict(causal=1), TypeError, "causal must be a bool"),
    ("scale", dict(scale=-1.0), ValueError, "scale must be >"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale must be finite"),
    ("prefix alone", dict(prefix_v=None), ValueError, "given together"),
    (
        "prefix heads",
        dict(prefix_k=torch.randn(4, 3, 8), prefix_v=torch.randn(4, 3, 8)),
        ValueError,
        "prefix_k must be (Hkv, P, D)",
    ),
    (
        "prefix batch",
        dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)),
        ValueError,
        "prefix_k must be (B, Hkv, P, D)",
    ),
    (
        "prefix ndim",
        dict(prefix_k=torch.randn(3, 8), prefix_v=torch.randn(3, 8)),
        ValueError,
        "prefix_k must be 3-D or 4-D",
    ),
    ("prefix p mismatch", dict(prefix_v=torch.randn(2, 4, 8)), ValueError, "same shape"),
    (
        "prefix dtype",
        dict(prefix_k=torch.randn(2, 3, 8).double(), prefix_v=torch.randn(2, 3, 8).double()),
        TypeError,
        "prefix_k has dtype",
    ),
    (
        "prefix device",
        dict(prefix_k=torch.randn(2, 3, 8, device="meta"), prefix_v=torch.randn(2, 3, 8)),
        ValueError,
        "prefix_k is on meta",
    ),
    ("mask dtype", dict(attn_mask=torch.zeros(2, 7)), TypeError, "attn_mask must be a bool"),
    ("mask padding shape", dict(attn_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key-padding"),
    (
        "mask 4d shape",
        dict(attn_mask=torch.ones(2, 3, 5, 7, dtype=torch.bool)),
        ValueError,
        "(B, 1 or Hq, 1 or N, M)",
    ),
    ("mask 3d", dict(attn_mask=torch.ones(2, 5, 7, dtype=torch.bool)), ValueError, "attn_mask must be 2-D"),
    ("backend", dict(backend="cudnn"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, override, exc, match):
    q, k, v, pk_, pv_ = _good()
    args = dict(q=q, k=k, v=v, prefix_k=pk_, prefix_v=pv_)
    kwargs = dict(attn_mask=None, causal=True, scale=None, backend="torch")
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(exc) as info:
        pk.prefix_attention(*args.values(), **kwargs)
    assert match in str(info.value)


@pytest.mark.parametrize(
    "b,hq,hkv,n,m,d,p,joint",
    [
        (32, 4, 2, 41, 41, 32, 8, True),  # the built-in model's training attention: joint 0.71x split
        (1, 8, 8, 1, 256, 64, 16, True),  # a short decode step
        (4, 8, 8, 1, 1024, 64, 16, False),  # decode over a long cache: copying it would cost 2.6x
        (4, 8, 8, 1024, 1024, 64, 16, False),  # long causal sequence: split skips masked blocks
        (2, 4, 2, 5, 9, 40, 0, False),  # no prefix: nothing to join
    ],
)
def test_default_cpu_path_choice(b, hq, hkv, n, m, d, p, joint):
    q, k = torch.empty(b, hq, n, d), torch.empty(b, hkv, m, d)
    assert PA._joint_wanted(q, k, torch.empty(hkv, p, d)) is joint
