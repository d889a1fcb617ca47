"""The ``"ptpeft"`` attention implementation for ``transformers``.

Registered with both of transformers' registries: ``AttentionInterface`` (the function every
routed attention module calls) and ``AttentionMaskInterface`` (the mask builder; without it
``create_causal_mask`` returns ``None`` for unknown implementations and padding silently
vanishes). The function runs :func:`ptpeft_kernels.prefix_attention`, with the prefix of
the calling module when :func:`~ptpeft_kernels.apply_prefix` attached one.

Transformers hands us ``query`` (B, Hq, N, D) and un-repeated ``key``/``value`` (B, Hkv, M, D)
— the op's own layout, GQA by index — and expects (B, N, Hq, D) back plus attention weights
(always ``None`` here). Masks: our builder returns transformers' boolean SDPA mask (True =
attend, (B, 1, N, M)), or ``None`` only where bottom-right causal alignment (or no mask at
all) is exactly right, so the op can use its causal fast path.

Cases the fused op does not cover go through ``scaled_dot_product_attention`` with the
prefix concatenated in front of the keys (same result, an extra copy), with a one-time
warning: sliding windows, attention dropout while training, logit soft-capping, and
additive float masks that carry a bias rather than just 0 / -inf.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.prefix_attention import prefix_attention
from .attention_kwargs import (
    _warned,  # noqa: F401  (one set of warned keys; tests clear it)
    check_keywords,
    index_mask,
    segment_mask,
    sink_logits,
    warn_once,
)

ATTN_IMPLEMENTATION = "ptpeft"

_registered = False


# ----------------------------------------------------------------------------- masks


def _ends_aligned(q_length: Any, kv_length: Any, q_offset: Any, kv_offset: Any) -> bool:
    """Whether the last key is the last query, i.e. bottom-right causal alignment is exact.

    With a DynamicCache the keys are [past, new] and this holds; a StaticCache has unwritten
    slots after the last query (and tensor offsets), so its mask must be materialised.
    """
    values = (q_length, kv_length, q_offset, kv_offset)
    if not all(isinstance(v, int) for v in values):
        return False
    return q_offset + q_length == kv_offset + kv_length


def ptpeft_mask(**kwargs: Any) -> Tensor | None:
    """transformers' boolean SDPA mask, skipped (``None``) only where our causal flag is exact."""
    from transformers.masking_utils import sdpa_mask

    aligned = _ends_aligned(
        kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    )
    # A skipped mask means "use the module's is_causal". PaliGemma's Gemma layers set is_causal=False
    # (use_bidirectional_attention) yet ask for a causal mask, so skipping would make them bidirectional
    # (transformers' SDPA path does exactly that, eager does not): materialise it for such configs.
    bidirectional_modules = getattr(kwargs.get("config"), "use_bidirectional_attention", False)
    if kwargs.get("allow_is_causal_skip", True) and (not aligned or bidirectional_modules):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**kwargs)


def _bool_mask(mask: Tensor, batch: int, m: int) -> tuple[Tensor | None, Tensor | None]:
    """(bool mask, float bias): a mask transformers built, as the op's bool form where possible.

    Returns (bool (B, 1|H, 1|N, M), None), or (None, float mask) when the float mask carries
    values other than 0 and "masked" (a real bias, which only the SDPA path can add).
    """
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be 2-D (B, M) or 4-D (B, 1|H, N, M), got shape {tuple(mask.shape)}"
        )
    if mask.shape[-1] > m:  # masks sized for a static cache cover slots past the keys we were given
        mask = mask[..., :m]
    if mask.shape[0] != batch:
        mask = mask.expand(batch, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        return mask.bool(), None
    keep = mask > torch.finfo(mask.dtype).min / 2
    if torch.any(keep & (mask != 0)):
        return None, mask
    return keep, None


# ----------------------------------------------------------------------------- fallback


def _fallback(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    prefix: tuple[Tensor, Tensor] | None,
    keep: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    scale: float,
    dropout: float,
    window: int | None,
    softcap: float | None,
    sinks: Tensor | None,
    head_mask: Tensor | None,
) -> Tensor:
    """SDPA, or explicit scores (soft-capping, sinks, head mask), with the prefix in front of the keys.

    ``keep`` / ``bias`` cover the sequence keys; ``causal`` and ``window`` (bottom-right aligned)
    are applied only when no mask was given (a given mask already carries them).
    """
    b, hq, n, d = query.shape
    hkv, m = key.shape[1], key.shape[2]
    dev = query.device
    if causal or window:
        pos = torch.arange(n, device=dev)[:, None] + (m - n)  # bottom-right aligned query positions
        kpos = torch.arange(m, device=dev)[None, :]
        visible = kpos <= pos if causal else torch.ones(n, m, dtype=torch.bool, device=dev)
        if window:
            visible = visible & (kpos > pos - window)
        visible = visible[None, None]
        keep = visible if keep is None else keep & visible
    if keep is not None:
        keep = keep.expand(b, *keep.shape[1:])
    if prefix is not None and prefix[0].shape[-2] > 0:
        p = prefix[0].shape[-2]
        pk, pv = (t.expand(b, -1, -1, -1) if t.dim() == 3 else t for t in prefix)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if keep is not None:
            ones = torch.ones(*keep.shape[:-1], p, dtype=torch.bool, device=dev)
            keep = torch.cat([ones, keep], dim=-1)
        if bias is not None:
            bias = torch.cat([bias.new_zeros(*bias.shape[:-1], p), bias], dim=-1)
    if hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    if softcap or sinks is not None or head_mask is not None:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if bias is not None:
            scores = scores + bias.float()
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        if sinks is not None:  # one more logit per row with a zero value: it only absorbs probability
            column = sink_logits(sinks, b, hq, n).float().expand(b, hq, n, 1)
            scores = torch.cat([scores, column], dim=-1)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if sinks is not None:
            probs = probs[..., :-1]
        if head_mask is not None:
            probs = probs * (head_mask.view(1, -1, 1, 1) if head_mask.dim() == 1 else head_mask)
        probs = nn.functional.dropout(probs, p=dropout, training=module.training)
        return torch.matmul(probs.to(value.dtype), value)
    attn_mask = bias if bias is not None else keep
    if bias is not None and keep is not None:
        attn_mask = bias.masked_fill(~keep, float("-inf"))
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scale
    )
    if keep is not None:  # a row that sees nothing outputs zeros, as the fused op does
        out = out.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    return out


# ----------------------------------------------------------------------------- the attention function


def _module_prefix(module: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    slot = getattr(module, "_ptpeft_prefix", None)
    if slot is None:
        return None
    pk, pv = slot.kv()
    return pk.to(dtype), pv.to(dtype)


def _and(keep: Tensor | None, extra: Tensor) -> Tensor:
    return extra if keep is None else keep & extra


def ptpeft_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None = None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers ``AttentionInterface`` entry: (B, Hq, N, D) queries in, (B, N, Hq, D) out.

    Every keyword transformers passes is honoured, inert or refused (see ``attention_kwargs``).
    """
    check_keywords(module, kwargs)
    if kwargs.get("output_attentions"):
        warn_once(
            "output_attentions",
            "ptpeft attention does not materialise attention weights; output_attentions=True returns "
            "None weights (use attn_implementation='eager' to inspect them)",
            stacklevel=3,
        )
    b, hq, n, d = query.shape
    m = key.shape[2]
    scale = (d**-0.5 if d else 1.0) if scaling is None else float(scaling)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if getattr(module, "_ptpeft_cross", False):
        # Cross-attention is never causal, whatever the module says (transformers 5.17's Kosmos-2
        # projection keeps is_causal=True there; its eager path ignores it, its SDPA path does not).
        causal = False
    causal = bool(causal) and n > 1  # one query attends to every cached key: no mask needed
    prefix = _module_prefix(module, query.dtype)

    keep = bias = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"ptpeft attention takes a tensor attention_mask (bool or additive float), got "
                f"{type(attention_mask).__name__}; build masks with attn_implementation='ptpeft'"
            )
        keep, bias = _bool_mask(attention_mask, b, m)
        causal = False  # a given mask already encodes causality (and any bidirectional blocks)
    # Packed sequences (flash-attn's varlen keywords) and top-k key selection become bool masks.
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
        keep = _and(keep, segment_mask(cu_q, cu_k, n, m, b, causal))
        causal = False
    if kwargs.get("indices") is not None:
        keep = _and(keep, index_mask(kwargs["indices"], b, n, m))
    if kwargs.get("position_bias") is not None:
        position_bias = kwargs["position_bias"][..., :m]
        bias = position_bias if bias is None else bias + position_bias

    # A window matters only without a mask (a given mask carries it, as transformers' eager and SDPA
    # paths assume) and when some query's window ends before the first key (M > window).
    window = kwargs.get("sliding_window")
    window = window if window and attention_mask is None and m > window else None
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    head_mask = kwargs.get("head_mask")
    dropout = float(dropout) if module.training else 0.0
    reasons = [
        name
        for name, present in (
            ("sliding-window attention", window is not None),
            ("attention dropout during training", dropout > 0.0),
            ("attention logit soft-capping", bool(softcap)),
            ("attention sinks (s_aux / sinks)", sinks is not None),
            ("a head mask", head_mask is not None),
            ("an additive attention bias (float mask values or position_bias)", bias is not None),
        )
        if present
    ]
    if reasons:
        reason = " and ".join(reasons)
        warn_once(
            reason,
            f"ptpeft attention: {reason} is not supported by the fused prefix_attention kernel; "
            f"{type(module).__name__} falls back to torch scaled_dot_product_attention (explicit scores for "
            f"soft-capping, sinks and head masks) with the prefix concatenated to the keys (same result, "
            f"slower). Warned once.",
            stacklevel=3,
        )
        out = _fallback(
            module,
            query,
            key,
            value,
            prefix,
            keep,
            bias,
            causal and attention_mask is None,
            scale,
            dropout,
            window,
            softcap,
            sinks,
            head_mask,
        )
    else:
        pk, pv = prefix if prefix is not None else (None, None)
        # backend=None: PTPEFT_BACKEND (default auto) chooses, so a whole model can be pinned to one backend.
        out = prefix_attention(
            query, key, value, pk, pv, attn_mask=keep, causal=causal, scale=scale, backend=None
        )
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- registration


def register_attention() -> str:
    """Register ``"ptpeft"`` with transformers' attention and mask registries; returns the name.

    Idempotent. After it, ``from_pretrained(..., attn_implementation="ptpeft")`` and
    ``model.set_attn_implementation("ptpeft")`` work.
    """
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, ptpeft_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ptpeft_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


def _configs(model: nn.Module) -> list[Any]:
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


def _bypassing_configs(model: nn.Module) -> dict[int, list[str]]:
    """Configs whose every attention site computes attention itself: id -> those sites' names.

    Such modules never call the registry, but the model still builds their masks for the
    configured implementation: switched to "ptpeft" they would be handed a boolean mask where
    they add a float one (Bloom, MPT, GIT's text decoder, Falcon before transformers 5.25: logits
    change silently).
    """
    from transformers import PretrainedConfig

    from .model_info import find_attention_sites

    owners = {
        n: m.config
        for n, m in model.named_modules()
        if isinstance(getattr(m, "config", None), PretrainedConfig)
    }
    routed: set[int] = set()
    bypassing: dict[int, list[str]] = {}
    for site in find_attention_sites(model):
        parts = site.name.split(".")
        ancestors = (".".join(parts[:i]) for i in range(len(parts), -1, -1))  # the site itself first
        config = next((owners[a] for a in ancestors if a in owners), None)
        if config is None:
            continue
        if site.routed:
            routed.add(id(config))
        else:
            bypassing.setdefault(id(config), []).append(site.name)
    return {k: v for k, v in bypassing.items() if k not in routed}


def set_attention(model: nn.Module, implementation: str = ATTN_IMPLEMENTATION) -> nn.Module:
    """Switch every attention of ``model`` (all sub-models) to ``implementation``; returns ``model``.

    ``"ptpeft"`` (the default) runs them through :func:`ptpeft_kernels.prefix_attention`;
    ``"sdpa"`` / ``"eager"`` switch back (prefix-carrying modules then refuse to run). Sub-models
    whose attention modules all bypass transformers' attention registry keep their implementation
    under ``"ptpeft"`` (with a warning): their masks must stay the ones they were written for.
    """
    if not isinstance(implementation, str):
        raise TypeError(f"implementation must be a str, got {type(implementation).__name__}")
    if implementation == ATTN_IMPLEMENTATION:
        register_attention()
    configs = _configs(model)
    if not configs:
        raise TypeError(f"model must be a transformers model (with a config), got {type(model).__name__}")
    keep_as_is = _bypassing_configs(model) if implementation == ATTN_IMPLEMENTATION else {}
    before = {id(c): c._attn_implementation for c in configs}
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        import logging

        # transformers warns for sub-models that bypass the registry; this function reports those itself.
        log = logging.getLogger("transformers.modeling_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            setter(implementation)
        finally:
            log.setLevel(level)
    # Sub-configs transformers did not reach (modules keeping a config it does not list), and back for
    # the bypassing ones it switched anyway (its check is per source file: GIT's vision tower is routed).
    for config in configs:
        want = before[id(config)] if id(config) in keep_as_is else implementation
        if config._attn_implementation != want:
            config._attn_implementation_internal = want
    if keep_as_is:
        names = [n for v in keep_as_is.values() for n in v]
        warnings.warn(
            f"{type(model).__name__}: {len(names)} attention module(s) compute attention themselves instead "
            f"of dispatching through transformers' AttentionInterface ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); their sub-model keeps attn_implementation "
            f"{sorted({before[k] for k in keep_as_is})} so its masks stay right. They get no fused kernel "
            f"and cannot take prefixes (LoRA and adapters work).",
            UserWarning,
            stacklevel=2,
        )
    if implementation == ATTN_IMPLEMENTATION:
        from .model_info import find_attention_sites

        for site in find_attention_sites(model):
            if site.cross:
                object.__setattr__(site.module, "_ptpeft_cross", True)
    return model


def enable_ptpeft_attention(model: nn.Module) -> nn.Module:
    """Route every attention of ``model`` through the fused kernels (no prefix needed); returns ``model``."""
    return set_attention(model, ATTN_IMPLEMENTATION)
