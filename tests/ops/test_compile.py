"""The custom ops trace under ``torch.compile(fullgraph=True)`` and match eager, forward and backward.

Runs the torch backend on the CPU (the fake implementations and the autograd registrations
are what compile exercises; the backend inside the op is opaque to it). One small case per
op keeps the compile time to seconds.
"""

import pytest
import torch

import ptpeft_kernels as pk
from tests.helpers import leaf


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compare(fn, inputs, grad_seed=0):
    eager_in = [leaf(t, t.requires_grad) for t in inputs]
    compiled_in = [leaf(t, t.requires_grad) for t in inputs]
    compiled = torch.compile(fn, fullgraph=True)
    out = fn(*eager_in)
    out_c = compiled(*compiled_in)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads = torch.autograd.grad(out, [eager_in[i] for i in wanted], grad_out)
    grads_c = torch.autograd.grad(out_c, [compiled_in[i] for i in wanted], grad_out)
    for i, g, gc in zip(wanted, grads, grads_c, strict=True):
        torch.testing.assert_close(gc, g, atol=1e-5, rtol=1e-5, msg=f"gradient of input {i}")
        assert g.abs().sum() > 0  # a zero gradient would make the comparison vacuous


def test_prefix_attention_compiles():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 7, 16, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 7, 16, generator=gen).requires_grad_()
    pk_ = torch.randn(2, 3, 16, generator=gen).requires_grad_()
    pv_ = torch.randn(2, 3, 16, generator=gen).requires_grad_()
    mask = torch.rand(2, 7, generator=gen) > 0.3
    mask[:, -1] = True

    def fn(q, k, v, pk_, pv_):
        out = pk.prefix_attention(q, k, v, pk_, pv_, attn_mask=mask, causal=True, backend="torch")
        return out * 2.0 + 1.0  # something around the op for the compiler to fuse

    compare(fn, [q, k, v, pk_, pv_])


def test_lora_linear_compiles():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 12, generator=gen).requires_grad_()
    weight = torch.randn(10, 12, generator=gen)  # frozen, as in PEFT
    bias = torch.randn(10, generator=gen)
    lora_a = (torch.randn(4, 12, generator=gen) * 0.3).requires_grad_()
    lora_b = (torch.randn(10, 4, generator=gen) * 0.3).requires_grad_()

    def fn(x, lora_a, lora_b):
        return torch.relu(pk.lora_linear(x, weight, bias, lora_a, lora_b, 0.5, backend="torch"))

    compare(fn, [x, lora_a, lora_b])


def test_adapter_compiles():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 12, generator=gen).requires_grad_()
    down_w = (torch.randn(5, 12, generator=gen) * 0.3).requires_grad_()
    down_b = torch.randn(5, generator=gen).requires_grad_()
    up_w = (torch.randn(12, 5, generator=gen) * 0.3).requires_grad_()
    up_b = torch.randn(12, generator=gen).requires_grad_()

    def fn(x, down_w, down_b, up_w, up_b):
        y = pk.adapter(x, down_w, down_b, up_w, up_b, activation="silu", scaling=0.5, backend="torch")
        return y.sum(-1)

    compare(fn, [x, down_w, down_b, up_w, up_b])


def _graph_targets(fn, *inputs) -> str:
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compile(fn, backend=record, fullgraph=True)(*inputs)
    return "\n".join(graphs)


def test_compile_traces_the_custom_ops_not_their_eager_twins():
    """Eager calls take an autograd.Function (no torch.library dispatch); compile must see the ops."""
    q = torch.randn(1, 2, 3, 8)
    x, w, a, b = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    wd, wu = torch.randn(2, 8), torch.randn(8, 2)
    graph = _graph_targets(
        lambda q, x: (
            pk.prefix_attention(q, q, q, backend="torch"),
            pk.lora_linear(x, w, None, a, b, 1.0, backend="torch"),
            pk.adapter(x, wd, None, wu, None, backend="torch"),
        ),
        q,
        x,
    )
    for op in ("ptpeft.prefix_attention", "ptpeft.lora_linear", "ptpeft.adapter"):
        assert op in graph, graph


def test_custom_op_path_matches_the_eager_path_outside_compile():
    """The custom ops' own autograd registration (what compile uses), called directly, equals eager."""
    import sys

    lora = sys.modules["ptpeft_kernels.ops.lora"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, generator=gen).requires_grad_()
    w = torch.randn(10, 12, generator=gen).requires_grad_()
    a = torch.randn(4, 12, generator=gen).requires_grad_()
    b = torch.randn(10, 4, generator=gen).requires_grad_()
    y_op = lora._lora_linear_op(x, w, None, a, b, 0.5, 0.0, 0, "torch")[0]
    y_eager = pk.lora_linear(x, w, None, a, b, 0.5, backend="torch")
    torch.testing.assert_close(y_op, y_eager, rtol=0, atol=0)
    g = torch.randn(y_op.shape, generator=gen)
    for got, want in zip(
        torch.autograd.grad(y_op, [x, w, a, b], g), torch.autograd.grad(y_eager, [x, w, a, b], g), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
