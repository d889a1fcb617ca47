"""The decode kernel's arithmetic helpers (csrc/prefix_attention/decode_math.h) on the CPU, vs float64."""

import ctypes
import math

import pytest
import torch

from . import host_lib

pytestmark = pytest.mark.skipif(host_lib.compiler() is None, reason="needs a host C++ compiler (g++)")

_i64, _f32, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_int


@pytest.fixture(scope="module")
def lib():
    lib = host_lib.load()
    lib.ptpeft_visible_seq_end.restype = _i64
    lib.ptpeft_kv_head_of.restype = _i64
    lib.ptpeft_plan_splits.restype = _int
    lib.ptpeft_max_splits.restype = _int
    lib.ptpeft_online_softmax.restype = _f32
    lib.ptpeft_merge.restype = _f32
    lib.ptpeft_offset3.restype = _i64
    return lib


def _floats(values):
    values = list(values)
    return (_f32 * max(1, len(values)))(*values)


def test_bottom_right_causal_limits_match_the_reference_mask(lib):
    for n_total, m in [(1, 1), (1, 9), (4, 4), (5, 12), (16, 4095)]:
        ref = torch.ones(n_total, m, dtype=torch.bool).tril(m - n_total)  # the reference's visibility
        for n in range(n_total):
            end = lib.ptpeft_visible_seq_end(_i64(n), _i64(n_total), _i64(m), _int(1))
            assert end == int(ref[n].sum()) and ref[n, :end].all()
            assert lib.ptpeft_visible_seq_end(_i64(n), _i64(n_total), _i64(m), _int(0)) == m
    # M < N (only without causal in the API): clamped at 0, never negative.
    assert lib.ptpeft_visible_seq_end(_i64(0), _i64(5), _i64(2), _int(1)) == 0


@pytest.mark.parametrize("hq,hkv,n", [(8, 8, 1), (8, 2, 3), (32, 8, 16), (32, 1, 4)])
def test_gqa_rows_cover_each_query_head_once_and_invert_the_reference_map(lib, hq, hkv, n):
    groups = hq // hkv
    seen = set()
    head, query = _i64(), _i64()
    for kv in range(hkv):
        for row in range(groups * n):
            lib.ptpeft_row_index(
                _i64(row), _i64(kv), _i64(groups), _i64(n), ctypes.byref(head), ctypes.byref(query)
            )
            assert head.value // groups == kv  # the reference: kv head = hq // G (repeat_interleave)
            assert lib.ptpeft_kv_head_of(head, _i64(groups)) == kv
            seen.add((head.value, query.value))
    assert seen == {(h, i) for h in range(hq) for i in range(n)}


@pytest.mark.parametrize("blocks", [1, 7, 128, 4096])
@pytest.mark.parametrize("keys", [0, 1, 63, 64, 65, 4095, 4128, 100_000])
@pytest.mark.parametrize("sms", [1, 132])
def test_split_plans_cover_the_keys_in_nonempty_tile_aligned_ranges(lib, blocks, keys, sms):
    limit = lib.ptpeft_max_splits()
    for requested in (0, 1, 5, 1000):
        ranges = (_i64 * (2 * limit))()
        per = _i64()
        count = lib.ptpeft_plan_splits(
            _i64(blocks), _i64(keys), _int(sms), _int(64), _int(requested), ranges, ctypes.byref(per)
        )
        pairs = [(ranges[2 * s], ranges[2 * s + 1]) for s in range(count)]
        assert 1 <= count <= limit and per.value % 64 == 0
        assert pairs[0][0] == 0 and pairs[-1][1] == keys
        assert all(a == prev_b for (a, _), (_, prev_b) in zip(pairs[1:], pairs[:-1], strict=True))
        if keys > 0:
            assert all(b > a for a, b in pairs), pairs  # no empty split
        if requested:
            # The requested count, clamped to one split per tile and the limit, then possibly
            # lowered by the recount that keeps every split non-empty (never below half).
            want = min(requested, max(1, -(-keys // 64)), limit)
            assert want / 2 < count <= want
        elif blocks >= 4 * sms:
            assert count == 1  # enough blocks already: no merge pass


def _ref_softmax(scores, values):
    s = torch.tensor(scores, dtype=torch.float64) * math.log(2.0)  # log2 domain -> natural
    if torch.isneginf(s).all():
        return float("-inf"), 0.0
    lse = torch.logsumexp(s, 0)
    w = torch.exp(s - lse)
    return lse.item() / math.log(2.0), (w * torch.tensor(values, dtype=torch.float64)).sum().item()


@pytest.mark.parametrize("tile", [1, 3, 64])
def test_online_softmax_matches_one_pass_softmax(lib, tile):
    g = torch.Generator().manual_seed(tile)
    for n in (1, 5, 64, 300):
        scores = (torch.randn(n, generator=g) * 8).tolist()
        for j in range(0, n, 4):
            scores[j] = float("-inf")  # masked keys, including whole tiles at tile=1 and 3
        values = torch.randn(n, generator=g).tolist()
        out = _f32()
        lse2 = lib.ptpeft_online_softmax(
            _floats(scores), _floats(values), _int(n), _int(tile), ctypes.byref(out)
        )
        ref_lse2, ref_out = _ref_softmax(scores, values)
        if ref_lse2 == float("-inf"):
            assert lse2 == float("-inf") and out.value == 0.0
        else:
            assert abs(lse2 - ref_lse2) <= 1e-5 * max(1.0, abs(ref_lse2))
            assert abs(out.value - ref_out) <= 1e-5


def test_online_softmax_of_nothing_visible_is_zero_not_nan(lib):
    out = _f32()
    lse2 = lib.ptpeft_online_softmax(
        _floats([float("-inf")] * 10), _floats([float("nan")] * 10), _int(10), _int(4), ctypes.byref(out)
    )
    assert lse2 == float("-inf") and out.value == 0.0


def test_large_scores_do_not_overflow(lib):
    scores = [300.0, 299.0, -300.0]  # exp2(300) overflows float32; the running max keeps it finite
    out = _f32()
    lse2 = lib.ptpeft_online_softmax(
        _floats(scores), _floats([1.0, 2.0, 3.0]), _int(3), _int(1), ctypes.byref(out)
    )
    ref_lse2, ref_out = _ref_softmax(scores, [1.0, 2.0, 3.0])
    assert math.isfinite(lse2) and abs(lse2 - ref_lse2) < 1e-4 and abs(out.value - ref_out) < 1e-5


def test_lse_merge_of_split_partials_equals_the_whole_softmax(lib):
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(200, generator=g) * 4).tolist()
    values = torch.randn(200, generator=g).tolist()
    for bounds in ([0, 200], [0, 64, 128, 200], [0, 1, 2, 199, 200], [0, 50, 50, 200]):
        lses, outs = [], []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out = _f32()
            part = scores[a:b] if b > a else [float("-inf")]
            vals = values[a:b] if b > a else [0.0]
            lses.append(
                lib.ptpeft_online_softmax(
                    _floats(part), _floats(vals), _int(len(part)), _int(64), ctypes.byref(out)
                )
            )
            outs.append(out.value)
        merged = _f32()
        lse = lib.ptpeft_merge(_floats(lses), _floats(outs), _int(len(lses)), ctypes.byref(merged))
        ref_lse2, ref_out = _ref_softmax(scores, values)
        assert abs(lse - ref_lse2 * math.log(2.0)) <= 1e-5 * abs(ref_lse2 * math.log(2.0)) + 1e-6
        assert abs(merged.value - ref_out) <= 1e-5


def test_merge_skips_empty_splits_and_all_empty_gives_zero(lib):
    merged = _f32()
    inf = float("-inf")
    lse = lib.ptpeft_merge(
        _floats([inf, 1.0, inf]), _floats([float("nan"), 2.5, float("nan")]), _int(3), ctypes.byref(merged)
    )
    assert merged.value == 2.5 and abs(lse - math.log(2.0)) < 1e-6
    lse = lib.ptpeft_merge(_floats([inf, inf]), _floats([float("nan")] * 2), _int(2), ctypes.byref(merged))
    assert lse == inf and merged.value == 0.0


def test_offsets_are_64_bit(lib):
    # (b, h, n) of a (B=70000, H=8, M=4096, D=128) cache: far beyond 2^31 elements.
    sb, sh, sn = 8 * 4096 * 128, 4096 * 128, 128
    for b, h, n in [(69999, 7, 4095), (4096, 3, 17), (1, 0, 0)]:
        got = lib.ptpeft_offset3(_i64(b), _i64(sb), _i64(h), _i64(sh), _i64(n), _i64(sn))
        assert got == b * sb + h * sh + n * sn
    assert lib.ptpeft_offset3(_i64(69999), _i64(sb), _i64(0), _i64(0), _i64(0), _i64(0)) > 2**31
