"""Pieces both attention forwards share: the online-softmax key tile and the launch-argument helpers.

Pointer offsets are 64-bit wherever a product can pass 2^31 elements: a (head x head stride)
exceeds it once H*N*D of one batch does, a full mask's (row x row stride) once N*M does, and a
strided view's row stride can be anything. Triton passes an integer argument as int32 whenever
its value fits, so ``h * stride_qh`` with an int32 ``h`` wraps silently; the kernels widen the
index (``.to(tl.int64)``) before it meets a stride. Comparisons (bounds, causal band) stay int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import mma, next_pow2

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def fwd_tile(
    acc, l_i, m_i, q, KB, VB, stride_kn, stride_vn, dk_off, dv_off,
    start_n, n_keys, q_pos, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
    BOUNDS: tl.constexpr, CAUSAL_BAND: tl.constexpr, MASK_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax for the query rows of ``q``.

    ``dk_off`` / ``dv_off``: int64 (BLOCK_D,) offsets of the head-dim elements in K / V.
    ``q_pos``: each row's query index (for the causal band ``key <= q_pos + diag``).
    ``MROWS``: the mask pointer of the batch (MASK_MODE 1, a scalar) or of each row (MASK_MODE 2).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_keys
    n64 = offs_n.to(tl.int64)
    # Loads are always bounds-masked (a per-key predicate costs nothing next to the load); the
    # score masking below is what the BOUNDS / CAUSAL_BAND specialisations skip.
    kt_mask = n_ok[None, :] & d_ok[:, None]
    v_mask = n_ok[:, None] & d_ok[None, :]
    kt = tl.load(KB + n64[None, :] * stride_kn + dk_off[:, None], mask=kt_mask, other=0.0)
    s = mma(q, kt, tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32), UPCAST) * qk_scale
    if BOUNDS:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    if CAUSAL_BAND:
        s = tl.where(offs_n[None, :] <= q_pos[:, None] + diag, s, float("-inf"))
    if MASK_MODE == 1:
        keep = tl.load(MROWS + n64 * stride_mm, mask=n_ok, other=0)
        s = tl.where(keep[None, :] != 0, s, float("-inf"))
    elif MASK_MODE == 2:
        m_ok = row_ok[:, None] & n_ok[None, :]
        keep = tl.load(MROWS[:, None] + n64[None, :] * stride_mm, mask=m_ok, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen nothing yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(VB + n64[:, None] * stride_vn + dv_off[None, :], mask=v_mask, other=0.0)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
    return acc, l_i, m_new


@triton.jit
def finish_rows(acc, l_i, m_i):
    """(output rows, natural-log LSE) of an online softmax; rows that saw nothing give (0, -inf)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw nothing have acc = 0: output 0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


def mask_args(attn_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, tuple, int]:
    """(pointer tensor, 4 strides, MASK_MODE): 0 none, 1 key padding (B, M), 2 full (B, 1|Hq, 1|N, M)."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), 0
    mask = attn_mask.view(torch.uint8)
    if mask.dim() == 2:
        return mask, (mask.stride(0), 0, 0, mask.stride(1)), 1
    _, mh, mn, _ = mask.shape
    strides = (
        mask.stride(0),
        mask.stride(1) if mh > 1 else 0,
        mask.stride(2) if mn > 1 else 0,
        mask.stride(3),
    )
    return mask, strides, 2


def prefix_args(prefix: torch.Tensor | None, k: torch.Tensor) -> tuple[torch.Tensor, tuple, int]:
    """(pointer tensor, (batch, head, row, dim) strides, P); a shared prefix has batch stride 0."""
    if prefix is None:
        return k, (0, 0, 0, 0), 0
    if prefix.dim() == 3:
        return prefix, (0, *prefix.stride()), prefix.shape[1]
    return prefix, tuple(prefix.stride()), prefix.shape[2]


def head_meta(d: int) -> dict:
    return {"HEAD_D": d, "BLOCK_D": next_pow2(d)}  # non-power-of-two head dims are zero-padded
