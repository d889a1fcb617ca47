"""PT-PEFT stages (mark_trainable, trainable_summary) and bad inputs to every entry point."""

from __future__ import annotations

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.stages import parameter_kinds

from .conftest import base_model


def _kinds_trainable(model):
    kinds = parameter_kinds(model)
    return {kinds[n] for n, p in model.named_parameters() if p.requires_grad}


def test_stage_one_then_stage_two_keeps_prefixes_trainable():
    model = pk.apply_prefix(base_model("blip2"), num_prefix=2, reparam_hidden=8)
    assert _kinds_trainable(model) == {"prefix"}
    assert not model.query_tokens.requires_grad  # stray top-level parameters are frozen too
    pk.apply_lora(model, r=2)
    assert _kinds_trainable(model) == {"prefix", "lora"}
    pk.apply_adapter(model, bottleneck=2)
    assert _kinds_trainable(model) == {"prefix", "lora", "adapter"}
    pk.mark_trainable(model, prefix=False, adapter=False)
    assert _kinds_trainable(model) == {"lora"}
    pk.mark_trainable(model, prefix=True, lora=False, adapter=False, base=True)
    assert _kinds_trainable(model) == {"prefix", "base"}


def test_trainable_summary_counts_every_kind():
    model = pk.apply_lora(pk.apply_prefix(base_model("llama"), num_prefix=3, reparam_hidden=None), r=2)
    summary = pk.trainable_summary(model)
    kinds = parameter_kinds(model)
    params = dict(model.named_parameters())
    for kind in ("prefix", "lora", "adapter", "base"):
        total = sum(params[n].numel() for n, k in kinds.items() if k == kind)
        assert summary.counts[kind] == (0 if kind in ("adapter", "base") else total, total)
    assert summary.counts["prefix"][1] == 2 * 2 * 2 * 3 * 8  # L x (K, V) x Hkv x P x D
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert "prefix" in str(summary) and "% trainable" in str(summary)
    assert summary.as_dict()["lora"]["trainable"] == summary.counts["lora"][0]


def test_apply_without_freeze_leaves_the_base_alone():
    model = pk.apply_lora(base_model("llama"), r=2, freeze=False)
    assert _kinds_trainable(model) == {"base", "lora"}


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_targets_name_what_they_got_and_what_exists():
    with pytest.raises(
        ValueError, match=r"targets='nowhere' matched no self-attention module.*model\.layers\.0"
    ):
        pk.apply_prefix(base_model("llama"), targets="nowhere")
    with pytest.raises(
        TypeError, match="targets must be 'language_model', 'all' or a regex string.*got int 3"
    ):
        pk.apply_prefix(base_model("llama"), targets=3)
    with pytest.raises(ValueError, match="not a valid regex"):
        pk.apply_prefix(base_model("llama"), targets="(")
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matched no module of LlamaForCausalLM"):
        pk.apply_lora(base_model("llama"), target_modules=["nope"])
    with pytest.raises(
        ValueError, match="LoRA supports nn.Linear targets only.*model.embed_tokens \\(Embedding\\)"
    ):
        pk.apply_lora(base_model("llama"), target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(TypeError, match="target_modules must be None, a regex string or a list"):
        pk.apply_lora(base_model("llama"), target_modules=5)
    with pytest.warns(UserWarning, match=r"matched no module: \['query'\]"):
        pk.apply_lora(base_model("llama"), target_modules=["q_proj", "query"])


def test_models_whose_attention_bypasses_the_registry_are_named():
    git = base_model("git")
    with pytest.raises(
        ValueError,
        match=r"prefixes cannot reach them: git\.encoder\.layer\.0\.attention\.self \(GitSelfAttention\)",
    ):
        pk.apply_prefix(git)
    # LoRA does not need the registry: the same model takes it.
    pk.apply_lora(git, target_modules=["query", "value"])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: pk.apply_prefix(m, num_prefix=-1), ValueError, "num_prefix must be >= 0, got -1"),
        (lambda m: pk.apply_prefix(m, num_prefix=2.5), TypeError, "num_prefix must be an int"),
        (lambda m: pk.apply_prefix(m, reparam_hidden=0), ValueError, "reparam_hidden must be >= 1"),
        (lambda m: pk.apply_lora(m, r=0), ValueError, "r must be >= 1, got 0"),
        (lambda m: pk.apply_lora(m, alpha="x"), TypeError, "alpha must be a number"),
        (lambda m: pk.apply_lora(m, dropout=1.5), ValueError, r"dropout must be in \[0, 1\)"),
        (lambda m: pk.apply_adapter(m, placement="after"), ValueError, "placement must be one of"),
        (lambda m: pk.apply_adapter(m, bottleneck=0), ValueError, "bottleneck must be >= 1"),
        (lambda m: pk.merge_lora(m), ValueError, "no LoRA layers to merge"),
        (lambda m: pk.fold_prefix(m), ValueError, "no prefixes to fold"),
        (lambda m: pk.mark_trainable(m, lora="yes"), TypeError, "lora must be a bool"),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(base_model("llama"))


def test_applying_twice_and_non_models_are_refused():
    model = pk.apply_prefix(base_model("llama"), num_prefix=2, reparam_hidden=8)
    with pytest.raises(ValueError, match="already has prefixes"):
        pk.apply_prefix(model)
    pk.apply_lora(model, r=2)
    with pytest.raises(ValueError, match="already carry LoRA"):
        pk.apply_lora(model, r=2)
    pk.apply_adapter(model, bottleneck=2)
    with pytest.raises(ValueError, match="already has adapters"):
        pk.apply_adapter(model, bottleneck=2)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(
        TypeError, match="transformers PreTrainedModel with config.model_type, got Sequential"
    ):
        pk.apply_prefix(plain)
    with pytest.raises(TypeError, match="model must be a torch nn.Module"):
        pk.apply_lora("llama")
    with pytest.raises(TypeError, match="transformers model"):
        pk.enable_ptpeft_attention(plain)
