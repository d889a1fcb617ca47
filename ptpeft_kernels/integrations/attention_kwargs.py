"""The keywords transformers hands an attention function, and what the ``"ptpeft"`` one does with each.

Audited against transformers 5.24 (``sdpa_attention_forward``, ``eager_attention_forward``, the
flash / flex paths, and every ``attention_interface(...)`` call in the model files; in 5.25's model
files every keyword those calls name is listed here, checked 2026-12-03). Each keyword
is *honoured* (the fused kernel computes it, or the SDPA / explicit-scores fallback does, with a
one-time warning), *inert* (listed below with the reason it cannot change the result), or
*refused* with an error. Anything else that carries a value gets a one-time warning naming it —
no keyword is dropped silently.

Honoured in :func:`~ptpeft_kernels.integrations.attention.ptpeft_attention_forward`:
``attention_mask``, ``scaling``, ``is_causal``, ``dropout`` (fallback while training),
``sliding_window`` (the mask transformers builds carries the window, as its eager / SDPA paths
assume; without a mask and with a window that bites: fallback), ``softcap`` (fallback),
``s_aux`` / ``sinks`` (learned attention sinks: fallback), ``position_bias`` (fallback, as an
additive bias), ``head_mask`` (fallback), ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (packed
sequences: a block-diagonal mask, fused), ``indices`` (top-k sparse key selection: a mask,
fused), ``output_attentions`` (warned: weights are not materialised, ``None`` is returned).
Refused: ``block_indices`` (block-sparse selection whose layout only the model's indexer knows).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

# Keywords that reach attention functions without bearing on the attention they compute.
INERT: dict[str, str] = {
    "position_ids": "RoPE is applied before attention; packed sequences found from them are in the mask "
    "the registered ptpeft mask builder makes (as for sdpa / eager)",
    "max_length_q": "the longest packed query sequence, implied by cu_seq_lens_q",
    "max_length_k": "the longest packed key sequence, implied by cu_seq_lens_k",
    "deterministic": "a flash-attn backward flag; the result is the same either way",
    "seq_idx": "packed-sequence index of state-space layers, not attention",
    "use_cache": "the cache is updated before attention",
    "cache_position": "the cache is updated before attention",
    "past_key_values": "the cache is updated before attention",
    "cache": "the cache is updated before attention",
    "position_embeddings": "applied to the queries and keys before attention",
    "output_hidden_states": "a model-output option",
    "output_router_logits": "a model-output option",
    "return_dict": "a model-output option",
    "num_items_in_batch": "a loss option",
    "encoder_hidden_states": "cross-attention keys are projected from it before attention",
    "encoder_attention_mask": "cross-attention masks arrive as attention_mask",
}
HONOURED = (
    "attention_mask",
    "dropout",
    "scaling",
    "is_causal",
    "sliding_window",
    "softcap",
    "s_aux",
    "sinks",
    "position_bias",
    "head_mask",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "indices",
    "output_attentions",
)
REFUSED = ("block_indices",)

_warned: set[str] = set()
_generation_fields: set[str] | None = None


def warn_once(key: str, message: str, stacklevel: int = 4) -> None:
    """One ``RuntimeWarning`` per ``key`` and process (stacklevel 4: the module that called attention)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _is_generation_option(name: str) -> bool:
    # Kosmos-2's vision tower forwards generate()'s options (do_sample, max_new_tokens, ...) down to
    # its attention: they concern decoding, not attention.
    global _generation_fields
    if _generation_fields is None:
        from transformers import GenerationConfig

        _generation_fields = set(GenerationConfig().to_dict())
    return name in _generation_fields


def check_keywords(module: Any, kwargs: dict[str, Any]) -> None:
    """Refuse what cannot be honoured; warn once for keywords this audit does not know."""
    for name in REFUSED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{type(module).__name__} passes {name} (block-sparse attention chosen by its indexer) to "
                f"the attention function; the ptpeft attention cannot apply it. Run this model with "
                f"attn_implementation='sdpa' (prefixes need the ptpeft attention: none on this model)"
            )
    for name, value in kwargs.items():
        if value is None or value is False or name in HONOURED or name in INERT:
            continue
        if _is_generation_option(name):
            continue
        warn_once(
            f"unknown:{name}",
            f"ptpeft attention: {type(module).__name__} passes the keyword {name!r}, which this attention "
            f"does not know and ignores (transformers' sdpa attention ignores unknown keywords too); if it "
            f"changes attention for this model, run it with attn_implementation='eager'. Warned once.",
        )


def segment_mask(cu_q: Tensor, cu_k: Tensor, n: int, m: int, batch: int, causal: bool) -> Tensor:
    """Bool (1, 1, N, M) visibility of packed sequences: ``cu_seq_lens_*`` (S + 1,) cumulative lengths.

    Query i of sequence s sees key j of the same sequence (and, when ``causal``, with bottom-right
    alignment inside it: ``j <= i + (end_k[s] - end_q[s])``), as flash-attn's varlen kernels do.
    """
    if batch != 1:
        raise ValueError(
            f"cu_seq_lens_q / cu_seq_lens_k describe sequences packed into one row (batch 1), "
            f"got batch {batch}"
        )
    cu_q, cu_k = cu_q.reshape(-1).long(), cu_k.reshape(-1).long()
    if cu_q.numel() != cu_k.numel() or int(cu_q[-1]) != n or int(cu_k[-1]) != m:
        raise ValueError(
            f"cu_seq_lens_q / cu_seq_lens_k must be (S + 1,) cumulative lengths ending at N={n} / M={m}, "
            f"got {cu_q.tolist()} and {cu_k.tolist()}"
        )
    device = cu_q.device
    seg_q = torch.searchsorted(cu_q[1:], torch.arange(n, device=device), right=True)
    seg_k = torch.searchsorted(cu_k[1:], torch.arange(m, device=device), right=True)
    visible = seg_q[:, None] == seg_k[None, :]
    if causal:
        shift = (cu_k[1:] - cu_q[1:])[seg_q]  # end_k - end_q of each query's sequence
        last = torch.arange(n, device=device) + shift  # the last key each query sees
        visible &= torch.arange(m, device=device)[None, :] <= last[:, None]
    return visible[None, None]


def index_mask(indices: Tensor, batch: int, n: int, m: int) -> Tensor:
    """Bool (B, 1, N, M): the keys a top-k indexer selected, ``indices`` (B, N, k); negative = none."""
    if indices.dim() != 3 or indices.shape[0] not in (1, batch) or indices.shape[1] != n:
        raise ValueError(
            f"indices must be (B, N, k) = ({batch}, {n}, k) key indices, got {tuple(indices.shape)}"
        )
    if m == 0:
        return torch.zeros(batch, 1, n, 0, dtype=torch.bool, device=indices.device)
    idx = indices.long()
    valid = idx >= 0
    counts = torch.zeros(indices.shape[0], n, m, dtype=torch.int32, device=indices.device)
    counts.scatter_add_(-1, idx.clamp(min=0, max=max(m - 1, 0)), valid.int())
    return (counts > 0).expand(batch, n, m)[:, None]


def sink_logits(sinks: Tensor, batch: int, heads: int, n: int) -> Tensor:
    """Sink logits broadcastable to (B, Hq, N, 1), from GPT-OSS's per-head ``s_aux`` (Hq,) or a
    per-token (B, Hq, N, 1) tensor (Inkling2's ``sinks``)."""
    if sinks.dim() == 1:
        if sinks.shape[0] != heads:
            raise ValueError(
                f"s_aux must hold one sink logit per query head ({heads}), got {tuple(sinks.shape)}"
            )
        return sinks.view(1, heads, 1, 1)
    if sinks.dim() == 4 and sinks.shape[-1] == 1:
        try:
            torch.broadcast_shapes(sinks.shape, (batch, heads, n, 1))
            return sinks
        except RuntimeError:
            pass
    raise ValueError(
        f"sinks must be (Hq,) = ({heads},) or broadcast to (B, Hq, N, 1) = ({batch}, {heads}, {n}, 1), "
        f"got {tuple(sinks.shape)}"
    )
