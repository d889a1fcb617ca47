"""Under torch.autocast the ops take mixed dtypes (bf16 activations, fp32 weights) as F.linear does."""

import torch

import ptpeft_kernels as pk
from tests.helpers import GRAD_FACTOR, assert_close, leaf


def test_lora_and_adapter_follow_autocast():
    """bf16 autocast (bf16 activations, fp32 weights): output and every gradient within the
    project's low-precision rule of a float64 reference (2x / 3x the same-dtype reference's error).

    Mutations it guards against (the old check accepted 10 % of the largest output and never
    looked at gradient values): the LoRA term scaled by 0.95 (``alpha=scaling`` ->
    ``alpha=0.95 * scaling`` in the torch forward), half the LoRA path missing from dx
    (``dx.addmm_(dh, lora_A)`` -> ``dx.addmm_(dh, lora_A, alpha=0.5)`` in the torch backward).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen).bfloat16().requires_grad_()
    w, a, b = (torch.randn(*s, generator=gen).requires_grad_() for s in [(12, 16), (4, 16), (12, 4)])
    wd, wu = (
        torch.randn(3, 12, generator=gen).requires_grad_(),
        torch.randn(12, 3, generator=gen).requires_grad_(),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pk.lora_linear(x, w, None, a, b, 0.5)
        expected = torch.nn.functional.linear(x, w)  # what autocast itself does to a linear
        z = pk.adapter(y, wd, None, wu, None)
    assert y.dtype == expected.dtype == torch.bfloat16 and z.dtype == torch.bfloat16
    grad_z = torch.randn(z.shape, generator=gen)
    leaves = [x, w, a, b, wd, wu]
    got = torch.autograd.grad(z.float(), leaves, grad_z, retain_graph=True)
    assert x.grad is None and [g.dtype for g in got] == [torch.bfloat16] + [torch.float32] * 5

    def reference(dtype, upcast):
        ins = [leaf(t.detach().to(dtype)) for t in leaves]
        ry = pk.lora_linear_ref(ins[0], ins[1], None, ins[2], ins[3], 0.5, upcast=upcast)
        rz = pk.adapter_ref(ry, ins[4], None, ins[5], None, upcast=upcast)
        return ry, rz, torch.autograd.grad(rz, ins, grad_z.to(rz.dtype))

    y64, z64, grads64 = reference(torch.float64, True)
    y16, z16, grads16 = reference(torch.bfloat16, False)  # the same-dtype PyTorch yardstick
    assert_close("y", y, y64, ref_lowp=y16)
    assert_close("z", z, z64, ref_lowp=z16)
    for name, g, r, lowp in zip(["dx", "dw", "da", "db", "dwd", "dwu"], got, grads64, grads16, strict=True):
        # The fp32 weights' gradients hold bf16 values (autocast computed in bf16): the bf16 rule.
        assert_close(name, g.bfloat16(), r, ref_lowp=lowp, factor=GRAD_FACTOR)


def test_prefix_attention_follows_autocast():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 8, generator=gen).bfloat16()
    k = torch.randn(1, 2, 4, 8, generator=gen).bfloat16()
    prefix = torch.randn(2, 3, 8, generator=gen, requires_grad=True)  # fp32 trainable prefix
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pk.prefix_attention(q, k, k, prefix, prefix)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert prefix.grad.dtype == torch.float32 and prefix.grad.abs().sum() > 0


def test_outside_autocast_mixed_dtypes_are_refused():
    x = torch.randn(4, 16).bfloat16()
    w, a, b = torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    try:
        pk.lora_linear(x, w, None, a, b, 1.0)
    except TypeError as err:
        assert "weight has dtype torch.float32 but x has dtype torch.bfloat16" in str(err)
    else:
        raise AssertionError("mixed dtypes outside autocast must raise")
