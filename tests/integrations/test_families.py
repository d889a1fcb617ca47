"""Per family and set-up (prefix, LoRA, adapter, prefix + LoRA): forward, backward and generate."""

from __future__ import annotations

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.stages import parameter_kinds
from ptpeft_kernels.integrations.tiny import generate_kwargs, tiny_inputs

from .conftest import (
    GENERATIVE,
    LEFT_PAD_FAITHFUL,
    SUPPORTED,
    apply_method,
    base_model,
    forward_inputs,
    randomize_added,
    select_row,
    valid_positions,
)

METHODS = ["prefix", "lora", "adapter", "prefix+lora"]
# Which parameter kinds train after each set-up: PT-PEFT stage 2 keeps the prefixes trainable.
TRAINS = {"prefix": {"prefix"}, "lora": {"lora"}, "adapter": {"adapter"}, "prefix+lora": {"prefix", "lora"}}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", SUPPORTED)
def test_forward_changes_outputs_through_the_added_parameters(family, method):
    base = base_model(family)
    batch = forward_inputs(family)
    with torch.no_grad():
        ref = base(**batch).logits
        model = apply_method(base_model(family), method)
        randomize_added(model)
        out = model(**batch).logits
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    valid = valid_positions(family, batch, out)
    # The added parameters must reach the computation (a prefix that no attention reads would not).
    assert (out - ref)[valid].abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", SUPPORTED)
def test_backward_reaches_exactly_the_trainable_parameters(family, method):
    model = apply_method(base_model(family), method)
    randomize_added(model)
    model.train()
    batch = forward_inputs(family)
    logits = model(**batch).logits
    logits[valid_positions(family, batch, logits)].float().pow(2).mean().backward()
    kinds = parameter_kinds(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {kinds[n] for n in trainable} == TRAINS[method]
    assert trainable == {n for n, k in kinds.items() if k in TRAINS[method]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (
                f"{name}: zero/non-finite gradient"
            )
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"


def _generate(model, batch, **extra):
    out = model.generate(
        **batch, **generate_kwargs(3), return_dict_in_generate=True, output_logits=True, **extra
    )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", GENERATIVE)
def test_generate_with_cache_matches_full_recompute(family, method):
    model = apply_method(base_model(family), method)
    randomize_added(model)
    # Kosmos-2's own no-cache path mis-positions left-padded rows (eager and sdpa alike): no padding there.
    batch = tiny_inputs(family, pads=[0, 0] if family == "kosmos2" else [0, 2])
    seq, logits = _generate(model, batch)
    seq_full, logits_full = _generate(model, batch, use_cache=False)
    assert seq.shape[1] == batch["input_ids"].shape[1] + 3 or family == "florence2"
    torch.testing.assert_close(logits, logits_full, atol=2e-5, rtol=1e-4)
    assert torch.equal(seq, seq_full)


@pytest.mark.parametrize("family", LEFT_PAD_FAITHFUL)
def test_generate_left_padding_matches_unpadded_rows(family):
    model = apply_method(base_model(family), "prefix+lora")
    randomize_added(model)
    pads = [0, 3]
    batch = tiny_inputs(family, pads=pads, text_len=4)
    seq, logits = _generate(model, batch)
    for i, pad in enumerate(pads):
        row_seq, row_logits = _generate(model, select_row(family, batch, i, pad))
        torch.testing.assert_close(logits[i : i + 1], row_logits, atol=2e-5, rtol=1e-4)
        assert torch.equal(seq[i, -3:], row_seq[0, -3:])


@pytest.mark.parametrize("family", ["llama", "llava", "blip2", "qwen2_vl", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    model = apply_method(base_model(family), "prefix+lora")
    randomize_added(model)
    checkpointed = base_model(family)
    checkpointed.load_state_dict(model.state_dict(), strict=False)
    apply_method(checkpointed, "prefix+lora")
    checkpointed.load_state_dict(model.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    batch = forward_inputs(family)
    grads = []
    for m in (model, checkpointed):
        m.train()
        logits = m(**batch).logits
        logits[valid_positions(family, batch, logits)].pow(2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_prefix_reaches_every_language_model_self_attention():
    model = pk.apply_prefix(base_model("blip2"), num_prefix=2, reparam_hidden=8)
    slots = {n for n, m in model.named_modules() if getattr(m, "_ptpeft_prefix", None) is not None}
    assert slots == {f"language_model.model.decoder.layers.{i}.self_attn" for i in range(2)}
    everything = pk.apply_prefix(base_model("blip2"), num_prefix=2, reparam_hidden=8, targets="all")
    slots = {n for n, m in everything.named_modules() if getattr(m, "_ptpeft_prefix", None) is not None}
    assert len(slots) == 1 + 2 + 2  # vision layer, Q-Former self-attention (not its cross-attention), OPT
    assert not any("crossattention" in n for n in slots)
    assert set(everything.ptpeft_prefix.encoders) == {"vision_model", "qformer", "language_model"}


def test_bfloat16_model_keeps_float32_prefixes_and_trains_all_kinds():
    model = base_model("llava").to(torch.bfloat16)
    pk.apply_prefix(model, num_prefix=3, reparam_hidden=16)
    pk.apply_lora(model, r=4)
    pk.apply_adapter(model, bottleneck=4)
    randomize_added(model)
    batch = tiny_inputs("llava", pads=[0, 2])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    model.train()
    logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    logits[batch["attention_mask"].bool()].float().pow(2).mean().backward()
    kinds = parameter_kinds(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            # the prefixes are float32 master weights; LoRA / adapters follow the base dtype
            assert p.dtype == (torch.float32 if kinds[name] == "prefix" else torch.bfloat16), name
    model.eval()
    assert model.generate(**batch, **generate_kwargs(2)).shape[1] == batch["input_ids"].shape[1] + 2
