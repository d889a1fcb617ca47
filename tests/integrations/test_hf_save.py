"""``model.save_pretrained`` / ``from_pretrained`` of a model carrying PT-PEFT parts: exact round trips or
a clear refusal, never parts dropped as transformers' UNEXPECTED ("can be ignored") keys.

Logits are compared with ``torch.equal``: the reloaded model runs the same float32 weights through
the same code.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.hf_save import base_state_dict
from tests.file_tree import file_tree

from .conftest import base_model, forward_inputs

PT_PEFT_FILES = {"ptpeft_config.json", "prefix_model.safetensors"}
# Beside prefixes, out of reach of from_pretrained / load_adapter (which would load the LoRA part alone).
LORA_FILES = {"peft_lora/adapter_config.json", "peft_lora/adapter_model.safetensors"}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


def perturbed(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Move every trainable (PT-PEFT) parameter off its initial value, as training would (LoRA B is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def logits(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**forward_inputs(family)).logits


def from_pretrained(model: torch.nn.Module, path):
    """``type(model).from_pretrained(path)`` and its loading report."""
    loaded, info = type(model).from_pretrained(path, output_loading_info=True)
    return loaded.eval(), info


@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_unmerged_parts_are_saved_as_adapters_and_load_back_exactly(family, tmp_path):
    model = perturbed(pk.apply_lora(pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=8)))
    want = logits(model, family)
    model.save_pretrained(tmp_path)
    # The adapters only (transformers' and PEFT's convention for a model carrying adapters): no copy of the
    # frozen base, no prefix keys in a model.safetensors for from_pretrained to drop.
    assert file_tree(tmp_path) == PT_PEFT_FILES | LORA_FILES
    assert torch.equal(logits(pk.load_adapters(base_model(family), tmp_path), family), want)


def test_adapters_and_prefix_only_models_save_their_parts(tmp_path):
    model = perturbed(pk.apply_adapter(pk.apply_prefix(base_model("llava"), num_prefix=2), bottleneck=4))
    want = logits(model, "llava")
    model.save_pretrained(tmp_path)
    assert file_tree(tmp_path) == PT_PEFT_FILES | {"bottleneck_adapters.safetensors"}
    assert torch.equal(logits(pk.load_adapters(base_model("llava"), tmp_path), "llava"), want)


@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_merged_lora_with_prefixes_round_trips_through_from_pretrained(family, tmp_path):
    model = perturbed(pk.apply_lora(pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=8)))
    pk.merge_lora(model)
    want = logits(model, family)
    with pytest.warns(UserWarning, match=r"from_pretrained loads the merged weights only.*load_adapters"):
        model.save_pretrained(tmp_path)
    assert file_tree(tmp_path) == MODEL_FILES | PT_PEFT_FILES
    # transformers loads the merged model with nothing unexpected or missing (before: the prefixes were
    # in model.safetensors, reported UNEXPECTED and dropped, logits 0.56 apart)...
    merged, info = from_pretrained(model, tmp_path)
    assert not info["unexpected_keys"]
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # ...and load_adapters puts the prefixes back: the round trip is exact.
    assert torch.equal(logits(pk.load_adapters(merged, tmp_path), family), want)


def test_merged_model_without_other_parts_is_a_plain_checkpoint(tmp_path):
    model = perturbed(pk.apply_lora(base_model("llava")))
    pk.merge_lora(model)
    want = logits(model, "llava")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to warn about
        model.save_pretrained(tmp_path)
    assert file_tree(tmp_path) == MODEL_FILES
    merged, info = from_pretrained(model, tmp_path)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert torch.equal(logits(merged, "llava"), want)


def test_merged_but_kept_lora_saves_the_unmerged_adapters(tmp_path):
    model = perturbed(pk.apply_lora(pk.apply_prefix(base_model("llava"), num_prefix=2)))
    want = logits(model, "llava")  # the unmerged computation
    pk.merge_lora(model, unload=False)
    model.save_pretrained(tmp_path)
    assert file_tree(tmp_path) == PT_PEFT_FILES | LORA_FILES
    assert torch.equal(logits(pk.load_adapters(base_model("llava"), tmp_path), "llava"), want)


def test_base_state_dict_is_the_plain_models():
    plain = base_model("llava")
    model = pk.apply_adapter(pk.apply_lora(pk.apply_prefix(copy.deepcopy(plain), num_prefix=2)), bottleneck=4)
    got, want = base_state_dict(model), plain.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_copies_save_their_own_parameters(tmp_path):
    model = pk.apply_prefix(base_model("llava"), num_prefix=2, reparam_hidden=None)
    for i, clone in enumerate([copy.deepcopy(model), pickle.loads(pickle.dumps(model))]):
        perturbed(clone, seed=i)
        clone.save_pretrained(tmp_path / str(i))
        assert torch.equal(
            logits(pk.load_adapters(base_model("llava"), tmp_path / str(i)), "llava"), logits(clone, "llava")
        )
        assert not torch.equal(logits(clone, "llava"), logits(model, "llava"))


def test_refusals_name_save_adapters(tmp_path):
    model = pk.apply_lora(pk.apply_prefix(base_model("llava"), num_prefix=2))
    with pytest.raises(ValueError, match=r"explicit state_dict.*ptpeft_kernels\.save_adapters"):
        model.save_pretrained(tmp_path, state_dict=model.state_dict())
    with pytest.raises(ValueError, match=r"push_to_hub.*ptpeft_kernels\.save_adapters"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"1 base parameters are trainable.*mark_trainable"):
        model.save_pretrained(tmp_path)
    model.get_input_embeddings().weight.requires_grad_(False)
    pk.merge_lora(model)
    pk.apply_lora(model, r=2)
    with pytest.raises(ValueError, match=r"merged LoRA updates and the model carries new, unmerged LoRA"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
