"""Gather per-sample hidden states of a transformers model, without padding positions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

# Attribute names under which transformers models keep their image encoder: LLaVA / LLaVA-NeXT
# (``vision_tower``), BLIP-2 / InstructBLIP / CLIP (``vision_model``), Qwen-VL (``visual``), others.
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "vision_encoder", "image_encoder", "visual")

TOWERS = ("language", "vision")


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The model's vision encoder: the shallowest submodule named one of :data:`VISION_TOWER_NAMES`."""
    found = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if name and name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no vision tower (looked for submodules named "
            f"{', '.join(VISION_TOWER_NAMES)}); use tower='language'"
        )
    # Shallowest first, so LLaVA's ``model.vision_tower`` wins over anything nested inside it.
    return min(found, key=lambda item: (item[0], item[1]))[2]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _language_hidden_states(output: object) -> tuple[torch.Tensor, ...]:
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        # BLIP-2 / InstructBLIP nest the language model's outputs.
        hidden = getattr(getattr(output, "language_model_outputs", None), "hidden_states", None)
    if hidden is None:
        raise ValueError(
            f"the model output ({type(output).__name__}) has no hidden_states (nor language_model_outputs."
            "hidden_states) although output_hidden_states=True was passed"
        )
    return tuple(hidden)


def _normalize_layers(layers: Sequence[int], count: int) -> list[int]:
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
        if not -count <= layer < count:
            raise ValueError(
                f"layer {layer} is out of range: the model returns {count} hidden states "
                f"(0 = embeddings, {count - 1} = last layer; negative indices count from the end)"
            )
        out.append(layer % count)
    # -1 and num_hidden_layers name the same layer; collecting it twice would double its samples.
    return list(dict.fromkeys(out))


def collect_layers(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, object]],
    layers: Sequence[int] | None = (-1,),
    tower: str = "language",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | str = False,
) -> dict[int, list[torch.Tensor]]:
    """Hidden states of several layers in one pass: ``{layer: [per-sample (L_i, d) tensors]}``.

    Keys are the non-negative indices into the model's hidden-state tuple (0 = embedding output,
    ``num_hidden_layers`` = last layer); ``layers=None`` takes every one. See
    :func:`collect_features` for the other arguments.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise TypeError(f"max_batches must be an int or None, got {type(max_batches).__name__}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    if layers is not None and (not isinstance(layers, (list, tuple)) or not layers):
        raise ValueError(f"layers must be a non-empty list of ints or None (all), got {layers!r}")
    vision = find_vision_tower(model) if tower == "vision" else None
    device = torch.device(device) if device is not None else _model_device(model)

    # eval() flips every submodule; remember each flag so a partly frozen model (e.g. a vision tower
    # kept in eval during training) comes back exactly as it was.
    flags = {m: m.training for m in model.modules()}
    out: dict[int, list[torch.Tensor]] = {}
    batches = dataloader
    if progress:
        from tqdm.auto import tqdm

        total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore[arg-type]
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        batches = tqdm(dataloader, total=total, desc=progress if isinstance(progress, str) else "features")
    try:
        model.eval()
        with torch.no_grad():
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                _collect_batch(model, vision, batch, b, layers, device, out)
    finally:
        for m, flag in flags.items():
            m.training = flag
        if progress:
            batches.close()  # type: ignore[union-attr]
    if not out:
        raise ValueError("the dataloader yielded no batches")
    return out


def _collect_batch(
    model: nn.Module,
    vision: nn.Module | None,
    batch: Mapping[str, object],
    index: int,
    layers: Sequence[int] | None,
    device: torch.device,
    out: dict[int, list[torch.Tensor]],
) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch {index} must be a dict of model inputs, got {type(batch).__name__}")
    # Labels would only add a loss computation; non-tensor entries (raw texts, ids) are not inputs.
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
    mask = inputs.get("attention_mask")
    if vision is not None:
        if "pixel_values" not in inputs:
            raise ValueError(f"batch {index} has no pixel_values; tower='vision' needs images")
        dtype = next(vision.parameters()).dtype
        result = vision(pixel_values=inputs["pixel_values"].to(dtype), output_hidden_states=True)
        hidden = getattr(result, "hidden_states", None)
        if hidden is None:
            raise ValueError(f"the vision tower {type(vision).__name__} returned no hidden_states")
        hidden = tuple(hidden)
        # Every image has all its patches: padding is a text-side notion.
        mask = None
    else:
        hidden = _language_hidden_states(model(**inputs, output_hidden_states=True))
    norm = list(range(len(hidden))) if layers is None else _normalize_layers(layers, len(hidden))
    states0 = hidden[norm[0]]
    if mask is not None:
        if mask.dim() != 2 or tuple(mask.shape) != tuple(states0.shape[:2]):
            raise ValueError(
                f"batch {index}: attention_mask has shape {tuple(mask.shape)} but the hidden states are "
                f"{tuple(states0.shape)}; cannot tell padding positions apart"
            )
        keep = [row.nonzero().flatten().cpu() for row in mask.bool()]
    else:
        keep = None
    for layer in norm:
        states = hidden[layer].detach().cpu()
        target = out.setdefault(layer, [])
        for i in range(states.shape[0]):
            target.append(states[i] if keep is None else states[i, keep[i]])


def collect_features(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, object]],
    layer: int = -1,
    tower: str = "language",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | str = False,
) -> list[torch.Tensor]:
    """Per-sample hidden states of one layer, padding positions removed.

    Runs ``model(**batch, output_hidden_states=True)`` in eval mode without gradients over the
    batches (dicts of model inputs; tensor entries other than ``labels`` are passed, others are
    ignored), then restores every submodule's training flag.

    Args:
        model: a transformers model.
        dataloader: iterable of batch dicts (e.g. ``input_ids``, ``attention_mask``, ``pixel_values``).
        layer: index into the hidden-state tuple: 0 = embedding output, -1 = last layer.
        tower: ``"language"`` reads the language model's hidden states (``output.hidden_states``,
            or ``output.language_model_outputs.hidden_states`` for BLIP-2); positions where
            ``attention_mask == 0`` are dropped (all kept when there is no mask; image or query
            tokens inside the sequence count as tokens). ``"vision"`` runs the model's vision
            tower (see :func:`find_vision_tower`) on ``pixel_values`` and returns all patches.
        max_batches: stop after this many batches.
        device: where inputs go; defaults to the device of the model's parameters.
        progress: show a tqdm bar (a string sets its label).

    Returns:
        One (L_i, d) tensor per sample in dataloader order, on the CPU, in the model's dtype.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    by_layer = collect_layers(model, dataloader, [layer], tower, max_batches, device, progress)
    return next(iter(by_layer.values()))
