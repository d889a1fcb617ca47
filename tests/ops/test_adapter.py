"""adapter, torch backend: forward and every gradient against the float64 reference."""

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.ops.activations import ACTIVATIONS, activate, activation_grad
from ptpeft_kernels.ops.adapter import adapter_ref
from tests.helpers import DTYPE_TOLS, GRAD_FACTOR, activation_reference, assert_close, leaf, noncontiguous
from tests.ops.test_lora import saved_tensors_during


def make(lead, d, r, dtype, bias=True, residual=False, d_out=None, seed=0, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    d_out = d_out or d

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = rnd(*lead, d)
    x = noncontiguous(x).requires_grad_() if noncontig else leaf(x)
    return {
        "x": x,
        "down_weight": leaf(rnd(r, d, scale=d**-0.5)),
        "down_bias": leaf(rnd(r)) if bias else None,
        "up_weight": leaf(rnd(d_out, r, scale=r**-0.5)),
        "up_bias": leaf(rnd(d_out)) if bias else None,
        "residual": leaf(rnd(*lead, d_out)) if residual else None,
    }


def check(t, dtype, atol, rtol, activation="gelu", scaling=0.7):
    args = [t[n] for n in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    out = pk.adapter(*args, activation=activation, scaling=scaling, residual=t["residual"], backend="torch")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    wanted = [n for n, v in t.items() if v is not None]
    got = torch.autograd.grad(out, [t[n] for n in wanted], grad_out)

    def ref_run(conv, upcast):
        ins = {n: None if v is None else leaf(conv(v)) for n, v in t.items()}
        ref_args = [ins[n] for n in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
        y = adapter_ref(
            *ref_args, activation=activation, scaling=scaling, residual=ins["residual"], upcast=upcast
        )
        return y, torch.autograd.grad(y, [ins[n] for n in wanted], grad_out.to(y.dtype))

    ref, ref_grads = ref_run(lambda v: v.double(), True)
    lowp, lowp_grads = (None, [None] * len(wanted))
    if dtype in (torch.bfloat16, torch.float16):
        lowp, lowp_grads = ref_run(lambda v: v, False)
    assert_close("y", out, ref, atol=atol, rtol=rtol, ref_lowp=lowp)
    for name, g, r, lg in zip(wanted, got, ref_grads, lowp_grads, strict=True):
        assert_close(f"d{name}", g, r, atol=atol, rtol=rtol, ref_lowp=lg, factor=GRAD_FACTOR)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True)])
def test_matches_float64_reference(activation, bias, residual, dtype, atol, rtol):
    check(make((2, 7), 24, 8, dtype, bias=bias, residual=residual), dtype, atol, rtol, activation)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("r", [1, 64])
def test_ranks_and_projection_to_another_width(r, dtype, atol, rtol):
    check(make((5,), 16, r, dtype, residual=True, d_out=24), dtype, atol, rtol, "silu")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_noncontiguous_input(dtype, atol, rtol):
    check(make((3, 4), 24, 8, dtype, noncontig=True), dtype, atol, rtol, "gelu_tanh")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives_match_autograd(activation):
    h = torch.linspace(-4, 4, 101, dtype=torch.float64).requires_grad_()
    (expected,) = torch.autograd.grad(activate(h, activation).sum(), h)
    torch.testing.assert_close(activation_grad(h.detach(), activation), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_and_backend_activations_follow_their_formulas(activation):
    """``adapter_ref`` and the backends' ``activate`` against tests.helpers' formulas, in float64.

    Mutation it guards against: the backends' GELU switched to its tanh approximation
    (``F.gelu(h)`` -> ``F.gelu(h, approximate="tanh")`` in ``activations.activate``). While
    ``adapter_ref`` called that same helper, the forward comparisons agreed with it (2.8e-7
    apart); only the gradients, from ``activation_grad`` which the reference did not share, differed.
    """
    h = torch.linspace(-6, 6, 241, dtype=torch.float64)
    torch.testing.assert_close(
        activate(h, activation), activation_reference(h, activation), rtol=1e-12, atol=1e-12
    )
    t = make((2, 7), 24, 8, torch.float64, residual=True)
    x, wd, bd, wu, bu, res = (
        t[n].detach() for n in ("x", "down_weight", "down_bias", "up_weight", "up_bias", "residual")
    )
    expected = res + 0.7 * (activation_reference(x @ wd.t() + bd, activation) @ wu.t() + bu)
    got = adapter_ref(x, wd, bd, wu, bu, activation=activation, scaling=0.7, residual=res)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_only_bottleneck_sized_activations_are_saved():
    t = make((4, 8), 24, 6, torch.float32)
    args = [t[n] for n in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    _, saved = saved_tensors_during(lambda: pk.adapter(*args, backend="torch"))
    params = {id(v) for n, v in t.items() if v is not None and n != "x"}
    activations = sorted(s.numel() for s in saved if id(s) not in params)
    assert activations == sorted([t["x"].numel(), 32 * 6])


def test_gradcheck_float64():
    t = make((2, 3), 5, 3, torch.float64, residual=True)
    names = [n for n, v in t.items() if v is not None]

    def fn(x, wd, bd, wu, bu, res):
        return pk.adapter(x, wd, bd, wu, bu, activation="gelu", scaling=0.9, residual=res, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(t[n] for n in names), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- bad input


def _good():
    return dict(
        x=torch.randn(3, 8),
        down_weight=torch.randn(4, 8),
        down_bias=torch.randn(4),
        up_weight=torch.randn(8, 4),
        up_bias=torch.randn(8),
    )


BAD = [
    ("x type", dict(x=None), TypeError, "x must be a torch.Tensor"),
    ("x width", dict(x=torch.randn(3, 7)), ValueError, "x must end with d_in = 8"),
    ("down ndim", dict(down_weight=torch.randn(4, 8, 1)), ValueError, "down_weight must be 2-D"),
    (
        "up shape",
        dict(up_weight=torch.randn(8, 5)),
        ValueError,
        "up_weight must have the bottleneck size = 4",
    ),
    (
        "no residual width",
        dict(up_weight=torch.randn(6, 4), up_bias=torch.randn(6)),
        ValueError,
        "without residual",
    ),
    ("residual shape", dict(residual=torch.randn(3, 6)), ValueError, "residual must be (..., d_out)"),
    ("down bias", dict(down_bias=torch.randn(5)), ValueError, "down_bias must have size = 4"),
    ("dtype", dict(up_bias=torch.randn(8, dtype=torch.float64)), TypeError, "up_bias has dtype"),
    ("activation", dict(activation="tanh"), ValueError, "activation must be one of"),
    ("scaling", dict(scaling=None), TypeError, "scaling must be a real number"),
    ("backend", dict(backend="gpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,override,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, override, exc, match):
    args = _good()
    kwargs = dict(activation="gelu", scaling=1.0, residual=None, backend="torch")
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(exc) as info:
        pk.adapter(*args.values(), **kwargs)
    assert match in str(info.value)
