"""One fused GEMM kernel that the LoRA and adapter ops are built from.

``C = alpha * (op_a(A) @ op_b(B) + bias) * act'(AUX) + scale2 * drop(A2 @ B2) + RES``

* ``op_a`` / ``op_b``: optional activation (prologue, recomputed from the pre-activation
  instead of storing it) and optional dropout of the operand (the LoRA input x, keyed by
  (token, feature)).
* ``A2 @ B2``: the rank-r "extra K-slab" (LoRA's ``h B^T``, or ``dh A`` in the backward)
  folded into the same output tile, so the tokens x out result is written once.
* ``RSUM``: row sums of ``op_a(A)`` over K (not scaled by alpha), which is every bias gradient
  (``sum_t dy``) as a by-product of a weight-gradient GEMM that already streams ``dy``.
* split-K: reductions over tokens with a small output (``dA``, ``dB``, adapter weight
  gradients: r x d) would occupy a handful of SMs; they split K over a second grid axis and
  write float32 partials that the launcher sums (deterministic, unlike atomics).

Any operand may be a strided (transposed, non-contiguous) view: strides are passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    activate,
    activation_grad,
    bucket,
    dropout_keep,
    interpreting,
    launch,
    mma,
    next_pow2,
    sm_count,
)
from .configs import gemm_tiles


@triton.jit
def _gemm_kernel(
    A, B, C, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    A2, B2, R, stride_a2m, stride_a2r, stride_b2r, stride_b2n, scale2,
    BIAS, RES, stride_rm, stride_rn, AUX, stride_xm, stride_xn, RSUM, stride_rss,
    alpha, seed, drop_p,
    M_KEY, N_KEY, K_KEY,  # autotune keys only (power-of-two buckets of M, N, K)
    ACT_A: tl.constexpr, ACT_B: tl.constexpr, ACT_GRAD: tl.constexpr,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, DROP_EXTRA: tl.constexpr,
    HAS_EXTRA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_RSUM: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles share each B column tile while it is in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N

    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    # 64-bit offsets everywhere a stride meets an index: a transposed operand's K stride times the
    # token count overflows int32, and so does any index times the stride of a large strided view.
    m64 = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)
    a_ptrs = A + m64[:, None] * stride_am + (k_start + offs_k).to(tl.int64)[None, :] * stride_ak
    b_ptrs = B + (k_start + offs_k).to(tl.int64)[:, None] * stride_bk + n64[None, :] * stride_bn
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K  # tl.cast: a stride of 1 arrives as a constexpr
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < k_end
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if ACT_A != 0:
            a = activate(a.to(tl.float32), ACT_A).to(A.dtype.element_ty)
        if ACT_B != 0:
            b = activate(b.to(tl.float32), ACT_B).to(B.dtype.element_ty)
        if DROP_A:
            a = tl.where(dropout_keep(seed, offs_m[:, None], kk[None, :], drop_p), a, 0.0)
        if DROP_B:
            b = tl.where(dropout_keep(seed, kk[:, None], offs_n[None, :], drop_p), b, 0.0)
        if HAS_RSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        acc = mma(a, b, acc, UPCAST)
        a_ptrs += a_step
        b_ptrs += b_step

    out = acc * alpha
    if HAS_BIAS:
        bias = tl.load(BIAS + n64, mask=col_ok, other=0.0).to(tl.float32)
        out += alpha * bias[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if ACT_GRAD != 0:
        aux_ptrs = AUX + m64[:, None] * stride_xm + n64[None, :] * stride_xn
        aux = tl.load(aux_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        out = out * activation_grad(aux, ACT_GRAD)
    if HAS_EXTRA:
        extra = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            a2 = tl.load(
                A2 + m64[:, None] * stride_a2m + rr.to(tl.int64)[None, :] * stride_a2r,
                mask=row_ok[:, None] & (rr < R)[None, :],
                other=0.0,
            )
            b2 = tl.load(
                B2 + rr.to(tl.int64)[:, None] * stride_b2r + n64[None, :] * stride_b2n,
                mask=(rr < R)[:, None] & col_ok[None, :],
                other=0.0,
            )
            extra = mma(a2, b2, extra, UPCAST)
        if DROP_EXTRA:
            extra = tl.where(dropout_keep(seed, offs_m[:, None], offs_n[None, :], drop_p), extra, 0.0)
        out += scale2 * extra
    if HAS_RES:
        res_ptrs = RES + m64[:, None] * stride_rm + n64[None, :] * stride_rn
        out += tl.load(res_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    c_ptrs = C + split.to(tl.int64) * stride_cs + m64[:, None] * stride_cm + n64[None, :] * stride_cn
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=tile_ok)
    # Every column tile computes the same row sums; the first one writes them. Nested, not `and`:
    # older Triton front ends reject `constexpr and tensor`.
    if HAS_RSUM:  # noqa: SIM102
        if pid_n == 0:
            tl.store(RSUM + split.to(tl.int64) * stride_rss + m64, rsum, mask=row_ok)


# Everything that changes the kernel's work per tile is part of the tuning key.
_TUNE_KEY = [
    "M_KEY", "N_KEY", "K_KEY", "stride_ak", "stride_bk",
    "ACT_A", "ACT_B", "ACT_GRAD", "DROP_A", "DROP_B", "DROP_EXTRA",
    "HAS_EXTRA", "HAS_BIAS", "HAS_RES", "HAS_RSUM", "SPLIT_K",
]  # fmt: skip


def _interpreter_meta(m: int, n: int, k: int) -> dict:
    # The interpreter runs one program at a time in numpy: few large tiles are fastest, but keep
    # them small enough that the test shapes still span several tiles and partial edges.
    return {"BLOCK_M": 32, "BLOCK_N": min(32, next_pow2(n)), "BLOCK_K": 32, "GROUP_M": 2}


def _act_code(name: str | None) -> int:
    from ._common import ACT_CODES

    return 0 if name is None else ACT_CODES[name]


def _strides2(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Splits of K so that a small-output reduction over tokens (r x d, K = tokens) fills the GPU.

    Only reductions whose K dominates the output (K >= 2 max(M, N): the weight gradients dA, dB,
    dWd, dWu) split; rank-r products over features (x A^T, dy B) have M = tokens and enough tiles.
    Aim for about two programs per SM counting 64x64 output tiles, with at least 256 of K per
    split so each float32 partial amortises its write. MEASURE: thresholds untuned on a GPU.
    The interpreter's tiny shapes relax the ratio so the split path runs in the CPU tests too.
    """
    on_gpu = device.type == "cuda"
    if k < (2 * max(m, n) if on_gpu else max(m, n) // 2):
        return 1
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
    want = max(1, (2 * sm_count(device)) // max(1, tiles))
    return int(max(1, min(want, k // 256 if on_gpu else k // 16, 64)))


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    alpha: float = 1.0,
    bias: torch.Tensor | None = None,
    act_a: str | None = None,
    act_b: str | None = None,
    act_grad: str | None = None,
    aux: torch.Tensor | None = None,
    extra: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    dropout: tuple[str, float, int] | None = None,
    row_sum: bool = False,
    split_k: int | None = None,
    tiles=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``alpha * (op_a(a) @ op_b(b) + bias) [* act'(aux)] + s2 * drop(a2 @ b2) + residual``.

    ``a`` (M, K), ``b`` (K, N), any strides. ``dropout = (where, p, seed)`` with ``where`` one of
    ``"a"``, ``"b"``, ``"extra"``: which operand holds the (token, feature) grid being dropped
    (the caller folds ``1 / (1 - p)`` into ``alpha`` or the extra scale). ``row_sum``: also
    return ``op_a(a).sum(1)`` in float32 (not scaled by ``alpha``). ``split_k``: None picks it (only for plain
    products: bias, extra, residual and act_grad need the whole K in one program). ``tiles``: force one
    :class:`~.configs.Tiles` config (tests). Returns (C (M, N), row sums or None).
    """
    m, k = a.shape
    n = b.shape[1]
    device = a.device
    plain = bias is None and extra is None and residual is None and act_grad is None
    if split_k is None:
        split_k = choose_split_k(m, n, k, device) if plain else 1
    if split_k > 1 and not plain:
        raise ValueError("split_k > 1 supports only alpha (no bias, extra, residual or act_grad)")
    out_dtype = out_dtype or a.dtype
    if split_k > 1:
        c = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
        stride_cs = c.stride(0)
        c2 = c[0]
    else:
        c = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=device)
        stride_cs = 0
        c2 = c
    rsum = torch.empty((split_k, m), dtype=torch.float32, device=device) if row_sum else None
    if m == 0 or n == 0:
        result = c if split_k == 1 else torch.zeros((m, n), dtype=out_dtype, device=device)
        return result, (torch.zeros(m, dtype=torch.float32, device=device) if row_sum else None)
    drop_where, drop_p, seed = dropout if dropout is not None else (None, 0.0, 0)
    a2, b2, scale2 = extra if extra is not None else (None, None, 0.0)
    r = a2.shape[1] if a2 is not None else 0
    dummy = c2  # a valid pointer for arguments a constexpr flag switches off
    args = (
        a, b, c2, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_cs, c2.stride(0), c2.stride(1),
        a2 if a2 is not None else dummy, b2 if b2 is not None else dummy, r,
        *_strides2(a2), *_strides2(b2), float(scale2),
        bias if bias is not None else dummy,
        residual if residual is not None else dummy, *_strides2(residual),
        aux if aux is not None else dummy, *_strides2(aux),
        rsum if rsum is not None else dummy, rsum.stride(0) if rsum is not None else 0,
        float(alpha), int(seed), float(drop_p),
        bucket(m), bucket(n), bucket(k),
    )  # fmt: skip
    flags = {
        "ACT_A": _act_code(act_a),
        "ACT_B": _act_code(act_b),
        "ACT_GRAD": _act_code(act_grad),
        "DROP_A": drop_where == "a",
        "DROP_B": drop_where == "b",
        "DROP_EXTRA": drop_where == "extra",
        "HAS_EXTRA": extra is not None,
        "HAS_BIAS": bias is not None,
        "HAS_RES": residual is not None,
        "HAS_RSUM": row_sum,
        "SPLIT_K": split_k,
        "BLOCK_R": min(64, next_pow2(r)),
        "UPCAST": interpreting(),
    }

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    launch(_gemm_kernel, grid, args, flags, device=device, name="gemm", tiles=gemm_tiles(a.dtype, m, n),
           key=_TUNE_KEY, interp_tiles=_interpreter_meta(m, n, k), force=tiles)  # fmt: skip
    if split_k > 1:
        result = c.sum(0).to(out_dtype)
        if out is not None:
            out.copy_(result)
            result = out
    else:
        result = c
    return result, (rsum.sum(0) if rsum is not None else None)
