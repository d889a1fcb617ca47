"""``--load-in-4bit``: the frozen base in bitsandbytes NF4 (QLoRA-style PT-PEFT).

The base model is loaded through ``transformers.BitsAndBytesConfig``: every ``nn.Linear``
except the output head becomes a ``bnb.nn.Linear4bit`` holding 4-bit NF4 codes plus one
scale per 64 weights (``--double-quant`` quantises those scales again). Prefixes, LoRA
and adapters are added on top in float32 and train as usual; LoRA over a ``Linear4bit``
keeps bitsandbytes' GEMM for the base (:class:`~ptpeft_kernels.LoRALinear`). bitsandbytes
runs NF4 forward and backward on the CPU too, which is how the tests exercise this path.
"""

from __future__ import annotations

import os

import torch

QLORA_HINT = "--load-in-4bit needs bitsandbytes: pip install 'ptpeft_kernels[qlora]' (bitsandbytes>=0.50)"


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or a ``ValueError`` that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ValueError(f"{QLORA_HINT} ({exc})") from None
    return bitsandbytes


def bnb_config(compute_dtype: torch.dtype, double_quant: bool = False):
    """The ``BitsAndBytesConfig`` of the driver's 4-bit base: NF4 codes, ``compute_dtype`` GEMMs."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_model(
    path: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device,
    *,
    load_in_4bit: bool = False,
    double_quant: bool = False,
) -> torch.nn.Module:
    """The driver's base model on ``device``: ``dtype`` weights, or NF4 with ``dtype`` compute."""
    from transformers import AutoModelForImageTextToText

    from . import minilm  # noqa: F401 - registers the built-in MiniLM preset's language-model type
    from .models import load_model

    if not load_in_4bit:
        return load_model(path, dtype).to(device)
    # bitsandbytes quantises while loading, on the target device (a 4-bit model cannot be moved
    # with .to() afterwards); the non-quantised rest (embeddings, norms, head) is kept in dtype.
    model = AutoModelForImageTextToText.from_pretrained(
        str(path),
        dtype=dtype,
        quantization_config=bnb_config(dtype, double_quant),
        device_map={"": torch.device(device)},
        local_files_only=True,
    )
    keep_cpu_layout(model)
    if torch.device(device).type == "cpu":
        own_storage(model)
    return model


@torch.no_grad()
def own_storage(model: torch.nn.Module) -> None:
    """Give the non-quantised parameters and buffers storages of their own.

    Loading to the CPU, transformers reads a safetensors file into one allocation and the
    tensors it does not convert (embeddings, norms, the head) stay views into it, which keeps
    the whole full-precision file alive next to the 4-bit weights. Measured on the built-in
    model: 3.92 MB held after a 4-bit load instead of 0.79 MB (fp32: 3.92 MB).
    """
    from ..layers.lora import is_4bit_linear

    quantized = {id(m.weight) for m in model.modules() if is_4bit_linear(m)}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and id(t) not in quantized and t.device.type == "cpu":
                    t.data = t.data.clone()


def keep_cpu_layout(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight at its first
    no-grad eval forward, rounding the scales to bfloat16: evaluation would then run other
    weights than training, and layers narrower than one 64-weight block crash in the repacking
    (``shape '[32, 0]' is invalid``, seen on the tiny built-in model).
    """
    from ..layers.lora import is_4bit_linear

    for m in model.modules():
        if is_4bit_linear(m) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def count_4bit_layers(model: torch.nn.Module) -> int:
    from ..layers.lora import is_4bit_linear

    return sum(1 for m in model.modules() if is_4bit_linear(m))


def base_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers by storage dtype, with the 4-bit layers'
    quantisation state (absmax scales, the second-level codebook) under ``"4bit_state"``."""
    from ..layers.lora import is_4bit_linear

    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = str(t.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    state = 0
    for m in model.modules():
        if is_4bit_linear(m):
            qs = m.weight.quant_state
            parts = [qs.absmax, qs.code]
            if qs.state2 is not None:
                parts += [qs.state2.absmax, qs.state2.code]
            state += sum(p.numel() * p.element_size() for p in parts if p is not None)
    if state:
        out["4bit_state"] = state
    return out
