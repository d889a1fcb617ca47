"""Configs of three public LMMs, built from their published sizes (no weights), for ``--estimate-memory``.

The numbers are those of the models' published ``config.json`` files (llava-hf/llava-1.5-7b-hf,
llava-hf/llava-v1.6-34b-hf, Qwen/Qwen2-VL-72B-Instruct): widths, depths, heads, vocabularies.
``default_image_tokens`` is the image-token count the estimate assumes when ``--seq-len`` is not
given: 576 for a 336 px CLIP-L/14 image; LLaVA-NeXT's any-resolution grid at its largest
(the base image plus 2 x 2 tiles: 5 x 576); Qwen2-VL at 1024 tokens (an 896 x 896 image in
14 px patches merged 2 x 2).
"""

from __future__ import annotations

from typing import Any

_CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def _llava_15_7b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP_L_336),
        text_config=text,
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def _llava_next_34b():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    text = LlamaConfig(  # Nous-Hermes-2-Yi-34B
        vocab_size=64064,
        hidden_size=7168,
        intermediate_size=20480,
        num_hidden_layers=60,
        num_attention_heads=56,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=5_000_000.0,
    )
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_CLIP_L_336),
        text_config=text,
        image_token_index=64000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )


def _qwen2_vl_72b():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 8192,
            "intermediate_size": 29568,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
        },
        vision_config={
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 8192,
            "mlp_ratio": 4,
            "num_heads": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
        },
    )


REFERENCE_CONFIGS: dict[str, tuple[Any, int]] = {
    # name: (config factory, default image tokens)
    "llava-1.5-7b": (_llava_15_7b, 576),
    "llava-next-34b": (_llava_next_34b, 5 * 576),
    "qwen2-vl-72b": (_qwen2_vl_72b, 1024),
}


def reference_config(name: str):
    """``(config, default image tokens)`` of a reference model."""
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"unknown reference config {name!r}; known: {', '.join(REFERENCE_CONFIGS)}")
    factory, tokens = REFERENCE_CONFIGS[name]
    return factory(), tokens
