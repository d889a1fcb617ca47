"""LoRALinear, BottleneckAdapter, PrefixEncoder."""

import math

import pytest
import torch
from torch import nn

import ptpeft_kernels as pk


def test_fresh_lora_is_its_base_layer_and_trains_both_factors():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = pk.LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.scaling == 2.0 and layer.lora_B.weight.abs().sum() == 0
    assert (layer.in_features, layer.out_features, layer.weight) == (12, 10, base.weight)
    base.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.lora_B.weight.grad.abs().sum() > 0  # B gets a gradient even at zero
    assert base.weight.grad is None


def test_lora_matches_explicit_formula_and_rslora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double()
    layer = pk.LoRALinear(base, r=4, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(7, 12, dtype=torch.float64)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), expected)


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = pk.LoRALinear(base, r=4, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 16)
    y = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, w0)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_lora_dropout_only_in_training():
    """In eval mode the layer is exactly ``base(x) + scaling * x A^T B^T``; dropout acts only in training.

    Mutation it guards against (the old check compared ``layer(x)`` with ``layer(x)``): eval
    outputs scaled by the keep rate (``self.scaling,`` -> ``self.scaling if self.training else
    self.scaling * (1.0 - self.dropout),`` in ``LoRALinear.forward``), as non-inverted dropout would.
    """
    torch.manual_seed(0)
    layer = pk.LoRALinear(nn.Linear(16, 8).double(), r=4, dropout=0.5).double()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 16, dtype=torch.float64)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = layer.base_layer(x) + layer.scaling * (x @ a.t()) @ b.t()
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second) and not torch.allclose(first, expected)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(r=0), ValueError, "r must be >= 1"),
        (dict(r=2.0), TypeError, "r must be an int"),
        (dict(dropout=1.0), ValueError, "dropout must be in [0, 1)"),
        (dict(alpha="8"), TypeError, "alpha must be a finite number"),
    ],
)
def test_lora_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match.replace("[", r"\[").replace(")", r"\)")):
        pk.LoRALinear(nn.Linear(4, 4), **kwargs)
    with pytest.raises(TypeError, match="base_layer must be an nn.Linear"):
        pk.LoRALinear(nn.Conv1d(4, 4, 1))


def test_fresh_adapter_is_identity_and_learns():
    torch.manual_seed(0)
    adapter = pk.BottleneckAdapter(12, bottleneck=3, activation="relu", scaling=0.5)
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.testing.assert_close(adapter(x), x, rtol=0, atol=0)
    res = torch.randn(2, 5, 12)
    torch.testing.assert_close(adapter(x, residual=res), res, rtol=0, atol=0)
    adapter(x).pow(2).sum().backward()
    assert adapter.up.weight.grad.abs().sum() > 0


def test_adapter_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        pk.BottleneckAdapter(8, activation="swish")
    with pytest.raises(ValueError, match="bottleneck must be >= 1"):
        pk.BottleneckAdapter(8, bottleneck=0)


@pytest.mark.parametrize("reparam_hidden", [16, None])
def test_prefix_encoder_shapes_gradients_and_fold(reparam_hidden):
    torch.manual_seed(0)
    enc = pk.PrefixEncoder(
        num_layers=3, num_kv_heads=2, head_dim=4, num_prefix=5, reparam_hidden=reparam_hidden
    )
    out = enc()
    assert out.shape == (3, 2, 2, 5, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    folded_before = out.detach().clone()
    enc.fold()
    assert not enc.reparameterized
    assert [n for n, _ in enc.named_parameters()] == ["prefix"]
    torch.testing.assert_close(enc(), folded_before, rtol=0, atol=0)


def test_prefix_encoder_feeds_prefix_attention():
    torch.manual_seed(0)
    enc = pk.PrefixEncoder(num_layers=2, num_kv_heads=2, head_dim=8, num_prefix=3, reparam_hidden=8)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    prefixes = enc()
    out = pk.prefix_attention(q, k, k, prefixes[1, 0], prefixes[1, 1])
    out.sum().backward()
    assert enc.embedding.weight.grad.abs().sum() > 0


def test_prefix_encoder_zero_prefix_and_bad_arguments():
    assert pk.PrefixEncoder(2, 2, 4, 0, reparam_hidden=None)().shape == (2, 2, 2, 0, 4)
    with pytest.raises(ValueError, match="num_prefix must be >= 0"):
        pk.PrefixEncoder(2, 2, 4, -1)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        pk.PrefixEncoder(2, 2, 4.0, 3)


@pytest.mark.parametrize("reparam_hidden", [7, None])
def test_prefix_encoder_layer_equals_the_full_output(reparam_hidden):
    torch.manual_seed(0)
    enc = pk.PrefixEncoder(3, num_kv_heads=2, head_dim=4, num_prefix=5, reparam_hidden=reparam_hidden)
    full = enc()
    for index in (0, 1, 2, -1):
        k, v = enc.layer(index)
        torch.testing.assert_close(k, full[index, 0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, full[index, 1], atol=1e-6, rtol=1e-6)
    assert (enc.reparam_hidden, enc.embed_dim) == ((7, 8) if reparam_hidden else (None, None))
    with pytest.raises(IndexError, match="out of range for 3 layers"):
        enc.layer(3)
