"""save_adapters / load_adapters: round trips, atomic files, and clear errors on mismatch or damage."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations import checkpoint as ckpt
from ptpeft_kernels.integrations.stages import parameter_kinds
from ptpeft_kernels.integrations.tiny import tiny_model
from tests.file_tree import file_tree
from tests.optional import require

from .conftest import base_model, forward_inputs, randomize_added, valid_positions


def _everything(family):
    model = pk.apply_prefix(base_model(family), num_prefix=3, reparam_hidden=16)
    pk.apply_lora(model, r=4, alpha=8)
    pk.apply_adapter(model, bottleneck=4, placement="parallel")
    randomize_added(model)
    return model


@pytest.mark.parametrize("family", ["llama", "llava", "blip2", "qwen2_vl", "bert"])
def test_round_trip_of_prefix_lora_and_adapters(family, tmp_path):
    model = _everything(family)
    pk.save_adapters(model, tmp_path)
    assert sorted(file_tree(tmp_path)) == sorted(
        [
            ckpt.CONFIG_NAME,
            f"{ckpt.PEFT_SUBDIR}/{ckpt.PEFT_CONFIG_NAME}",
            f"{ckpt.PEFT_SUBDIR}/{ckpt.LORA_WEIGHTS}",
            ckpt.PREFIX_WEIGHTS,
            ckpt.ADAPTER_WEIGHTS,
        ]
    )  # and no temporary files left behind
    loaded = pk.load_adapters(base_model(family), tmp_path)
    batch = forward_inputs(family)
    with torch.no_grad():
        a, b = model(**batch).logits, loaded(**batch).logits
    valid = valid_positions(family, batch, a)
    torch.testing.assert_close(b[valid], a[valid], atol=0, rtol=0)
    kinds = parameter_kinds(loaded)
    assert all(p.requires_grad == (kinds[n] != "base") for n, p in loaded.named_parameters())
    assert pk.trainable_summary(loaded).counts == pk.trainable_summary(model).counts


def test_loading_into_a_model_that_already_has_the_structures(tmp_path):
    model = _everything("llama")
    pk.save_adapters(model, tmp_path)
    target = _everything("llama")
    randomize_added(target, seed=7)
    pk.load_adapters(target, tmp_path)
    assert model.state_dict().keys() == target.state_dict().keys()
    for (n, a), (_, b) in zip(model.state_dict().items(), target.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=n)


def test_resave_replaces_files_and_removes_stale_ones(tmp_path):
    pk.save_adapters(_everything("llama"), tmp_path)
    prefix_only = pk.apply_prefix(base_model("llama"), num_prefix=2, reparam_hidden=None)
    pk.save_adapters(prefix_only, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([ckpt.CONFIG_NAME, ckpt.PREFIX_WEIGHTS])
    loaded = pk.load_adapters(base_model("llama"), tmp_path)
    assert not any(isinstance(m, pk.LoRALinear) for m in loaded.modules())
    assert loaded.ptpeft_prefix.encoders["language_model"].num_prefix == 2


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    model = pk.apply_prefix(base_model("llama"), num_prefix=2, reparam_hidden=8)
    pk.save_adapters(model, tmp_path)
    before = (tmp_path / ckpt.PREFIX_WEIGHTS).read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    randomize_added(model)
    with pytest.raises(OSError, match="disk full"):
        pk.save_adapters(model, tmp_path)
    assert (tmp_path / ckpt.PREFIX_WEIGHTS).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([ckpt.CONFIG_NAME, ckpt.PREFIX_WEIGHTS])


def _saved(tmp_path, family="llama"):
    pk.save_adapters(_everything(family), tmp_path)
    return tmp_path


def test_wrong_family_is_refused(tmp_path):
    _saved(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"saved from a 'llama' model, but the model is 'qwen2'"):
        pk.load_adapters(base_model("qwen2"), tmp_path)


def test_layer_count_and_shape_mismatches_are_refused(tmp_path):
    _saved(tmp_path, "llama")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_model("llama").config.to_dict()
    cfg.update(num_hidden_layers=1)
    one_layer = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(
        ValueError,
        match=r"model has 2 attention modules, LlamaForCausalLM has 1; first difference: the model has "
        r"fewer: the checkpoint's model\.layers\.1\.self_attn \(4 heads, 2 key/value heads of dim 8\)",
    ):
        pk.load_adapters(one_layer, tmp_path)
    cfg.update(num_hidden_layers=2, num_key_value_heads=4)
    more_heads = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(
        ValueError,
        match=r"attention module 0 is model\.layers\.0\.self_attn \(4 heads, 4 key/value heads of dim 8\) "
        r"in the model, model\.layers\.0\.self_attn \(4 heads, 2 key/value heads of dim 8\) saved",
    ):
        pk.load_adapters(more_heads, tmp_path)
    other_prefix = pk.apply_prefix(base_model("llama"), num_prefix=5, reparam_hidden=16)
    with pytest.raises(ValueError, match="already has prefixes of another layout"):
        pk.load_adapters(other_prefix, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize(
    "name", [ckpt.PREFIX_WEIGHTS, f"{ckpt.PEFT_SUBDIR}/{ckpt.LORA_WEIGHTS}", ckpt.ADAPTER_WEIGHTS]
)
def test_corrupt_or_truncated_weight_files_give_a_clear_error(tmp_path, name, damage):
    _saved(tmp_path)
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00not safetensors" * 8, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file.*corrupt or truncated"):
        pk.load_adapters(base_model("llama"), tmp_path)


def test_corrupt_json_missing_files_and_wrong_keys(tmp_path):
    _saved(tmp_path)
    (tmp_path / ckpt.CONFIG_NAME).write_text('{"format": "ptpeft_adap')
    with pytest.raises(ValueError, match="ptpeft_config.json is not valid JSON"):
        pk.load_adapters(base_model("llama"), tmp_path)
    _saved(tmp_path)
    (tmp_path / ckpt.ADAPTER_WEIGHTS).unlink()
    with pytest.raises(
        FileNotFoundError, match="bottleneck_adapters.safetensors is listed in ptpeft_config.json"
    ):
        pk.load_adapters(base_model("llama"), tmp_path)
    _saved(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / ckpt.PREFIX_WEIGHTS)
    tensors["language_model.extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / ckpt.PREFIX_WEIGHTS)
    with pytest.raises(ValueError, match=r"prefix keys do not match the model: missing \[\], unexpected"):
        pk.load_adapters(base_model("llama"), tmp_path)
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    config["version"] = 99
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not 'ptpeft_adapters' version 1"):
        pk.load_adapters(base_model("llama"), tmp_path)


def test_save_and_load_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="has no prefixes, LoRA layers or adapters to save"):
        pk.save_adapters(base_model("llama"), tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        pk.save_adapters(base_model("llama"), 3)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        pk.load_adapters(base_model("llama"), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        pk.load_adapters(base_model("llama"), tmp_path)
    with pytest.raises(TypeError, match="model must be a torch nn.Module"):
        pk.load_adapters("llama", tmp_path)


# ----------------------------------------------------------------------------- checkpoints of another depth


def _deeper(family: str, layers: int = 3):
    """The tiny ``family`` model with ``layers`` language-model layers instead of 2."""
    import copy as _copy

    config = _copy.deepcopy(base_model(family).config)
    text = getattr(config, "text_config", config)
    text.num_hidden_layers = layers
    torch.manual_seed(0)
    return type(base_model(family))(config).eval()


def _structures(model):
    return (
        getattr(model, "ptpeft_prefix", None) is not None,
        any(isinstance(m, pk.LoRALinear) for m in model.modules()),
        any(isinstance(m, pk.BottleneckAdapter) for m in model.modules()),
    )


@pytest.mark.parametrize("setup", ["prefix", "lora", "adapter", "prefix+lora"])
def test_a_checkpoint_from_a_shallower_model_is_refused_before_anything_changes(setup, tmp_path):
    """Issue 15 item 3: a 2-layer LLaVA checkpoint loaded silently into a 3-layer one (layer 2: nothing)."""
    model = base_model("llava")
    if "prefix" in setup:
        pk.apply_prefix(model, num_prefix=2, reparam_hidden=8)
    if "lora" in setup:
        pk.apply_lora(model, r=2, alpha=4)
    if setup == "adapter":
        pk.apply_adapter(model, bottleneck=2)
    pk.save_adapters(model, tmp_path)
    deeper = _deeper("llava")
    with pytest.raises(
        ValueError,
        match=r"model has 4 attention modules, LlavaForConditionalGeneration has 5; first difference: the "
        r"model has more: its attention module model\.language_model\.layers\.2\.self_attn \(4 heads",
    ):
        pk.load_adapters(deeper, tmp_path)
    assert _structures(deeper) == (False, False, False)  # refused before adding anything
    pk.load_adapters(base_model("llava"), tmp_path)  # the model it came from still takes it


def test_checkpoints_without_a_site_list_are_checked_by_count(tmp_path):
    pk.save_adapters(pk.apply_prefix(base_model("llama"), num_prefix=2, reparam_hidden=8), tmp_path)
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    del config["attention_sites"]  # as written before the list was saved
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="the checkpoint's model has 2 attention modules, LlamaForCausalLM has 3"
    ):
        pk.load_adapters(_deeper("llama"), tmp_path)


def test_lora_module_widths_are_checked_before_lora_is_added(tmp_path):
    model = pk.apply_prefix(base_model("llama"), num_prefix=2, reparam_hidden=8)
    pk.save_adapters(pk.apply_lora(model, r=2, alpha=4, target_modules=["gate_proj"]), tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_model("llama").config.to_dict()
    cfg.update(intermediate_size=48)  # same attention, wider MLP
    wider = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(
        ValueError,
        match=r"LoRA module model\.layers\.0\.mlp\.gate_proj is 32 -> 64 in the "
        r"checkpoint but 32 -> 48 in the model",
    ):
        pk.load_adapters(wider, tmp_path)
    assert _structures(wider) == (False, False, False)


def test_a_peft_lora_checkpoint_from_a_shallower_model_is_refused(tmp_path):
    peft = require("peft", "PEFT checkpoint refusals")
    shallow = peft.get_peft_model(
        base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    shallow.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"target_modules .* select 2 module\(s\) of LlamaForCausalLM the checkpoint has no LoRA "
        r"weights for, first model\.layers\.2\.self_attn\.q_proj",
    ):
        pk.load_adapters(_deeper("llama"), tmp_path)
    pk.load_adapters(base_model("llama"), tmp_path)
