"""Python side of the host-side runs of csrc/ kernels (tests/cuda/host/*.cpp through ctypes)."""

from __future__ import annotations

import ctypes

import torch

from . import host_lib

_i64, _f32, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_int


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    num_splits: int = 0,
    sm_count: int = 4,
    reverse: bool = False,
    sentinel: float = float("nan"),
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run the decode kernel's block code on float32 CPU tensors (any strides, last dim unit).

    ``prefix_k`` (Hkv, P, D) or (B, Hkv, P, D); ``mask`` bool (B, M) or (B, 1|Hq, 1|N, M).
    Returns (out (B, Hq, N, D), natural-log lse (B, Hq, N), splits used); outputs start
    filled with ``sentinel`` so an unwritten element shows.
    """
    lib = host_lib.load()
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    p = 0 if prefix_k is None else prefix_k.shape[-2]
    if prefix_k is not None and prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.expand(b, -1, -1, -1), prefix_v.expand(b, -1, -1, -1)
    mask8 = None
    if mask is not None:
        mask8 = (mask[:, None, None, :] if mask.dim() == 2 else mask).to(torch.uint8).expand(b, hq, n, m)
    out = torch.full((b, hq, n, d), sentinel, dtype=torch.float32)
    lse = torch.full((b, hq, n), sentinel, dtype=torch.float32)
    for t in (q, k, v, prefix_k, prefix_v):
        assert t is None or (t.dtype == torch.float32 and t.stride(-1) == 1)
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3]]
    strides += [*prefix_k.stride()[:3], *prefix_v.stride()[:3]] if prefix_k is not None else [0] * 6
    strides += list(mask8.stride()) if mask8 is not None else [0] * 4
    strides += [*out.stride()[:3], *lse.stride()[:2]]
    fn = lib.ptpeft_decode_emulate
    fn.restype = _int
    splits = fn(
        _ptr(q), _ptr(k), _ptr(v), _ptr(prefix_k), _ptr(prefix_v), _ptr(mask8), _ptr(out), _ptr(lse),
        (_i64 * len(strides))(*strides), _int(b), _int(hq), _int(hkv), _int(n), _int(m), _int(p), _int(d),
        _int(int(causal)), _f32(scale), _int(num_splits), _int(sm_count), _int(int(reverse)),
    )  # fmt: skip
    if splits < 0:
        raise ValueError(f"the decode kernel has no head dim {d} instantiation")
    return out, lse, splits


def lora_gemm(a, b, c, alpha=1.0, bias=None, accumulate=False, drop=None, splits=1, reverse=False):
    """The cuda backend's ``lora_gemm`` on float32 CPU tensors (split-K handled as in bindings.cpp)."""
    lib = host_lib.load()
    p, seed, on, transposed = drop if drop is not None else (0.0, 0, 0, False)
    i, k = a.shape
    j = b.shape[0]
    assert b.shape[1] == k and tuple(c.shape) == (i, j) and a.dtype == b.dtype == c.dtype == torch.float32
    assert splits == 1 or (bias is None and not accumulate and on != 3)
    target, c_split = c, 0
    if splits > 1:
        target = torch.full((splits, i, j), float("nan"), dtype=torch.float32)
        c_split = i * j
    strides = [*a.stride(), *b.stride(), *target.stride()[-2:]]
    bias_c = bias.contiguous() if bias is not None else None
    lib.ptpeft_lora_gemm_emulate(
        _ptr(a), _ptr(b), _ptr(target), _ptr(bias_c), _i64(i), _i64(j), _i64(k), (_i64 * 6)(*strides),
        _int(splits), _i64(c_split), _f32(alpha), _int(int(accumulate)), _int(on), _int(int(transposed)),
        _f32(p), ctypes.c_uint64(seed), _int(int(reverse)),
    )  # fmt: skip
    if splits > 1:
        c.copy_(target.sum(0))


def dropout_keep_mask(rows: int, cols: int, p: float, seed: int) -> torch.Tensor:
    lib = host_lib.load()
    keep = torch.empty((rows, cols), dtype=torch.uint8)
    lib.ptpeft_dropout_keep_mask(_ptr(keep), _i64(rows), _i64(cols), _f32(p), ctypes.c_uint64(seed))
    return keep.bool()


def _epilogue(kind, h, bias, other, scale, activation):
    for t in (h, bias, other):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous())
    rows, cols = h.shape
    host_lib.load().ptpeft_adapter_epilogue(
        _int(kind), _ptr(h), _ptr(bias), _ptr(other), _i64(rows), _i64(cols), _f32(scale), _int(activation)
    )


class Epilogues:
    """The adapter epilogue ops with the signatures of ``torch.ops.ptpeft_cuda.adapter_*``, run on the CPU."""

    @staticmethod
    def bias_act(h, bias, act, activation):
        _epilogue(0, h, bias, act, 1.0, activation)

    @staticmethod
    def residual(u, bias, residual, scale):
        _epilogue(1, u, bias, residual, scale, 0)

    @staticmethod
    def act_grad(du, h, scale, activation):
        _epilogue(2, du, None, h, scale, activation)
