"""``merge_lora``: fold LoRA updates into the base weights for inference."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import LoRALinear
from .hf_save import mark_base_merged
from .lora import _parent, move_hooks


def dequantized_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding a bitsandbytes ``Linear4bit``'s dequantised weight (and its bias).

    ``dtype`` defaults to the layer's compute dtype (float32 where it has none).
    """
    import bitsandbytes as bnb

    weight = layer.weight
    w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    dtype = dtype or getattr(layer, "compute_dtype", None) or torch.float32
    out = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=dtype
    )
    with torch.no_grad():
        out.weight.copy_(w.reshape(layer.out_features, layer.in_features).to(dtype))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.to(dtype))
    out.requires_grad_(False)
    return out


def merge_lora(model: nn.Module, unload: bool = True, dequantize: bool = False) -> nn.Module:
    """Fold every LoRA update into its base weight (``W += scaling * B @ A``); returns ``model``.

    With ``unload=True`` (default) each :class:`~ptpeft_kernels.LoRALinear` is replaced by its
    ``base_layer``, leaving a plain transformers model (``save_pretrained`` writes the merged
    weights under the original names, and any prefixes / adapters beside them: ``hf_save.py``);
    with ``unload=False`` the wrappers stay, merged, and ``LoRALinear.unmerge()`` can undo it.
    Outputs are unchanged up to the weight dtype's rounding.

    LoRA over a 4-bit (bitsandbytes) base cannot be merged into the packed weight without a
    re-quantisation that would change the results, so it raises unless ``dequantize=True``:
    then each such layer's base becomes a plain ``nn.Linear`` holding the dequantised weight in
    the layer's compute dtype plus the update (the model's other 4-bit layers stay 4-bit). The
    merged layer computes what the un-merged one did, up to that dtype's rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge (apply_lora was not called)")
    if not isinstance(dequantize, bool):
        raise TypeError(f"dequantize must be a bool, got {type(dequantize).__name__} {dequantize!r}")
    quantized = [n for n, m in layers if m.quantized]
    if quantized and not dequantize:
        raise ValueError(
            f"{len(quantized)} LoRA layer(s) sit on 4-bit (bitsandbytes) base weights, first {quantized[0]}; "
            "merging into 4-bit weights would re-quantise them and change the outputs. Pass "
            "merge_lora(model, dequantize=True) to merge into dequantised weights (more memory), or keep "
            "the adapters separate (save_adapters)"
        )
    for name, layer in layers:
        if layer.quantized:
            plain = dequantized_linear(layer.base_layer)
            move_hooks(layer.base_layer, plain)
            layer.base_layer = plain
            layer.quantized = False
        layer.merge()
        if unload:
            parent, child = _parent(model, name)
            move_hooks(layer, layer.base_layer)
            setattr(parent, child, layer.base_layer)
    if unload:
        mark_base_merged(model)  # save_pretrained must now write the (merged) base weights too
    return model
