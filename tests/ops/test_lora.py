"""lora_linear, torch backend: forward and every gradient against the float64 reference."""

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from ptpeft_kernels.ops.lora import draw_dropout_seed, lora_linear_ref
from tests.helpers import DTYPE_TOLS, GRAD_FACTOR, assert_close, leaf, noncontiguous
from tests.ops.test_dropout_rate import assert_keep_rate

SHAPES = [  # (lead shape of x, in, out, r)
    ((7,), 24, 16, 1),
    ((2, 5), 24, 40, 8),
    ((3, 4), 32, 24, 64),  # rank larger than both feature sizes
]


def make(lead, fin, fout, r, dtype, bias=True, w_grad=False, seed=0, noncontig=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = rnd(*lead, fin)
    if noncontig:
        x = noncontiguous(x)
    tensors = {
        "x": x.requires_grad_() if noncontig else leaf(x),
        "weight": leaf(rnd(fout, fin, scale=fin**-0.5), w_grad),
        "bias": leaf(rnd(fout)) if bias else None,
        "lora_A": leaf(rnd(r, fin, scale=fin**-0.5)),
        "lora_B": leaf(rnd(fout, r, scale=r**-0.5)),
    }
    return tensors


def check_against_reference(t, dtype, atol, rtol, dropout_p=0.0, backend="torch", scaling=1.7):
    torch.manual_seed(1234)
    out = pk.lora_linear(*t.values(), scaling, dropout_p=dropout_p, backend=backend)
    keep = None
    if dropout_p > 0:
        torch.manual_seed(1234)
        seed = draw_dropout_seed()
        x = t["x"]
        mask_fn = backends.get_impl("lora_linear", backend, "dropout_mask")
        keep = mask_fn((x.numel() // x.shape[-1], x.shape[-1]), dropout_p, seed, x.device).view(x.shape)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    wanted = [name for name, v in t.items() if v is not None and v.requires_grad]
    got = torch.autograd.grad(out, [t[n] for n in wanted], grad_out)

    ref_in = {n: None if v is None else leaf(v.double(), v.requires_grad) for n, v in t.items()}
    ref = lora_linear_ref(*ref_in.values(), scaling, dropout_keep=keep, dropout_p=dropout_p)
    ref_grads = torch.autograd.grad(ref, [ref_in[n] for n in wanted], grad_out.double())
    lowp, lowp_grads = None, [None] * len(wanted)
    if dtype in (torch.bfloat16, torch.float16):
        lowp_in = {n: None if v is None else leaf(v, v.requires_grad) for n, v in t.items()}
        lowp = lora_linear_ref(
            *lowp_in.values(), scaling, dropout_keep=keep, dropout_p=dropout_p, upcast=False
        )
        lowp_grads = torch.autograd.grad(lowp, [lowp_in[n] for n in wanted], grad_out)

    assert out.dtype == dtype
    assert_close("y", out, ref, atol=atol, rtol=rtol, ref_lowp=lowp)
    for name, g, r, lg in zip(wanted, got, ref_grads, lowp_grads, strict=True):
        assert_close(f"d{name}", g, r, atol=atol, rtol=rtol, ref_lowp=lg, factor=GRAD_FACTOR)
    return out, keep


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("lead,fin,fout,r", SHAPES)
@pytest.mark.parametrize("bias,w_grad", [(True, False), (False, True), (True, True)])
def test_matches_float64_reference(lead, fin, fout, r, bias, w_grad, dtype, atol, rtol):
    t = make(lead, fin, fout, r, dtype, bias=bias, w_grad=w_grad)
    check_against_reference(t, dtype, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_noncontiguous_input(dtype, atol, rtol):
    check_against_reference(make((3, 5), 24, 16, 8, dtype, noncontig=True), dtype, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_dropout_matches_reference_with_the_same_mask(dtype, atol, rtol):
    t = make((4, 6), 32, 16, 8, dtype, w_grad=True)
    _, keep = check_against_reference(t, dtype, atol, rtol, dropout_p=0.4)
    assert_keep_rate(keep, 0.4, "the mask this call used")  # the rate itself: tests/ops/test_dropout_rate.py


def test_dropout_is_reproducible_and_varies_with_the_seed():
    t = make((4, 6), 32, 16, 8, torch.float32)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(pk.lora_linear(*t.values(), 1.0, dropout_p=0.5, backend="torch"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


def saved_tensors_during(fn):
    """Run ``fn`` and return every tensor autograd saves for the backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_frozen_weight_gets_no_gradient_and_only_rank_sized_activations_are_saved():
    t = make((2, 8), 24, 40, 4, torch.float32)
    out, saved = saved_tensors_during(lambda: pk.lora_linear(*t.values(), 1.0, backend="torch"))
    params = {id(v) for v in t.values() if v is not None and v is not t["x"]}
    activations = [s for s in saved if id(s) not in params]
    tokens, r = 16, 4
    # x itself plus the tokens x r LoRA activation; nothing of size tokens x out_features.
    assert sorted(a.numel() for a in activations) == sorted([t["x"].numel(), tokens * r])
    assert any(a is t["x"] for a in activations)
    out.sum().backward()
    assert t["weight"].grad is None
    assert t["lora_A"].grad is not None and t["x"].grad is not None


def test_gradcheck_float64():
    t = make((2, 3), 6, 5, 2, torch.float64, w_grad=True)
    names = list(t)

    def fn(*ts):
        return pk.lora_linear(*ts, 0.8, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(t[n] for n in names), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- bad input


def _good():
    return dict(
        x=torch.randn(3, 8),
        weight=torch.randn(6, 8),
        bias=torch.randn(6),
        lora_A=torch.randn(2, 8),
        lora_B=torch.randn(6, 2),
    )


BAD = [
    ("x type", dict(x=3.0), TypeError, "x must be a torch.Tensor"),
    ("x int", dict(x=torch.ones(3, 8, dtype=torch.int32)), TypeError, "x must have a floating dtype"),
    ("x features", dict(x=torch.randn(3, 7)), ValueError, "in_features = 8"),
    ("weight ndim", dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
    ("A features", dict(lora_A=torch.randn(2, 5)), ValueError, "lora_A must have in_features"),
    ("B shape", dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must be (out_features, r)"),
    ("bias size", dict(bias=torch.randn(5)), ValueError, "bias must have out_features"),
    ("dtype", dict(lora_A=torch.randn(2, 8, dtype=torch.float64)), TypeError, "lora_A has dtype"),
    ("device", dict(lora_B=torch.randn(6, 2, device="meta")), ValueError, "lora_B is on meta"),
    ("scaling", dict(scaling="2"), TypeError, "scaling must be a real number"),
    ("scaling inf", dict(scaling=float("inf")), ValueError, "scaling must be finite"),
    ("dropout", dict(dropout_p=1.0), ValueError, "dropout_p must be <"),
    ("dropout neg", dict(dropout_p=-0.1), ValueError, "dropout_p must be >="),
    ("backend", dict(backend="cutlass"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, override, exc, match):
    args = _good()
    kwargs = dict(scaling=1.0, dropout_p=0.0, backend="torch")
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value
    scaling = kwargs.pop("scaling")
    with pytest.raises(exc) as info:
        pk.lora_linear(*args.values(), scaling, **kwargs)
    assert match in str(info.value)
