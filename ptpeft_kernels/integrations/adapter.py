"""``apply_adapter``: bottleneck adapters in each transformer layer, placed with forward hooks.

No modelling code is edited and no module is replaced (the base model's state-dict keys stay
as they are): each adapter is registered on its transformer layer as
``ptpeft_adapter_attn`` / ``ptpeft_adapter_ffn`` and runs from a forward hook:

- ``houlsby``: after the attention output projection and after the feed-forward block,
  ``h -> h + up(act(down(h)))``, before the residual addition (Houlsby et al. 2019);
- ``pfeiffer``: after the feed-forward block only (Pfeiffer et al. 2021);
- ``parallel``: beside the feed-forward block, ``ffn(x) + up(act(down(x)))`` (He et al. 2022).

The layer parts are found by name: the attention output projection (``o_proj``,
``out_proj``, ``dense``, ... or BERT's ``attention.output.dense``) and the feed-forward block
(a ``mlp`` / ``feed_forward`` / ``ffn`` child, an ``fc1``/``fc2`` pair, or BERT's
``intermediate``/``output``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layers import BottleneckAdapter
from ..layers._validate import check_int
from .hf_save import install_save_pretrained
from .lora import attention_output_projection, is_linear
from .model_info import model_family, select_sites
from .stages import freeze_base

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
SPEC_ATTR = "_ptpeft_adapter_spec"
_FFN_MODULES = ("mlp", "feed_forward", "ffn", "feedforward")
_FFN_PAIRS = (("fc1", "fc2"), ("intermediate_query", "output_query"), ("intermediate", "output"))


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("adapter hook: the hooked module received no tensor input")


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


class _SequentialHook:
    """Forward hook: the module's output h becomes ``h + adapter(h)``."""

    def __init__(self, adapter: BottleneckAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        return _replace_first(output, self.adapter(h))


class _StashInput:
    """Forward pre-hook on the feed-forward entry: keep its input for the parallel adapter."""

    def __init__(self, adapter: BottleneckAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        object.__setattr__(self.adapter, "_ptpeft_input", _first_tensor(args, kwargs))


class _ParallelHook:
    """Forward hook on the feed-forward exit: output ``ffn(x) + adapter_delta(x)``."""

    def __init__(self, adapter: BottleneckAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = self.adapter.__dict__.pop("_ptpeft_input", None)
        if x is None:
            raise RuntimeError("parallel adapter: the feed-forward input was not seen before its output")
        h = output[0] if isinstance(output, tuple) else output
        return _replace_first(output, self.adapter(x, residual=h))


def _find_layer(model: nn.Module, site_name: str) -> tuple[str, nn.Module, nn.Module, nn.Module] | None:
    """(layer name, layer, feed-forward entry, feed-forward exit) for the layer holding ``site_name``."""
    parts = site_name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:cut])
        layer = model.get_submodule(name) if name else model
        for ffn in _FFN_MODULES:
            child = getattr(layer, ffn, None)
            if isinstance(child, nn.Module):
                return name, layer, child, child
        for first, second in _FFN_PAIRS:
            a, b = getattr(layer, first, None), getattr(layer, second, None)
            a, b = getattr(a, "dense", a), getattr(b, "dense", b)
            if is_linear(a) and is_linear(b):
                return name, layer, a, b
    return None


def _width(module: nn.Module) -> int | None:
    if is_linear(module):
        return module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def apply_adapter(
    model: nn.Module,
    bottleneck: int = 64,
    placement: str = "houlsby",
    *,
    activation: str = "gelu",
    scaling: float = 1.0,
    targets: str = "language_model",
    freeze: bool = True,
) -> nn.Module:
    """Add bottleneck adapters to every targeted transformer layer; returns ``model``.

    Args:
        bottleneck: the adapters' inner width.
        placement: ``"houlsby"`` | ``"pfeiffer"`` | ``"parallel"`` (module docstring).
        activation, scaling: of :class:`~ptpeft_kernels.BottleneckAdapter`.
        targets: which layers, by their self-attention: ``"language_model"``, ``"all"`` or a
            regex over attention module names (as in :func:`~ptpeft_kernels.apply_prefix`).
        freeze: freeze the pre-trained parameters (prefix / LoRA parameters keep their flag).

    Fresh adapters have a zero up-projection: the model's outputs do not change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}")
    check_int("bottleneck", bottleneck, low=1)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if getattr(model, SPEC_ATTR, None) is not None:
        raise ValueError("model already has adapters; apply_adapter adds them once")
    model_family(model)
    sites = select_sites(model, targets)
    plan = []
    missing = []
    for site in sites:
        found = _find_layer(model, site.name)
        out = attention_output_projection(model, site.name)
        if found is None or (placement == "houlsby" and out is None):
            missing.append(f"{site.name} ({type(site.module).__name__})")
            continue
        if any(p[0] == found[0] for p in plan):
            continue  # two targeted attentions in one layer: one set of adapters per layer
        plan.append((*found, out))
    if missing:
        raise ValueError(
            f"cannot locate the feed-forward block / attention output projection of the layers holding: "
            f"{', '.join(missing)}; adapters need an mlp/ffn child, an fc1/fc2 pair or intermediate/output"
        )
    param = next(model.parameters())
    kwargs = {"activation": activation, "scaling": scaling, "device": param.device, "dtype": param.dtype}
    layer_names = []
    for layer_name, layer, entry, exit_, out in plan:
        width = out[1].out_features if out is not None else _width(exit_)
        if placement == "houlsby":
            attn = BottleneckAdapter(out[1].out_features, bottleneck, **kwargs)
            layer.add_module("ptpeft_adapter_attn", attn)
            out[1].register_forward_hook(_SequentialHook(attn))
        ffn = BottleneckAdapter(width, bottleneck, **kwargs)
        layer.add_module("ptpeft_adapter_ffn", ffn)
        if placement == "parallel":
            entry.register_forward_pre_hook(_StashInput(ffn), with_kwargs=True)
            exit_.register_forward_hook(_ParallelHook(ffn), with_kwargs=True)
        else:
            exit_.register_forward_hook(_SequentialHook(ffn))
        layer_names.append(layer_name)
    spec = {
        "placement": placement,
        "bottleneck": bottleneck,
        "activation": activation,
        "scaling": float(scaling),
        "targets": targets,
        "layers": layer_names,
    }
    object.__setattr__(model, SPEC_ATTR, spec)
    install_save_pretrained(model)
    if freeze:
        freeze_base(model)
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter) and name.rsplit(".", 1)[0] in layer_names:
            module.requires_grad_(True)
    return model


def adapter_spec(model: nn.Module) -> dict | None:
    return getattr(model, SPEC_ATTR, None)
