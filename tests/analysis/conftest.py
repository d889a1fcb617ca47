"""Tiny models and data for the analysis tests: random weights from configs, a word-level tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "rug",
    "red",
    "blue",
    "big",
    "small",
    "and",
    "then",
]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def make_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def random_texts(n: int, seed: int = 0, lo: int = 12, hi: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_llama():
    return make_llama()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    """A saved base checkpoint (+ tokenizer), a copy with one MLP changed, an identical copy, and data."""
    root = tmp_path_factory.mktemp("run")
    model = make_llama()
    model.save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    model.save_pretrained(root / "same")
    with torch.no_grad():
        # The last decoder layer's MLP: hidden states 0 and 1 are untouched, 2 (the last) changes.
        model.model.layers[1].mlp.down_proj.weight.mul_(5.0)
    model.save_pretrained(root / "changed")
    with open(root / "data.jsonl", "w", encoding="utf-8") as fh:
        for text in random_texts(20, seed=1):
            fh.write(json.dumps({"text": text}) + "\n")
    return root
