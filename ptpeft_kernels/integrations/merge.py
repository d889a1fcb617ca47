"""``merge_lora``: fold LoRA updates into the base weights for inference."""

from __future__ import annotations

from torch import nn

from ..layers import LoRALinear
from .hf_save import mark_base_merged
from .lora import _parent, move_hooks


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every LoRA update into its base weight (``W += scaling * B @ A``); returns ``model``.

    With ``unload=True`` (default) each :class:`~ptpeft_kernels.LoRALinear` is replaced by its
    ``base_layer``, leaving a plain transformers model (``save_pretrained`` writes the merged
    weights under the original names, and any prefixes / adapters beside them: ``hf_save.py``);
    with ``unload=False`` the wrappers stay, merged, and ``LoRALinear.unmerge()`` can undo it.
    Outputs are unchanged up to the weight dtype's rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge (apply_lora was not called)")
    for name, layer in layers:
        layer.merge()
        if unload:
            parent, child = _parent(model, name)
            move_hooks(layer, layer.base_layer)
            setattr(parent, child, layer.base_layer)
    if unload:
        mark_base_merged(model)  # save_pretrained must now write the (merged) base weights too
    return model
