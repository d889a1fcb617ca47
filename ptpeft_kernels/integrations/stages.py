"""Which parameters train: ``mark_trainable`` and ``trainable_summary`` over the four kinds.

Kinds: ``prefix`` (the :class:`PrefixBank` at ``model.ptpeft_prefix``), ``lora``
(``lora_A`` / ``lora_B`` of every :class:`~ptpeft_kernels.LoRALinear`, and of PEFT's LoRA
layers), ``adapter`` (every
:class:`~ptpeft_kernels.BottleneckAdapter`) and ``base`` (everything else, including a
LoRA layer's ``base_layer``). PT-PEFT stage 1 trains ``prefix``; stage 2 trains
``prefix`` + ``lora`` (or ``adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..layers import BottleneckAdapter, LoRALinear

KINDS = ("prefix", "lora", "adapter", "base")


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """``{parameter name: kind}`` for every parameter of ``model`` (shared parameters once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    special: dict[int, str] = {}
    for name, module in model.named_modules():
        if name == "ptpeft_prefix" or name.endswith(".ptpeft_prefix"):
            for p in module.parameters():
                special[id(p)] = "prefix"
        elif isinstance(module, LoRALinear):
            for p in (*module.lora_A.parameters(), *module.lora_B.parameters()):
                special[id(p)] = "lora"
        elif isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            # PEFT's LoRA layers (one lora_A / lora_B per adapter name): apply_prefix after
            # get_peft_model must leave them trainable, as it does ours.
            for p in (*module.lora_A.parameters(), *module.lora_B.parameters()):
                special[id(p)] = "lora"
        elif isinstance(module, BottleneckAdapter):
            for p in module.parameters():
                special[id(p)] = "adapter"
    return {name: special.get(id(p), "base") for name, p in model.named_parameters()}


def mark_trainable(
    model: nn.Module, prefix: bool = True, lora: bool = True, adapter: bool = True, base: bool = False
) -> nn.Module:
    """Set ``requires_grad`` by kind; returns ``model``.

    ``mark_trainable(model, lora=False, adapter=False)`` is PT-PEFT stage 1;
    the defaults (everything added trains, the pre-trained model is frozen) are stage 2.
    """
    wanted = {"prefix": prefix, "lora": lora, "adapter": adapter, "base": base}
    for kind, flag in wanted.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{kind} must be a bool, got {type(flag).__name__} {flag!r}")
    kinds = parameter_kinds(model)
    for name, p in model.named_parameters():
        p.requires_grad_(wanted[kinds[name]])
    return model


def freeze_base(model: nn.Module) -> None:
    """Freeze every ``base`` parameter; prefix / LoRA / adapter parameters keep their flag."""
    kinds = parameter_kinds(model)
    for name, p in model.named_parameters():
        if kinds[name] == "base":
            p.requires_grad_(False)


@dataclass
class TrainableSummary:
    """Parameter counts per kind: ``counts[kind] = (trainable, total)``."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: {"trainable": t, "total": n} for k, (t, n) in self.counts.items()}

    def __str__(self) -> str:
        lines = [f"{'kind':<8} {'trainable':>12} {'total':>12}"]
        for kind, (t, n) in self.counts.items():
            lines.append(f"{kind:<8} {t:>12,} {n:>12,}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{'all':<8} {self.trainable:>12,} {self.total:>12,}  ({pct:.4f}% trainable)")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable / total parameter counts per kind (prefix, lora, adapter, base)."""
    kinds = parameter_kinds(model)
    counts = {k: [0, 0] for k in KINDS}
    for name, p in model.named_parameters():
        c = counts[kinds[name]]
        c[1] += p.numel()
        if p.requires_grad:
            c[0] += p.numel()
    return TrainableSummary({k: (t, n) for k, (t, n) in counts.items()})
