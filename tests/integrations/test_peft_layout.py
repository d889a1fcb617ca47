"""Where save_adapters puts the PEFT files, and why: no loader may load a part of a checkpoint as the whole.

With peft installed, transformers' ``Model.from_pretrained(path)`` and ``model.load_adapter(path)``
load the PEFT checkpoint at ``path``'s top level and nothing else. A version-1 directory of prefixes +
LoRA kept its PEFT files there, so both loaded the LoRA part alone without a word (measured on the
tiny LLaVA: logits 0.58 from the saved model's). Version 2 keeps them at the top level only when LoRA is
all the checkpoint holds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations import checkpoint as ckpt
from tests.file_tree import file_tree
from tests.optional import require

from .conftest import base_model, forward_inputs, randomize_added, valid_positions

PEFT_FILES = {ckpt.PEFT_CONFIG_NAME, ckpt.LORA_WEIGHTS}
IN_SUBDIR = {f"{ckpt.PEFT_SUBDIR}/{f}" for f in PEFT_FILES}


def _logits(model, family="llava"):
    batch = forward_inputs(family)
    with torch.no_grad():
        out = model(**batch).logits
    return out[valid_positions(family, batch, out)]


def _saved_base(tmp_path):
    """The tiny LLaVA saved and loaded back: its config names its path, as a real checkpoint's does."""
    model = base_model("llava")
    model.save_pretrained(tmp_path / "base")
    loaded = type(model).from_pretrained(tmp_path / "base")
    assert loaded.config._name_or_path == str(tmp_path / "base")
    return loaded.eval()


def _adapted(model, prefix=True, lora=True):
    if prefix:
        pk.apply_prefix(model, num_prefix=3, reparam_hidden=8)
    if lora:
        pk.apply_lora(model, r=4, alpha=8)
    randomize_added(model, std=0.5)
    return model


def test_prefixes_and_lora_are_out_of_reach_of_transformers_peft_loading(tmp_path):
    require("peft", "transformers' PEFT loading")
    model = _adapted(_saved_base(tmp_path))
    pk.save_adapters(model, tmp_path / "ad")
    assert file_tree(tmp_path / "ad") == {ckpt.CONFIG_NAME, ckpt.PREFIX_WEIGHTS} | IN_SUBDIR
    cls = type(model)
    # Version 1 loaded the LoRA part here and dropped the prefixes silently; now it is an error.
    with pytest.raises(OSError, match="no file named model.safetensors|config.json"):
        cls.from_pretrained(tmp_path / "ad")
    with pytest.raises(ValueError, match="adapter model file not found|adapter_config.json"):
        cls.from_pretrained(tmp_path / "base").load_adapter(str(tmp_path / "ad"))
    loaded = pk.load_adapters(cls.from_pretrained(tmp_path / "base"), tmp_path / "ad")
    assert torch.equal(_logits(loaded), _logits(model))


def test_the_subfolder_is_a_peft_checkpoint_of_the_lora_part(tmp_path):
    peft = require("peft", "the PEFT interoperability tests")
    model = _adapted(base_model("llava"))
    pk.save_adapters(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_model("llava"), tmp_path / ckpt.PEFT_SUBDIR)
    ours = pk.load_adapters(base_model("llava"), tmp_path / ckpt.PEFT_SUBDIR)  # as a PEFT checkpoint
    assert pk.integrations.prefix.get_prefix_bank(ours) is None
    lora_only = _logits(ours)
    assert (lora_only - _logits(base_model("llava"))).abs().max() > 1e-2  # the LoRA part is there
    torch.testing.assert_close(_logits(theirs), lora_only, atol=1e-5, rtol=1e-5)


def test_a_lora_only_checkpoint_stays_a_plain_peft_checkpoint(tmp_path):
    require("peft", "transformers' PEFT loading")
    model = _adapted(_saved_base(tmp_path), prefix=False)
    pk.save_adapters(model, tmp_path / "ad")
    assert file_tree(tmp_path / "ad") == {ckpt.CONFIG_NAME} | PEFT_FILES
    # All there is, so transformers' own loading is complete: it gives the saved model's logits.
    theirs = type(model).from_pretrained(tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), atol=1e-5, rtol=1e-5)


def test_saving_another_layout_into_the_same_directory_leaves_no_stale_files(tmp_path):
    lora_only = _adapted(base_model("llava"), prefix=False)
    both = _adapted(base_model("llava"))
    pk.save_adapters(lora_only, tmp_path)
    pk.save_adapters(both, tmp_path)  # a stale top-level adapter_config.json would be loadable alone
    assert file_tree(tmp_path) == {ckpt.CONFIG_NAME, ckpt.PREFIX_WEIGHTS} | IN_SUBDIR
    pk.save_adapters(lora_only, tmp_path)
    assert file_tree(tmp_path) == {ckpt.CONFIG_NAME} | PEFT_FILES
    assert not (tmp_path / ckpt.PEFT_SUBDIR).exists()
    pk.save_adapters(pk.apply_prefix(base_model("llava"), num_prefix=2), tmp_path)
    assert file_tree(tmp_path) == {ckpt.CONFIG_NAME, ckpt.PREFIX_WEIGHTS}


def test_a_version_1_directory_still_loads_exactly(tmp_path):
    model = _adapted(base_model("llava"))
    pk.save_adapters(model, tmp_path)
    for name in PEFT_FILES:  # the version-1 layout: PEFT files at the top level, no peft_directory
        shutil.move(tmp_path / ckpt.PEFT_SUBDIR / name, tmp_path / name)
    (tmp_path / ckpt.PEFT_SUBDIR).rmdir()
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    del config["lora"]["peft_directory"]
    config.update(version=1, files=sorted(set(config["files"]) - IN_SUBDIR | PEFT_FILES))
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps(config))
    assert torch.equal(_logits(pk.load_adapters(base_model("llava"), tmp_path)), _logits(model))


@pytest.mark.parametrize("where", ["../elsewhere", "other"])
def test_a_peft_directory_outside_the_layout_is_refused(tmp_path, where):
    pk.save_adapters(_adapted(base_model("llava")), tmp_path)
    config = json.loads((tmp_path / ckpt.CONFIG_NAME).read_text())
    config["lora"]["peft_directory"] = where
    (tmp_path / ckpt.CONFIG_NAME).write_text(json.dumps(config))
    target = base_model("llava")
    with pytest.raises(ValueError, match=rf"lora\.peft_directory is '{where}', expected '\.' or 'peft_lora'"):
        pk.load_adapters(target, tmp_path)
    assert pk.integrations.prefix.get_prefix_bank(target) is None  # refused before anything was added
