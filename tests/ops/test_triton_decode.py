"""prefix_attention's small-N (decode) Triton forward: N <= 16, GQA group packed into 16-row tiles,
keys split into ranges merged by log-sum-exp. Output and LSE against the float64 reference through
the launcher (NaN-filled outputs; the key-range length left to the heuristic or forced to one range
or many), and the five gradients of one call through the public op (the backward consumes this
kernel's output and LSE)."""

import importlib

import pytest
import torch

import ptpeft_kernels as pk
from tests.helpers import DEVICE, DTYPE_TOLS, triton_marks
from tests.ops.test_prefix_attention import Case
from tests.ops.test_triton_prefix_attention import check, check_launchers

pytestmark = triton_marks()
TRITON_PA = importlib.import_module("ptpeft_kernels.ops.triton_impl.prefix_attention")

CASES = [
    Case(n=1, m=37, p=0, hq=4, hkv=1),  # GQA 4, odd cache, an empty prefix
    Case(n=1, m=45, p=7, hq=2, hkv=2, shared=False),  # no grouping, odd per-batch prefix
    Case(n=3, m=37, p=1, hq=8, hkv=2, mask="keypad"),  # GQA 4: 12 packed rows, key padding
    Case(n=16, m=45, p=7, hq=4, hkv=1, mask="keypad_empty", shared=False),  # 64 rows, a padded-out sample
    Case(n=5, m=23, p=1, hq=4, hkv=1, mask="fullh", causal=False),  # per-head full mask, no causality
    Case(n=4, m=4, p=None, hq=4, hkv=1),  # N = M: the causal band starts at the first key
]


def test_small_n_takes_the_decode_kernel(monkeypatch):
    calls = []
    real = TRITON_PA.launch_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(TRITON_PA, "launch_decode", spy)
    for n in (TRITON_PA.DECODE_MAX_N, TRITON_PA.DECODE_MAX_N + 1):
        q = torch.randn(1, 2, n, 16)
        k = torch.randn(1, 1, n + 2, 16)
        pk.prefix_attention(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE), backend="triton")
    assert calls == [TRITON_PA.DECODE_MAX_N]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_output_and_lse_match_float64_reference(case):
    check_launchers(case, torch.float32, backward=False)


def test_decode_feeds_the_backward_through_the_public_op():
    """Gradients of a call the decode kernel serves: its (output, LSE) drive the backward."""
    _, atol, rtol = DTYPE_TOLS[0]
    check(Case(n=3, m=37, p=1, hq=8, hkv=2, mask="keypad"), torch.float32, atol, rtol)


@pytest.mark.parametrize("split_keys", [16, 32, 1 << 20], ids=["ranges16", "ranges32", "one-range"])
def test_decode_key_ranges_merge_to_the_reference(split_keys):
    """One range (no merge), ranges of one key tile, and ranges of two: prefix ranges of 7 keys
    and sequence ranges ending mid-tile, into NaN-filled outputs."""
    case = Case(n=2, m=45, p=7, hq=4, hkv=1, mask="keypad", shared=False)
    check_launchers(case, torch.float32, split_keys=split_keys, backward=False)


def test_decode_low_precision_with_a_range_that_sees_only_padding():
    # Sample 0 is fully padded: its sequence ranges see nothing (LSE -inf) and merge with the prefix.
    check_launchers(Case(n=3, m=37, p=7, hq=4, hkv=1, mask="keypad_empty"), torch.bfloat16, split_keys=16,
                    backward=False)  # fmt: skip


