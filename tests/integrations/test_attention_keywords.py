"""Every keyword transformers hands an attention function is honoured, falls back with a warning, or is
refused — never dropped silently (issue 15 item 4: GPT-OSS's learned sinks were ignored)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptpeft_kernels as pk
from ptpeft_kernels.integrations import attention as attn

from . import extra_families
from .conftest import base_model, randomize_added

B, HQ, HKV, N, M, D, P = 2, 4, 2, 5, 7, 8, 3


class _Attn(nn.Module):
    def __init__(self, prefix=None, is_causal=True):
        super().__init__()
        self.is_causal = is_causal
        if prefix is not None:
            slot = type("Slot", (), {"kv": lambda self: prefix})()
            object.__setattr__(self, "_ptpeft_prefix", slot)


def _tensors(n=N, m=M, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HQ, n, D, generator=g)
    k, v = torch.randn(batch, HKV, m, D, generator=g), torch.randn(batch, HKV, m, D, generator=g)
    prefix = (torch.randn(HKV, P, D, generator=g), torch.randn(HKV, P, D, generator=g))
    return q, k, v, prefix


def _ref(q, k, v, prefix=None, keep=None, causal=False, bias=None, sinks=None, head_mask=None):
    """float64 softmax over [prefix, keys] (+ a zero-valued sink column); returns (B, N, Hq, D)."""
    b, hq, n, d = q.shape
    m = k.shape[2]
    pk_, pv_ = (t.expand(b, -1, -1, -1) for t in prefix) if prefix is not None else (k[:, :, :0], v[:, :, :0])
    p = pk_.shape[2]
    keys = torch.cat([pk_, k], 2).double().repeat_interleave(hq // k.shape[1], 1)
    vals = torch.cat([pv_, v], 2).double().repeat_interleave(hq // k.shape[1], 1)
    s = q.double() @ keys.transpose(-1, -2) * d**-0.5
    seq = s[..., p:]
    if bias is not None:
        seq = seq + bias.double()
    if causal:
        seq = seq.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(m - n), float("-inf"))
    if keep is not None:
        seq = seq.masked_fill(~keep, float("-inf"))
    s = torch.cat([s[..., :p], seq], -1)
    if sinks is not None:
        column = sinks.double().view(1, -1, 1, 1) if sinks.dim() == 1 else sinks.double()
        s = torch.cat([s, column.expand(b, hq, n, 1)], -1)
    probs = torch.softmax(s, -1).nan_to_num(0.0)
    if sinks is not None:
        probs = probs[..., :-1]
    if head_mask is not None:
        probs = probs * head_mask.double().view(1, -1, 1, 1)
    return (probs @ vals).transpose(1, 2).float()


def _run(module, q, k, v, mask=None, warns=None, **kwargs):
    attn._warned.clear()
    if warns is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fused path: no fallback warning
            return attn.ptpeft_attention_forward(module, q, k, v, mask, **kwargs)[0]
    with pytest.warns(RuntimeWarning, match=warns):
        return attn.ptpeft_attention_forward(module, q, k, v, mask, **kwargs)[0]


# ----------------------------------------------------------------------------- honoured keywords


@pytest.mark.parametrize("form", ["s_aux", "sinks"])
def test_sinks_join_the_softmax_denominator_with_the_prefix(form):
    q, k, v, prefix = _tensors()
    g = torch.Generator().manual_seed(5)
    # GPT-OSS: one learned logit per query head; Inkling2: one per head and token.
    sinks = torch.randn(*((HQ,) if form == "s_aux" else (B, HQ, N, 1)), generator=g) * 2
    keep = torch.ones(B, 1, N, M, dtype=torch.bool).tril(M - N)
    keep[1, ..., :3] = False  # left padding
    want = _ref(q, k, v, prefix, keep=keep, sinks=sinks)
    out = _run(_Attn(prefix), q, k, v, keep, warns="attention sinks", **{form: sinks})
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, _ref(q, k, v, prefix, keep=keep), atol=1e-3)  # the sinks matter
    # Gradients reach the sinks (GPT-OSS trains them) as in the float64 definition.
    sinks64 = sinks.double().requires_grad_()
    sinks32 = sinks.clone().requires_grad_()
    _ref(q, k, v, prefix, keep=keep, sinks=sinks64).double().pow(2).sum().backward()
    attn.ptpeft_attention_forward(_Attn(prefix), q, k, v, keep, **{form: sinks32})[0].pow(2).sum().backward()
    torch.testing.assert_close(sinks32.grad, sinks64.grad.float(), atol=1e-5, rtol=1e-4)


def test_position_bias_is_added_to_the_sequence_scores_and_causality_kept():
    q, k, v, prefix = _tensors()
    bias = torch.randn(1, HQ, N, M, generator=torch.Generator().manual_seed(2))
    out = _run(_Attn(prefix), q, k, v, None, warns="additive attention bias", position_bias=bias)
    torch.testing.assert_close(out, _ref(q, k, v, prefix, causal=True, bias=bias), atol=1e-5, rtol=1e-5)


def test_head_mask_scales_each_heads_probabilities():
    q, k, v, prefix = _tensors()
    head_mask = torch.tensor([1.0, 0.0, 0.5, 1.0])
    out = _run(_Attn(prefix), q, k, v, None, warns="a head mask", head_mask=head_mask)
    torch.testing.assert_close(
        out, _ref(q, k, v, prefix, causal=True, head_mask=head_mask), atol=1e-5, rtol=1e-5
    )


def test_packed_sequences_from_cu_seq_lens_take_the_fused_path():
    """flash-attn's varlen keywords: three sequences packed in one row see only themselves."""
    q, k, v, prefix = _tensors(n=9, m=9, batch=1)
    cu = torch.tensor([0, 2, 6, 9], dtype=torch.int32)
    out = _run(
        _Attn(prefix), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4
    )
    pieces = [
        _ref(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], prefix, causal=True)
        for a, b in zip(cu[:-1], cu[1:], strict=True)
    ]
    torch.testing.assert_close(out, torch.cat(pieces, dim=1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cumulative lengths ending at N=9"):
        attn.ptpeft_attention_forward(_Attn(), q, k, v, None, cu_seq_lens_q=cu[:-1], cu_seq_lens_k=cu[:-1])


def test_top_k_indices_select_the_visible_keys():
    """DeepSeek-V3.2 hands the indexer's top-k key indices instead of masking (negative: no key)."""
    q, k, v, prefix = _tensors()
    g = torch.Generator().manual_seed(3)
    indices = torch.stack([torch.randperm(M, generator=g)[:3] for _ in range(B * N)]).view(B, N, 3)
    indices[0, 0, 2] = -1
    keep = torch.zeros(B, N, M, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            keep[b, i, indices[b, i][indices[b, i] >= 0]] = True
    out = _run(_Attn(prefix), q, k, v, None, indices=indices)
    want = _ref(q, k, v, prefix, keep=keep[:, None], causal=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_a_sliding_window_carried_by_the_mask_or_too_wide_to_bite_takes_the_fused_path():
    q, k, v, prefix = _tensors()
    pos = torch.arange(N)[:, None] + (M - N)
    window = (torch.arange(M)[None] <= pos) & (torch.arange(M)[None] > pos - 3)
    mask = window[None, None].expand(B, 1, N, M)  # transformers' sliding-window mask carries the window
    out = _run(_Attn(prefix), q, k, v, mask, sliding_window=3)
    torch.testing.assert_close(out, _ref(q, k, v, prefix, keep=mask), atol=1e-5, rtol=1e-5)
    out = _run(_Attn(prefix), q, k, v, None, sliding_window=M)  # every key inside every window
    torch.testing.assert_close(out, _ref(q, k, v, prefix, causal=True), atol=1e-5, rtol=1e-5)
    out = _run(_Attn(prefix), q, k, v, None, warns="sliding-window", sliding_window=3)  # bites: fallback
    torch.testing.assert_close(out, _ref(q, k, v, prefix, keep=mask), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- refused, unknown, inert


def test_block_indices_are_refused_and_unknown_keywords_warn_once():
    q, k, v, _ = _tensors()
    with pytest.raises(NotImplementedError, match="block_indices.*attn_implementation='sdpa'"):
        attn.ptpeft_attention_forward(_Attn(), q, k, v, None, block_indices=torch.zeros(B, 1, N, 2))
    attn._warned.clear()
    with pytest.warns(RuntimeWarning, match="passes the keyword 'attn_temperature', which this attention"):
        attn.ptpeft_attention_forward(_Attn(), q, k, v, None, attn_temperature=torch.ones(HQ))
    inert = dict(
        position_ids=torch.arange(N)[None],
        use_cache=True,
        deterministic=True,
        output_hidden_states=True,
        do_sample=False,  # generate() options that Kosmos-2's vision tower passes down
        max_new_tokens=3,
        sliding_window=None,
        softcap=None,
        s_aux=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn.ptpeft_attention_forward(_Attn(), q, k, v, None, attn_temperature=torch.ones(HQ))  # once only
        out = attn.ptpeft_attention_forward(_Attn(), q, k, v, None, **inert)[0]
    torch.testing.assert_close(out, _ref(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- through whole models


def _gpt_oss(**overrides):
    model = extra_families.build("gpt_oss", **overrides)
    with torch.no_grad():  # sinks of a trained model's size (init gives std 0.02, where dropping them hides)
        g = torch.Generator().manual_seed(4)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=g) * 2)
    return model


def test_gpt_oss_with_sinks_and_a_sliding_window_matches_eager():
    model = _gpt_oss()
    batch = extra_families.inputs(length=9)  # longer than the window of 4: it bites
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = pk.set_attention(model, "eager")(**batch).logits
        attn._warned.clear()
        with pytest.warns(RuntimeWarning, match="attention sinks"):
            ours = pk.enable_ptpeft_attention(model)(**batch).logits
    torch.testing.assert_close(ours[valid], eager[valid], atol=2e-5, rtol=1e-4)


def test_gpt_oss_prefix_composes_with_the_sinks():
    """The prefix is P more keys in the same softmax as the sink: eager over a prefilled cache agrees."""
    from transformers import DynamicCache

    model = pk.apply_prefix(_gpt_oss(sliding_window=64), num_prefix=3, reparam_hidden=None)
    randomize_added(model)
    reference = pk.set_attention(_gpt_oss(sliding_window=64), "eager")
    batch = extra_families.inputs()
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch, position_ids=positions).logits
        cache = DynamicCache(config=reference.config)
        for layer, (k, v) in enumerate(model.ptpeft_prefix.encoders["language_model"]()):
            cache.update(k.expand(2, -1, -1, -1).contiguous(), v.expand(2, -1, -1, -1).contiguous(), layer)
        ref = reference(
            input_ids=batch["input_ids"],
            attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1),
            past_key_values=cache,
            position_ids=positions,
        ).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)


def test_packed_position_ids_keep_sequences_apart_as_in_eager():
    model = base_model("llama")
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    packed = torch.tensor([[0, 1, 0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        # Training-style (no cache): transformers' mask builder reads the packing from position_ids.
        eager = pk.set_attention(model, "eager")(input_ids=ids, position_ids=packed, use_cache=False).logits
        ours = pk.enable_ptpeft_attention(model)(input_ids=ids, position_ids=packed, use_cache=False).logits
        alone = model(input_ids=ids[:, 2:6]).logits  # the second sequence on its own
    torch.testing.assert_close(ours, eager, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, 2:6], alone, atol=2e-5, rtol=1e-4)
