"""Pieces shared by the Triton kernels: device checks, lazy tuning, activations, dropout bits.

Nothing here touches a device at import time: the SM count and the autotuned kernel
wrappers are created on first use, per device, and cached.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .configs import arch_family, to_use

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Activation codes (constexpr): 0 means none. Must match ``ACT_CODES`` users below.
ACT_CODES = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reason(*tensors: torch.Tensor | None) -> str | None:
    """Why these tensors cannot go through a Triton kernel (None if they can)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
            return (
                f"the tensors are on {t.device}; Triton kernels need CUDA tensors "
                "(CPU tensors only under TRITON_INTERPRET=1)"
            )
    return None


def dtype_reason(dtype: torch.dtype) -> str | None:
    if dtype not in SUPPORTED_DTYPES:
        return f"the triton backend supports dtypes {SUPPORTED_DTYPES}, got {dtype}"
    return None


def use_autotune(device: torch.device) -> bool:
    """Autotune only when compiling for a real GPU; the interpreter gets fixed small tiles."""
    return device.type == "cuda" and not interpreting()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, read on first use; 4 for the CPU interpreter.

    The interpreter value only makes the split-K heuristics take more than one split on tiny
    test shapes, so that code path is exercised on the CPU too.
    """
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int, at_least: int = 16) -> int:
    # tl.dot needs every dimension >= 16 on GPUs, and tile shapes must be powers of two.
    return max(at_least, triton.next_power_of_2(max(1, n)))


def bucket(n: int) -> int:
    """Autotune key bucket of a size: the next power of two, so a new length does not retune."""
    return triton.next_power_of_2(max(1, n))


def device_guard(device: torch.device):
    """Make ``device`` current around a launch: Triton launches on the current device and its current
    stream, not on the tensors' device. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _arch_of_index(index: int) -> int:
    return arch_family(torch.cuda.get_device_capability(index))


def arch_of(device: torch.device) -> int:
    """The tile-config family (80 or 90) of ``device``, read on first use; 80 off the GPU."""
    if device.type != "cuda":
        return 80
    return _arch_of_index(device_key(device)[1])


def device_key(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda":
        return (device.type, -1)
    return ("cuda", device.index if device.index is not None else torch.cuda.current_device())


_tuned_cache: dict[tuple, object] = {}


def autotuned(kernel, name: str, tiles: list, key: list[str], device: torch.device, prune=None):
    """``triton.autotune`` of ``kernel`` over ``tiles``, built on first use per device (never at import).

    One tuner per (kernel, tile list, device): a config tuned on one GPU is never reused for another
    (a mixed A100 + H100 machine, or two GPUs under different loads). ``prune(configs, named_args,
    **kwargs)`` drops configs that cannot fit the call's shape.
    """
    cache_key = (name, tuple(t.name for t in tiles), device_key(device))
    cached = _tuned_cache.get(cache_key)
    if cached is None:
        prune_by = {"early_config_prune": prune} if prune is not None else None
        configs = [t.config() for t in tiles]
        cached = triton.autotune(configs=configs, key=key, prune_configs_by=prune_by)(kernel)
        _tuned_cache[cache_key] = cached
    return cached


def launch(kernel, grid, args: tuple, meta: dict, *, device: torch.device, name: str, tiles: list,
           key: list[str], interp_tiles, prune=None, force=None) -> None:  # fmt: skip
    """Launch ``kernel`` on ``device``: under the interpreter with ``interp_tiles``; with ``force`` (a
    :class:`~.configs.Tiles`, tests) exactly that config; otherwise autotuned over ``tiles`` as the
    ``PTPEFT_AUTOTUNE`` switch allows (one tile: launched directly, nothing timed)."""
    with device_guard(device):
        if force is not None:
            kernel[grid](*args, **meta, **force.launch_kwargs())
        elif not use_autotune(device):
            kernel[grid](*args, **meta, **interp_tiles)
        else:
            usable = to_use(tiles, arch_of(device))
            if len(usable) == 1:
                kernel[grid](*args, **meta, **usable[0].launch_kwargs())
            else:
                autotuned(kernel, name, usable, key, device, prune)[grid](*args, **meta)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation; fp32 operands use IEEE products (no TF32).

    ``UPCAST`` is set only under the CPU interpreter, whose dot multiplies bfloat16 operands as
    their raw uint16 storage: products of two bf16/fp16 values are exact in float32, so
    upcasting first gives what the tensor cores compute.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def tanh_f32(x):
    # tl.math has no tanh in every Triton release this must compile with. exp(-2|x|) never
    # overflows; the absolute error near 0 is a float32 ulp of 1, as for the fused library tanh.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def sigmoid_f32(x):
    # exp(-|x|) never overflows (tl.sigmoid's exp(-x) does for x < -88), and the small side keeps
    # its relative precision instead of rounding to 0.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def activate(x, ACT: tl.constexpr):
    """act(x) in float32; every activation maps 0 to 0, so zero-padded tiles stay zero."""
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + tanh_f32(inner))
    elif ACT == 3:
        return tl.maximum(x, 0.0)
    elif ACT == 4:
        return x * sigmoid_f32(x)
    else:
        return x


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d act(x) / dx in float32 (same formulas as ops/activations.py)."""
    if ACT == 1:
        return (
            0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
        )
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = tanh_f32(inner)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 3:
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 4:
        s = sigmoid_f32(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return x * 0.0 + 1.0


@triton.jit
def dropout_keep(seed, rows, cols, p):
    """Keep-mask of dropout at element (rows, cols) of the LoRA input, both int32 and broadcastable.

    Philox keyed by (column, row) counters, so the forward, the backward and ``dropout_mask``
    regenerate the same mask from the seed alone; nothing of the input's size is stored.
    """
    c0 = (cols + rows * 0).to(tl.uint32, bitcast=True)
    c1 = (rows + cols * 0).to(tl.uint32, bitcast=True)
    zero = c0 * 0
    r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(r0) >= p
