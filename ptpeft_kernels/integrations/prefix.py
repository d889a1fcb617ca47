"""``apply_prefix``: per-layer trainable key/value prefixes in a transformers model (PT-PEFT stage 1).

The prefixes live in a :class:`PrefixBank` registered on the model as ``model.ptpeft_prefix``
(one :class:`~ptpeft_kernels.PrefixEncoder` per group of attention sites sharing a region
and a (Hkv, D) shape). Each targeted attention module gets a plain-Python slot
(``module._ptpeft_prefix``, not a submodule, so nothing is registered twice) that the
``"ptpeft"`` attention function reads: it returns that layer's (Hkv, P, D) key and value
prefixes, shared by the whole batch (no per-sample copy; the op sums their gradient).

A layer's prefix is computed when its attention runs, from the encoder's MLP rows for that
layer only, instead of once per model forward and cached: under gradient checkpointing the
recomputation in backward then repeats exactly the forward's operations (a cache would make
the two differ), and no tensor outlives its forward.
"""

from __future__ import annotations

import re
import warnings

from torch import Tensor, nn

from ..layers import PrefixEncoder
from ..layers._validate import check_int
from .attention import ATTN_IMPLEMENTATION, enable_ptpeft_attention
from .hf_save import install_save_pretrained
from .model_info import AttentionSite, model_family, select_sites
from .stages import freeze_base

BANK_ATTR = "ptpeft_prefix"
SLOT_ATTR = "_ptpeft_prefix"


def _group_key(region: str, hkv: int, head_dim: int, taken: dict[str, tuple[str, int, int]]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", region)
    if key in taken and taken[key] != (region, hkv, head_dim):
        key = f"{key}_h{hkv}_d{head_dim}"
    return key


class _PrefixSlot:
    """What an attention module holds: where its prefix comes from (a plain object, not a Module)."""

    def __init__(self, bank: PrefixBank, group: str, layer: int, site: str) -> None:
        self.bank, self.group, self.layer, self.site = bank, group, layer, site

    def kv(self) -> tuple[Tensor, Tensor]:
        return self.bank.encoders[self.group].layer(self.layer)


class PrefixBank(nn.Module):
    """The prefix encoders of one model, keyed by group, and which attention sites each serves."""

    def __init__(self, groups: dict[str, list[str]], encoders: dict[str, PrefixEncoder], family: str) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.sites = {k: list(v) for k, v in groups.items()}
        self.family = family

    def config(self) -> dict:
        """JSON-able description (what :func:`~ptpeft_kernels.load_adapters` rebuilds from)."""
        out = {}
        for key, enc in self.encoders.items():
            out[key] = {
                "sites": self.sites[key],
                "num_layers": enc.num_layers,
                "num_kv_heads": enc.num_kv_heads,
                "head_dim": enc.head_dim,
                "num_prefix": enc.num_prefix,
                "reparam_hidden": enc.reparam_hidden,
                "embed_dim": enc.embed_dim,
            }
        return out

    def extra_repr(self) -> str:
        return f"family={self.family}, groups={ {k: len(v) for k, v in self.sites.items()} }"


def _check_routing(module: nn.Module, args: tuple) -> None:
    # Prefixes only exist inside the "ptpeft" attention: refuse to run them away silently.
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        slot = module._ptpeft_prefix
        raise RuntimeError(
            f"{slot.site} carries a ptpeft prefix but its attention implementation is {impl!r}; "
            f"switch back with ptpeft_kernels.enable_ptpeft_attention(model) (or remove the prefixes)"
        )


def get_prefix_bank(model: nn.Module) -> PrefixBank | None:
    bank = getattr(model, BANK_ATTR, None)
    return bank if isinstance(bank, PrefixBank) else None


def _attach(model: nn.Module, bank: PrefixBank) -> None:
    modules = dict(model.named_modules())
    for group, names in bank.sites.items():
        for layer, name in enumerate(names):
            module = modules[name]
            # object.__setattr__: a plain attribute, never registered as a submodule/buffer.
            object.__setattr__(module, SLOT_ATTR, _PrefixSlot(bank, group, layer, name))
            handle = module.register_forward_pre_hook(_check_routing)
            object.__setattr__(module, "_ptpeft_prefix_hook", handle)


def build_prefix_bank(
    model: nn.Module,
    sites: list[AttentionSite],
    num_prefix: int,
    reparam_hidden: int | None,
    embed_dim: int | None = None,
    init_std: float = 0.02,
) -> PrefixBank:
    unknown = [s for s in sites if not s.shape_known]
    if unknown:
        first = unknown[0]
        listed = ", ".join(f"{s.name} ({type(s.module).__name__})" for s in unknown[:4])
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise ValueError(
            f"cannot read the prefix shape (key/value heads x head dim) of {len(unknown)} attention "
            f"module(s): {listed}{more}. For {first.name}: {first.shape_problem}. Set the values on each "
            f"such module before apply_prefix (e.g. module.num_heads = Hq; module.num_key_value_heads = Hkv; "
            f"module.head_dim = D, as the attention call sees them), or leave them out with "
            f"targets=<regex over module names>"
        )
    groups: dict[str, list[str]] = {}
    shapes: dict[str, tuple[str, int, int]] = {}
    for s in sites:
        key = _group_key(s.region, s.num_kv_heads, s.head_dim, shapes)
        shapes[key] = (s.region, s.num_kv_heads, s.head_dim)
        groups.setdefault(key, []).append(s.name)
    param = next(iter(model.parameters()), None)
    device = None if param is None else param.device
    encoders = {}
    for key, names in groups.items():
        _, hkv, head_dim = shapes[key]
        encoders[key] = PrefixEncoder(
            num_layers=len(names),
            num_kv_heads=hkv,
            head_dim=head_dim,
            num_prefix=num_prefix,
            reparam_hidden=reparam_hidden,
            embed_dim=embed_dim,
            init_std=init_std,
            device=device,
        )
    return PrefixBank(groups, encoders, model_family(model))


def install_prefix_bank(model: nn.Module, bank: PrefixBank) -> None:
    setattr(model, BANK_ATTR, bank)
    _attach(model, bank)
    enable_ptpeft_attention(model)
    install_save_pretrained(model)


def apply_prefix(
    model: nn.Module,
    num_prefix: int = 16,
    reparam_hidden: int | None = 512,
    targets: str = "language_model",
    *,
    embed_dim: int | None = None,
    init_std: float = 0.02,
    freeze: bool = True,
) -> nn.Module:
    """Add trainable key/value prefixes to every targeted self-attention layer; returns ``model``.

    Args:
        model: a transformers model.
        num_prefix: P, prefix tokens per layer (0 is allowed: outputs are unchanged).
        reparam_hidden: hidden width of the reparameterisation MLP (embedding -> Linear ->
            tanh -> Linear); ``None`` for plain prefix parameters.
        targets: ``"language_model"`` (self-attention of the language model; for a text-only
            model, all of it), ``"all"`` (also vision encoder / Q-Former self-attention) or a
            regex that fully matches attention module names. Cross-attention never gets a prefix.
        embed_dim, init_std: passed to :class:`~ptpeft_kernels.PrefixEncoder`.
        freeze: freeze every parameter except the prefixes (and LoRA / adapter parameters
            already added), including stray top-level ones such as BLIP-2's ``query_tokens``.

    The model switches to the ``"ptpeft"`` attention implementation. Each query attends to all
    P prefix keys of its layer, at no position (prefixes carry no positional encoding, and the
    sequence positions are not shifted by P — unlike PEFT's prefix tuning).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}")
    check_int("num_prefix", num_prefix, low=0)
    if reparam_hidden is not None:
        check_int("reparam_hidden", reparam_hidden, low=1)
    if get_prefix_bank(model) is not None:
        raise ValueError(
            "model already has prefixes (model.ptpeft_prefix); apply_prefix adds them once — train the "
            "existing ones, or load others with load_adapters"
        )
    model_family(model)
    sites = select_sites(model, targets)
    if targets == "all":
        # "all" means token self-attention wherever it is; attention over another axis (Florence-2's
        # channel attention, whose "sequence" is the feature channels) has no fixed prefix shape.
        skipped = [f"{s.name} ({type(s.module).__name__})" for s in sites if not s.shape_known]
        if skipped:
            warnings.warn(
                f"apply_prefix(targets='all'): no prefix for attention modules without a fixed head count / "
                f"head dim: {', '.join(skipped)}",
                UserWarning,
                stacklevel=2,
            )
            sites = [s for s in sites if s.shape_known]
    # Prefix parameters stay float32 under a bf16/fp16 model (the attention casts them per call):
    # they are the trained part, and low-precision master weights lose small optimizer updates.
    bank = build_prefix_bank(model, sites, num_prefix, reparam_hidden, embed_dim, init_std)
    install_prefix_bank(model, bank)
    if freeze:
        freeze_base(model)
    for p in bank.parameters():
        p.requires_grad_(True)
    return model


def fold_prefix(model: nn.Module) -> nn.Module:
    """Replace each prefix MLP by its output (plain trainable prefixes, same outputs); returns ``model``.

    For inference (no MLP to run per layer and step) or to continue training the prefixes directly.
    """
    bank = get_prefix_bank(model)
    if bank is None:
        raise ValueError(f"{type(model).__name__} has no prefixes to fold (apply_prefix was not called)")
    for enc in bank.encoders.values():
        enc.fold()
    return model
