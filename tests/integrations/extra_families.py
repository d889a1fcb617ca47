"""Tiny models of text families outside ``integrations.tiny.FAMILIES``, for the head-shape and keyword tests.

Fused query/key/value projections (Phi-3, GPT-NeoX, GPT-2, GPT-BigCode, CodeGen, Persimmon),
attention that bypasses the registry (Falcon, Bloom, MPT) and learned attention sinks (GPT-OSS):
hidden size 32, 4 heads of dim 8, two layers, a 128-token vocabulary.
"""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family: (config class, model class, config arguments, expected (Hq, Hkv, D) of every attention site)
SPECS: dict[str, tuple[str, str, dict, tuple[int, int, int] | None]] = {
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        (4, 2, 8),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        (4, 4, 8),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
        (4, 4, 8),
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True),
        (4, 1, 8),
    ),
    "codegen": (
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, rotary_dim=4),
        (4, 4, 8),
    ),
    "persimmon": (
        "PersimmonConfig",
        "PersimmonForCausalLM",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        (4, 4, 8),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        (4, 1, 8),  # multi-query by default
    ),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4), None),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64), None),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,  # layer 0 slides (window 4), layer 1 attends to everything
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        (4, 2, 8),
    ),
}
FUSED = ["phi3", "gpt_neox", "gpt2", "gpt_bigcode", "codegen", "persimmon", "falcon"]
BYPASSING = ["bloom", "mpt"]
# The transformers release from which a FUSED family dispatches through AttentionInterface; before it
# the family computes attention itself, like the BYPASSING ones (read in each release's modeling file).
ROUTED_SINCE = {"codegen": (5, 24), "falcon": (5, 25)}


def bypassing() -> list[str]:
    """The families whose attention the installed transformers does not route through its registry."""
    return [*BYPASSING, *(f for f in ROUTED_SINCE if not routes_attention(f))]


def routes_attention(family: str) -> bool:
    """Whether the installed transformers routes ``family``'s attention through its registry."""
    import transformers

    installed = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    return installed >= ROUTED_SINCE.get(family, (0, 0))


def build(family: str, **overrides) -> torch.nn.Module:
    """The tiny ``family`` model (seed 0, eval mode); ``overrides`` change its config arguments."""
    import transformers

    config_cls, model_cls, kwargs, _ = SPECS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**_COMMON, **{**kwargs, **overrides})
    return getattr(transformers, model_cls)(config).eval()


def inputs(batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and a left-padded attention mask (row 1 starts with two pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}
