"""Small-N (decode) forward of ``prefix_attention`` in Triton, for N <= 16 queries per head.

The general forward runs B * Hq programs of >= 64 query rows: at N = 1 over 98 % of each tile is
padding, every query head of a GQA group loads the same K/V tiles again, and at B = 1, Hq = 32 a
132-SM GPU has 32 programs. Here a program owns (batch, kv head, 16-row tile of the group's
packed query rows, key range):

* packed row ``r`` of a group is query head ``h = hk * G + r // N`` at query ``i = r % N``, so one
  16-row tile holds e.g. the whole group at G = 8, N = 2, and each K/V tile is loaded once for it;
* the keys split into ranges of ``split_keys`` (a multiple of every key tile): the prefix's ranges
  first, then the sequence's, so the grid has about two programs per SM even at B = 1;
* each range runs the same online softmax as the general kernel (``fwd_tile``: causal band,
  key-padding and full masks, prefix never masked) and writes its normalised partial output and
  log-sum-exp in float32; a merge pass combines the partials by log-sum-exp and writes the final
  output and LSE. With one range the kernel writes them directly.

The (output, LSE) pair is the general kernel's contract, so the backward is unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_common import LOG2E, finish_rows, fwd_tile, head_meta, mask_args, prefix_args
from ._common import bucket, device_guard, interpreting, launch, sm_count
from .configs import ATTN_DECODE, DECODE_BLOCK_M, DECODE_KEY_QUANTUM, attention_tiles


@triton.jit
def _attn_decode_kernel(
    Q, K, V, PK, PV, MASK, OUT, LSE, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mh, stride_mn, stride_mm,
    stride_ob, stride_oh, stride_on, stride_od,
    H, HKV, N, M, P, GROUPS, qk_scale, SPLIT_KEYS, PREFIX_SPLITS, ROWS,
    N_KEY, M_KEY,  # autotune keys only
    HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group_rows = GROUPS * N
    n_tiles = tl.cdiv(group_rows, BLOCK_M)
    bhk = pid // n_tiles
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    r = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group_rows
    i = r % N  # query index: the causal band compares it in int32
    h = hk * GROUPS + (r // N).to(tl.int64)  # query head of each packed row
    i64 = i.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    d_ok = offs_d < HEAD_D
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + i64[:, None] * stride_qn + d64[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = M - N
    MROWS = MASK + b * stride_mb  # key padding: one row per batch (unused without a mask)
    if MASK_MODE == 2:
        MROWS = MROWS + h * stride_mh + i64 * stride_mn

    if split < PREFIX_SPLITS:  # prefix keys: never masked
        lo = split * SPLIT_KEYS
        hi = tl.minimum(lo + SPLIT_KEYS, P)
        PKB = PK + b * stride_pkb + hk * stride_pkh
        PVB = PV + b * stride_pvb + hk * stride_pvh
        dpk, dpv = d64 * stride_pkd, d64 * stride_pvd
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = fwd_tile(
                acc, l_i, m_i, q, PKB, PVB, stride_pkn, stride_pvn, dpk, dpv,
                start_n, hi, i, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
                BOUNDS=True, CAUSAL_BAND=False, MASK_MODE=0, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
            )  # fmt: skip
    else:
        lo = (split - PREFIX_SPLITS) * SPLIT_KEYS
        hi = tl.minimum(lo + SPLIT_KEYS, M)
        # Query 0 sees keys [0, M - N]; every later query sees more. Whole tiles below that need no band.
        band = hi
        if CAUSAL:
            band = tl.minimum(lo + (tl.maximum(diag + 1 - lo, 0) // BLOCK_N) * BLOCK_N, hi)
        KB = K + b * stride_kb + hk * stride_kh
        VB = V + b * stride_vb + hk * stride_vh
        dk, dv = d64 * stride_kd, d64 * stride_vd
        for start_n in range(lo, band, BLOCK_N):
            acc, l_i, m_i = fwd_tile(
                acc, l_i, m_i, q, KB, VB, stride_kn, stride_vn, dk, dv,
                start_n, hi, i, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
                BOUNDS=True, CAUSAL_BAND=False, MASK_MODE=MASK_MODE, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
            )  # fmt: skip
        for start_n in range(band, hi, BLOCK_N):
            acc, l_i, m_i = fwd_tile(
                acc, l_i, m_i, q, KB, VB, stride_kn, stride_vn, dk, dv,
                start_n, hi, i, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
                BOUNDS=True, CAUSAL_BAND=CAUSAL, MASK_MODE=MASK_MODE, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
            )  # fmt: skip

    out, lse = finish_rows(acc, l_i, m_i)
    row = (b * H + h) * N + i64  # the row of (B, Hq, N)
    if SPLIT:
        part = split.to(tl.int64) * ROWS + row
        o_ptrs = PART_O + part[:, None] * HEAD_D + d64[None, :]
        tl.store(o_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(PART_LSE + part, lse, mask=row_ok)
    else:
        o_rows = b * stride_ob + h * stride_oh + i64 * stride_on
        o_ptrs = OUT + o_rows[:, None] + d64[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + row, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    PART_O, PART_LSE, OUT, LSE, stride_ob, stride_oh, stride_on, stride_od, H, N, ROWS, SPLITS,
    HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out = sum_s exp(lse_s - lse) out_s with lse = log sum_s exp(lse_s), per row of (B, Hq, N)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < ROWS
    offs_d = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    ok = r_ok[:, None] & (offs_d < HEAD_D)[None, :]
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    part = rows  # int64: part s of a row sits at s * ROWS + row
    for _ in range(0, SPLITS):
        lse_s = tl.load(PART_LSE + part, mask=r_ok, other=float("-inf"))
        o_s = tl.load(PART_O + part[:, None] * HEAD_D + d64[None, :], mask=ok, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a range that saw nothing weighs 0
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s - m_safe)
        l_sum = l_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m = m_new
        part += ROWS
    seen = l_sum > 0.0
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, l_sum, 1.0)), float("-inf"))
    b = rows // (H * N)
    h = (rows // N) % H
    i = rows % N
    o_ptrs = OUT + (b * stride_ob + h * stride_oh + i * stride_on)[:, None] + d64[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + rows, lse, mask=r_ok)


_TUNE_KEY = ["N_KEY", "M_KEY", "HEAD_D", "CAUSAL", "MASK_MODE", "SPLIT"]
_INTERP_TILES = {"BLOCK_N": 16}
_INTERP_KEY_QUANTUM = 16  # so the tiny interpreter shapes split into several ranges
MERGE_BLOCK_R = 16


def split_keys_for(p: int, m: int, programs: int, device: torch.device) -> int:
    """Keys per range: about two programs per SM over all ranges, each range a whole number of quanta.

    A range shorter than one quantum (128 keys on a GPU) would cost more in its float32 partial
    write and merge than it saves. MEASURE: the two-programs-per-SM target is not timed on a GPU.
    """
    quantum = _INTERP_KEY_QUANTUM if interpreting() else DECODE_KEY_QUANTUM
    want = max(1, triton.cdiv(2 * sm_count(device), max(1, programs)))
    per = triton.cdiv(max(1, p + m), want)
    return max(quantum, triton.cdiv(per, quantum) * quantum)


def launch_decode(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse, tiles=None,
                  split_keys=None):  # fmt: skip
    """The small-N forward into ``out`` / ``lse``; ``tiles`` forces a config and ``split_keys`` the
    key-range length (a multiple of every key tile: tests use it to get one range or many)."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    groups = hq // hkv
    pk, pk_strides, p = prefix_args(prefix_k, k)
    pv, pv_strides, _ = prefix_args(prefix_v, v)
    mask, mask_strides, mode = mask_args(attn_mask, q)
    programs = b * hkv * triton.cdiv(groups * n, DECODE_BLOCK_M)
    if split_keys is None:
        split_keys = split_keys_for(p, m, programs, q.device)
    prefix_splits = triton.cdiv(p, split_keys)
    splits = max(1, prefix_splits + triton.cdiv(m, split_keys))  # no keys at all: one empty range
    rows = b * hq * n
    if splits > 1:
        part_o = torch.empty((splits, rows, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = lse  # unused
    args = (
        q, k, v, pk, pv, mask, out, lse, part_o, part_lse,
        *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *mask_strides, *out.stride(),
        hq, hkv, n, m, p, groups, float(scale) * LOG2E, split_keys, prefix_splits, rows, bucket(n), bucket(m),
    )  # fmt: skip
    head = head_meta(d)
    meta = {**head, "CAUSAL": bool(causal), "MASK_MODE": mode, "SPLIT": splits > 1, "UPCAST": interpreting(),
            "BLOCK_M": DECODE_BLOCK_M}  # fmt: skip
    launch(_attn_decode_kernel, (programs, splits), args, meta, device=q.device, name="attn_decode",
           tiles=attention_tiles(ATTN_DECODE, q.dtype, head["BLOCK_D"]), key=_TUNE_KEY,
           interp_tiles=_INTERP_TILES, force=tiles)  # fmt: skip
    if splits > 1:
        with device_guard(q.device):
            _decode_merge_kernel[(triton.cdiv(rows, MERGE_BLOCK_R),)](
                part_o, part_lse, out, lse, *out.stride(), hq, n, rows, splits,
                HEAD_D=d, BLOCK_R=MERGE_BLOCK_R, BLOCK_D=head["BLOCK_D"],
            )  # fmt: skip
    return out, lse
