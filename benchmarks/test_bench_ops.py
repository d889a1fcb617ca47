"""Micro-benchmarks of the three ops and their baselines, for pytest-benchmark.

    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave     # saves .benchmarks/<machine>/
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare       # against the last saved run
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

Same providers as the scripts (``attn.py``, ``lora.py``, ``adapter.py``), each checked against the
float64 reference before it is timed, at one CPU shape per op (``--bench-size tiny`` for the
plumbing check). FlexAttention runs compiled (its first call, outside the timing, compiles) and,
on the CPU, without autograd only (it has no CPU backward); at ``tiny`` it runs uncompiled.
"""

import pytest
import torch

from benchmarks import adapter, attn, lora

SHAPES = {
    "cpu": {
        "attn": dict(batch=2, heads=8, gqa=1, seq=512, kv_seq=None, prefix=16, head_dim=64, mask="causal"),
        "attn_gqa": dict(
            batch=2, heads=8, gqa=4, seq=512, kv_seq=None, prefix=16, head_dim=64, mask="causal"
        ),
        "lora": dict(leading=(1024,), fin=1536, fout=1536, rank=16),
        "adapter": dict(leading=(1024,), width=1536, bottleneck=64),
    },
    "tiny": {
        "attn": dict(batch=1, heads=2, gqa=1, seq=16, kv_seq=None, prefix=3, head_dim=8, mask="causal"),
        "attn_gqa": dict(batch=1, heads=4, gqa=2, seq=16, kv_seq=None, prefix=3, head_dim=8, mask="causal"),
        "lora": dict(leading=(8,), fin=16, fout=12, rank=4),
        "adapter": dict(leading=(8,), width=16, bottleneck=4),
    },
}
DEVICE, DTYPE = torch.device("cpu"), torch.float32
ATTN_CASES = [
    ("ptpeft-torch", "full"),
    ("peft-sdpa", "full"),
    ("sdpa-noprefix", "full"),
    ("ptpeft-torch", "inference"),
    ("peft-sdpa", "inference"),
    ("flex-attention", "inference"),  # the CPU has no FlexAttention backward
]


def _timed_call(provider, check, name: str, mode: str):
    """The provider's callable for ``mode`` after its output passed the float64 check (and one call)."""
    calls = provider.calls([mode, "inference"])
    error = check(name, calls["inference"]())
    assert error is None, error
    calls[mode]()  # compiles FlexAttention, builds the kept graph of backward-only modes
    return calls[mode]


@pytest.mark.parametrize("case", ["attn", "attn_gqa"])
@pytest.mark.parametrize("name,mode", ATTN_CASES, ids=[f"{n}-{m}" for n, m in ATTN_CASES])
def test_prefix_attention(benchmark, bench_size, case, name, mode):
    cfg = SHAPES[bench_size][case]
    tensors = attn.make_tensors(cfg, DEVICE, DTYPE)
    factories = attn.provider_factories(cfg, tensors, flex_compiled=bench_size != "tiny")
    provider = (factories.get(name) or factories[f"{name}-eager"])()  # tiny: FlexAttention uncompiled
    call = _timed_call(provider, attn.make_check(tensors, cfg["mask"] == "causal", DTYPE), name, mode)
    benchmark.extra_info["shape"] = attn.shape_label(cfg)
    benchmark(call)


@pytest.mark.parametrize("name", ["ptpeft-torch", "peft", "base-linear"])
def test_lora_linear(benchmark, bench_size, name):
    s = SHAPES[bench_size]["lora"]
    providers, check = lora.build_providers(s["leading"], s["fin"], s["fout"], s["rank"], DEVICE, DTYPE)
    call = _timed_call(providers[name], check, name, "full")
    benchmark.extra_info["shape"] = f"x{s['leading'] + (s['fin'],)} W{s['fout']}x{s['fin']} r{s['rank']}"
    benchmark(call)


@pytest.mark.parametrize("name", ["ptpeft-torch", "unfused"])
def test_adapter(benchmark, bench_size, name):
    s = SHAPES[bench_size]["adapter"]
    providers, check = adapter.build_providers(s["leading"], s["width"], s["bottleneck"], DEVICE, DTYPE)
    call = _timed_call(providers[name], check, name, "full")
    benchmark.extra_info["shape"] = f"x{s['leading'] + (s['width'],)} bottleneck{s['bottleneck']} gelu"
    benchmark(call)
