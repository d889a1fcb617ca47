"""The word-level fast tokenizer both built-in presets use over the synthetic vocabulary."""

from __future__ import annotations


def word_level_tokenizer(
    specials: list[str], words: list[str], *, unk: str, pad: str, bos: str, eos: str, lowercase: bool = False
):
    """Ids in order ``specials`` then ``words``; split on whitespace and punctuation; ``bos`` prepended
    to every sequence (no EOS appended), right padding. ``lowercase`` normalises like an uncased model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    if lowercase:
        tk.normalizer = normalizers.Lowercase()
    split = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    tk.pre_tokenizer = pre_tokenizers.Sequence(split)
    tk.add_special_tokens(list(specials))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        padding_side="right",
        model_max_length=512,
    )
