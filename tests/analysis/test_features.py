"""collect_features on tiny random models: padding excluded, layers, eval mode, towers."""

from __future__ import annotations

import pytest
import torch

from ptpeft_kernels.analysis import collect_features, collect_layers, find_vision_tower

from .conftest import make_llama

ATOL = 1e-5


def padded_batch(lengths: list[int], vocab: int, left: bool = False, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("left", [False, True])
def test_padding_positions_excluded(tiny_llama, left):
    batch = padded_batch([7, 3, 5], tiny_llama.config.vocab_size, left=left)
    feats = collect_features(tiny_llama, [batch])
    with torch.no_grad():
        hidden = tiny_llama(**batch, output_hidden_states=True).hidden_states[-1]
    assert [f.shape for f in feats] == [(7, 32), (3, 32), (5, 32)]
    for i, f in enumerate(feats):
        manual = hidden[i][batch["attention_mask"][i].bool()]
        torch.testing.assert_close(f, manual, atol=ATOL, rtol=0)


def test_right_padded_features_equal_each_sample_alone(tiny_llama):
    # With right padding a causal model never sees the pads, so the kept rows are exactly what the
    # model computes for each text alone: a check that the kept positions are the real tokens.
    batch = padded_batch([6, 2, 4], tiny_llama.config.vocab_size)
    feats = collect_features(tiny_llama, [batch])
    for i, f in enumerate(feats):
        n = int(batch["attention_mask"][i].sum())
        with torch.no_grad():
            alone = tiny_llama(input_ids=batch["input_ids"][i : i + 1, :n], output_hidden_states=True)
        torch.testing.assert_close(f, alone.hidden_states[-1][0], atol=ATOL, rtol=1e-5)


def test_layer_selection_and_multi_layer_pass(tiny_llama):
    batch = padded_batch([5, 4], tiny_llama.config.vocab_size)
    emb = collect_features(tiny_llama, [batch], layer=0)
    with torch.no_grad():
        table = tiny_llama.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(emb[1], table[1, :4], atol=0, rtol=0)
    by_layer = collect_layers(tiny_llama, [batch], [0, -1, 2])
    # -1 and 2 are the same (last) hidden state of a 2-layer model: one key, no doubled samples.
    assert sorted(by_layer) == [0, 2]
    assert len(by_layer[2]) == 2
    torch.testing.assert_close(by_layer[2][0], collect_features(tiny_llama, [batch])[0], atol=0, rtol=0)
    assert sorted(collect_layers(tiny_llama, [batch], None)) == [0, 1, 2]


def test_batches_order_max_batches_and_ignored_entries(tiny_llama):
    vocab = tiny_llama.config.vocab_size
    batches = [padded_batch([3, 4], vocab, seed=s) for s in range(3)]
    batches[0]["labels"] = batches[0]["input_ids"].clone()
    batches[0]["text"] = ["not", "a tensor"]
    feats = collect_features(tiny_llama, batches, max_batches=2)
    assert [f.shape[0] for f in feats] == [3, 4, 3, 4]
    torch.testing.assert_close(feats[2], collect_features(tiny_llama, [batches[1]])[0], atol=0, rtol=0)


def test_without_attention_mask_every_position_is_kept(tiny_llama):
    ids = torch.randint(3, tiny_llama.config.vocab_size, (2, 6))
    assert [f.shape[0] for f in collect_features(tiny_llama, [{"input_ids": ids}])] == [6, 6]


def test_eval_mode_no_grad_and_training_flags_restored():
    model = make_llama(attention_dropout=0.5)
    model.train()
    model.model.layers[0].eval()  # a partly frozen model must come back exactly as it was
    flags = {name: m.training for name, m in model.named_modules()}
    batch = padded_batch([6, 6], model.config.vocab_size)
    first = collect_features(model, [batch])
    second = collect_features(model, [batch])
    assert {name: m.training for name, m in model.named_modules()} == flags
    # Dropout 0.5 would make two train-mode passes differ.
    torch.testing.assert_close(first[0], second[0], atol=0, rtol=0)
    assert not first[0].requires_grad
    model.eval()
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(first[0], ref, atol=ATOL, rtol=0)


def test_flags_restored_when_a_batch_fails(tiny_llama):
    tiny_llama.train()
    try:
        with pytest.raises(TypeError, match="dict of model inputs"):
            collect_features(tiny_llama, [torch.zeros(2, 3)])
        assert tiny_llama.training and all(m.training for m in tiny_llama.modules())
    finally:
        tiny_llama.eval()


def test_bad_arguments(tiny_llama):
    batch = padded_batch([3], tiny_llama.config.vocab_size)
    with pytest.raises(ValueError, match="out of range: the model returns 3 hidden states"):
        collect_features(tiny_llama, [batch], layer=3)
    with pytest.raises(ValueError, match="out of range"):
        collect_features(tiny_llama, [batch], layer=-4)
    with pytest.raises(TypeError, match="layer must be an int"):
        collect_features(tiny_llama, [batch], layer=1.0)
    with pytest.raises(ValueError, match="tower"):
        collect_features(tiny_llama, [batch], tower="audio")
    with pytest.raises(ValueError, match="no vision tower"):
        collect_features(tiny_llama, [batch], tower="vision")
    with pytest.raises(ValueError, match="max_batches"):
        collect_features(tiny_llama, [batch], max_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        collect_features(tiny_llama, [])
    bad_mask = dict(batch, attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot tell padding positions apart"):
        collect_features(tiny_llama, [bad_mask])


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    torch.manual_seed(0)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=63, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def test_vision_tower_of_llava():
    model = tiny_llava()
    tower = find_vision_tower(model)
    assert tower is model.model.vision_tower
    pixels = torch.randn(2, 3, 16, 16)
    ids = torch.randint(0, 60, (2, 20))
    ids[:, 1:17] = 63  # 16 patches -> 16 image tokens
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with torch.no_grad():
        ref = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    vis = collect_features(model, [batch], layer=1, tower="vision")
    # All 16 patches + the class token of each image; the text mask does not apply to images.
    assert [f.shape for f in vis] == [(17, 16), (17, 16)]
    torch.testing.assert_close(vis[1], ref[1][1], atol=ATOL, rtol=0)
    # The language tower reads the language model's states (width 32), text padding removed.
    lang = collect_features(model, [batch], tower="language")
    assert [f.shape for f in lang] == [(20, 32), (17, 32)]
    with pytest.raises(ValueError, match="no pixel_values"):
        collect_features(model, [{"input_ids": ids}], tower="vision")


def test_blip2_language_states_come_from_language_model_outputs():
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    qformer = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=16,
    )
    text = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
    )
    torch.manual_seed(0)
    cfg = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=63,
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    assert find_vision_tower(model) is model.vision_model
    ids = torch.randint(0, 60, (2, 10))
    ids[:, :4] = 63  # the 4 query-token slots
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16)}
    lang = collect_features(model, [batch])
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).language_model_outputs.hidden_states[-1]
    assert [f.shape for f in lang] == [(8, 32), (10, 32)]
    torch.testing.assert_close(lang[0], ref[0, :8], atol=ATOL, rtol=0)
    assert [f.shape for f in collect_features(model, [batch], tower="vision")] == [(5, 16), (5, 16)]
