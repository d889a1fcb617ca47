"""Prefix shapes read from any attention module: after LoRA (ours or PEFT's), fused q/k/v projections,
and a clear way out when they cannot be read (issue 15 items 7 and 8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.model_info import find_attention_sites
from ptpeft_kernels.integrations.tiny import tiny_inputs
from tests.optional import require

from . import extra_families
from .conftest import base_model, forward_inputs, randomize_added, valid_positions

# ----------------------------------------------------------------------------- prefix after LoRA (item 7)


def _logits(model, family):
    batch = forward_inputs(family)
    with torch.no_grad():
        out = model(**batch).logits
    return out[valid_positions(family, batch, out)]


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_prefix_after_lora_equals_lora_after_prefix(family):
    late = pk.apply_prefix(pk.apply_lora(base_model(family), r=4, alpha=8), num_prefix=3, reparam_hidden=16)
    early = pk.apply_lora(pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=16), r=4, alpha=8)
    randomize_added(late)
    early.load_state_dict(late.state_dict())  # same names, same structures
    assert {n for n, p in late.named_parameters() if p.requires_grad} == {
        n for n, p in early.named_parameters() if p.requires_grad
    }
    torch.testing.assert_close(_logits(late, family), _logits(early, family), atol=0, rtol=0)
    assert (_logits(late, family) - _logits(base_model(family), family)).abs().max() > 1e-3


def test_prefix_after_peft_lora_equals_peft_lora_after_prefix():
    peft = require("peft", "prefix-after-PEFT-LoRA")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    late = pk.apply_prefix(
        peft.get_peft_model(base_model("llama"), peft.LoraConfig(**config)), num_prefix=3, reparam_hidden=16
    )
    early = peft.get_peft_model(
        pk.apply_prefix(base_model("llama"), num_prefix=3, reparam_hidden=16), peft.LoraConfig(**config)
    )
    trainable = {n for n, p in late.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("ptpeft_prefix" in n for n in trainable)
    assert all("lora_" in n or "ptpeft_prefix" in n for n in trainable)  # the base stays frozen
    with torch.no_grad():
        for n, p in late.named_parameters():
            if "lora_B" in n or "ptpeft_prefix" in n:
                p.normal_(0.0, 0.3)
    # The bank sits on the object apply_prefix was given: the PeftModel here, the base model there.
    state = {
        (f"base_model.model.{k}" if k.startswith("ptpeft_prefix.") else k): v
        for k, v in late.state_dict().items()
    }
    early.load_state_dict(state)
    torch.testing.assert_close(_logits(late, "llama"), _logits(early, "llama"), atol=0, rtol=0)


def test_a_prefix_lora_checkpoint_loads_into_a_model_that_already_has_lora(tmp_path):
    source = pk.apply_lora(
        pk.apply_prefix(base_model("llava"), num_prefix=3, reparam_hidden=16), r=4, alpha=8
    )
    randomize_added(source)
    pk.save_adapters(source, tmp_path)
    target = pk.load_adapters(pk.apply_lora(base_model("llava"), r=4, alpha=8), tmp_path)
    torch.testing.assert_close(_logits(target, "llava"), _logits(source, "llava"), atol=0, rtol=0)


# ----------------------------------------------------------------------------- fused q/k/v (item 8)


# The fused projection of each family, for LoRA before the prefix (GPT-2's Conv1D takes no LoRA here).
_FUSED_LINEAR = {
    "phi3": "qkv_proj",
    "gpt_neox": "query_key_value",
    "gpt_bigcode": "c_attn",
    "codegen": "qkv_proj",
    "falcon": "query_key_value",
}


@pytest.mark.parametrize(
    "family, lora_first",
    [(f, False) for f in extra_families.FUSED] + [(f, True) for f in _FUSED_LINEAR],
)
def test_fused_qkv_families_get_prefixes_equal_to_eager_over_a_prefilled_cache(family, lora_first):
    """Shapes read right (the prefix call would raise otherwise), and the prefix is exactly P extra
    keys: transformers' eager attention with the prefixes in its KV cache gives the same logits.
    With LoRA (B = 0, so the same function) on the fused projection first, its width is read
    through the wrapper: GPT-NeoX and CodeGen keep their key/value head count nowhere else."""
    from transformers import DynamicCache

    model = extra_families.build(family)
    if lora_first:
        pk.apply_lora(model, r=2, alpha=4, target_modules=[_FUSED_LINEAR[family]])
    want = extra_families.SPECS[family][3]
    shapes = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in find_attention_sites(model)}
    assert shapes == {want}
    batch = extra_families.inputs()
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    reference = extra_families.build(family, attn_implementation="eager")
    with torch.no_grad():
        plain = pk.enable_ptpeft_attention(extra_families.build(family))(
            **batch, position_ids=positions
        ).logits
        eager = reference(**batch, position_ids=positions).logits
        torch.testing.assert_close(plain[mask.bool()], eager[mask.bool()], atol=2e-5, rtol=1e-4)
        if not extra_families.routes_attention(family):  # CodeGen before 5.24, Falcon before 5.25
            with pytest.raises(ValueError, match="compute attention themselves.*prefixes cannot reach them"):
                pk.apply_prefix(model, num_prefix=3, reparam_hidden=None)
            return
        pk.apply_prefix(model, num_prefix=3, reparam_hidden=None)
        model.ptpeft_prefix.encoders["language_model"].prefix.normal_(0.0, 0.5)  # LoRA B stays 0
        out = model(**batch, position_ids=positions).logits
        prefixes = model.ptpeft_prefix.encoders["language_model"]()  # (L, 2, Hkv, P, D)
        cache = DynamicCache(config=reference.config)
        for layer, (k, v) in enumerate(prefixes):
            cache.update(k.expand(2, -1, -1, -1).contiguous(), v.expand(2, -1, -1, -1).contiguous(), layer)
        ref = reference(
            input_ids=batch["input_ids"],
            attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1),
            past_key_values=cache,
            position_ids=positions,
        ).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    assert (out - plain)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("family", [*extra_families.bypassing(), "git"])
def test_families_that_bypass_the_registry_keep_their_attention_and_refuse_prefixes(family):
    """Switched to "ptpeft" they were handed a boolean mask where they add a float one: logits moved
    by 0.16 (Falcon), 6e-3 (Bloom), 0.32 (MPT), 4e-4 (GIT) with no warning."""
    if family == "git":
        model, batch = base_model("git"), tiny_inputs("git", pads=[0, 2])
    else:
        model, batch = extra_families.build(family), extra_families.inputs()
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = pk.set_attention(model, "eager")(**batch).logits[:, -valid.shape[1] :][valid]
        with pytest.warns(UserWarning, match="compute attention themselves.*keeps attn_implementation"):
            pk.enable_ptpeft_attention(model)
        ours = model(**batch).logits[:, -valid.shape[1] :][valid]
    torch.testing.assert_close(ours, eager, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="compute attention themselves.*prefixes cannot reach them"):
        pk.apply_prefix(model, num_prefix=2)


# ----------------------------------------------------------------------------- unreadable shapes


class _OpaqueAttention(nn.Module):
    """A routed attention whose head counts are nowhere a reader could find them (fused ``to_qkv``)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.to_qkv = nn.Linear(32, 96, bias=False)
        self.to_out = nn.Linear(32, 32, bias=False)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        b, n, _ = hidden_states.shape
        q, k, v = self.to_qkv(hidden_states).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("position_embeddings", "position_ids")}
        out, _ = attention(self, q, k, v, attention_mask, scaling=8**-0.5, **kwargs)
        return self.to_out(out.reshape(b, n, 32)), None


def test_unreadable_head_counts_name_what_was_looked_for_and_the_way_out():
    from transformers import PretrainedConfig

    model = base_model("llama")
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = _OpaqueAttention(PretrainedConfig(), i)  # a config without head counts
    with pytest.raises(
        ValueError,
        match=r"cannot read the prefix shape .* of 2 attention module\(s\): model\.layers\.0\.self_attn "
        r"\(_OpaqueAttention\).*no head count \(looked for module attributes num_heads, num_attention_heads.*"
        r"module\.num_key_value_heads = Hkv.*targets=<regex",
    ):
        pk.apply_prefix(model, num_prefix=2)
    for layer in model.model.layers:  # the way out the message gives
        layer.self_attn.num_heads, layer.self_attn.head_dim = 4, 8
    with pytest.raises(
        ValueError, match=r"no key/value head count dividing 4 query heads \(looked for module"
    ):
        pk.apply_prefix(model, num_prefix=2)
    for layer in model.model.layers:
        layer.self_attn.num_key_value_heads = 4
    pk.apply_prefix(model, num_prefix=2, reparam_hidden=None)
    randomize_added(model)
    with torch.no_grad():
        model(**tiny_inputs("llama", pads=[0, 2]))  # a wrong shape would be refused by the op
