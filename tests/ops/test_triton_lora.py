"""lora_linear, triton backend: forward and every gradient against the float64 reference.

Under the CPU interpreter the shapes are small but span several output tiles, partial tiles
and, for the token reductions (dA, dB), several split-K partials.
"""

import importlib

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from ptpeft_kernels.ops.lora import draw_dropout_seed, lora_linear_ref
from tests.helpers import CUDA, DEVICE, DTYPE_TOLS, GRAD_FACTOR, assert_close, leaf, triton_marks
from tests.ops.test_dropout_rate import assert_keep_rate
from tests.ops.test_lora import make

pytestmark = triton_marks()
OP = "lora_linear"

# (lead shape of x, in, out, r, bias, weight needs grad): every shape once with each dtype, the
# bias / frozen-weight variants spread over them (the CPU interpreter is slow); wider on a GPU.
CASES = [
    ((7,), 24, 16, 1, True, False),
    ((2, 19), 40, 72, 8, False, True),
    ((3, 11), 36, 24, 64, True, True),  # rank larger than both feature sizes: the rank slab loops
    ((2, 19), 40, 72, 8, True, False),
]
if CUDA:
    CASES += [((4, 300), 512, 768, 16, True, False), ((4, 300), 512, 768, 16, True, True)]


def gemm_config_params():
    """(dtype class, tiles) of every GEMM config; on a GPU each runs only on the architectures it lists."""
    configs = importlib.import_module("ptpeft_kernels.ops.triton_impl.configs")
    return [pytest.param(dclass, t, id=f"{dclass}-{t.name}-sm{'+'.join(map(str, t.archs))}")
            for dclass, tiles in configs.GEMM.items() for t in tiles]  # fmt: skip


def force_gemm_tiles(monkeypatch, dclass, tiles, interpreted_class):
    """Every GEMM launch with ``tiles`` (natively, or under the interpreter); returns (dtype, atol, rtol):
    the class's dtype on a GPU, float32 under the interpreter (the tiles' shapes are what is tested).
    The interpreter runs one class per op test file (``interpreted_class``), to bound its time."""
    if not CUDA and dclass != interpreted_class:
        pytest.skip(f"the interpreter runs the {dclass} GEMM configs in the other op's test file")
    gemm_mod = importlib.import_module("ptpeft_kernels.ops.triton_impl.gemm")
    if CUDA and importlib.import_module("ptpeft_kernels.ops.triton_impl._common").arch_of(
        torch.device(DEVICE)
    ) not in tiles.archs:
        pytest.skip(f"listed for sm_{tiles.archs} only")
    monkeypatch.setattr(gemm_mod, "gemm_tiles", lambda dtype, m, n: [tiles])
    monkeypatch.setattr(gemm_mod, "_interpreter_meta", lambda m, n, k: dict(tiles.blocks))
    if CUDA and dclass == "16bit":
        return torch.bfloat16, None, None
    return torch.float32, 2e-5, 2e-5


def on_device(t: dict) -> dict:
    if not CUDA:
        return t
    return {n: None if v is None else leaf(v.detach().to(DEVICE), v.requires_grad) for n, v in t.items()}


def check_against_reference(t, dtype, atol, rtol, dropout_p=0.0, backend="triton", scaling=1.7):
    """Forward and every requested gradient vs float64, with the backend's own dropout mask."""
    torch.manual_seed(1234)
    out = pk.lora_linear(*t.values(), scaling, dropout_p=dropout_p, backend=backend)
    keep = None
    if dropout_p > 0:
        torch.manual_seed(1234)  # the op drew its seed first thing from this generator
        seed = draw_dropout_seed()
        x = t["x"]
        mask_fn = backends.get_impl(OP, backend, "dropout_mask")
        keep = mask_fn((x.numel() // x.shape[-1], x.shape[-1]), dropout_p, seed, x.device).view(x.shape)
        keep = keep.cpu()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    wanted = [name for name, v in t.items() if v is not None and v.requires_grad]
    got = torch.autograd.grad(out, [t[n] for n in wanted], grad_out.to(out.device))

    def ref_run(conv, upcast):
        ins = {n: None if v is None else leaf(conv(v.detach().cpu()), v.requires_grad) for n, v in t.items()}
        y = lora_linear_ref(*ins.values(), scaling, dropout_keep=keep, dropout_p=dropout_p, upcast=upcast)
        return y, torch.autograd.grad(y, [ins[n] for n in wanted], grad_out.to(y.dtype))

    ref, ref_grads = ref_run(lambda v: v.double(), True)
    lowp, lowp_grads = None, [None] * len(wanted)
    if dtype in (torch.bfloat16, torch.float16):
        lowp, lowp_grads = ref_run(lambda v: v, False)
    assert out.dtype == dtype
    assert_close("y", out.cpu(), ref, atol=atol, rtol=rtol, ref_lowp=lowp)
    for name, g, r, lg in zip(wanted, got, ref_grads, lowp_grads, strict=True):
        assert_close(f"d{name}", g.cpu(), r, atol=atol, rtol=rtol, ref_lowp=lg, factor=GRAD_FACTOR)
    return out, keep


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
@pytest.mark.parametrize("lead,fin,fout,r,bias,w_grad", CASES)
def test_matches_float64_reference(lead, fin, fout, r, bias, w_grad, dtype, atol, rtol):
    t = on_device(make(lead, fin, fout, r, dtype, bias=bias, w_grad=w_grad))
    check_against_reference(t, dtype, atol, rtol, backend="triton")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_noncontiguous_input(dtype, atol, rtol):
    t = make((3, 5), 24, 16, 8, dtype, noncontig=True)
    if CUDA:
        t = on_device(t)
        big = torch.zeros(*t["x"].shape[:-1], 2 * t["x"].shape[-1], dtype=dtype, device=DEVICE)
        big[..., ::2] = t["x"].detach()
        t["x"] = big[..., ::2].requires_grad_()
    assert not t["x"].is_contiguous()
    check_against_reference(t, dtype, atol, rtol, backend="triton")


def test_only_the_lora_factors_need_gradients():
    t = make((2, 19), 40, 24, 8, torch.float32)
    t["x"].requires_grad_(False)
    check_against_reference(on_device(t), torch.float32, 2e-5, 2e-5, backend="triton")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLS)
def test_dropout_matches_reference_with_the_kernels_mask(dtype, atol, rtol):
    t = on_device(make((4, 9), 40, 24, 8, dtype, w_grad=True))
    _, keep = check_against_reference(t, dtype, atol, rtol, dropout_p=0.4, backend="triton")
    assert_keep_rate(keep, 0.4, "the mask this call used")  # the rate itself: tests/ops/test_dropout_rate.py


def test_dropout_mask_is_reproducible_and_varies_with_the_seed():
    mask_fn = backends.get_impl(OP, "triton", "dropout_mask")
    a = mask_fn((33, 40), 0.3, 1234, torch.device(DEVICE))
    b = mask_fn((33, 40), 0.3, 1234, torch.device(DEVICE))
    c = mask_fn((33, 40), 0.3, 2**40 + 7, torch.device(DEVICE))  # 64-bit seeds are used whole
    assert a.dtype == torch.bool and a.shape == (33, 40)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert mask_fn((33, 40), 0.0, 1234, torch.device(DEVICE)) is None
    # Rows and columns are not a shifted copy of each other (the counters are (column, row)).
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[:, 0], a[:, 1])


def test_public_dropout_is_reproducible_under_manual_seed():
    t = on_device(make((4, 6), 32, 16, 8, torch.float32))
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(pk.lora_linear(*t.values(), 1.0, dropout_p=0.5, backend="triton"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


def test_gemm_split_k_and_row_sums_match_torch():
    """The building block on its own: split-K partials, row sums, every epilogue term."""
    gemm = importlib.import_module("ptpeft_kernels.ops.triton_impl.gemm").gemm
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(45, 70, generator=gen).to(DEVICE)
    b = torch.randn(70, 37, generator=gen).to(DEVICE)
    for split in (1, 3):
        c, rows = gemm(a.t().contiguous().t(), b, alpha=0.5, row_sum=True, split_k=split)
        torch.testing.assert_close(c, 0.5 * a @ b, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rows, a.sum(1), atol=1e-4, rtol=1e-5)
    bias = torch.randn(37, generator=gen).to(DEVICE)
    res = torch.randn(45, 37, generator=gen).to(DEVICE)
    a2, b2 = torch.randn(45, 5, generator=gen).to(DEVICE), torch.randn(5, 37, generator=gen).to(DEVICE)
    out = torch.full((45, 37), float("nan"), device=DEVICE)
    c, _ = gemm(a, b, out=out, alpha=0.5, bias=bias, extra=(a2, b2, 0.3), residual=res)
    assert c is out and not out.isnan().any()
    torch.testing.assert_close(c, 0.5 * (a @ b + bias) + 0.3 * a2 @ b2 + res, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="split_k"):
        gemm(a, b, bias=bias, split_k=2)


@pytest.mark.parametrize("dclass,tiles", gemm_config_params())
def test_every_gemm_tile_config_is_correct(dclass, tiles, monkeypatch):
    """Each GEMM config forced (not the tuner's pick) for every GEMM of the forward and backward."""
    dtype, atol, rtol = force_gemm_tiles(monkeypatch, dclass, tiles, interpreted_class="16bit")
    t = on_device(make((2, 19), 40, 72, 8, dtype, w_grad=True))
    check_against_reference(t, dtype, atol, rtol, dropout_p=0.25, backend="triton")


def test_explicit_triton_refuses_float64():
    t = make((3,), 8, 6, 2, torch.float64)
    with pytest.raises(pk.BackendUnavailableError, match="float64"):
        pk.lora_linear(*on_device(t).values(), 1.0, backend="triton")


def test_auto_never_picks_triton_for_cpu_tensors():
    t = make((3,), 8, 6, 2, torch.float32)
    assert backends.resolve(OP, "auto", *t.values(), 1.0, 0.0) == "torch"
