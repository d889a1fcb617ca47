"""Under torch.autocast the ops take mixed dtypes (bf16 activations, fp32 weights) as F.linear does."""

import torch

import ptpeft_kernels as pk


def test_lora_and_adapter_follow_autocast():
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
    ref = pk.lora_linear_ref(x.double(), w.double(), None, a.double(), b.double(), 0.5)
    assert (y.double() - ref).abs().max() < 0.1 * ref.abs().max()
    z.float().sum().backward()
    assert w.grad.dtype == a.grad.dtype == wd.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


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
