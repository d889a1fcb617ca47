"""``apply_lora``: replace targeted ``nn.Linear`` layers by :class:`~ptpeft_kernels.LoRALinear`.

Matching follows PEFT's ``target_modules`` rules, so a config written for PEFT selects the
same layers: a list (or set/tuple) of strings matches a module whose full name equals an
entry or ends with ``"." + entry``; a single string is a regex that must match the full
name. The default (``None``) is narrower than PEFT's per-architecture suffix lists, which
also hit the vision tower's ``q_proj``/``v_proj``: only the language model's attention
projections (query, key, value and output; self- and cross-attention).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from ..layers import LoRALinear
from ..layers._validate import check_int, check_prob
from .hf_save import install_save_pretrained
from .model_info import find_attention_sites, model_family
from .stages import freeze_base


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def is_linear(module: object) -> bool:
    """An ``nn.Linear``, bare or already wrapped in LoRA."""
    return isinstance(module, (nn.Linear, LoRALinear))


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Move ``src``'s forward (pre-)hooks to ``dst`` (the module replacing it), keeping their ids.

    Adapters hang on a layer's output projection or feed-forward Linear by hook; a LoRA wrapper
    computes its output without calling the wrapped Linear, so the hooks must follow the wrapper.
    """
    for attr in _HOOK_DICTS:
        src_hooks, dst_hooks = getattr(src, attr, None), getattr(dst, attr, None)
        if src_hooks is None or dst_hooks is None:
            continue
        dst_hooks.update(src_hooks)
        src_hooks.clear()
    for attr in ("_forward_hooks_always_called",):
        if hasattr(src, attr) and hasattr(dst, attr):
            getattr(dst, attr).update(getattr(src, attr))
            getattr(src, attr).clear()


def attention_output_projection(model: nn.Module, site_name: str) -> tuple[str, nn.Module] | None:
    """The ``nn.Linear`` that projects an attention site's output back to the residual width.

    Inside the site (``o_proj``, ``out_proj``, ``proj``, ``dense``, ...) or, for BERT-style
    splits where the site is ``attention.self``, the sibling ``attention.output.dense``.
    """
    from .model_info import _OUT_NAMES

    site = model.get_submodule(site_name)
    for n in _OUT_NAMES:
        child = getattr(site, n, None)
        if is_linear(child):
            return f"{site_name}.{n}", child
    parent_name, _, _ = site_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    output = getattr(parent, "output", None)
    dense = getattr(output, "dense", None)
    if is_linear(dense):
        return f"{parent_name}.output.dense", dense
    return None


def default_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the language model's attention projections (q, k, v, output)."""
    names: list[str] = []
    for site in find_attention_sites(model):
        if site.region != "language_model":
            continue
        for child_name, child in site.module.named_children():
            if is_linear(child):
                names.append(f"{site.name}.{child_name}")
        out = attention_output_projection(model, site.name)
        if out is not None and out[0] not in names:
            names.append(out[0])
    return names


def match_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Module names selected by PEFT's rules (list: exact or ``.suffix`` match; str: full regex)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from None
        return [n for n in names if pattern.fullmatch(n)]
    if not isinstance(target_modules, Iterable):
        raise TypeError(
            f"target_modules must be None, a regex string or a list of module-name suffixes, "
            f"got {type(target_modules).__name__}"
        )
    keys = list(target_modules)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"target_modules must be a non-empty list of non-empty strings, got {keys!r}")
    chosen = [n for n in names if any(n == k or n.endswith("." + k) for k in keys)]
    unused = [k for k in keys if not any(n == k or n.endswith("." + k) for n in chosen)]
    if chosen and unused:
        warnings.warn(f"target_modules entries matched no module: {unused}", UserWarning, stacklevel=3)
    return chosen


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Iterable[str] | None = None,
    *,
    use_rslora: bool = False,
    freeze: bool = True,
) -> nn.Module:
    """Wrap the targeted ``nn.Linear`` layers in :class:`~ptpeft_kernels.LoRALinear`; returns ``model``.

    Args:
        r, alpha, dropout, use_rslora: as in PEFT (``scaling = alpha / r``, or ``alpha / sqrt(r)``).
        target_modules: ``None`` (the language model's attention projections), a list of
            name suffixes, or a full-match regex string (PEFT's rules).
        freeze: freeze the pre-trained parameters (prefix and adapter parameters keep their
            ``requires_grad``: PT-PEFT stage 2 trains them next to the new LoRA weights).

    Fresh LoRA layers have ``lora_B = 0``, so the model's outputs do not change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}")
    check_int("r", r, low=1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__} {alpha!r}")
    check_prob("dropout", dropout)
    family = model_family(model)
    if target_modules is None:
        names = default_lora_targets(model)
        what = "the language model's attention projections"
    else:
        names = match_targets(model, target_modules)
        what = f"target_modules={target_modules!r}"
    modules = dict(model.named_modules())
    # A LoRALinear's own sub-layers (base_layer, lora_A, lora_B) are never targets themselves.
    names = [n for n in names if not _inside_lora(n, modules)]
    if not names:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"{what} matched no module of {type(model).__name__} ({family}); expected a list of name "
            f"suffixes or a full-match regex over module names such as {linears}"
        )
    done = [n for n in names if isinstance(modules[n], LoRALinear)]
    if done:
        raise ValueError(
            f"{what} matched layers that already carry LoRA: {done[:4]}; apply_lora adds it once"
        )
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not isinstance(modules[n], nn.Linear)]
    if wrong:
        raise ValueError(f"LoRA supports nn.Linear targets only; {what} also matched: {', '.join(wrong)}")
    new = []
    for name in names:
        parent, child = _parent(model, name)
        layer = LoRALinear(modules[name], r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        move_hooks(modules[name], layer)
        setattr(parent, child, layer)
        new.append(layer)
    install_save_pretrained(model)
    if freeze:
        freeze_base(model)
    for layer in new:
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return model


def _inside_lora(name: str, modules: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), LoRALinear) for i in range(1, len(parts)))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
