"""``save_pretrained`` of a model that carries PT-PEFT parts (prefixes, LoRA layers, adapters).

Why the model needs its own: transformers' ``from_pretrained`` restores only the modules its model
class defines. Written by the stock ``save_pretrained``, prefix / adapter / LoRA-wrapper tensors
land in ``model.safetensors`` and ``from_pretrained`` drops them as UNEXPECTED keys ("can be
ignored"; measured on the tiny LLaVA, prefixes + merged LoRA: logits 0.56 apart after the round
trip), and an unmerged LoRA's ``...q_proj.base_layer.weight`` does not even load into the base
(its weights stay random). ``from_pretrained`` has no hook through which a library could restore
them, so the fix lives on the saving side.

:func:`install_save_pretrained` (called by ``apply_prefix``, ``apply_lora`` and ``apply_adapter``)
gives the model an instance-level ``save_pretrained`` -- an instance attribute shadowing the class
method, the way accelerate wraps ``forward``; transformers' own ``_is_overridden`` anticipates such
wrappers. It follows transformers' convention for models that carry adapters (PEFT's
``PeftModel`` and transformers' ``_hf_peft_config_loaded`` models save the adapters only):

- the PT-PEFT parts are written in the :func:`~ptpeft_kernels.save_adapters` layout (LoRA in PEFT's
  format, prefixes, adapters), never into ``model.safetensors``; the frozen base is not copied;
- after :func:`~ptpeft_kernels.merge_lora` the base weights are no longer the pre-trained ones, so
  the merged model is written too, exactly as transformers writes the plain model (``config.json``,
  ``model.safetensors`` under the plain model's names, no prefix keys): ``from_pretrained`` loads
  it without unexpected keys and ``load_adapters`` adds the prefixes back (a warning says so);
- what cannot be written so that it loads back exactly is refused with a ``ValueError`` naming
  ``pk.save_adapters``: trainable base parameters, new LoRA layers on a merged base, an explicit
  ``state_dict`` (FSDP / DeepSpeed gathered saves) and ``push_to_hub``.

Loading back (exact, tested): ``pk.load_adapters(Model.from_pretrained(base), directory)`` where
``base`` is the pre-trained model's path, or ``directory`` itself after ``merge_lora``.

Because ``Trainer._save`` calls ``model.save_pretrained``, every Trainer / SFTTrainer checkpoint of
such a model holds the adapter files instead of a copy of the base; resuming from them is
:class:`~ptpeft_kernels.PTPEFTTrainerMixin`'s job (``hf_trainer.py``).
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

from torch import Tensor, nn

from ..layers import BottleneckAdapter, LoRALinear

MERGED_ATTR = "_ptpeft_base_merged"
BANK_NAME = "ptpeft_prefix"  # prefix.BANK_ATTR (not imported: prefix.py imports this module)


def mark_base_merged(model: nn.Module) -> None:
    """Record that LoRA updates were folded into (and unloaded from) the base weights."""
    object.__setattr__(model, MERGED_ATTR, True)


def has_ptpeft_parts(model: nn.Module) -> bool:
    """Whether ``model`` carries prefixes, LoRA layers or bottleneck adapters."""
    parts = (LoRALinear, BottleneckAdapter)
    return any(name == BANK_NAME or isinstance(m, parts) for name, m in model.named_modules())


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` without its PT-PEFT parts, under the plain (un-adapted) model's names.

    Prefix and adapter tensors are left out, LoRA ``lora_A`` / ``lora_B`` too, and a LoRA layer's
    ``<name>.base_layer.weight`` becomes ``<name>.weight``: what ``save_pretrained`` of the model
    without its PT-PEFT parts would write.
    """
    state = model.state_dict()
    drop: list[str] = []
    rename: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if name == BANK_NAME or isinstance(module, BottleneckAdapter):
            drop.append(f"{name}.")
        elif isinstance(module, LoRALinear):
            drop += [f"{name}.lora_A.", f"{name}.lora_B."]
            rename.append((f"{name}.base_layer.", f"{name}."))
    out = {}
    for key, value in state.items():
        if any(key.startswith(p) for p in drop):
            continue
        for old, new in rename:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _refuse(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"{type(model).__name__}.save_pretrained: {why}. Save the PT-PEFT parts with "
        f"ptpeft_kernels.save_adapters(model, directory) and load them with "
        f"ptpeft_kernels.load_adapters(base_model, directory)"
    )


class _SavePretrained:
    """The callable stored as ``model.save_pretrained`` (a plain object: it pickles and deep-copies)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        model = self.model
        original = type(model).save_pretrained
        if not has_ptpeft_parts(model):  # e.g. merge_lora took the last part: a plain model again
            return original(model, save_directory, *args, **kwargs)
        arguments = inspect.signature(original).bind(model, save_directory, *args, **kwargs).arguments
        extra = arguments.pop("kwargs", {})
        if arguments.get("state_dict") is not None:
            raise _refuse(
                model,
                "an explicit state_dict (as FSDP / DeepSpeed gathered saves pass) cannot be split into "
                "the base model and its PT-PEFT parts",
            )
        if arguments.get("push_to_hub"):
            raise _refuse(model, "push_to_hub is not supported for a model carrying PT-PEFT parts")
        trainable = [n for n, p in base_state_items(model) if p.requires_grad]
        if trainable:
            raise _refuse(
                model,
                f"{len(trainable)} base parameters are trainable (e.g. {trainable[:3]}); the PT-PEFT "
                f"files hold prefixes, LoRA and adapters only -- freeze the base with "
                f"ptpeft_kernels.mark_trainable(model)",
            )
        merged = getattr(model, MERGED_ATTR, False)
        has_lora = any(isinstance(m, LoRALinear) for m in model.modules())
        if merged and has_lora:
            raise _refuse(
                model,
                "the base weights hold merged LoRA updates and the model carries new, unmerged LoRA "
                "layers (PEFT would apply the new LoRA on loading the merged weights); merge them too "
                "with ptpeft_kernels.merge_lora(model)",
            )
        if not arguments.get("is_main_process", True):
            return None
        from .checkpoint import save_adapters

        if merged:
            rest = {k: v for k, v in arguments.items() if k not in ("self", "save_directory", "state_dict")}
            original(model, save_directory, state_dict=base_state_dict(model), **rest, **extra)
            warnings.warn(
                f"{save_directory}: transformers' from_pretrained loads the merged weights only; load the "
                f"prefixes / adapters saved beside them with "
                f"ptpeft_kernels.load_adapters(Model.from_pretrained(path), path)",
                UserWarning,
                stacklevel=2,
            )
        save_adapters(model, save_directory)
        return None


def base_state_items(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the base model's own parameters (not prefix / LoRA / adapter ones)."""
    from .stages import parameter_kinds

    kinds = parameter_kinds(model)
    return [(n, p) for n, p in model.named_parameters() if kinds[n] == "base"]


def install_save_pretrained(model: nn.Module) -> None:
    """Give a transformers model the PT-PEFT-aware ``save_pretrained`` (module docstring); idempotent.

    Modules without a ``save_pretrained`` method (not transformers models) are left alone.
    """
    if not callable(getattr(type(model), "save_pretrained", None)):
        return
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        return
    object.__setattr__(model, "save_pretrained", _SavePretrained(model))
