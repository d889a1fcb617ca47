"""Triton backend of ``prefix_attention``: flash attention over [prefix keys, sequence keys].

Forward (one launch): a program owns (batch, query head, BLOCK_M query rows). Its online
softmax (base-2 exponentials, running max and sum in float32) first sweeps the P prefix keys,
read in place from the shared ``(Hkv, P, D)`` tensor (batch stride 0; no concatenation, no
per-batch copy, never masked), then the sequence keys in two phases: tiles every row of the
block sees whole (no causal arithmetic at all), then the diagonal band up to the last
visible key — tiles past it are never visited. Grouped-query attention is by index
(``kv head = h // (Hq // Hkv)``). It writes O and the natural-log LSE per row.

Backward (a tiny ``delta = rowsum(dO * O)`` pass, then one launch): the grid holds three kinds
of programs per (batch, kv head): prefix key tiles, sequence key tiles (each accumulates its
dK, dV over every query head of its group and every query tile it is visible to, in registers,
and writes them once) and query tiles (dQ over prefix then sequence keys, the same two-phase
sweep as the forward). No atomics: a shared prefix's per-batch float32 partials are summed by
the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import backends
from ..prefix_attention import OP
from ._attention_common import LOG2E, MAX_HEAD_DIM, finish_rows, fwd_tile, head_meta, mask_args, prefix_args
from ._common import bucket, device_guard, device_reason, dtype_reason, interpreting, launch, mma
from .attention_decode import launch_decode
from .configs import ATTN_BWD, ATTN_FWD, PREP_BLOCK_M, attention_tiles


def supports(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    reason = device_reason(q, k, v, prefix_k, prefix_v, attn_mask) or dtype_reason(q.dtype)
    if reason is None and q.shape[-1] > MAX_HEAD_DIM:
        # Beyond 128 the q/dO/K/V tiles of one program no longer fit registers at useful block sizes.
        reason = f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    return reason


# ----------------------------------------------------------------------------- forward


@triton.jit
def _query_block_key_range(start_m, N, M, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sequence keys of a query block: [0, full_hi) every row sees, [full_hi, hi) need the causal band.

    Keys from ``hi`` on are invisible to the whole block (bottom-right causal) and never loaded.
    """
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, N) - 1
        hi = tl.minimum(M, last_row + (M - N) + 1)
        full_hi = (tl.minimum(start_m + (M - N) + 1, M) // BLOCK_N) * BLOCK_N
    else:
        hi = M
        full_hi = (M // BLOCK_N) * BLOCK_N
    return full_hi, hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, PK, PV, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mh, stride_mn, stride_mm,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, M, P, GROUPS, qk_scale,
    N_KEY, M_KEY,  # autotune keys only
    HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    # Causal rows late in the sequence see the most keys: launch them first for a better tail.
    pid_m = num_m - 1 - pid % num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUPS
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_D
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d64[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = M - N
    if MASK_MODE == 2:
        MROWS = MASK + b * stride_mb + h * stride_mh + rows * stride_mn
    else:  # key padding: one row per batch (unused without a mask)
        MROWS = MASK + b * stride_mb

    # Prefix keys: never masked; only the last tile can run past P.
    PKB = PK + b * stride_pkb + hk * stride_pkh
    PVB = PV + b * stride_pvb + hk * stride_pvh
    dpk, dpv = d64 * stride_pkd, d64 * stride_pvd
    for start_n in range(0, P, BLOCK_N):
        acc, l_i, m_i = fwd_tile(
            acc, l_i, m_i, q, PKB, PVB, stride_pkn, stride_pvn, dpk, dpv,
            start_n, P, offs_m, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
            BOUNDS=True, CAUSAL_BAND=False, MASK_MODE=0, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
        )  # fmt: skip

    # Sequence keys: [0, full_hi) is visible to every row of the block, [full_hi, hi) needs masking,
    # keys from hi on are invisible to the whole block (bottom-right causal) and never loaded.
    full_hi, hi = _query_block_key_range(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    KB = K + b * stride_kb + hk * stride_kh
    VB = V + b * stride_vb + hk * stride_vh
    dk, dv = d64 * stride_kd, d64 * stride_vd
    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = fwd_tile(
            acc, l_i, m_i, q, KB, VB, stride_kn, stride_vn, dk, dv,
            start_n, M, offs_m, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
            BOUNDS=False, CAUSAL_BAND=False, MASK_MODE=MASK_MODE, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = fwd_tile(
            acc, l_i, m_i, q, KB, VB, stride_kn, stride_vn, dk, dv,
            start_n, M, offs_m, d_ok, row_ok, diag, qk_scale, MROWS, stride_mm,
            BOUNDS=True, CAUSAL_BAND=CAUSAL, MASK_MODE=MASK_MODE, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
        )  # fmt: skip

    out, lse = finish_rows(acc, l_i, m_i)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + d64[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_prep_kernel(
    OUT, DO, LSE, DELTA, LSE2,
    stride_ob, stride_oh, stride_on, stride_od, stride_db, stride_dh, stride_dn, stride_dd,
    H, N, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    num_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    ok = (offs_m < N)[:, None] & (offs_d < HEAD_D)[None, :]
    o_ptrs = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + d64[None, :] * stride_od
    do_ptrs = DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dn + d64[None, :] * stride_dd
    o = tl.load(o_ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=ok, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * N + rows
    lse = tl.load(LSE + row, mask=offs_m < N, other=0.0)
    tl.store(DELTA + row, tl.sum(o * do, axis=1), mask=offs_m < N)
    # Base-2 LSE for exp2 in the main kernel; a row that saw nothing gets +inf so every p is 0.
    tl.store(
        LSE2 + row, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=offs_m < N
    )


@triton.jit
def _dkdv_step(
    dk, dv, k, v, QH, DOH, LSE2H, DELTAH, MBH, keep_n,
    stride_qn, stride_don, stride_mn, stride_mm, dq_off, ddo_off,
    start_m, N, offs_n, n_ok, d_ok, diag, qk_scale,
    CAUSAL_BAND: tl.constexpr, MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    m_ok = offs_m < N
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(QH + rows[:, None] * stride_qn + dq_off[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DOH + rows[:, None] * stride_don + ddo_off[None, :], mask=qd_mask, other=0.0)
    # Rows past N read lse2 = +inf: their probabilities are exactly 0.
    lse2 = tl.load(LSE2H + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTAH + rows, mask=m_ok, other=0.0)
    zero = tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32)
    # Transposed scores (keys x queries) so P^T and dS^T feed dV and dK without a transpose.
    st = mma(k, tl.trans(q), zero, UPCAST) * qk_scale
    pt = tl.math.exp2(st - lse2[None, :])
    if CAUSAL_BAND:
        pt = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pt, 0.0)
    if MASK_MODE == 1:
        pt = tl.where(keep_n[:, None] != 0, pt, 0.0)
    elif MASK_MODE == 2:
        keep = tl.load(
            MBH + rows[None, :] * stride_mn + offs_n.to(tl.int64)[:, None] * stride_mm,
            mask=m_ok[None, :] & n_ok[:, None],
            other=0,
        )
        pt = tl.where(keep != 0, pt, 0.0)
    dv = mma(pt.to(do.dtype), do, dv, UPCAST)
    dpt = mma(v, tl.trans(do), zero, UPCAST)
    dst = pt * (dpt - delta[None, :])
    dk = mma(dst.to(q.dtype), q, dk, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, DO, LSE2, DELTA, KB, VB, DKB, DVB, MASK,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mn, stride_mm,
    b, hk, H, N, M, GROUPS, start_n, n_keys, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n64 = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    n_ok = offs_n < n_keys
    d_ok = offs_d < HEAD_D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(KB + n64[:, None] * stride_kn + d64[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(VB + n64[:, None] * stride_vn + d64[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    diag = M - N
    keep_n = n_ok.to(tl.int8)
    if MASK_MODE == 1:  # key padding: one vector per key tile, loaded once
        keep_n = tl.load(MASK + b * stride_mb + n64 * stride_mm, mask=n_ok, other=0).to(tl.int8)
    dq_off, ddo_off = d64 * stride_qd, d64 * stride_dod
    # Query tiles [lo, band_end) straddle the causal diagonal of this key tile; from band_end on
    # every row sees all of its keys; rows before lo see none of them and are skipped.
    if CAUSAL:  # the prefix call passes CAUSAL=False: prefix keys are visible to every query
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        band_end = lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - lo, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        band_end = 0
    for g in range(GROUPS):
        h = hk * GROUPS + g  # int64, like hk
        QH = Q + b * stride_qb + h * stride_qh
        DOH = DO + b * stride_dob + h * stride_doh
        LSE2H = LSE2 + (b * H + h) * N
        DELTAH = DELTA + (b * H + h) * N
        MBH = MASK + b * stride_mb + h * stride_mh
        for start_m in range(lo, tl.minimum(band_end, N), BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, QH, DOH, LSE2H, DELTAH, MBH, keep_n,
                stride_qn, stride_don, stride_mn, stride_mm, dq_off, ddo_off,
                start_m, N, offs_n, n_ok, d_ok, diag, qk_scale,
                CAUSAL_BAND=True, MASK_MODE=MASK_MODE, BLOCK_M=BLOCK_M, UPCAST=UPCAST,
            )  # fmt: skip
        for start_m in range(tl.maximum(band_end, lo), N, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, QH, DOH, LSE2H, DELTAH, MBH, keep_n,
                stride_qn, stride_don, stride_mn, stride_mm, dq_off, ddo_off,
                start_m, N, offs_n, n_ok, d_ok, diag, qk_scale,
                CAUSAL_BAND=False, MASK_MODE=MASK_MODE, BLOCK_M=BLOCK_M, UPCAST=UPCAST,
            )  # fmt: skip
    dk = dk * sm_scale
    tl.store(DKB + n64[:, None] * stride_dkn + d64[None, :] * stride_dkd,
             dk.to(DKB.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(DVB + n64[:, None] * stride_dvn + d64[None, :] * stride_dvd,
             dv.to(DVB.dtype.element_ty), mask=kv_mask)  # fmt: skip


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, KB, VB, stride_kn, stride_vn, dk_off, dv_off,
    start_n, n_keys, offs_m, row_ok, d_ok, diag, qk_scale, MROWS, stride_mm,
    BOUNDS: tl.constexpr, CAUSAL_BAND: tl.constexpr, MASK_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n64 = offs_n.to(tl.int64)
    n_ok = offs_n < n_keys
    t_mask = n_ok[None, :] & d_ok[:, None]
    kt = tl.load(KB + n64[None, :] * stride_kn + dk_off[:, None], mask=t_mask, other=0.0)
    vt = tl.load(VB + n64[None, :] * stride_vn + dv_off[:, None], mask=t_mask, other=0.0)
    zero = tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)
    s = mma(q, kt, zero, UPCAST) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if BOUNDS:
        p = tl.where(n_ok[None, :], p, 0.0)
    if CAUSAL_BAND:
        p = tl.where(offs_n[None, :] <= offs_m[:, None] + diag, p, 0.0)
    if MASK_MODE == 1:
        keep = tl.load(MROWS + n64 * stride_mm, mask=n_ok, other=0)
        p = tl.where(keep[None, :] != 0, p, 0.0)
    elif MASK_MODE == 2:
        m_ok = row_ok[:, None] & n_ok[None, :]
        keep = tl.load(MROWS[:, None] + n64[None, :] * stride_mm, mask=m_ok, other=0)
        p = tl.where(keep != 0, p, 0.0)
    dp = mma(do, vt, zero, UPCAST)
    ds = p * (dp - delta[:, None])
    return mma(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST)


@triton.jit
def _bwd_dq(
    Q, DO, LSE2, DELTA, K, V, PK, PV, DQ, MASK,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
    stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd, stride_mb, stride_mh, stride_mn, stride_mm,
    b, hk, h, H, N, M, P, start_m, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d64[None, :] * stride_qd,
                mask=qd_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don
                 + d64[None, :] * stride_dod, mask=qd_mask, other=0.0)  # fmt: skip
    lse2 = tl.load(LSE2 + (b * H + h) * N + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = M - N
    if MASK_MODE == 2:
        MROWS = MASK + b * stride_mb + h * stride_mh + rows * stride_mn
    else:
        MROWS = MASK + b * stride_mb

    PKB = PK + b * stride_pkb + hk * stride_pkh
    PVB = PV + b * stride_pvb + hk * stride_pvh
    dpk, dpv = d64 * stride_pkd, d64 * stride_pvd
    for start_n in range(0, P, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse2, delta, PKB, PVB, stride_pkn, stride_pvn, dpk, dpv,
            start_n, P, offs_m, row_ok, d_ok, diag, qk_scale, MROWS, stride_mm,
            BOUNDS=True, CAUSAL_BAND=False, MASK_MODE=0, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
        )  # fmt: skip
    full_hi, hi = _query_block_key_range(start_m, N, M, CAUSAL, BLOCK_M, BLOCK_N)
    KB = K + b * stride_kb + hk * stride_kh
    VB = V + b * stride_vb + hk * stride_vh
    dk, dv = d64 * stride_kd, d64 * stride_vd
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse2, delta, KB, VB, stride_kn, stride_vn, dk, dv,
            start_n, M, offs_m, row_ok, d_ok, diag, qk_scale, MROWS, stride_mm,
            BOUNDS=False, CAUSAL_BAND=False, MASK_MODE=MASK_MODE, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse2, delta, KB, VB, stride_kn, stride_vn, dk, dv,
            start_n, M, offs_m, row_ok, d_ok, diag, qk_scale, MROWS, stride_mm,
            BOUNDS=True, CAUSAL_BAND=CAUSAL, MASK_MODE=MASK_MODE, BLOCK_N=BLOCK_N, UPCAST=UPCAST,
        )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + d64[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, PK, PV, MASK, DO, LSE2, DELTA, DQ, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mh, stride_mn, stride_mm,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dpkb, stride_dpkh, stride_dpkn, stride_dpkd,
    stride_dpvb, stride_dpvh, stride_dpvn, stride_dpvd,
    H, HKV, N, M, P, GROUPS, qk_scale, sm_scale,
    N_KEY, M_KEY,  # autotune keys only
    HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_MODE: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    n_pt = tl.cdiv(P, BLOCK_N1)
    n_st = tl.cdiv(M, BLOCK_N1)
    n_qt = tl.cdiv(N, BLOCK_M2)
    per_bh = n_pt + n_st + GROUPS * n_qt
    pid = tl.program_id(0)
    bhk = pid // per_bh
    t = pid % per_bh
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    if t < n_pt:
        start_n = t * BLOCK_N1
        _bwd_dkdv(
            Q, DO, LSE2, DELTA,
            PK + b * stride_pkb + hk * stride_pkh, PV + b * stride_pvb + hk * stride_pvh,
            DPK + b * stride_dpkb + hk * stride_dpkh, DPV + b * stride_dpvb + hk * stride_dpvh, MASK,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
            stride_pkn, stride_pkd, stride_pvn, stride_pvd,
            stride_dpkn, stride_dpkd, stride_dpvn, stride_dpvd, stride_mb, stride_mh, stride_mn, stride_mm,
            b, hk, H, N, M, GROUPS, start_n, P, qk_scale, sm_scale,
            CAUSAL=False, MASK_MODE=0, HEAD_D=HEAD_D,
            BLOCK_M=BLOCK_M1, BLOCK_N=BLOCK_N1, BLOCK_D=BLOCK_D, UPCAST=UPCAST,
        )  # fmt: skip
    elif t < n_pt + n_st:
        start_n = (t - n_pt) * BLOCK_N1
        _bwd_dkdv(
            Q, DO, LSE2, DELTA,
            K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
            DK + b * stride_dkb + hk * stride_dkh, DV + b * stride_dvb + hk * stride_dvh, MASK,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
            stride_mb, stride_mh, stride_mn, stride_mm,
            b, hk, H, N, M, GROUPS, start_n, M, qk_scale, sm_scale,
            CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, HEAD_D=HEAD_D,
            BLOCK_M=BLOCK_M1, BLOCK_N=BLOCK_N1, BLOCK_D=BLOCK_D, UPCAST=UPCAST,
        )  # fmt: skip
    else:
        u = t - n_pt - n_st
        # Late query tiles do the most causal work: hand them out first.
        start_m = (n_qt - 1 - u % n_qt) * BLOCK_M2
        h = hk * GROUPS + u // n_qt
        _bwd_dq(
            Q, DO, LSE2, DELTA, K, V, PK, PV, DQ, MASK,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
            stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
            stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd,
            stride_dqb, stride_dqh, stride_dqn, stride_dqd, stride_mb, stride_mh, stride_mn, stride_mm,
            b, hk, h, H, N, M, P, start_m, qk_scale, sm_scale,
            CAUSAL=CAUSAL, MASK_MODE=MASK_MODE, HEAD_D=HEAD_D,
            BLOCK_M=BLOCK_M2, BLOCK_N=BLOCK_N2, BLOCK_D=BLOCK_D, UPCAST=UPCAST,
        )  # fmt: skip


# ----------------------------------------------------------------------------- launchers

_TUNE_KEY = ["N_KEY", "M_KEY", "HEAD_D", "CAUSAL", "MASK_MODE"]

# Interpreter tiles: non-square and small, so the tiny test shapes span several tiles of each kind
# (prefix tail, full, diagonal band, skipped) while numpy still does the arithmetic in bulk.
_INTERP_FWD = {"BLOCK_M": 32, "BLOCK_N": 16}
_INTERP_BWD = {"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16}

# Up to this many queries the forward takes the small-N kernel (attention_decode.py): the query
# rows of a GQA group share one 16-row tile and the keys split over programs, where this kernel
# would pad every head's rows to a >= 64-row tile and run B * Hq programs.
DECODE_MAX_N = 16


@backends.register(OP, "triton", supports=supports)
def forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    b, hq, n, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or n == 0:
        return out, lse
    return launch_any_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse)


def launch_any_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse, tiles=None,
                       split_keys=None):  # fmt: skip
    """The small-N kernel for N <= DECODE_MAX_N, else the general one (``tiles``: that kernel's config)."""
    if q.shape[2] <= DECODE_MAX_N:
        args = (q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse)
        return launch_decode(*args, tiles=tiles, split_keys=split_keys)
    return _launch_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse, tiles)


def _launch_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, out, lse, tiles=None):
    """Run the forward kernel into ``out`` / ``lse`` (tests pass sentinel-filled buffers, and
    ``tiles`` to force one config)."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    pk, pk_strides, p = prefix_args(prefix_k, k)
    pv, pv_strides, _ = prefix_args(prefix_v, v)
    mask, mask_strides, mode = mask_args(attn_mask, q)
    args = (
        q, k, v, pk, pv, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *mask_strides, *out.stride(),
        hq, n, m, p, hq // hkv, float(scale) * LOG2E, bucket(n), bucket(m),
    )  # fmt: skip
    head = head_meta(d)
    meta = {**head, "CAUSAL": bool(causal), "MASK_MODE": mode, "UPCAST": interpreting()}

    def grid(cfg):
        return (b * hq * triton.cdiv(n, cfg["BLOCK_M"]),)

    launch(_attn_fwd_kernel, grid, args, meta, device=q.device, name="attn_fwd",
           tiles=attention_tiles(ATTN_FWD, q.dtype, head["BLOCK_D"]), key=_TUNE_KEY,
           interp_tiles=_INTERP_FWD, force=tiles)  # fmt: skip
    return out, lse


@backends.register(OP, "triton", kind="backward")
def backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale, tiles=None):
    """dq, dk, dv, dprefix_k, dprefix_v; ``tiles`` forces one backward config (tests)."""
    dout = dout.contiguous()  # autograd hands dO in whatever layout the consumer produced
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    device = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=device)
    if prefix_k is None:  # two distinct tensors: custom-op outputs may not alias each other
        dpk_out, dpv_out = q.new_empty(0), q.new_empty(0)
        dpk = dpv = None
    elif prefix_k.dim() == 3:
        # Shared prefix: per-batch float32 partials, summed below. Deterministic, unlike float32
        # atomics into one buffer; the partials are B*Hkv*P*D floats (2 MiB at B=8, Hkv=16, P=32,
        # D=128) and their sum is one tiny reduction. MEASURE: atomics vs partials not yet timed.
        dpk = torch.empty((b, *prefix_k.shape), dtype=torch.float32, device=device)
        dpv = torch.empty((b, *prefix_v.shape), dtype=torch.float32, device=device)
    else:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=device)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=device)
    if b * hkv > 0 and (n + m + (0 if prefix_k is None else prefix_k.shape[-2])) > 0:
        _launch_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale,
                         dq, dk, dv, dpk, dpv, tiles)  # fmt: skip
    elif dpk is not None:
        dpk.zero_()
        dpv.zero_()
    if prefix_k is not None:
        if prefix_k.dim() == 3:
            dpk_out, dpv_out = dpk.sum(0).to(prefix_k.dtype), dpv.sum(0).to(prefix_v.dtype)
        else:
            dpk_out, dpv_out = dpk, dpv
    return dq, dk, dv, dpk_out, dpv_out


def _launch_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale,
                     dq, dk, dv, dpk, dpv, tiles=None):  # fmt: skip
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    device = q.device
    delta = torch.empty((b, hq, n), dtype=torch.float32, device=device)
    lse2 = torch.empty((b, hq, n), dtype=torch.float32, device=device)
    head = head_meta(d)
    if n > 0 and hq > 0:
        # A separate pass: inlining delta would re-read O once per key tile instead of once.
        block = 32 if interpreting() else PREP_BLOCK_M
        with device_guard(device):
            _bwd_prep_kernel[(b * hq * triton.cdiv(n, block),)](
                out, dout, lse, delta, lse2, *out.stride(), *dout.stride(), hq, n,
                BLOCK_M=block, **head,
            )  # fmt: skip
    pk, pk_strides, p = prefix_args(prefix_k, k)
    pv, pv_strides, _ = prefix_args(prefix_v, v)
    if dpk is None:
        dpk, dpv, dpk_strides, dpv_strides = dk, dv, (0, 0, 0, 0), (0, 0, 0, 0)
    else:
        dpk_strides, dpv_strides = tuple(dpk.stride()), tuple(dpv.stride())
    mask, mask_strides, mode = mask_args(attn_mask, q)
    args = (
        q, k, v, pk, pv, mask, dout, lse2, delta, dq, dk, dv, dpk, dpv,
        *q.stride(), *k.stride(), *v.stride(), *pk_strides, *pv_strides, *mask_strides,
        *dout.stride(), *dq.stride(), *dk.stride(), *dv.stride(), *dpk_strides, *dpv_strides,
        hq, hkv, n, m, p, hq // hkv, float(scale) * LOG2E, float(scale), bucket(n), bucket(m),
    )  # fmt: skip
    meta = {**head, "CAUSAL": bool(causal), "MASK_MODE": mode, "UPCAST": interpreting()}
    groups = hq // hkv

    def grid(cfg):
        per_bh = (
            triton.cdiv(p, cfg["BLOCK_N1"]) + triton.cdiv(m, cfg["BLOCK_N1"])
            + groups * triton.cdiv(n, cfg["BLOCK_M2"])
        )  # fmt: skip
        return (b * hkv * per_bh,)

    launch(_attn_bwd_kernel, grid, args, meta, device=device, name="attn_bwd",
           tiles=attention_tiles(ATTN_BWD, q.dtype, head["BLOCK_D"]), key=_TUNE_KEY,
           interp_tiles=_INTERP_BWD, force=tiles)  # fmt: skip
