"""Interoperability with PEFT: same LoRA layers and logits, checkpoints both ways, prefix-tuning import."""

from __future__ import annotations

import pytest
import torch

import ptpeft_kernels as pk
from tests.optional import require

from .conftest import base_model, forward_inputs, randomize_added, valid_positions

peft = require("peft", "the PEFT interoperability tests")


def _copy_lora_into_peft(ours, theirs):
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, pk.LoRALinear):
                target = theirs.get_submodule(f"base_model.model.{name}")
                target.lora_A["default"].weight.copy_(layer.lora_A.weight)
                target.lora_B["default"].weight.copy_(layer.lora_B.weight)


def _peft_lora_names(model):
    return {
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and not isinstance(m, pk.LoRALinear) and "default" in getattr(m, "lora_A", {})
    }


@pytest.mark.parametrize(
    "family, targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("opt", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]),
        ("bert", ["query", "value"]),
        ("llava", ["q_proj", "v_proj"]),  # PEFT's suffix rule also hits the CLIP tower's q/v
        ("blip2", r".*language_model.*\.(q_proj|v_proj)"),
        ("qwen2_vl", ["q_proj", "v_proj", "qkv"]),
    ],
)
def test_lora_matches_peft_on_the_same_weights(family, targets):
    ours = pk.apply_lora(base_model(family), r=4, alpha=8, target_modules=targets)
    randomize_added(ours)
    theirs = peft.get_peft_model(
        base_model(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    ours_names = {n for n, m in ours.named_modules() if isinstance(m, pk.LoRALinear)}
    assert ours_names == _peft_lora_names(theirs)  # PEFT's matching rules, to the module
    _copy_lora_into_peft(ours, theirs)
    batch = forward_inputs(family)
    with torch.no_grad():
        a, b = ours(**batch).logits, theirs(**batch).logits
    valid = valid_positions(family, batch, a)
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "bert", "llava", "blip2", "qwen2_vl", "florence2"])
def test_saved_lora_loads_in_peft_and_reproduces_our_logits(family, tmp_path):
    model = pk.apply_lora(base_model(family), r=4, alpha=8)
    randomize_added(model)
    pk.save_adapters(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_model(family), tmp_path)
    batch = forward_inputs(family)
    with torch.no_grad():
        ours, loaded, plain = (
            model(**batch).logits,
            theirs(**batch).logits,
            base_model(family)(**batch).logits,
        )
    valid = valid_positions(family, batch, ours)
    assert (ours - plain)[valid].abs().max() > 1e-3  # the LoRA update is real, so equality means it loaded
    torch.testing.assert_close(loaded[valid], ours[valid], atol=1e-5, rtol=1e-5)


def test_peft_saved_lora_loads_into_ours(tmp_path):
    theirs = peft.get_peft_model(
        base_model("llava"),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], alpha_pattern={"o_proj": 4}),
    )
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path)
    ours = pk.load_adapters(base_model("llava"), tmp_path)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, pk.LoRALinear)}
    assert set(layers) == _peft_lora_names(theirs)
    assert {m.alpha for n, m in layers.items() if n.endswith("o_proj")} == {4.0}
    batch = forward_inputs("llava")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad == ("lora_" in n) for n, p in ours.named_parameters())


def test_peft_prefix_tuning_import_equals_peft_up_to_its_position_shift(tmp_path):
    num_prefix = 3
    theirs = peft.get_peft_model(
        base_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_prefix)
    )
    theirs.save_pretrained(tmp_path)
    ours = pk.load_adapters(base_model("llama"), tmp_path)  # dispatches to import_peft_prefix
    assert not ours.ptpeft_prefix.encoders["language_model"].reparameterized
    batch = forward_inputs("llama", pads=(0, 0))
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        expected = theirs(**batch).logits
        # PEFT feeds the prefix as a P-token cache, so its tokens sit at positions P..P+N-1; ours do not
        # move. Giving ours those positions explicitly must reproduce PEFT exactly.
        shifted = ours(**batch, position_ids=torch.arange(num_prefix, num_prefix + n)[None]).logits
        unshifted = ours(**batch).logits
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=1e-5)
    assert (unshifted - expected).abs().max() > 1e-4  # the documented difference is real


def test_import_peft_prefix_rejects_a_mismatched_embedding():
    bad = {"prompt_embeddings": torch.zeros(3, 7)}
    with pytest.raises(
        ValueError, match=r"prompt_embeddings width 7 != layers x 2 x Hkv x D = 2 x 2 x 2 x 8"
    ):
        pk.import_peft_prefix(base_model("llama"), bad)
    with pytest.raises(ValueError, match="expected a 2-D 'prompt_embeddings'"):
        pk.import_peft_prefix(base_model("llama"), {"other": torch.zeros(3)})


def test_unsupported_peft_lora_variants_are_refused(tmp_path):
    theirs = peft.get_peft_model(
        base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    theirs.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match="DoRA, fan_in_fan_out, modules_to_save and LoRA biases are not supported"
    ):
        pk.load_adapters(base_model("llama"), tmp_path)
