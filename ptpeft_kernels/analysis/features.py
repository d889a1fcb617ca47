"""Gather per-sample hidden states of a transformers model: without padding positions, or a fixed
number of positions per sample (:func:`pad_to_length`, ``length=`` of :func:`collect_layers`).

Fixed length. The paper's rank ratio moves in steps of 100 / n points with n = min(L, d) for L
positions per sample; the built-in model's samples have about 23 positions (4.3-point steps).
Measuring the first ``length`` positions of every sample (128 by default in the driver) makes
n = min(length, d) the same for every sample and every model. Where a sample is shorter, the
driver either continues its caption with itself (``--rank-fill repeat``, the default, see
:func:`ptpeft_kernels.analysis.measures.repeated_text`: every measured position is a real token)
or pads it (``--rank-fill pad``, :func:`pad_to_length`: pad token, attention mask 0, what a
tokenizer's ``padding="max_length"`` gives; the padding rows are the model's hidden states at a
padding token after the sample — for the built-in model's ~23-token samples about 80 % of 128
rows, whose values every method may change, prefix-tuning also through the prefixes those
positions attend to). The share of real positions is reported beside every figure
(``real_positions``).
"""

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


_PER_TOKEN = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


def pad_to_length(batch: Mapping[str, object], length: int, pad_token_id: int) -> tuple[dict, list[int]]:
    """Right-pad a right-padded batch to at least ``length`` positions.

    The per-token tensors of the language model's sequence are padded along their second dimension:
    ``input_ids`` with ``pad_token_id``, ``labels`` with -100, ``attention_mask``,
    ``token_type_ids`` and ``mm_token_type_ids`` with 0. Nothing else is touched, whatever its shape
    (``pixel_values`` of 3 channels in a batch of 3 tokens, or InstructBLIP's ``qformer_input_ids``,
    a sequence of its own). A batch already ``length`` long or longer is returned unchanged
    (collection keeps its first ``length`` positions).

    Returns the batch and, per sample, how many of its first ``length`` positions are real tokens
    (attention mask 1).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("batch needs a 2-D input_ids tensor to pad to a fixed length")
    b, seq = ids.shape
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, seq):
        raise ValueError(f"attention_mask must have the shape of input_ids {(b, seq)}")
    m = mask.bool()
    # Right padding: once a row's mask is 0 it stays 0. A left-padded row would put pads first.
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError(
            "the batch is not right-padded (a padding position precedes a real token); fixed-length "
            "measurement pads on the right"
        )
    real = [min(int(r.sum()), length) for r in m]
    if seq >= length:
        return dict(batch), real
    extra = length - seq
    out: dict = {}
    for key, value in batch.items():
        if key in _PER_TOKEN and isinstance(value, torch.Tensor) and tuple(value.shape) == (b, seq):
            fill = pad_token_id if key == "input_ids" else (-100 if key == "labels" else 0)
            pad = value.new_full((b, extra, *value.shape[2:]), fill)
            value = torch.cat([value, pad], dim=1)
        out[key] = value
    if "attention_mask" not in batch:
        out["attention_mask"] = torch.cat([mask, mask.new_zeros(b, extra)], dim=1)
    return out, real


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
    length: int | None = None,
) -> dict[int, list[torch.Tensor]]:
    """Hidden states of several layers in one pass: ``{layer: [per-sample (L_i, d) tensors]}``.

    Keys are the non-negative indices into the model's hidden-state tuple (0 = embedding output,
    ``num_hidden_layers`` = last layer); ``layers=None`` takes every one. ``length``: keep the
    first ``length`` positions of every sample, padding positions included (pad the batches with
    :func:`pad_to_length` first); every sample is then ``(length, d)``. See
    :func:`collect_features` for the other arguments.
    """
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"length must be None or an int >= 1, got {length!r}")
    if length is not None and tower != "language":
        raise ValueError("length applies to tower='language' (a vision tower has no padding)")
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
                _collect_batch(model, vision, batch, b, layers, device, out, length)
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
    length: int | None = None,
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
    if length is not None:
        if states0.shape[1] < length:
            raise ValueError(
                f"batch {index} has {states0.shape[1]} positions, fewer than length={length}; pad it with "
                "pad_to_length first"
            )
        for layer in norm:
            states = hidden[layer][:, :length].detach().cpu()
            out.setdefault(layer, []).extend(states.unbind(0))
        return
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
    length: int | None = None,
) -> list[torch.Tensor]:
    """Per-sample hidden states of one layer, padding positions removed (or, with ``length``, the
    first ``length`` positions of every sample, padding included: see :func:`collect_layers`).

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
    by_layer = collect_layers(model, dataloader, [layer], tower, max_batches, device, progress, length)
    return next(iter(by_layer.values()))
