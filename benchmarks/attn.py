"""Prefix-augmented attention: ours against the path Hugging Face PEFT takes, and the unprefixed ceiling.

Providers:
  ptpeft-<backend>  ``pk.prefix_attention`` on each backend this machine runs (shared
                    (H, P, D) prefix, causal flag, no mask tensor);
  peft-sdpa         what PEFT prefix tuning makes a transformers model do: the prefix is
                    a past key/value, concatenated per batch in front of K and V, and
                    the (B, 1, N, P + M) additive mask is materialised for SDPA;
  sdpa-noprefix     ``scaled_dot_product_attention(is_causal=True)`` on the sequence
                    alone (no prefix): the ceiling a prefix kernel can approach.

TFLOP/s counts the useful work of the masked computation (4 * B * H * D * visible
pairs forward, 2.5x that backward), the same count for every provider.

Before timing, each provider's output (batch element 0) is checked against the float64
reference of the function it computes; a provider that fails stops the script.

Example: python benchmarks/attn.py --batch 4 --heads 8 --seq 1024 --prefix 16 --head-dim 64
         python benchmarks/attn.py --seq 1024 2048 4096 --modes full   # one process, three lengths
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse

import torch
import torch.nn.functional as F

import ptpeft_kernels as pk
from benchmarks.common import append_csv, check_provider, common_args, measure, modes_for, print_table, setup


def peft_style(q, k, v, prefix_k, prefix_v, causal: bool):
    b, _, n, _ = q.shape
    p, m = prefix_k.shape[-2], k.shape[2]
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2)
    visible = torch.ones(n, p + m, dtype=torch.bool, device=q.device)
    if causal:
        visible[:, p:] = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    mask = torch.zeros(b, 1, n, p + m, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def visible_pairs(n: int, m: int, p: int, causal: bool) -> int:
    seq = sum(min(m, i + (m - n) + 1) for i in range(n)) if causal else n * m
    return n * p + seq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024], help="sequence length(s) N (= M)")
    parser.add_argument("--prefix", type=int, default=16, help="prefix length P")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--non-causal", action="store_true", help="bidirectional attention")
    parser.add_argument(
        "--providers", nargs="+", default=None, help="subset of providers (default: all this machine runs)"
    )
    common_args(parser, "attn.csv")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    for n in args.seq:
        rows = _run(args, n, device, dtype, parser)
        if not args.no_csv:
            append_csv(rows, args.csv, device)


def _run(args, n: int, device: torch.device, dtype: torch.dtype, parser) -> list:
    b, h, p, d, causal = args.batch, args.heads, args.prefix, args.head_dim, not args.non_causal
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    prefix_k, prefix_v = rnd(h, p, d), rnd(h, p, d)
    prefixed = [q, k, v, prefix_k, prefix_v]

    providers = {}
    for backend in pk.available_backends():
        if backend == "torch" or device.type == "cuda":
            providers[f"ptpeft-{backend}"] = (
                lambda backend=backend: pk.prefix_attention(
                    q, k, v, prefix_k, prefix_v, causal=causal, backend=backend
                ),
                prefixed,
            )
    providers["peft-sdpa"] = (lambda: peft_style(q, k, v, prefix_k, prefix_v, causal), prefixed)
    providers["sdpa-noprefix"] = (
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        [q, k, v],
    )
    if args.providers:
        unknown = set(args.providers) - set(providers)
        if unknown:
            parser.error(f"unknown providers {sorted(unknown)}; available: {sorted(providers)}")
        providers = {name: providers[name] for name in args.providers}

    with torch.no_grad():  # batch element 0 of each provider against the float64 reference
        first, prefix = [t[:1] for t in (q, k, v)], [prefix_k, prefix_v]
        refs = {  # (float64, same dtype) outputs, with and without the prefix
            with_prefix: tuple(
                pk.prefix_attention_ref(
                    *(t.to(ref_dtype) for t in first + prefix[: 2 * with_prefix]), causal=causal, upcast=False
                )  # fmt: skip
                for ref_dtype in (torch.float64, dtype)
            )
            for with_prefix in (True, False)
        }
        for name, (fn, _) in providers.items():
            check_provider(name, fn()[:1], *refs[name != "sdpa-noprefix"])

    shape = f"B{b} H{h} N{n} P{p} D{d} {'causal' if causal else 'full'}"
    fwd_flops = 4.0 * b * h * d * visible_pairs(n, n, p, causal)
    flops = {"forward": fwd_flops, "backward": 2.5 * fwd_flops, "full": 3.5 * fwd_flops}
    calls = []
    for name, (fn, inputs) in providers.items():
        pairs = visible_pairs(n, n, 0 if name == "sdpa-noprefix" else p, causal)
        for mode, call in modes_for(fn, inputs, args.modes).items():
            calls.append((name, mode, call, flops[mode] * pairs / visible_pairs(n, n, p, causal)))
    rows = measure("attn", calls, shape, dtype, device, args.warmup, args.repeats)
    print(f"prefix attention, {shape}, {dtype}, {device}")
    print_table(rows, baseline="peft-sdpa")
    return rows


if __name__ == "__main__":
    main()
