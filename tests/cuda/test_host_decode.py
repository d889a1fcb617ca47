"""The decode attention kernel's block code, run on the CPU (tests/cuda/host), against float64.

The host library runs the kernel's phases for every thread between its barriers, on float32
data: indexing, tiling, split boundaries, masking, GQA mapping, the online softmax and the
merge are the code the GPU runs; only the vector loads and the half/bf16 conversions differ.
"""

import pytest
import torch

from ptpeft_kernels.ops.prefix_attention import prefix_attention_ref
from tests.helpers import assert_close

from . import emulate, host_lib

pytestmark = pytest.mark.skipif(host_lib.compiler() is None, reason="needs a host C++ compiler (g++)")


def _ref_lse(q, k, prefix_k, mask, causal, scale):
    """float64 natural-log LSE of each query row over its visible keys (-inf if none)."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    keys = k.double()
    if prefix_k is not None:
        pk = prefix_k.double()
        pk = pk.expand(b, -1, -1, -1) if pk.dim() == 3 else pk
        keys = torch.cat([pk, keys], dim=2)
    p = keys.shape[2] - m
    keys = keys.repeat_interleave(hq // hkv, dim=1)
    scores = q.double() @ keys.transpose(-1, -2) * scale
    visible = torch.ones(b, hq, n, p + m, dtype=torch.bool)
    if causal:
        visible[..., p:] &= torch.ones(n, m, dtype=torch.bool).tril(m - n)
    if mask is not None:
        visible[..., p:] &= mask[:, None, None, :] if mask.dim() == 2 else mask
    return torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)


def _inputs(b, hq, hkv, n, m, p, d, shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, m, d, generator=g)
    v = torch.randn(b, hkv, m, d, generator=g)
    lead = (hkv,) if shared else (b, hkv)
    pk = torch.randn(*lead, p, d, generator=g) if p >= 0 else None
    pv = torch.randn(*lead, p, d, generator=g) if p >= 0 else None
    return q, k, v, pk, pv


def _check(q, k, v, pk, pv, *, mask=None, causal=True, num_splits=0, sm_count=4):
    scale = q.shape[-1] ** -0.5
    out, lse, splits = emulate.decode(
        q, k, v, pk, pv, mask=mask, causal=causal, num_splits=num_splits, sm_count=sm_count
    )
    ref = prefix_attention_ref(q, k, v, pk, pv, attn_mask=mask, causal=causal).double()
    assert_close("out", out, ref, atol=2e-5, rtol=2e-5)
    ref_lse = _ref_lse(q, k, pk, mask, causal, scale)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows with nothing visible differ"
    finite = torch.isfinite(ref_lse)
    assert_close("lse", lse[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    # The same program with the threads of every phase run in reverse order: a phase that
    # reads what another thread writes before the next barrier would change the result.
    out_r, lse_r, _ = emulate.decode(
        q, k, v, pk, pv, mask=mask, causal=causal, num_splits=num_splits, sm_count=sm_count, reverse=True
    )
    assert torch.equal(out, out_r) and torch.equal(lse.nan_to_num(), lse_r.nan_to_num())
    return splits


@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("m", [1, 17, 4095])
def test_head_dims_and_odd_cache_lengths(d, m):
    q, k, v, pk, pv = _inputs(1, 4, 1, 1, m, 7, d, shared=True)
    _check(q, k, v, pk, pv)


@pytest.mark.parametrize("p", [0, 1, 7, 32])
@pytest.mark.parametrize("shared", [True, False])
def test_prefix_lengths_shared_and_per_batch(p, shared):
    q, k, v, pk, pv = _inputs(2, 2, 2, 3, 40, p, 64, shared=shared)
    _check(q, k, v, pk, pv, num_splits=2)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (8, 1), (16, 2)])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_gqa_ratios_and_query_counts(hq, hkv, n):
    # G * N up to 128 rows: several row chunks of 16 per kv head.
    q, k, v, pk, pv = _inputs(2, hq, hkv, n, 70, 5, 64, shared=False, seed=hq * 100 + n)
    _check(q, k, v, pk, pv, num_splits=3)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 200])
def test_forced_split_counts_agree(splits):
    q, k, v, pk, pv = _inputs(1, 2, 1, 4, 300, 32, 64, shared=True)
    used = _check(q, k, v, pk, pv, num_splits=splits)
    assert used == min(splits, -(-(300 + 32) // 64))  # at most one split per 64-key tile


def test_automatic_splits_follow_the_sm_count():
    q, k, v, pk, pv = _inputs(1, 4, 1, 1, 2000, 16, 64, shared=True)
    few = _check(q, k, v, pk, pv, sm_count=1)
    many = _check(q, k, v, pk, pv, sm_count=132)
    assert 1 < few < many


@pytest.mark.parametrize("form", ["padding", "full", "per_query"])
@pytest.mark.parametrize("causal", [True, False])
def test_masks(form, causal):
    b, hq, hkv, n, m = 3, 4, 2, 4, 50
    q, k, v, pk, pv = _inputs(b, hq, hkv, n, m, 3, 64, shared=True)
    g = torch.Generator().manual_seed(7)
    if form == "padding":
        mask = torch.rand(b, m, generator=g) > 0.3
        mask[1] = False  # one sequence entirely padded: its rows see only the prefix
    elif form == "full":
        mask = torch.rand(b, hq, n, m, generator=g) > 0.5
    else:
        mask = torch.rand(b, 1, n, m, generator=g) > 0.5
    _check(q, k, v, pk, pv, mask=mask, causal=causal, num_splits=2)


def test_rows_that_see_nothing_give_zeros_and_minus_infinity():
    b, hq, n, m = 2, 2, 2, 30
    q, k, v, _, _ = _inputs(b, hq, 1, n, m, 0, 64, shared=True)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0] = False
    out, lse, _ = emulate.decode(q, k, v, mask=mask, num_splits=3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()
    _check(q, k, v, None, None, mask=mask, num_splits=3)


def test_no_keys_at_all():
    q, k, v, _, _ = _inputs(1, 2, 1, 1, 0, 0, 64, shared=True)
    out, lse, splits = emulate.decode(q, k, v, causal=False)
    assert splits == 1 and torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_strided_inputs_read_in_place():
    # A KV cache preallocated for 96 positions holding 41, q sliced from a fused projection.
    b, hq, hkv, n, m, d = 2, 4, 2, 3, 41, 64
    cache_k = torch.randn(b, hkv, 96, d)
    cache_v = torch.randn(b, hkv, 96, d)
    fused = torch.randn(b, n, 3 * hq, d).transpose(1, 2)
    q = fused[:, hq : 2 * hq]
    pk = torch.randn(hkv, 2 * 9, d)[:, ::2]
    pv = torch.randn(hkv, 9, d)
    _check(q, cache_k[:, :, :m], cache_v[:, :, :m], pk, pv, num_splits=2)


def test_square_causal_block():
    # N = M = 16: the first query sees one sequence key, the last all 16 (plus the prefix).
    q, k, v, pk, pv = _inputs(1, 2, 1, 16, 16, 4, 64, shared=True)
    _check(q, k, v, pk, pv)
