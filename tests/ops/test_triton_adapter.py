"""adapter, triton backend: forward and every gradient against the float64 reference."""


import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from ptpeft_kernels.ops.activations import ACTIVATIONS
from ptpeft_kernels.ops.adapter import adapter_ref
from tests.helpers import CUDA, DEVICE, DTYPE_TOLS, GRAD_FACTOR, assert_close, leaf, triton_marks
from tests.ops.test_adapter import make
from tests.ops.test_triton_lora import force_gemm_tiles, gemm_config_params

pytestmark = triton_marks()
OP = "adapter"
NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias")


def on_device(t: dict) -> dict:
    if not CUDA:
        return t
    strided = not t["x"].is_contiguous()
    moved = {n: None if v is None else v.detach().to(DEVICE) for n, v in t.items()}
    if strided:  # .to() would make the strided view contiguous again
        big = torch.empty(
            *moved["x"].shape[:-1], 2 * moved["x"].shape[-1], device=DEVICE, dtype=moved["x"].dtype
        )
        big[..., ::2] = moved["x"]
        moved["x"] = big[..., ::2]
    return {n: None if v is None else v.requires_grad_(t[n].requires_grad) for n, v in moved.items()}


def check(t, dtype, atol, rtol, activation="gelu", scaling=0.7):
    out = pk.adapter(*(t[n] for n in NAMES), activation=activation, scaling=scaling, residual=t["residual"],
                     backend="triton")  # fmt: skip
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    wanted = [n for n, v in t.items() if v is not None and v.requires_grad]
    got = torch.autograd.grad(out, [t[n] for n in wanted], grad_out)

    def ref_run(conv, upcast):
        ins = {n: None if v is None else leaf(conv(v.detach().cpu()), v.requires_grad) for n, v in t.items()}
        y = adapter_ref(*(ins[n] for n in NAMES), activation=activation, scaling=scaling,
                        residual=ins["residual"], upcast=upcast)  # fmt: skip
        return y, torch.autograd.grad(y, [ins[n] for n in wanted], grad_out.cpu().to(y.dtype))

    ref, ref_grads = ref_run(lambda v: v.double(), True)
    lowp, lowp_grads = None, [None] * len(wanted)
    if dtype in (torch.bfloat16, torch.float16):
        lowp, lowp_grads = ref_run(lambda v: v, False)
    assert_close("y", out.cpu(), ref, atol=atol, rtol=rtol, ref_lowp=lowp)
    for name, g, r, lg in zip(wanted, got, ref_grads, lowp_grads, strict=True):
        assert_close(f"d{name}", g.cpu(), r, atol=atol, rtol=rtol, ref_lowp=lg, factor=GRAD_FACTOR)


LEAD = (3, 41) if CUDA else (2, 19)


# Every activation with each dtype; the bias / explicit-residual variants rotate over them (the
# CPU interpreter is slow, and the epilogue terms do not depend on the activation).
VARIANTS = [(act, *[(True, False), (False, True), (True, True)][i % 3]) for i, act in enumerate(ACTIVATIONS)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("activation,bias,residual", VARIANTS)
def test_matches_float64_reference(activation, bias, residual, dtype, atol, rtol):
    t = make(LEAD, 40, 8, dtype, bias=bias, residual=residual)
    check(on_device(t), dtype, atol, rtol, activation)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("r", [1, 64])
def test_bottlenecks_and_projection_to_another_width(r, dtype, atol, rtol):
    check(on_device(make((37,), 24, r, dtype, residual=True, d_out=40)), dtype, atol, rtol, "silu")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_noncontiguous_input(dtype, atol, rtol):
    t = make((3, 11), 24, 8, dtype, noncontig=True)
    assert not t["x"].is_contiguous()
    check(on_device(t), dtype, atol, rtol, "gelu_tanh")


def test_frozen_adapter_input_gradient_only():
    t = make(LEAD, 40, 8, torch.float32)
    for name in NAMES[1:]:
        t[name].requires_grad_(False)
    check(on_device(t), torch.float32, 2e-5, 2e-5, "relu")


def test_large_pre_activations_stay_finite():
    """gelu_tanh / silu / gelu at |h| up to ~100: exponentials saturate instead of overflowing to NaN."""
    t = make((2, 9), 24, 8, torch.float32)
    with torch.no_grad():
        t["down_weight"].mul_(200.0)
    t = on_device(t)
    args = [t[n] for n in NAMES]
    for activation in ("gelu_tanh", "silu", "gelu"):
        out = pk.adapter(*args, activation=activation, backend="triton")
        got = torch.autograd.grad(out.sum(), args)
        ins = [leaf(a.detach().cpu().double()) for a in args]
        ref = adapter_ref(*ins, activation=activation)
        ref_grads = torch.autograd.grad(ref.sum(), ins)
        assert ref.abs().max() > 50  # the regime this test is about
        for name, g, r in zip(("y", *NAMES), (out, *got), (ref, *ref_grads), strict=True):
            # Relative to the largest value: with |h| ~ 100 single-precision sums carry absolute
            # rounding of that order; what matters here is finite values with the reference's shape.
            scale = r.abs().max().item()
            assert_close(f"{activation} {name}", g.cpu(), r, atol=2e-6 * scale, rtol=1e-4)


@pytest.mark.parametrize("dclass,tiles", gemm_config_params())
def test_every_gemm_tile_config_is_correct(dclass, tiles, monkeypatch):
    """Each GEMM config forced (not the tuner's pick) for every GEMM of the forward and backward."""
    dtype, atol, rtol = force_gemm_tiles(monkeypatch, dclass, tiles, interpreted_class="fp32")
    check(on_device(make((2, 19), 40, 8, dtype, residual=True, d_out=24)), dtype, atol, rtol)


def test_explicit_triton_refuses_float64():
    t = make((3,), 8, 2, torch.float64)
    with pytest.raises(pk.BackendUnavailableError, match="float64"):
        pk.adapter(*(on_device(t)[n] for n in NAMES), backend="triton")


def test_auto_never_picks_triton_for_cpu_tensors():
    t = make((3,), 8, 2, torch.float32)
    assert backends.resolve(OP, "auto", *(t[n] for n in NAMES), "gelu", 1.0, None) == "torch"
