"""Prefix-augmented attention: softmax attention over [prefix keys, sequence keys].

Shapes (DESIGN.md): ``q`` (B, Hq, N, D); ``k``, ``v`` (B, Hkv, M, D) with ``Hq % Hkv == 0``
(grouped-query attention: query head h reads key/value head ``h // (Hq // Hkv)``);
``prefix_k``, ``prefix_v`` (Hkv, P, D) shared by the batch or (B, Hkv, P, D).

Masking: every query sees every prefix key. Among sequence keys, ``causal=True`` is
bottom-right aligned — query i sees key j iff ``j <= i + (M - N)`` — and ``attn_mask``
(bool, True = attend) is either a key-padding mask (B, M) or a full mask
(B, 1 or Hq, 1 or N, M). A query with no visible key outputs zeros, never NaN.

This file holds, in order: the reference, the ``torch`` backend (forward and the
exact backward), the ``torch.library`` custom ops with their fake and autograd
registrations, and the public function. The Triton kernels live in
``ops/triton_impl/prefix_attention.py`` so that importing this file never imports Triton.
"""

import functools
from functools import partial

import torch
from torch import Tensor

from .. import backends
from .._checks import autocast_inputs, check_same, check_scalar, check_tensor, describe
from ._eager import eager_function

__all__ = ["prefix_attention", "prefix_attention_ref"]

OP = "prefix_attention"


# ----------------------------------------------------------------------------- reference


def _reference_visibility(
    attn_mask: Tensor | None, causal: bool, b: int, n: int, m: int, device: torch.device
) -> Tensor | None:
    """The reference's own bool (B, 1|Hq, N, M) visibility of sequence keys, written from the definition.

    Deliberately not shared with the implementations (whose joint path builds its mask with
    :func:`_sequence_visibility`): a reference that reuses the code it checks cannot catch its bugs.
    """
    if not causal and attn_mask is None:
        return None
    visible = torch.ones(b, 1, n, m, dtype=torch.bool, device=device)
    if causal:  # bottom-right aligned: query i sees key j iff j <= i + (M - N)
        query = torch.arange(n, device=device).view(n, 1)
        key = torch.arange(m, device=device).view(1, m)
        visible = visible & (key <= query + (m - n))
    if attn_mask is not None:  # key padding (B, M), or (B, 1|Hq, 1|N, M)
        visible = visible & (attn_mask.reshape(b, 1, 1, m) if attn_mask.dim() == 2 else attn_mask)
    return visible


def prefix_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    upcast: bool = True,
) -> Tensor:
    """The definition, in plain PyTorch: explicit scores over the concatenated keys.

    With ``upcast=True`` it computes in float64 (the reference every backend is tested
    against); with ``upcast=False`` in the inputs' dtype (the "same-dtype PyTorch"
    error yardstick of the tests). Returns (B, Hq, N, D) in ``q.dtype``.
    """
    dtype = torch.float64 if upcast else q.dtype
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    groups = hq // hkv if hkv else 1
    scale = (d**-0.5 if d else 1.0) if scale is None else scale
    keys, values = k.to(dtype), v.to(dtype)
    if prefix_k is not None:
        pk, pv = prefix_k.to(dtype), prefix_v.to(dtype)
        if pk.dim() == 3:
            pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
        keys, values = torch.cat([pk, keys], dim=2), torch.cat([pv, values], dim=2)
    num_prefix = keys.shape[2] - m
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.to(dtype), keys.transpose(-1, -2)) * scale
    visible = _reference_visibility(attn_mask, causal, b, n, m, q.device)
    if visible is not None:
        prefix_visible = torch.ones(1, 1, 1, num_prefix, dtype=torch.bool, device=q.device)
        visible = torch.cat([prefix_visible.expand(*visible.shape[:3], -1), visible], dim=-1)
        scores = scores.masked_fill(~visible, float("-inf"))
    if scores.shape[-1] == 0:  # no keys at all (M = P = 0): zeros, as for a query that sees nothing
        return torch.matmul(scores, values).to(q.dtype)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    # Rows with nothing visible have all-zero weights: dividing by a clamped sum gives 0, not NaN.
    probs = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return torch.matmul(probs, values).to(q.dtype)


# ----------------------------------------------------------------------------- input checks


def _check_args(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale) -> tuple[Tensor | None, float]:
    """Validate the public arguments; return the canonical mask and the scale."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    for name, t in (("k", k), ("v", v)):
        check_same(name, t, "q", q)
    b, hq, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, Hkv, M, D), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != b:
        raise ValueError(f"k must have batch size {b} like q (B, Hq, N, D), got {describe(k)}")
    hkv, m = k.shape[1], k.shape[2]
    if k.shape[3] != d:
        raise ValueError(f"k and v head dim must equal q's head dim {d}, got {k.shape[3]}")
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
        raise ValueError(f"q heads must be a multiple of k/v heads (Hq % Hkv == 0), got Hq={hq}, Hkv={hkv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if causal and m < n:
        raise ValueError(
            f"causal=True needs at least as many keys as queries (M >= N, bottom-right aligned), "
            f"got N={n}, M={m}"
        )
    default_scale = d**-0.5 if d else 1.0  # D = 0: the output is empty whatever the scale
    scale = default_scale if scale is None else check_scalar("scale", scale, low=0.0, low_open=True)

    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together (both None or both tensors)")
    if prefix_k is not None:
        check_tensor("prefix_k", prefix_k, (3, 4))
        check_tensor("prefix_v", prefix_v, (3, 4))
        check_same("prefix_k", prefix_k, "q", q)
        check_same("prefix_v", prefix_v, "q", q)
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                f"and {tuple(prefix_v.shape)}"
            )
        lead = (hkv,) if prefix_k.dim() == 3 else (b, hkv)
        want = (*lead, prefix_k.shape[-2], d)
        if tuple(prefix_k.shape) != want:
            form = "(Hkv, P, D)" if prefix_k.dim() == 3 else "(B, Hkv, P, D)"
            raise ValueError(
                f"prefix_k must be {form} = {want} for Hkv={hkv}, D={d}"
                f"{'' if prefix_k.dim() == 3 else f', B={b}'}, got {tuple(prefix_k.shape)}"
            )

    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, (2, 4), floating=False)
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor (True = attend), got dtype {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (b, m):
                raise ValueError(
                    f"a 2-D attn_mask is a key-padding mask (B, M) = {(b, m)}, got {tuple(attn_mask.shape)}"
                )
        else:
            mb, mh, mn, mm = attn_mask.shape
            if mb != b or mh not in (1, hq) or mn not in (1, n) or mm != m:
                raise ValueError(
                    f"a 4-D attn_mask must be (B, 1 or Hq, 1 or N, M) with B={b}, Hq={hq}, N={n}, "
                    f"M={m}, got {tuple(attn_mask.shape)}"
                )
            if mh == 1 and mn == 1:
                attn_mask = attn_mask.reshape(b, m)
    return attn_mask, scale


# ----------------------------------------------------------------------------- torch backend
#
# The attention splits into parts whose softmaxes are merged with their log-sum-exps:
# the prefix (a small explicit matmul, no mask), and the sequence keys. Under bottom-right
# causal masking with M > N the sequence splits again, into the first M - N keys (visible
# to every query) and a square N x N block that is top-left causal — exactly what the
# fused SDPA kernels' is_causal flag computes, so no (N x M) mask is ever built for it.
# The backward needs no per-part state: given the merged output O and log-sum-exp L,
# every part's probabilities are exp(s - L) and delta = rowsum(dO * O) is global, which
# is what the fused kernels' backward computes when handed O and L instead of their own.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Part:
    """A contiguous range of keys with one masking rule.

    ``causal_offset``: key j (within the part) is visible to query i iff j <= i + offset;
    None means no causal rule. ``keep``: bool (B, 1|Hq, 1|N, Mp), or None.
    """

    def __init__(
        self,
        k: Tensor,
        v: Tensor,
        causal_offset: int | None,
        keep: Tensor | None,
        every_row_sees: bool = False,
    ):
        self.k, self.v, self.causal_offset, self.keep = k, v, causal_offset, keep
        self.every_row_sees = every_row_sees  # known without looking at ``keep`` (prefix keys included)


def _sequence_parts(k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool, n: int) -> list[_Part]:
    m = k.shape[2]
    keep = attn_mask[:, None, None, :] if attn_mask is not None and attn_mask.dim() == 2 else attn_mask
    ranges = [(0, m - n, None), (m - n, m, 0)] if causal else [(0, m, None)]
    parts = []
    for start, stop, offset in ranges:
        if stop > start:
            part_keep = None if keep is None else keep[..., start:stop]
            parts.append(_Part(k[:, :, start:stop], v[:, :, start:stop], offset, part_keep))
    return parts


# Short sequences: when one head's score matrix has at most _JOINT_MAX_SCORES entries
# (N * (P + M)) and each concatenated K/V at most _JOINT_MAX_COPY elements, the CPU path
# attends to prefix and sequence in one fused call over concatenated keys with the mask
# materialised; otherwise the split path (no copies, causal blocks skipped) wins.
# Joint / split time, fwd+bwd, fp32, 1 thread (P=8 at N<=96, else 16):
#   causal, no mask:       N41 0.71, N96 0.81, N128 0.90, N256 0.97, N512 1.02, N1024 1.39
#   causal + padding mask: N41 0.71, N96 0.86, N128 0.96, N256 1.02, N512 1.03, N1024 1.01
# The built-in model's attention (B32 Hq4 Hkv2 N41 D32 P8): 3.8 ms joint vs 5.4 ms split.
# Decode steps (N=1, P16, forward) are where the copy bound matters: B1 H8 D64 M64 0.47,
# M1024 0.92, M4096 1.96; B4 H8 M1024 2.62; B4 H32 M2048 D128 4.52.
_JOINT_MAX_SCORES = 1 << 15
_JOINT_MAX_COPY = 1 << 20


def _joint_wanted(q: Tensor, k: Tensor, prefix_k: Tensor | None) -> bool:
    if prefix_k is None or prefix_k.shape[-2] == 0 or not _use_fused_cpu(q, _Part(k, k, None, None)):
        return False
    b, hkv, m, d = k.shape
    keys = prefix_k.shape[-2] + m
    return q.shape[2] * keys <= _JOINT_MAX_SCORES and b * hkv * keys * d <= _JOINT_MAX_COPY


def _sequence_visibility(
    attn_mask: Tensor | None, causal: bool, n: int, m: int, device: torch.device
) -> Tensor | None:
    """The joint path's bool (B|1, Hq|1, N, M) mask of visible sequence keys; None when all are visible."""
    visible = None
    if causal:
        visible = torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)[None, None]
    if attn_mask is not None:
        keep = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
        visible = keep if visible is None else visible & keep
    return visible


def _joint_part(k, v, prefix_k, prefix_v, attn_mask, causal, n) -> _Part:
    """Prefix and sequence keys as one part: keys concatenated, visibility materialised."""
    b, hkv, m, d = k.shape
    p = prefix_k.shape[-2]
    keys = torch.cat([prefix_k.expand(b, hkv, p, d), k], dim=2)
    values = torch.cat([prefix_v.expand(b, hkv, p, d), v], dim=2)
    visible = _sequence_visibility(attn_mask, causal, n, m, k.device)
    keep = None
    if visible is not None:
        keep = torch.cat([visible.new_ones(*visible.shape[:-1], p), visible], dim=-1)
    return _Part(keys, values, None, keep, every_row_sees=True)


def _unit_last_stride(t: Tensor) -> Tensor:
    # The fused CPU kernels read rows as dense vectors: a strided last dim gives wrong results, not an error.
    return t if t.stride(-1) == 1 else t.contiguous()


def _use_fused_cpu(q: Tensor, part: _Part) -> bool:
    # PyTorch's fused CPU flash kernel: top-left causal only, any float dtype, GQA natively.
    return q.device.type == "cpu" and part.causal_offset in (None, 0) and part.k.dim() == 4


def _additive(keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _rows_visible(keep: Tensor, causal_offset: int | None, n: int) -> Tensor:
    """Bool (B, 1|Hq, N): whether query i sees any key of the part."""
    if causal_offset is None:
        return keep.any(dim=-1).expand(*keep.shape[:2], n)
    mp = keep.shape[-1]
    if keep.shape[2] == 1:  # key padding: query i sees keys [0, i + offset], so "any" is a prefix-or
        seen = keep[:, :, 0].int().cummax(dim=-1).values.bool()
        last = (torch.arange(n, device=keep.device) + causal_offset).clamp(max=mp - 1)
        rows = seen[..., last]
        return rows & (last >= 0)
    tril = torch.ones(n, mp, dtype=torch.bool, device=keep.device).tril(causal_offset)
    return (keep & tril).any(dim=-1)


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """(B, Hq, N, D) -> (B, Hkv, G*N, D): the G query heads of one KV head stacked along rows."""
    b, hq, n, d = x.shape
    return x.reshape(b, hkv, (hq // hkv) * n, d)


def _math_scores(q: Tensor, part: _Part, scale: float) -> Tensor:
    """Masked scores (B, Hkv, G, N, Mp) in the accumulation dtype; K/V are never repeated."""
    b, hq, n, _ = q.shape
    k = part.k
    hkv, mp = k.shape[-3], k.shape[-2]
    acc = _acc_dtype(q.dtype)
    # In-place from here on: each (B, H, N, Mp) temporary counts against peak memory.
    scores = torch.matmul(_grouped(q, hkv).to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)
    scores = scores.view(b, hkv, hq // hkv, n, mp)
    if part.causal_offset is not None:
        tril = torch.ones(n, mp, dtype=torch.bool, device=q.device).tril(part.causal_offset)
        scores.masked_fill_(~tril, float("-inf"))
    if part.keep is not None:
        keep = part.keep
        keep = keep.reshape(b, hkv, hq // hkv, *keep.shape[2:]) if keep.shape[1] == hq else keep[:, :, None]
        scores.masked_fill_(~keep, float("-inf"))
    return scores


def _part_forward(q: Tensor, part: _Part, scale: float) -> tuple[Tensor, Tensor]:
    """One part's normalised output (B, Hq, N, D) and log-sum-exp (B, Hq, N); -inf where nothing is seen."""
    b, hq, n, d = q.shape
    if _use_fused_cpu(q, part):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _unit_last_stride(q),
            _unit_last_stride(part.k),
            _unit_last_stride(part.v),
            0.0,
            part.causal_offset == 0,
            attn_mask=_additive(part.keep, q.dtype),
            scale=scale,
        )
        if part.keep is not None and not part.every_row_sees:  # it reports lse = 0 for rows that saw nothing
            rows = _rows_visible(part.keep, part.causal_offset, n)
            lse = lse.masked_fill(~rows, float("-inf"))
            out = out.masked_fill_(~rows[..., None], 0.0)
        return out, lse
    scores = _math_scores(q, part, scale)
    lse = torch.logsumexp(scores, dim=-1)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    probs = scores.sub_(safe[..., None]).exp_()
    hkv = part.k.shape[-3]
    out = torch.matmul(probs.view(b, hkv, -1, probs.shape[-1]), part.v.to(probs.dtype))
    return out.view(b, hq, n, d), lse.reshape(b, hq, n)


def _merge(results: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Softmax-weighted sum of the parts' outputs: weights exp(lse_i - lse), lse = logsumexp_i(lse_i)."""
    if len(results) == 1:
        out, lse = results[0]  # any layout: the custom op makes its outputs dense (see _dense)
        return out.to(dtype), lse.to(_acc_dtype(dtype))
    acc = _acc_dtype(dtype)
    lse = torch.logsumexp(torch.stack([r[1].to(acc) for r in results]), dim=0)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    # Accumulate in place into the first part's output (a fresh tensor the parts own): at
    # B4 H8 N1024 D64 fp32 the out-of-place version spent 15 ms of a 65 ms forward here.
    first_out, first_lse = results[0]
    out = first_out.to(acc).mul_(torch.exp(first_lse.to(acc) - safe)[..., None])
    for part_out, part_lse in results[1:]:
        out.addcmul_(part_out, torch.exp(part_lse.to(acc) - safe)[..., None])
    return out.to(dtype), lse


def _prefix_part(prefix_k: Tensor | None, prefix_v: Tensor | None) -> _Part | None:
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return None
    return _Part(prefix_k, prefix_v, None, None)


@backends.register(OP, "torch")
def _torch_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    n = q.shape[2]
    if _joint_wanted(q, k, prefix_k):
        return _merge(
            [_part_forward(q, _joint_part(k, v, prefix_k, prefix_v, attn_mask, causal, n), scale)], q.dtype
        )
    parts = _sequence_parts(k, v, attn_mask, causal, n)
    prefix = _prefix_part(prefix_k, prefix_v)
    if prefix is not None:
        parts.insert(0, prefix)
    if not parts:  # M == 0 and no prefix: nothing to attend to
        acc = _acc_dtype(q.dtype)
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=acc)
    return _merge([_part_forward(q, part, scale) for part in parts], q.dtype)


def _fused_part_backward(
    dout: Tensor, q: Tensor, part: _Part, scale: float, out: Tensor, lse_bwd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one part from the fused CPU kernel, handed the merged output and log-sum-exp."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _unit_last_stride(dout),
        _unit_last_stride(q),
        _unit_last_stride(part.k),
        _unit_last_stride(part.v),
        _unit_last_stride(out),
        lse_bwd,
        0.0,
        part.causal_offset == 0,
        attn_mask=_additive(part.keep, q.dtype),
        scale=scale,
    )


def _math_part_backward(
    dout: Tensor, q: Tensor, part: _Part, scale: float, lse_bwd: Tensor, delta: Tensor, dq: Tensor
) -> tuple[Tensor, Tensor]:
    """(dk, dv) of one part computed explicitly; its dq is accumulated into ``dq`` (contiguous, in place)."""
    b, hq, n, d = q.shape
    k, v = part.k, part.v
    hkv, mp = k.shape[-3], k.shape[-2]
    acc = _acc_dtype(q.dtype)
    scores = _math_scores(q, part, scale)  # (B, Hkv, G, N, Mp)
    probs = scores.sub_(lse_bwd.reshape(b, hkv, -1, n)[..., None]).exp_()
    probs = probs.view(b, hkv, -1, mp)  # (B, Hkv, G*N, Mp)
    dout_g = _grouped(dout, hkv).to(acc)
    dv = torch.matmul(probs.transpose(-1, -2), dout_g)
    dp = torch.matmul(dout_g, v.to(acc).transpose(-1, -2))
    ds = dp.sub_(_grouped(delta[..., None], hkv)).mul_(probs).mul_(scale)
    keys = k.to(acc).expand(b, hkv, mp, d).reshape(b * hkv, mp, d)  # a copy only for a shared (small) prefix
    dq.view(b * hkv, -1, d).baddbmm_(ds.view(b * hkv, -1, mp), keys)  # no (B, Hq, N, D) temporary
    dk = torch.matmul(ds.transpose(-1, -2), _grouped(q, hkv).to(acc))
    if k.dim() == 3:  # shared by the batch: its gradient is the batch sum
        dk, dv = dk.sum(0), dv.sum(0)
    return dk, dv


@backends.register(OP, "torch", kind="backward")
def _torch_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale):
    acc = _acc_dtype(q.dtype)
    # Rows that saw nothing (lse = -inf) have zero probability everywhere: +inf makes exp(s - L) = 0.
    lse_bwd = lse.masked_fill(torch.isneginf(lse), float("inf"))
    if _joint_wanted(q, k, prefix_k):
        return _joint_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse_bwd, causal, scale)
    prefix = _prefix_part(prefix_k, prefix_v)
    parts = _sequence_parts(k, v, attn_mask, causal, q.shape[2]) + ([prefix] if prefix is not None else [])
    fused = [_use_fused_cpu(q, part) for part in parts]
    dk_parts, dv_parts = [None] * len(parts), [None] * len(parts)
    # Fused parts first: their dq is summed in place (>= float32); explicit parts then accumulate into it.
    dq = None
    for i, part in enumerate(parts):
        if fused[i]:
            part_dq, dk_parts[i], dv_parts[i] = _fused_part_backward(dout, q, part, scale, out, lse_bwd)
            dq = part_dq.to(acc) if dq is None else dq.add_(part_dq)
    if dq is None:
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    if not all(fused):
        dq = dq.contiguous()  # the explicit parts accumulate into a (B*Hkv, G*N, D) view of it
        delta = torch.matmul(dout.to(acc).unsqueeze(-2), out.to(acc).unsqueeze(-1))[..., 0, 0]  # rowsum(dO*O)
        for i, part in enumerate(parts):
            if not fused[i]:
                dk_parts[i], dv_parts[i] = _math_part_backward(dout, q, part, scale, lse_bwd, delta, dq)
    if prefix is not None:
        dpk, dpv = dk_parts.pop(), dv_parts.pop()
    elif prefix_k is not None:  # P = 0
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    else:  # two distinct tensors: custom-op outputs may not alias each other
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    return dq.to(q.dtype), _join(dk_parts, k), _join(dv_parts, v), dpk.to(q.dtype), dpv.to(q.dtype)


def _joint_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse_bwd, causal, scale):
    part = _joint_part(k, v, prefix_k, prefix_v, attn_mask, causal, q.shape[2])
    dq, dkeys, dvalues = _fused_part_backward(dout, q, part, scale, out, lse_bwd)
    p = prefix_k.shape[-2]
    # Views into the joint gradients, no copies (each costs about as much as a kernel pass
    # here: 87 us of a 4.2 ms call at B32 H4 N41); the custom op densifies them (_dense).
    dk, dv = dkeys[:, :, p:], dvalues[:, :, p:]
    dpk, dpv = dkeys[:, :, :p], dvalues[:, :, :p]
    if prefix_k.dim() == 3:
        dpk, dpv = dpk.sum(0), dpv.sum(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(q.dtype), dpv.to(q.dtype)


def _join(grads: list[Tensor], like: Tensor) -> Tensor:
    """The sequence-key gradient from its parts' (no copy for a single part)."""
    if not grads:
        return torch.zeros_like(like)
    return (grads[0] if len(grads) == 1 else torch.cat(grads, dim=2)).to(like.dtype)


# ----------------------------------------------------------------------------- custom ops


def _dense(t: Tensor) -> Tensor:
    """``t`` contiguous and owning its storage, as the fakes promise; outputs may not alias each other.

    Only the custom ops (what ``torch.compile`` traces) pay for this: eager calls hand the
    backend's layouts on (the fused CPU kernel lays lse and dq out (B, N, H[, D]); the joint
    path's K/V gradients are views of one buffer), and autograd takes any strides.
    """
    return (
        t.clone(memory_format=torch.contiguous_format) if t._base is not None or not t.is_contiguous() else t
    )


# Empty dimensions are settled here, before any backend: PyTorch's fused CPU attention kernel
# divides by N (SIGFPE, the process dies, at N = 0), and kernel launchers differ on empty grids and
# the null pointers of empty tensors. No queries (B, Hq, N or D = 0) or no keys at all (M = P = 0):
# the output is all zeros (a query that sees nothing outputs zeros) and so is every gradient.
# Prefix keys only (M = 0): the PyTorch path, on every backend.


def _nothing_to_attend(q: Tensor, k: Tensor, prefix_k: Tensor | None) -> bool:
    no_prefix = prefix_k is None or prefix_k.shape[-2] == 0
    return q.numel() == 0 or (k.shape[2] == 0 and no_prefix)


def _backend_for(k: Tensor, backend: str) -> str:
    return "torch" if k.shape[2] == 0 else backend


def _forward_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    attn_mask: Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if _nothing_to_attend(q, k, prefix_k):
        acc = _acc_dtype(q.dtype)
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=acc)
    backend = backends.guarded(
        OP, _backend_for(k, backend), q, k, v, prefix_k, prefix_v, attn_mask, causal, scale
    )
    out, lse = backends.get_impl(OP, backend)(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    return out, lse


def _densified(impl):
    """``impl`` with every output passed through :func:`_dense` (same signature: custom_op reads it)."""

    @functools.wraps(impl)
    def run(*args):
        return tuple(_dense(t) for t in impl(*args))

    return run


_prefix_attention_op = torch.library.custom_op("ptpeft::prefix_attention", mutates_args=())(
    _densified(_forward_impl)
)


@_prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))


def _backward_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    attn_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _nothing_to_attend(q, k, prefix_k):  # a constant (empty or zero) output: every gradient is zero
        if prefix_k is None:  # two distinct tensors: custom-op outputs may not alias each other
            dpk, dpv = q.new_empty(0), q.new_empty(0)
        else:
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dpk, dpv
    backend = backends.guarded(
        OP, _backend_for(k, backend), q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, kind="backward"
    )
    impl = backends.get_impl(OP, backend, kind="backward")
    return impl(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale)


_prefix_attention_backward_op = torch.library.custom_op("ptpeft::prefix_attention_backward", mutates_args=())(
    _densified(_backward_impl)
)


@_prefix_attention_backward_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale, backend):
    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attn_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward_with(run, ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, attn_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = run(
        dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, ctx.causal, ctx.scale, ctx.backend
    )
    if prefix_k is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None


# torch.compile traces the custom op (backward through the backward op); eager calls skip the dispatch.
_prefix_attention_op.register_autograd(
    partial(_backward_with, _prefix_attention_backward_op), setup_context=_setup_context
)
_PrefixAttentionEager = eager_function(
    "_PrefixAttentionEager", _forward_impl, _setup_context, partial(_backward_with, _backward_impl)
)


# ----------------------------------------------------------------------------- public function


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Attention of ``q`` over the prefix keys followed by the sequence keys.

    Args:
        q: (B, Hq, N, D) queries.
        k, v: (B, Hkv, M, D) sequence keys and values, ``Hq % Hkv == 0`` (GQA by index).
        prefix_k, prefix_v: (Hkv, P, D) shared by the batch (gradient summed over it) or
            (B, Hkv, P, D); P may be 0. Every query sees every prefix key.
        attn_mask: bool, True = attend; covers sequence keys only: key padding (B, M) or
            (B, 1 or Hq, 1 or N, M).
        causal: bottom-right aligned — query i sees sequence key j iff ``j <= i + (M - N)``;
            needs ``M >= N``.
        scale: score scale, default ``D ** -0.5``.
        backend: ``auto`` | ``cuda`` | ``triton`` | ``torch``; ``auto`` follows ``PTPEFT_BACKEND``
            when it is set, else takes the first that runs of cuda, triton, torch.

    Returns:
        (B, Hq, N, D) in ``q.dtype`` (the layout of ``scaled_dot_product_attention``);
        a query with no visible key at all gets zeros.
    """
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    attn_mask, scale = _check_args(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    name = backends.resolve(OP, backend, q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    run = _prefix_attention_op if torch.compiler.is_compiling() else _PrefixAttentionEager.apply
    return run(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, name)[0]
