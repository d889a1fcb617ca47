"""The "ptpeft" attention implementation: layouts, masks, caches, fallbacks, and parity with eager / SDPA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ptpeft_kernels as pk
from ptpeft_kernels.integrations import attention as attn
from ptpeft_kernels.integrations.tiny import generate_kwargs, tiny_inputs

from .conftest import SUPPORTED, base_model, forward_inputs, randomize_added, valid_positions

# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", SUPPORTED)
def test_matches_eager_and_sdpa_on_padded_batches(family):
    model = base_model(family)
    batch = forward_inputs(family)
    outs = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa", "ptpeft"):
            pk.set_attention(model, impl)
            outs[impl] = model(**batch).logits
    valid = valid_positions(family, batch, outs["ptpeft"])
    torch.testing.assert_close(outs["ptpeft"][valid], outs["eager"][valid], atol=2e-5, rtol=1e-4)
    # Eager is the reference. transformers' own SDPA path departs from it in places (it runs
    # PaliGemma's is_causal=False Gemma layers bidirectionally when it skips an unpadded mask;
    # 5.17 applies a causal mask to Kosmos-2's image cross-attention): compare where it agrees.
    if torch.allclose(outs["sdpa"][valid], outs["eager"][valid], atol=2e-5, rtol=1e-4):
        torch.testing.assert_close(outs["ptpeft"][valid], outs["sdpa"][valid], atol=2e-5, rtol=1e-4)
    else:
        assert family in ("paligemma", "kosmos2"), f"{family}: transformers' sdpa and eager disagree"


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "bert_lm"])
def test_prefix_equals_eager_attention_over_a_prefilled_kv_cache(family):
    """Independent reference: transformers' eager attention with the prefixes placed in its KV cache
    (prefix keys are inserted raw there too) and explicit positions, so tokens are not shifted by P."""
    from transformers import DynamicCache

    model = pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=16)
    randomize_added(model)
    reference = pk.set_attention(base_model(family), "eager")
    batch = tiny_inputs(family, pads=[0, 2])
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch, position_ids=positions).logits
        prefixes = model.ptpeft_prefix.encoders["language_model"]()  # (L, 2, Hkv, P, D)
        b = mask.shape[0]
        cache = DynamicCache(config=reference.config)
        for layer, (k, v) in enumerate(prefixes):
            cache.update(k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous(), layer)
        ref = reference(
            input_ids=batch["input_ids"],
            attention_mask=torch.cat([torch.ones(b, 3, dtype=mask.dtype), mask], dim=1),
            past_key_values=cache,
            position_ids=positions,
        ).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)


def test_static_cache_generation_matches_dynamic_cache():
    # A static cache hands attention more key slots than were written (and tensor offsets): the mask
    # builder must materialise the mask instead of relying on bottom-right causal alignment.
    model = pk.apply_prefix(base_model("llama"), num_prefix=3, reparam_hidden=16)
    randomize_added(model)
    batch = tiny_inputs("llama", pads=[0, 2])
    dynamic = model.generate(**batch, **generate_kwargs(3), return_dict_in_generate=True, output_logits=True)
    static = model.generate(
        **batch,
        **generate_kwargs(3),
        return_dict_in_generate=True,
        output_logits=True,
        cache_implementation="static",
    )
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=2e-5, rtol=1e-4)


def test_mask_is_registered_and_padding_survives():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask

    model = pk.enable_ptpeft_attention(base_model("llama"))
    assert "ptpeft" in AttentionInterface._global_mapping
    assert "ptpeft" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    embeds = torch.zeros(2, 5, 32)
    padded = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    mask = create_causal_mask(model.config, embeds, padded, None)
    assert mask is not None and mask.dtype == torch.bool and mask.shape == (2, 1, 5, 5)
    assert not mask[1, 0, :, :2].any() and torch.equal(mask[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    # No padding and keys ending with the last query: no mask, the kernel's causal flag is exact.
    assert create_causal_mask(model.config, embeds, torch.ones(2, 5, dtype=torch.long), None) is None


def test_ptpeft_mask_materialises_unless_bottom_right_alignment_is_exact():
    common = dict(batch_size=1, attention_mask=None, device="cpu")
    assert attn.ptpeft_mask(q_length=5, kv_length=5, q_offset=0, kv_offset=0, **common) is None
    assert attn.ptpeft_mask(q_length=1, kv_length=7, q_offset=6, kv_offset=0, **common) is None  # decode
    # Keys run past the last query (a static cache's empty slots): must be a real mask.
    mask = attn.ptpeft_mask(q_length=3, kv_length=9, q_offset=4, kv_offset=0, **common)
    assert mask is not None and not mask[0, 0, 0, 5:].any() and mask[0, 0, 0, :5].all()
    mask = attn.ptpeft_mask(q_length=1, kv_length=7, q_offset=torch.tensor(4), kv_offset=0, **common)
    assert mask is not None and mask[0, 0, 0, :5].all() and not mask[0, 0, 0, 5:].any()


def test_switching_away_from_ptpeft_with_prefixes_raises():
    model = pk.apply_prefix(base_model("llama"), num_prefix=2, reparam_hidden=8)
    pk.set_attention(model, "sdpa")
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn carries a ptpeft prefix.*'sdpa'"):
        model(**tiny_inputs("llama"))
    pk.enable_ptpeft_attention(model)
    model(**tiny_inputs("llama"))


def test_set_attention_reaches_every_sub_config():
    model = pk.enable_ptpeft_attention(base_model("blip2"))
    impls = {type(m).__name__: m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    assert set(impls.values()) == {"ptpeft"}, impls
    with pytest.raises(TypeError, match="implementation must be a str"):
        pk.set_attention(model, None)


# ----------------------------------------------------------------------------- the function itself


class _Attn(nn.Module):
    def __init__(self, is_causal=True, prefix=None):
        super().__init__()
        self.is_causal = is_causal
        if prefix is not None:
            slot = type("Slot", (), {"kv": lambda self: prefix})()
            object.__setattr__(self, "_ptpeft_prefix", slot)


def _qkv(b=2, hq=4, hkv=2, n=3, m=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, m, d, generator=g)
    v = torch.randn(b, hkv, m, d, generator=g)
    pre = (torch.randn(hkv, 2, d, generator=g), torch.randn(hkv, 2, d, generator=g))
    return q, k, v, pre


def _ref(q, k, v, pre, mask=None, causal=True, bias=None, scale=None):
    """Explicit float64 softmax over [prefix, keys] with GQA by index."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    pk_, pv_ = (t.expand(b, -1, -1, -1) for t in pre) if pre is not None else (k[:, :, :0], v[:, :, :0])
    keys = torch.cat([pk_, k], 2).double().repeat_interleave(g, 1)
    vals = torch.cat([pv_, v], 2).double().repeat_interleave(g, 1)
    p, m = pk_.shape[2], k.shape[2]
    s = q.double() @ keys.transpose(-1, -2) * (scale or d**-0.5)
    seq = s[..., p:]
    if bias is not None:
        seq = seq + bias.double()
    if causal:
        seq = seq.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(m - n), float("-inf"))
    if mask is not None:
        seq = seq.masked_fill(~mask, float("-inf"))
    s = torch.cat([s[..., :p], seq], -1)
    return (torch.softmax(s, -1) @ vals).transpose(1, 2).float()


def test_gqa_prefix_and_bottom_right_causal_decode_layout():
    q, k, v, pre = _qkv(n=3, m=7)  # M > N: three new queries after four cached keys
    out, weights = attn.ptpeft_attention_forward(_Attn(prefix=pre), q, k, v, None, scaling=None)
    assert weights is None and out.shape == (2, 3, 4, 8)  # (B, N, Hq, D)
    torch.testing.assert_close(out, _ref(q, k, v, pre), atol=1e-5, rtol=1e-5)


def test_is_causal_kwarg_overrides_the_module_and_cross_attention_is_unmasked():
    q, k, v, _ = _qkv(n=4, m=9)  # cross-attention: keys from another sequence, N != M
    out, _ = attn.ptpeft_attention_forward(_Attn(is_causal=True), q, k, v, None, is_causal=False, scaling=0.3)
    torch.testing.assert_close(out, _ref(q, k, v, None, causal=False, scale=0.3), atol=1e-5, rtol=1e-5)
    out, _ = attn.ptpeft_attention_forward(_Attn(is_causal=False), q[:, :, :2], k, v, None)
    torch.testing.assert_close(out, _ref(q[:, :, :2], k, v, None, causal=False), atol=1e-5, rtol=1e-5)


def test_cross_attention_sites_are_never_causal():
    model = pk.enable_ptpeft_attention(base_model("kosmos2"))
    marked = {n for n, m in model.named_modules() if getattr(m, "_ptpeft_cross", False)}
    assert marked == {"image_to_text_projection.x_attn"}
    q, k, v, _ = _qkv(n=4, m=9)
    module = _Attn(is_causal=True)
    object.__setattr__(module, "_ptpeft_cross", True)
    out, _ = attn.ptpeft_attention_forward(module, q, k, v, None, is_causal=True)
    torch.testing.assert_close(out, _ref(q, k, v, None, causal=False), atol=1e-5, rtol=1e-5)


def test_bool_and_additive_zero_inf_masks_take_the_fused_path():
    q, k, v, pre = _qkv(n=5, m=5)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    keep[1, :, :, :2] = False  # left padding of row 1: its first queries see only the prefix
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    want = _ref(q, k, v, pre, mask=keep, causal=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither mask may fall back
        for mask in (keep, additive, keep[:1].expand(2, -1, -1, -1)[:1]):
            out, _ = attn.ptpeft_attention_forward(_Attn(prefix=pre), q, k, v, mask)
            expected = want if mask.shape[0] == 2 else _ref(q, k, v, pre, mask=keep[:1], causal=False)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", ["bias", "sliding_window", "softcap", "dropout"])
def test_unsupported_features_fall_back_to_sdpa_with_the_prefix_and_warn_once(case):
    attn._warned.clear()
    q, k, v, pre = _qkv(n=4, m=6)
    module = _Attn(prefix=pre)
    kwargs, want = {}, None
    if case == "bias":
        bias = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(3))
        mask, want = bias, _ref(q, k, v, pre, causal=False, bias=bias)
    elif case == "sliding_window":
        # bottom-right aligned: query i is at position i + 2 and sees the keys in (pos - 3, pos]
        pos = torch.arange(4)[:, None] + 2
        window = (torch.arange(6)[None] <= pos) & (torch.arange(6)[None] > pos - 3)
        mask, kwargs = None, {"sliding_window": 3}
        want = _ref(q, k, v, pre, mask=window, causal=False)
    elif case == "softcap":
        mask, kwargs = None, {"softcap": 1e6}  # a cap this large changes nothing measurable
        want = _ref(q, k, v, pre)
    else:
        mask = None
        module.train()
        kwargs = {"dropout": 0.5}
    with pytest.warns(RuntimeWarning, match="falls back to torch scaled_dot_product_attention"):
        out, _ = attn.ptpeft_attention_forward(module, q, k, v, mask, **kwargs)
    if want is not None:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    else:  # dropout: rescaled survivors, so not the deterministic output, but finite and same shape
        assert out.shape == (2, 4, 4, 8) and torch.isfinite(out).all()
        assert not torch.allclose(out, _ref(q, k, v, pre), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        attn.ptpeft_attention_forward(module, q, k, v, mask, **kwargs)


def test_softcap_is_applied_in_the_fallback():
    attn._warned.clear()
    q, k, v, pre = _qkv(n=4, m=6)
    with pytest.warns(RuntimeWarning, match="soft-capping"):
        out, _ = attn.ptpeft_attention_forward(_Attn(prefix=pre), q * 20, k, v, None, softcap=0.5)
    plain, _ = attn.ptpeft_attention_forward(_Attn(prefix=pre), q * 20, k, v, None)
    assert not torch.allclose(out, plain, atol=1e-3)  # capped logits flatten the softmax


def test_output_attentions_warns_and_non_tensor_masks_are_rejected():
    attn._warned.clear()
    q, k, v, _ = _qkv()
    with pytest.warns(RuntimeWarning, match="output_attentions"):
        attn.ptpeft_attention_forward(_Attn(), q, k, v, None, output_attentions=True)
    with pytest.raises(TypeError, match="tensor attention_mask"):
        attn.ptpeft_attention_forward(_Attn(), q, k, v, object())
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        attn.ptpeft_attention_forward(_Attn(), q, k, v, torch.ones(2, 3, 5, dtype=torch.bool))


def test_generation_does_not_copy_shared_prefixes_per_sample():
    model = pk.apply_prefix(base_model("llama"), num_prefix=3, reparam_hidden=None)
    slot = model.model.layers[0].self_attn._ptpeft_prefix
    k, v = slot.kv()
    assert k.shape == (2, 3, 8) and v.shape == (2, 3, 8)  # (Hkv, P, D): no batch dimension
    assert k.data_ptr() == model.ptpeft_prefix.encoders["language_model"].prefix[0, 0].data_ptr()
    copy.deepcopy(model)(**tiny_inputs("llama", batch=3, pads=[0, 1, 2]))


@pytest.mark.triton
@pytest.mark.parametrize("family", ["llama", "llava"])
def test_triton_backend_through_the_model_matches_torch(family, monkeypatch):
    """The whole model pinned to one backend with PTPEFT_BACKEND (Triton runs interpreted on the CPU)."""
    model = pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=16)
    randomize_added(model)
    batch = tiny_inputs(family, pads=[0, 2])
    valid = batch["attention_mask"].bool()
    from ptpeft_kernels import backends

    used, get_impl = set(), backends.get_impl

    def spy(op, backend, *args, **kwargs):
        used.add((op, backend))
        return get_impl(op, backend, *args, **kwargs)

    monkeypatch.setattr(backends, "get_impl", spy)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PTPEFT_BACKEND", backend)
        m = copy.deepcopy(model).train()
        logits = m(**batch).logits
        logits[valid].pow(2).mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        m.eval()
        tokens = m.generate(**batch, **generate_kwargs(2))
        results[backend] = (logits.detach(), grads, tokens)
    assert {("prefix_attention", "torch"), ("prefix_attention", "triton")} <= used
    (a, ga, ta), (b, gb, tb) = results["torch"], results["triton"]
    torch.testing.assert_close(b[valid], a[valid], atol=2e-5, rtol=1e-4)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-6, rtol=1e-4, msg=name)
    assert torch.equal(ta, tb)


def test_from_pretrained_with_attn_implementation_ptpeft(tmp_path):
    from transformers import AutoModelForImageTextToText

    pk.register_attention()
    base_model("llava").save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="ptpeft").eval()
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"ptpeft"}
    batch = tiny_inputs("llava", pads=[0, 2])
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ours, ref = model(**batch).logits, pk.set_attention(base_model("llava"), "eager")(**batch).logits
    torch.testing.assert_close(ours[valid], ref[valid], atol=2e-5, rtol=1e-4)
