"""Tiny random-weight models of every supported family, and matching example inputs.

Nothing is downloaded: each model is built from a config small enough (hidden sizes 32,
one or two layers, a 128-token vocabulary) to run a forward pass in milliseconds on a CPU.
The tests, the walk-through script and the training driver's smoke runs share them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN = VOCAB - 1  # the placeholder token the multi-modal models replace by image features


def _llama_like(model_type: str, **extra) -> dict:
    cfg = dict(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    cfg.update(extra)
    return cfg


def _opt(**extra) -> dict:
    cfg = dict(
        model_type="opt",
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    cfg.update(extra)
    return cfg


def _clip_vision(**extra) -> dict:
    cfg = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    cfg.update(extra)
    return cfg


@dataclass
class TinyFamily:
    """A family's tiny model builder and its example-input maker."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict]
    decoder_only: bool = True  # generate() continues input_ids (False: encoder-decoder or masked LM)


def _text_inputs(model, input_ids, attention_mask) -> dict:
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _no_dropout(cfg: dict) -> dict:
    for key in (
        "attention_dropout",
        "dropout",
        "activation_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "drop_path_rate",
    ):
        cfg.setdefault(key, 0.0)
    return cfg


def _build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _llama_like("llama")
    cfg.pop("model_type")
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _build_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = _llama_like("qwen2")
    cfg.pop("model_type")
    return Qwen2ForCausalLM(Qwen2Config(**cfg))


def _build_opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = _no_dropout(_opt())
    cfg.pop("model_type")
    return OPTForCausalLM(OPTConfig(**cfg))


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def _build_bert():
    from transformers import BertForMaskedLM

    return BertForMaskedLM(_bert_config())


def _build_bert_lm():
    from transformers import BertLMHeadModel

    return BertLMHeadModel(_bert_config(is_decoder=True, bos_token_id=BOS, eos_token_id=EOS))


def _build_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=_clip_vision(),
        text_config=_llama_like("llama"),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg)


def _build_llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=_llama_like("llama"),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16]],
        image_seq_length=16,
    )
    return LlavaNextForConditionalGeneration(cfg)


def _build_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    text = _llama_like("gemma", num_key_value_heads=1, head_dim=8)
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        vocab_size=VOCAB,
        projection_dim=32,
        hidden_size=32,
    )
    return PaliGemmaForConditionalGeneration(cfg)


def _idefics_like(config_cls, model_cls):
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    cfg = config_cls(
        vision_config=vision, text_config=_llama_like("llama"), image_token_id=IMAGE_TOKEN, scale_factor=2
    )
    return model_cls(cfg)


def _build_idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _idefics_like(Idefics3Config, Idefics3ForConditionalGeneration)


def _build_smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _idefics_like(SmolVLMConfig, SmolVLMForConditionalGeneration)


def _qformer() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        cross_attention_frequency=1,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _blip_vision() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )


def _build_blip2():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(
        vision_config=_blip_vision(),
        qformer_config=_qformer(),
        text_config=_no_dropout(_opt()),
        num_query_tokens=4,
        image_token_index=IMAGE_TOKEN,
    )
    return Blip2ForConditionalGeneration(cfg)


def _build_instructblip():
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    cfg = InstructBlipConfig(
        vision_config=_blip_vision(),
        qformer_config=_qformer(),
        text_config=_llama_like("llama"),
        num_query_tokens=4,
        image_token_index=IMAGE_TOKEN,
    )
    return InstructBlipForConditionalGeneration(cfg)


_VISION_START, _VISION_END, _VIDEO = VOCAB - 3, VOCAB - 4, VOCAB - 2


def _qwen_vl(config_cls, model_cls, v25: bool):
    text = _llama_like(
        "qwen", rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    )
    text.pop("model_type")
    vision = dict(
        depth=2,
        hidden_size=32,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    if v25:
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
    else:
        vision.update(embed_dim=32)
    cfg = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=_VIDEO,
        vision_start_token_id=_VISION_START,
        vision_end_token_id=_VISION_END,
    )
    return model_cls(cfg)


def _build_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return _qwen_vl(Qwen2VLConfig, Qwen2VLForConditionalGeneration, v25=False)


def _build_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, v25=True)


def _build_florence2():
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    text = dict(
        model_type="bart",
        vocab_size=VOCAB,
        max_position_embeddings=64,
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_layers=2,
        decoder_ffn_dim=64,
        decoder_attention_heads=4,
        d_model=32,
        eos_token_id=EOS,
        bos_token_id=BOS,
        pad_token_id=PAD,
        decoder_start_token_id=EOS,
        forced_eos_token_id=None,
    )
    vision = dict(
        depths=[1],
        patch_size=[7],
        patch_stride=[4],
        patch_padding=[3],
        patch_prenorm=[False],
        embed_dim=[32],
        num_heads=[4],
        num_groups=[4],
        window_size=4,
        projection_dim=32,
    )
    cfg = Florence2Config(
        text_config=_no_dropout(text), vision_config=_no_dropout(vision), image_token_id=IMAGE_TOKEN
    )
    return Florence2ForConditionalGeneration(cfg)


def _build_kosmos2():
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    text = dict(
        vocab_size=VOCAB,
        max_position_embeddings=256,
        embed_dim=32,
        layers=2,
        ffn_dim=64,
        attention_heads=4,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    cfg = Kosmos2Config(text_config=_no_dropout(text), vision_config=vision, latent_query_num=4)
    return Kosmos2ForConditionalGeneration(cfg)


def _build_git():
    from transformers import GitConfig, GitForCausalLM

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    cfg = GitConfig(
        vision_config=vision,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return GitForCausalLM(cfg)


# (image placeholder tokens before the text, extra forward kwargs maker)
def _image_tokens(n: int) -> list[int]:
    return [IMAGE_TOKEN] * n


def _pixels(b: int, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(b, *shape, generator=g)


def _extra_none(b, g, ids):
    return {}


def _extra_image(b, g, ids, size=16):
    return {"pixel_values": _pixels(b, g, 3, size, size)}


def _extra_llava_next(b, g, ids):
    return {"pixel_values": _pixels(b, g, 2, 3, 16, 16), "image_sizes": torch.tensor([[16, 16]] * b)}


def _extra_idefics(b, g, ids):
    return {"pixel_values": _pixels(b, g, 1, 3, 16, 16)}


def _extra_instructblip(b, g, ids):
    q = torch.randint(3, 100, (b, 5), generator=g)
    return {**_extra_image(b, g, ids), "qformer_input_ids": q, "qformer_attention_mask": torch.ones_like(q)}


def _extra_qwen_vl(b, g, ids):
    # one 16 x 16 image per sample: a 1 x 4 x 4 grid of 4 x 4 patches (x2 frames), 4 tokens after 2 x 2 merge
    return {
        "pixel_values": torch.randn(b * 16, 3 * 2 * 4 * 4, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]] * b),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def _extra_kosmos2(b, g, ids):
    return {**_extra_image(b, g, ids), "image_embeds_position_mask": (ids == IMAGE_TOKEN).long()}


def _extra_florence2(b, g, ids):
    return _extra_image(b, g, ids, size=8)


def _extra_git(b, g, ids):
    return _extra_image(b, g, ids)


@dataclass
class _Spec:
    build: Callable[[], torch.nn.Module]
    lead: list[int]  # tokens before the text (image placeholders, markers)
    extra: Callable = _extra_none
    kind: str = "decoder"  # "decoder" (generate continues input_ids), "encoder" (no generate), "seq2seq"


FAMILIES: dict[str, _Spec] = {
    "llama": _Spec(_build_llama, []),
    "qwen2": _Spec(_build_qwen2, []),
    "opt": _Spec(_build_opt, []),
    "bert": _Spec(_build_bert, [], kind="encoder"),
    "bert_lm": _Spec(_build_bert_lm, []),
    "llava": _Spec(_build_llava, _image_tokens(16), _extra_image),
    "llava_next": _Spec(_build_llava_next, _image_tokens(36), _extra_llava_next),
    "paligemma": _Spec(_build_paligemma, _image_tokens(16), _extra_image),
    "idefics3": _Spec(_build_idefics3, _image_tokens(4), _extra_idefics),
    "smolvlm": _Spec(_build_smolvlm, _image_tokens(4), _extra_idefics),
    "blip2": _Spec(_build_blip2, _image_tokens(4), _extra_image),
    "instructblip": _Spec(_build_instructblip, _image_tokens(4), _extra_instructblip),
    "qwen2_vl": _Spec(_build_qwen2_vl, [_VISION_START, *_image_tokens(4), _VISION_END], _extra_qwen_vl),
    "qwen2_5_vl": _Spec(_build_qwen2_5_vl, [_VISION_START, *_image_tokens(4), _VISION_END], _extra_qwen_vl),
    "florence2": _Spec(_build_florence2, _image_tokens(5), _extra_florence2, kind="seq2seq"),
    "kosmos2": _Spec(_build_kosmos2, [BOS, *_image_tokens(4)], _extra_kosmos2),
    "git": _Spec(_build_git, [], _extra_git),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (a key of ``FAMILIES``), in eval mode."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    return FAMILIES[family].build().eval()


def tiny_inputs(
    family: str, batch: int = 2, text_len: int = 6, pads: list[int] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Example inputs for ``tiny_model(family)``: left-padded ``input_ids`` / ``attention_mask``
    (row i starts with ``pads[i]`` pad tokens), image tensors and placeholder tokens as the family needs.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    spec = FAMILIES[family]
    pads = list(pads) if pads is not None else [0] * batch
    if len(pads) != batch:
        raise ValueError(f"pads must have one entry per row (batch={batch}), got {pads}")
    g = torch.Generator().manual_seed(seed)
    width = max(pads) + len(spec.lead) + text_len
    rows, masks = [], []
    for pad in pads:
        text = torch.randint(3, 100, (text_len + max(pads) - pad,), generator=g).tolist()
        row = [PAD] * pad + spec.lead + text
        rows.append(row)
        masks.append([0] * pad + [1] * (width - pad))
    ids = torch.tensor(rows)
    out = {"input_ids": ids, "attention_mask": torch.tensor(masks)}
    out.update(spec.extra(batch, g, ids))
    return out


def family_kind(family: str) -> str:
    """``"decoder"``, ``"encoder"`` (no ``generate``) or ``"seq2seq"``."""
    return FAMILIES[family].kind


def generate_kwargs(max_new_tokens: int = 3) -> dict:
    """Greedy, fixed-length generation that never emits a special or image-placeholder token
    (a random model would otherwise end early, or emit a placeholder that breaks re-encoding)."""
    return {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "do_sample": False,
        "suppress_tokens": [PAD, BOS, EOS, *range(100, VOCAB)],
    }
