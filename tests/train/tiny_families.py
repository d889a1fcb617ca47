"""Tiny random LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP and Qwen2-VL checkpoints with real processors,
saved as Hugging Face folders.

They exercise the driver's generic path (family prompt templates, processor-made image tokens,
label alignment) on families other than the built-in model. The tokenizer is word-level over
the synthetic vocabulary plus the words of the families' prompts. Qwen2-VL's processor needs
torchvision for its video half, which this machine lacks: its checkpoint is loaded with
:func:`load_qwen2_vl_processor`, the same processor without the video half.
"""

from __future__ import annotations

from pathlib import Path

from ptpeft_kernels.train import synthetic
from ptpeft_kernels.train.models import FAMILIES

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def _tokenizer(extra_special: list[str]):
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>", *extra_special]
    prompt_words = []
    for fam in FAMILIES.values():
        for text in (fam.template, fam.caption_prompt, fam.vqa_prompt):
            prompt_words += re.findall(r"\w+|[^\w\s]", text.replace("{prompt}", "").replace("{question}", ""))
    vocab: dict[str, int] = {}
    for w in special + synthetic.vocabulary() + prompt_words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tk.add_special_tokens(special)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _finish(model, processor, out: Path) -> Path:
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Every tiny vision tower: 32 px images in 16 px patches, one layer of width 32.
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
}
QFORMER = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "encoder_hidden_size": 32,
}
BLIP_IMAGES = {"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def _llama(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def build_llava(out: Path) -> Path:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer(["<image>"])
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=_llama(len(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    size = {"height": 32, "width": 32}
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False),
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _finish(LlavaForConditionalGeneration(cfg), proc, out)


def build_blip2(out: Path) -> Path:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessorPil,
        OPTConfig,
    )

    tok = _tokenizer(["<image>"])
    tok.image_token = "<image>"
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(**VISION).to_dict(),
        qformer_config=Blip2QFormerConfig(**QFORMER, vocab_size=len(tok)).to_dict(),
        text_config=OPTConfig(
            vocab_size=len(tok),
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            max_position_embeddings=256,
        ).to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    ip = BlipImageProcessorPil(**BLIP_IMAGES)
    return _finish(
        Blip2ForConditionalGeneration(cfg),
        Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=4),
        out,
    )


def build_llava_next(out: Path) -> Path:
    """One 32 px grid pinpoint: the processor makes a base tile plus one high-resolution tile."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = _tokenizer(["<image>"])
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=_llama(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[32, 32]],
        vision_feature_layer=-1,
    )
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]]
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _finish(LlavaNextForConditionalGeneration(cfg), proc, out)


def build_instructblip(out: Path) -> Path:
    """Llama language model; the Q-Former gets the prompt through its own tokenizer, as in InstructBLIP."""
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    tok = _tokenizer(["<image>"])
    tok.image_token = "<image>"
    qformer_tok = _tokenizer([])
    cfg = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**VISION).to_dict(),
        qformer_config=InstructBlipQFormerConfig(**QFORMER, vocab_size=len(qformer_tok)).to_dict(),
        text_config=_llama(len(tok)).to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    ip = BlipImageProcessorPil(**BLIP_IMAGES)
    proc = InstructBlipProcessor(
        image_processor=ip, tokenizer=tok, qformer_tokenizer=qformer_tok, num_query_tokens=4
    )
    return _finish(InstructBlipForConditionalGeneration(cfg), proc, out)


QWEN_SPECIAL = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|im_start|>",
    "<|im_end|>",
]


def _image_only_qwen2_vl_processor(image_processor, tokenizer):
    """Qwen2-VL's processor minus its video processor (whose class needs torchvision)."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor, tokenizer):
            super(Qwen2VLProcessor, self).__init__(image_processor, tokenizer)
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer)


def load_qwen2_vl_processor(path):
    """What ``AutoProcessor.from_pretrained`` gives for a Qwen2-VL folder where torchvision is installed."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    return _image_only_qwen2_vl_processor(
        Qwen2VLImageProcessorPil.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    )


def build_qwen2_vl(out: Path) -> Path:
    """32 px images as 4x4 patches of 8 px, merged 2x2: four image tokens, M-RoPE positions."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = _tokenizer(QWEN_SPECIAL)
    cfg = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "pad_token_id": PAD,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
    )
    ip = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    return _finish(Qwen2VLForConditionalGeneration(cfg), _image_only_qwen2_vl_processor(ip, tok), out)
