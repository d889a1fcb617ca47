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
