"""Finding the attention layers of a ``transformers`` model without per-model tables.

An *attention site* is a module whose ``forward`` dispatches through
``ALL_ATTENTION_FUNCTIONS.get_interface`` (a *routed* site: the ``"ptpeft"`` attention
reaches it), or one that looks like attention — a class named ``*Attention*`` owning
query/key/value ``nn.Linear`` children — but computes its scores itself (a *bypassing*
site, e.g. GIT's text decoder; prefixes cannot reach it, so targeting it is an error).

Sites are classified by region: ``language_model`` (under a submodule named
``language_model`` / ``text_model`` / ``text_decoder``, or, in a model with no such
submodule, anything outside a vision tower / Q-Former) or the name of the tower they sit in.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from torch import nn

# Submodule names under which a multi-modal model keeps its language model.
_LM_ROOTS = ("language_model", "text_model", "text_decoder")
# Path components that mark a non-language tower in models without an LM root.
_TOWER_RE = re.compile(
    r"(^|\.)(vision_model|vision_tower|visual|vision_encoder|image_encoder|qformer|vision)(\.|$)"
)
# Cross-attention, by the names the families use (BERT/Q-Former, BART/Florence-2, Kosmos-2).
_CROSS_RE = re.compile(r"(crossattention|cross_attn|cross_attention|encoder_attn|x_attn)", re.IGNORECASE)
_QKV_NAMES = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v", "qkv", "wq", "wk", "wv"}
_KEY_NAMES = ("k_proj", "key", "k", "wk")
_QUERY_NAMES = ("q_proj", "query", "q", "wq")
# One projection producing [queries, keys, values]: Phi-3 / CodeGen qkv_proj, GPT-NeoX / Persimmon /
# Falcon / Bloom query_key_value, GPT-2 / GPT-BigCode c_attn, DBRX / MPT Wqkv, Baichuan W_pack.
_FUSED_NAMES = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "in_proj", "W_pack")
_OUT_NAMES = ("o_proj", "out_proj", "proj", "dense", "wo", "c_proj")
# Where head counts live, in the order they are read: the module's own attributes first (vision
# towers and cross-attention keep their own), then its config, as transformers' modules compute them.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head")
_WIDTH_ATTRS = ("embed_dim", "dim", "hidden_size", "all_head_size")
_CONFIG_HEAD_ATTRS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
_CONFIG_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")

_routed_cache: dict[type, bool] = {}


@dataclass
class AttentionSite:
    """One attention module of a model."""

    name: str
    module: nn.Module
    region: str  # "language_model", or the tower's name ("vision_tower", "qformer", ...)
    cross: bool  # keys come from another sequence (no prefix goes here)
    routed: bool  # dispatches through transformers' AttentionInterface
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    shape_problem: str | None = None  # what was looked for when a head count / dim stays unknown

    @property
    def shape_known(self) -> bool:
        return None not in (self.num_heads, self.num_kv_heads, self.head_dim)


def model_family(model: nn.Module) -> str:
    """``config.model_type`` of a transformers model (``"llava"``, ``"blip-2"``, ...)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if not family:
        raise TypeError(
            f"model must be a transformers PreTrainedModel with config.model_type, got {type(model).__name__}"
        )
    return family


def is_routed(cls: type) -> bool:
    """Whether ``cls.forward`` dispatches through transformers' attention registry."""
    if cls not in _routed_cache:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _routed_cache[cls] = "ALL_ATTENTION_FUNCTIONS" in source or ".get_interface(" in source
    return _routed_cache[cls]


def _out_features(child: object) -> int | None:
    """Output width of a linear-like projection, seen through LoRA / PEFT / quantisation wrappers.

    ``nn.Linear`` and its subclasses (bitsandbytes), anything exposing ``out_features`` (this
    library's and PEFT's LoRA layers), transformers' ``Conv1D`` (GPT-2: ``nf``), or whatever a
    ``base_layer`` attribute wraps.
    """
    for _ in range(4):  # wrappers nest (PEFT around a quantised Linear, ...)
        if not isinstance(child, nn.Module):
            return None
        for attr in ("out_features", "nf"):
            value = getattr(child, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        child = getattr(child, "base_layer", None)
    return None


def _looks_like_attention(module: nn.Module) -> bool:
    if "attention" not in type(module).__name__.lower() and "attn" not in type(module).__name__.lower():
        return False
    linear_children = {n for n, c in module.named_children() if _out_features(c) is not None}
    return len(linear_children & _QKV_NAMES) >= 2 or bool(linear_children & set(_FUSED_NAMES))


def _first_int(obj: object, names: tuple[str, ...]) -> int | None:
    for n in names:
        value = getattr(obj, n, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _child_width(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for n in names:
        width = _out_features(getattr(module, n, None))
        if width is not None:
            return width
    return None


def _divide(total: int | None, part: int | None) -> int | None:
    return total // part if total is not None and part and total % part == 0 else None


def _head_shapes(module: nn.Module) -> tuple[int | None, int | None, int | None, str | None]:
    """(Hq, Hkv, D, problem): head counts and dim as the attention function will receive them.

    Read as transformers' modules compute them: the module's own attributes, then its config
    (``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` or ``hidden_size // heads``);
    projection widths (separate q/k, or one fused [q, k, v] projection, LoRA-wrapped or not)
    decide where they are present, since they are what the attention call is handed.
    ``problem`` says what was looked for when a value stays unknown.
    """
    config = getattr(module, "config", None)
    head_dim = _first_int(module, _HEAD_DIM_ATTRS)
    num_heads = _first_int(module, _HEAD_ATTRS)
    num_kv = _first_int(module, _KV_ATTRS)
    query = _child_width(module, _QUERY_NAMES)
    key = _child_width(module, _KEY_NAMES)
    fused = _child_width(module, _FUSED_NAMES)
    if num_heads is None and head_dim is not None:
        num_heads = _divide(query, head_dim)
    if num_heads is None and config is not None:
        num_heads = _first_int(config, _CONFIG_HEAD_ATTRS)
    if head_dim is None and num_heads is not None:
        head_dim = _divide(_first_int(module, _WIDTH_ATTRS) or query, num_heads)
    if head_dim is None and config is not None and num_heads is not None:
        width = _first_int(config, ("hidden_size",))
        head_dim = _first_int(config, ("head_dim",)) or _divide(width, num_heads)
    if num_heads is None or head_dim is None:
        missing = "head count" if num_heads is None else "head dim"
        looked = (
            f"module attributes {', '.join(_HEAD_ATTRS)} or config.{', config.'.join(_CONFIG_HEAD_ATTRS)}"
            if num_heads is None
            else f"module attributes {', '.join(_HEAD_DIM_ATTRS)}, config.head_dim or a query projection"
        )
        return num_heads, None, head_dim, f"no {missing} (looked for {looked})"
    if key is not None:
        num_kv = _divide(key, head_dim)
    elif fused is not None:
        rest = _divide(fused, head_dim)  # [Hq + 2 Hkv] heads of width D
        extra = rest - num_heads if rest else 0
        num_kv = extra // 2 if extra > 0 and extra % 2 == 0 else None
    if num_kv is None:
        num_kv = _divide(num_heads, _first_int(module, ("num_key_value_groups",)))
    if num_kv is None and config is not None:
        num_kv = _first_int(config, _CONFIG_KV_ATTRS)
    if num_kv is None or num_heads % num_kv:
        return (
            num_heads,
            None,
            head_dim,
            f"no key/value head count dividing {num_heads} query heads (looked for module attributes "
            f"{', '.join(_KV_ATTRS)}, a key projection ({', '.join(_KEY_NAMES)}), a fused projection "
            f"({', '.join(_FUSED_NAMES)}), num_key_value_groups, "
            f"config.{', config.'.join(_CONFIG_KV_ATTRS)})",
        )
    return num_heads, num_kv, head_dim, None


def _region(name: str, lm_roots: list[str]) -> str:
    for root in lm_roots:
        if name == root or name.startswith(root + "."):
            return "language_model"
    if not lm_roots and not _TOWER_RE.search(name):
        return "language_model"
    match = _TOWER_RE.search(name)
    if match:
        return match.group(2)
    parts = name.split(".")
    return parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]


def _ours(name: str) -> bool:
    # Modules this library adds (the prefix bank, adapters) are never attention sites or LM roots.
    return any(part.startswith("ptpeft_") for part in name.split("."))


def language_model_roots(model: nn.Module) -> list[str]:
    """Names of the submodules holding the language model (outermost only); [] for text-only models."""
    roots: list[str] = []
    for name, _ in model.named_modules():
        if _ours(name):
            continue
        if name.split(".")[-1] in _LM_ROOTS and not any(name.startswith(r + ".") for r in roots):
            roots.append(name)
    return roots


def find_attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention site of ``model``, in module order (outermost module of a nest only)."""
    lm_roots = language_model_roots(model)
    sites: list[AttentionSite] = []
    for name, module in model.named_modules():
        if _ours(name):
            continue
        routed = is_routed(type(module))
        if not routed and not _looks_like_attention(module):
            continue
        if any(name.startswith(s.name + ".") for s in sites):
            continue  # e.g. an attention class nested in another routed one
        num_heads, num_kv, head_dim, problem = _head_shapes(module)
        sites.append(
            AttentionSite(
                name=name,
                module=module,
                region=_region(name, lm_roots),
                cross=bool(_CROSS_RE.search(name)),
                routed=routed,
                num_heads=num_heads,
                num_kv_heads=num_kv,
                head_dim=head_dim,
                shape_problem=problem,
            )
        )
    return sites


def select_sites(model: nn.Module, targets: str, *, self_attention_only: bool = True) -> list[AttentionSite]:
    """The attention sites named by ``targets``: ``"language_model"``, ``"all"`` or a regex over names.

    Raises if the selection is empty or contains sites that bypass the attention registry.
    """
    if not isinstance(targets, str):
        raise TypeError(
            f"targets must be 'language_model', 'all' or a regex string over module names, "
            f"got {type(targets).__name__} {targets!r}"
        )
    sites = find_attention_sites(model)
    if targets == "language_model":
        chosen = [s for s in sites if s.region == "language_model"]
    elif targets == "all":
        chosen = list(sites)
    else:
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ValueError(f"targets {targets!r} is not a valid regex: {exc}") from None
        chosen = [s for s in sites if pattern.fullmatch(s.name)]
    if self_attention_only:
        chosen = [s for s in chosen if not s.cross]
    if not chosen:
        names = ", ".join(s.name for s in sites[:6]) or "none found"
        raise ValueError(
            f"targets={targets!r} matched no self-attention module of {type(model).__name__}; expected "
            f"'language_model', 'all' or a regex fully matching attention module names such as: {names}"
        )
    bypassing = [s for s in chosen if not s.routed]
    if bypassing:
        listed = ", ".join(f"{s.name} ({type(s.module).__name__})" for s in bypassing)
        raise ValueError(
            f"{type(model).__name__}: these attention modules compute attention themselves instead of "
            f"dispatching through transformers' AttentionInterface, so prefixes cannot reach them: {listed}. "
            f"Pick other targets (a regex over module names) or a model family whose attention is routed."
        )
    return chosen
