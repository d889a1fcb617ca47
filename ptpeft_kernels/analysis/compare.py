"""Compare the representation space of adapted models with their base model, layer by layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .cka import cka
from .features import collect_layers
from .spectrum import (
    check_threshold,
    cumulative_spectrum,
    effective_rank,
    rank_ratio_from_curve,
    spectrum_deviation,
)


@dataclass
class Comparison:
    """Results of :func:`compare_representations`.

    ``rows``: one dict per (model, layer) with keys ``model``, ``layer``, ``rank_ratio`` (percent),
    ``spectrum_length`` (n: the ratio moves in steps of 100 / n), ``effective_rank`` (Roy & Vetterli,
    mean over samples), ``deviation`` (max gap of cumulative spectra vs base) and ``cka`` (vs base);
    base rows first.
    ``curves[layer][model]``: cumulative spectra. ``ratios[model][layer]``: rank ratios.
    """

    threshold: float
    base_name: str
    rows: list[dict] = field(default_factory=list)
    curves: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    ratios: dict[str, dict[int, float]] = field(default_factory=dict)


def compare_representations(
    base: nn.Module,
    variants: Mapping[str, nn.Module | Callable[[], nn.Module]],
    batches: Sequence[Mapping[str, object]] | Iterable[Mapping[str, object]],
    layers: Sequence[int] | None = (-1,),
    tower: str = "language",
    threshold: float = 0.9,
    base_name: str = "base",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Comparison:
    """Rank ratio, spectrum deviation and CKA of each variant against ``base`` on the same batches.

    Args:
        base: the pre-trained model.
        variants: ``{name: model}`` or ``{name: zero-argument loader}``; loaders are called one at a
            time and their model dropped after use, so only two models are alive at once.
        batches: a re-iterable collection of batch dicts (a list, or a DataLoader); every model
            sees the same batches in the same order, so CKA rows pair up.
        layers: hidden-state indices (0 = embeddings, -1 = last), or None for every layer.
        tower, device: as for :func:`collect_features`.
    """
    threshold = check_threshold(threshold)
    if base_name in variants:
        raise ValueError(f"variant name {base_name!r} clashes with the base model's name")
    if iter(batches) is batches:  # a one-shot generator would be empty for the second model
        batches = list(batches)
    result = Comparison(threshold=threshold, base_name=base_name)
    base_feats = collect_layers(base, batches, layers, tower, device=device, progress=progress and base_name)
    base_curves = {layer: cumulative_spectrum(f) for layer, f in base_feats.items()}
    _record(result, base_name, base_feats, base_feats, base_curves)
    for name, variant in variants.items():
        model = variant if isinstance(variant, nn.Module) else variant()
        feats = collect_layers(model, batches, layers, tower, device=device, progress=progress and name)
        del model
        _record(result, name, feats, base_feats, base_curves)
    return result


def _record(
    result: Comparison,
    name: str,
    feats: dict[int, list[torch.Tensor]],
    base_feats: dict[int, list[torch.Tensor]],
    base_curves: dict[int, torch.Tensor],
) -> None:
    for layer in sorted(base_feats):
        if layer not in feats:
            raise ValueError(f"model {name!r} has no hidden state {layer} (it has {sorted(feats)})")
        curve = base_curves[layer] if feats is base_feats else cumulative_spectrum(feats[layer])
        ratio = rank_ratio_from_curve(curve, result.threshold)
        result.rows.append(
            {
                "model": name,
                "layer": layer,
                "rank_ratio": ratio,
                "spectrum_length": int(curve.numel()),
                "effective_rank": effective_rank(feats[layer]),
                "deviation": spectrum_deviation(base_curves[layer], curve),
                "cka": cka(base_feats[layer], feats[layer]),
            }
        )
        result.curves.setdefault(layer, {})[name] = curve
        result.ratios.setdefault(name, {})[layer] = ratio
