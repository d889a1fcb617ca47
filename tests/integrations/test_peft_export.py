"""A LoRA checkpoint with several ranks and alphas, exported in PEFT's format, gives our logits in ``peft``.

PEFT's config holds one ``r`` and one ``lora_alpha``; layers that differ are listed in
``rank_pattern`` / ``alpha_pattern``. A single-rank, single-alpha checkpoint never exercises them.
"""

from __future__ import annotations

import json

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations import checkpoint as ckpt
from tests.optional import require

from .conftest import base_model, forward_inputs, randomize_added, valid_positions

peft = require("peft", "the PEFT interoperability tests")

# (targets, r, alpha): the majority (q/k, 4 layers) sets PEFT's r and lora_alpha; o_proj shares
# the rank with another alpha, v_proj differs in both.
GROUPS = [(["q_proj", "k_proj"], 4, 8), (["o_proj"], 4, 32), (["v_proj"], 2, 3)]


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_two_ranks_and_alphas_reload_in_peft_with_our_logits(tmp_path, rslora):
    """Mutations it guards against, in ``_peft_lora_config``: ``alpha_pattern`` written empty (every
    layer loaded at the majority alpha: logits off by up to 0.27 on the issue's model),
    ``rank_pattern`` written empty, and ``use_rslora`` written as False."""
    model = base_model("llama")
    for targets, r, alpha in GROUPS:
        pk.apply_lora(model, r=r, alpha=alpha, target_modules=targets, use_rslora=rslora)
    randomize_added(model, std=0.5)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, pk.LoRALinear)}
    assert {(m.r, m.alpha) for m in ours.values()} == {(4, 8), (4, 32), (2, 3)}
    pk.save_adapters(model, tmp_path)

    config = json.loads((tmp_path / ckpt.PEFT_CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, rslora)
    theirs = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    for name, layer in ours.items():  # what PEFT made of every layer, one by one
        loaded = theirs.get_submodule(f"base_model.model.{name}")
        assert loaded.r["default"] == layer.r, name
        assert loaded.scaling["default"] == pytest.approx(layer.scaling, rel=1e-12), name
        torch.testing.assert_close(loaded.lora_B["default"].weight, layer.lora_B.weight, rtol=0, atol=0)

    batch = forward_inputs("llama")
    with torch.no_grad():
        got, want = theirs(**batch).logits, model(**batch).logits
        plain = base_model("llama")(**batch).logits
    valid = valid_positions("llama", batch, want)
    assert (want - plain)[valid].abs().max() > 1e-2  # the LoRA update is large enough to notice
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_the_scalings_change_the_logits():
    """The check above can fail: the same weights with every layer at the majority alpha give other logits."""
    model = base_model("llama")
    for targets, r, alpha in GROUPS:
        pk.apply_lora(model, r=r, alpha=alpha, target_modules=targets)
    randomize_added(model, std=0.5)
    batch = forward_inputs("llama")
    valid = valid_positions("llama", batch, model(**batch).logits)
    with torch.no_grad():
        before = model(**batch).logits
        for m in model.modules():
            if isinstance(m, pk.LoRALinear):
                m.scaling = 8 / m.r
        after = model(**batch).logits
    assert (before - after)[valid].abs().max() > 1e-2
