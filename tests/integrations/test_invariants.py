"""Fresh additions leave outputs unchanged; merging and folding keep them."""

from __future__ import annotations

import pytest
import torch

import ptpeft_kernels as pk

from .conftest import SUPPORTED, base_model, forward_inputs, randomize_added, valid_positions


@pytest.mark.parametrize("family", SUPPORTED)
def test_fresh_lora_fresh_adapters_and_zero_prefixes_change_nothing(family):
    batch = forward_inputs(family)
    untouched = base_model(family)
    with torch.no_grad():
        ref = untouched(**batch).logits
        # apply_prefix switches attention to "ptpeft": compare it with the untouched model on the same
        # attention (ptpeft vs eager/sdpa is test_attention's subject).
        ref_ptpeft = pk.enable_ptpeft_attention(untouched)(**batch).logits
        valid = valid_positions(family, batch, ref)
        setups = {
            "lora (B = 0)": lambda m: pk.apply_lora(m, r=4, alpha=8),
            "num_prefix = 0": lambda m: pk.apply_prefix(m, num_prefix=0, reparam_hidden=8),
            **{
                f"{p} adapter (up = 0)": (lambda m, p=p: pk.apply_adapter(m, bottleneck=4, placement=p))
                for p in ("houlsby", "pfeiffer", "parallel")
            },
        }
        for name, setup in setups.items():
            out = setup(base_model(family))(**batch).logits
            want = ref_ptpeft if "prefix" in name else ref
            torch.testing.assert_close(out[valid], want[valid], atol=1e-6, rtol=1e-6, msg=f"{family}: {name}")


@pytest.mark.parametrize("family", ["llama", "opt", "bert", "llava", "blip2", "qwen2_vl", "florence2"])
def test_merge_lora_and_fold_prefix_keep_outputs(family):
    model = pk.apply_lora(pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=16), r=4, alpha=8)
    randomize_added(model)
    batch = forward_inputs(family)
    with torch.no_grad():
        before = model(**batch).logits
        pk.merge_lora(model)
        assert not any(isinstance(m, pk.LoRALinear) for m in model.modules())
        merged = model(**batch).logits
        pk.fold_prefix(model)
        assert all(not enc.reparameterized for enc in model.ptpeft_prefix.encoders.values())
        folded = model(**batch).logits
    valid = valid_positions(family, batch, before)
    torch.testing.assert_close(merged[valid], before[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded[valid], before[valid], atol=1e-5, rtol=1e-5)


def test_merge_without_unload_keeps_wrappers_and_unmerges():
    model = pk.apply_lora(base_model("llama"), r=4, alpha=8)
    randomize_added(model)
    batch = forward_inputs("llama")
    with torch.no_grad():
        before = model(**batch).logits
        pk.merge_lora(model, unload=False)
        layers = [m for m in model.modules() if isinstance(m, pk.LoRALinear)]
        assert layers and all(m.merged for m in layers)
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)
        for m in layers:
            m.unmerge()
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)


def test_adapter_hooks_follow_lora_wrapping_and_merging():
    # Houlsby adapters hang on o_proj; LoRA then wraps o_proj, merging unwraps it: the adapter must stay.
    batch = forward_inputs("llama")
    model = pk.apply_adapter(base_model("llama"), bottleneck=4)
    randomize_added(model)
    with torch.no_grad():
        with_adapters = model(**batch).logits
        pk.apply_lora(model, r=4, alpha=8)  # fresh: B = 0
        torch.testing.assert_close(model(**batch).logits, with_adapters, atol=1e-6, rtol=1e-6)
        pk.merge_lora(model)
        torch.testing.assert_close(model(**batch).logits, with_adapters, atol=1e-6, rtol=1e-6)
        plain = base_model("llama")(**batch).logits
    assert (with_adapters - plain).abs().max() > 1e-3
