"""Prefix-augmented attention against every path a user would pick, at one shape or over a sweep.

Providers:
  ptpeft-<backend>  ``pk.prefix_attention`` on each backend this machine runs (shared (Hkv, P, D)
                    prefix, causal flag, grouped-query heads, no mask tensor);
  peft-sdpa         what PEFT prefix tuning makes a transformers model do: the prefix is a past
                    key/value, concatenated per batch in front of K and V, and SDPA runs with the
                    materialised (B, 1, N, P + M) boolean mask (built once per model forward in
                    transformers, so outside the timed call here) and, as transformers' SDPA path
                    does when a mask is given, K/V repeated to the query heads under GQA;
  flex-attention    ``torch.nn.attention.flex_attention``, compiled, with a block mask in which every
                    query sees the prefix and the sequence keys are bottom-right causal; K/V are the
                    concatenation [prefix, sequence]. Compilation is excluded from the timings and
                    recorded per row (``compile_s``: the first call less the median; near zero when
                    the inductor's on-disk cache already holds that shape's kernel). On the CPU it
                    has no backward (torch raises NotImplementedError for inputs that require grad):
                    only ``inference`` runs there, the training modes are reported as unsupported;
  flash-attn        ``flash_attn_func`` with the prefix concatenated in front of K/V (its causal mask is
                    bottom-right aligned, so every query sees the prefix); CUDA, fp16/bf16, when installed;
  sdpa-noprefix     SDPA on the sequence alone (no prefix): the ceiling a prefix kernel can approach.

TFLOP/s counts the useful work of the masked computation, the same count for every provider of the
same function: 4 * B * Hq * D * (visible query-key pairs) forward (the pairs counted exactly: every
prefix key, and the bottom-right causal triangle, M > N included), 2.5x that backward.

Before timing, each provider's output (the last 256 query rows of batch element 0, which see the most
keys) is checked against the float64 reference of the function it computes; a provider that
disagrees is reported in its rows (``status``), not timed.

Sweeps (``--sweep``; one axis at a time around a base point, the base shared by every axis):
  CPU: B4 Hq8 N1024 P16 D64 GQA1 causal; N 128..4096, P 0/16/64/256, D 64/128, GQA 1/4/8, causal/cross.
  GPU: B4 Hq16 N4096 P16 D128 GQA1 causal; N 128..16384, same P, D, GQA and masks.
``--quick``: B2 Hq8 P16 D64 GQA1 causal at N 256 and 1024.
``cross``: no causal mask (cross-attention or a bidirectional encoder; M = --kv-seq, default N).

Example: python benchmarks/attn.py --batch 4 --heads 8 --seq 1024 --prefix 16 --head-dim 64
         python benchmarks/attn.py --seq 1024 2048 4096 --gqa 1 4 --modes full   # a product of values
         python benchmarks/attn.py --sweep --repeats 10                          # every axis, this device
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import importlib.util
import warnings

import torch
import torch.nn.functional as F

import ptpeft_kernels as pk
from benchmarks.common import (
    MODES,
    Provider,
    append_csv,
    common_args,
    point_extra,
    print_table,
    product_points,
    provider_error,
    run_providers,
    setup,
    sweep_points,
)

PARAMS = ("batch", "heads", "gqa", "seq", "kv_seq", "prefix", "head_dim", "mask")
CHECK_ROWS = 256  # query rows checked against float64 (the last ones: they see the most keys)
SWEEPS = {  # (base point, axes): one axis at a time
    "cpu": (
        dict(batch=4, heads=8, gqa=1, seq=1024, kv_seq=None, prefix=16, head_dim=64, mask="causal"),
        {
            "seq": [128, 256, 512, 1024, 2048, 4096],
            "prefix": [0, 16, 64, 256],
            "head_dim": [64, 128],
            "gqa": [1, 4, 8],
            "mask": ["causal", "cross"],
        },
    ),
    "cuda": (
        dict(batch=4, heads=16, gqa=1, seq=4096, kv_seq=None, prefix=16, head_dim=128, mask="causal"),
        {
            "seq": [128, 256, 512, 1024, 2048, 4096, 8192, 16384],
            "prefix": [0, 16, 64, 256],
            "head_dim": [64, 128],
            "gqa": [1, 4, 8],
            "mask": ["causal", "cross"],
        },
    ),
    # two points: each compiles FlexAttention afresh (20-40 s on 2 cores without the inductor's disk cache)
    "quick": (
        dict(batch=2, heads=8, gqa=1, seq=1024, kv_seq=None, prefix=16, head_dim=64, mask="causal"),
        {"seq": [256, 1024]},
    ),
}


def visible_pairs(n: int, m: int, p: int, causal: bool) -> int:
    """Query-key pairs that take part: every query sees the P prefix keys; among the M sequence keys,
    query i (of N) sees key j iff j <= i + (M - N) when causal (bottom-right), all of them otherwise."""
    if not causal:
        return n * (p + m)
    return n * p + sum(max(0, min(m, i + (m - n) + 1)) for i in range(n))


def sequence_mask(n: int, m: int, causal: bool, device: torch.device) -> torch.Tensor | None:
    """(N, M) bool, True = visible, bottom-right causal; None without a causal mask."""
    if not causal:
        return None
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(m - n)


def peft_path(q, k, v, prefix_k, prefix_v, mask: torch.Tensor | None, causal: bool, groups: int):
    """The PEFT prefix-tuning path through transformers' SDPA attention (``sdpa_attention_forward``):
    past K/V concatenated per batch; with a mask, K/V repeated to the query heads (``repeat_kv``);
    without one, SDPA's own GQA and causal flag."""
    b = q.shape[0]
    if prefix_k is not None:
        k = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_provider(tensors: tuple, causal: bool, flops: float, compiled: bool = True) -> Provider:
    """Compiled FlexAttention over [prefix, sequence] keys, with a block mask built once (outside timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, _, prefix_k, _ = tensors
    n, m, groups = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    p = 0 if prefix_k is None else prefix_k.shape[1]
    block_mask = None
    if causal:

        def prefix_or_causal(b, h, q_idx, kv_idx):
            return (kv_idx < p) | (kv_idx - p <= q_idx + (m - n))

        block_mask = create_block_mask(prefix_or_causal, None, None, n, p + m, device=q.device)
    if compiled:
        torch._dynamo.reset()  # each shape compiles afresh: compile_s is that shape's cost, never a cache hit
    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def fn(q, k, v, prefix_k, prefix_v):
        b = q.shape[0]
        if prefix_k is not None:
            k = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2)
        with warnings.catch_warnings():  # uncompiled on purpose (--flex-eager): no advice to compile
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile", UserWarning)
            return attend(q, k, v, block_mask=block_mask, enable_gqa=groups > 1)

    return Provider(fn, tensors, [t for t in tensors if t is not None], flops, compiled=compiled)


def flash_provider(tensors: tuple, causal: bool, flops: float) -> Provider:
    """flash_attn_func on (B, N, H, D) copies of the inputs (its native layout), the prefix concatenated."""
    q = tensors[0]
    if importlib.util.find_spec("flash_attn") is None:
        return Provider(lambda: None, skipped="flash_attn is not installed")
    if q.device.type != "cuda":
        return Provider(lambda: None, skipped="flash_attn runs on CUDA only")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return Provider(lambda: None, skipped=f"flash_attn takes float16/bfloat16, not {q.dtype}")
    from flash_attn import flash_attn_func

    native = tuple(
        None if t is None else t.detach().transpose(-3, -2).contiguous().requires_grad_() for t in tensors
    )

    def fn(q, k, v, prefix_k, prefix_v):  # (B, N, H, D); prefixes (P, Hkv, D)
        b = q.shape[0]
        if prefix_k is not None:
            k = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=1)
            v = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=1)
        return flash_attn_func(q, k, v, causal=causal).transpose(1, 2)  # to (B, Hq, N, D) for the check

    return Provider(fn, native, [t for t in native if t is not None], flops)


def make_tensors(cfg: dict, device: torch.device, dtype: torch.dtype) -> tuple:
    """(q, k, v, prefix_k, prefix_v) at one point (prefixes None when P = 0), all requiring grad."""
    b, hq, n, p, d = cfg["batch"], cfg["heads"], cfg["seq"], cfg["prefix"], cfg["head_dim"]
    m, hkv = cfg["kv_seq"] or n, hq // cfg["gqa"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(b, hq, n, d), rnd(b, hkv, m, d), rnd(b, hkv, m, d)
    prefix_k, prefix_v = (rnd(hkv, p, d), rnd(hkv, p, d)) if p else (None, None)
    return q, k, v, prefix_k, prefix_v


def provider_factories(cfg: dict, tensors: tuple, flex_compiled: bool = True) -> dict:
    """{name: () -> Provider} for every provider at one point; built only when wanted (FlexAttention
    builds a block mask and resets the compiler)."""
    q, k, v, prefix_k, prefix_v = tensors
    b, hq, n, d = q.shape
    hkv, m, p = k.shape[1], k.shape[2], cfg["prefix"]
    causal, device = cfg["mask"] == "causal", q.device
    leaves = [t for t in tensors if t is not None]
    flops = 4.0 * b * hq * d * visible_pairs(n, m, p, causal)

    def ours(backend):
        def fn(q, k, v, prefix_k, prefix_v):
            return pk.prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, backend=backend)

        return Provider(fn, tensors, leaves, flops)

    def peft():
        mask = None
        if causal and (p > 0 or m != n):  # transformers drops the mask only for plain causal N == M
            visible = torch.cat(
                [torch.ones(n, p, dtype=torch.bool, device=device), sequence_mask(n, m, True, device)], 1
            )
            mask = visible.expand(b, 1, n, p + m)

        def fn(q, k, v, prefix_k, prefix_v):
            return peft_path(q, k, v, prefix_k, prefix_v, mask, causal, hq // hkv)

        return Provider(fn, tensors, leaves, flops)

    def noprefix():
        seq_mask = sequence_mask(n, m, causal, device) if m != n else None

        def fn(q, k, v):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=seq_mask, is_causal=causal and seq_mask is None, enable_gqa=hq != hkv
            )

        return Provider(fn, (q, k, v), [q, k, v], 4.0 * b * hq * d * visible_pairs(n, m, 0, causal))

    factories = {
        f"ptpeft-{backend}": (lambda backend=backend: ours(backend))
        for backend in pk.available_backends()
        if backend == "torch" or device.type == "cuda"
    }
    factories["peft-sdpa"] = peft
    flex_name = "flex-attention" if flex_compiled else "flex-attention-eager"
    factories[flex_name] = lambda: flex_provider(tensors, causal, flops, flex_compiled)
    factories["flash-attn"] = lambda: flash_provider(tensors, causal, flops)
    factories["sdpa-noprefix"] = noprefix
    return factories


def make_check(tensors: tuple, causal: bool, dtype: torch.dtype):
    """check(name, output): the provider's last CHECK_ROWS query rows of batch element 0 against the
    float64 reference (with the prefix, or without it for sdpa-noprefix)."""
    q, k, v, prefix_k, prefix_v = tensors
    rows = min(q.shape[2], CHECK_ROWS)
    with torch.no_grad():
        part = (q[:1, :, -rows:], k[:1], v[:1])
        refs = {}
        for with_prefix in (True, False):
            pre = (prefix_k, prefix_v) if with_prefix and prefix_k is not None else (None, None)
            refs[with_prefix] = [
                pk.prefix_attention_ref(
                    *(t.to(ref_dtype) for t in part),
                    *(None if t is None else t.to(ref_dtype) for t in pre),
                    causal=causal,
                    upcast=False,
                )
                for ref_dtype in (torch.float64, dtype)
            ]

    def check(name: str, out: torch.Tensor) -> str | None:
        return provider_error(name, out[:1, :, -rows:], *refs[name != "sdpa-noprefix"])

    return check


def shape_label(cfg: dict) -> str:
    m = cfg["kv_seq"] or cfg["seq"]
    hkv = cfg["heads"] // cfg["gqa"]
    parts = [f"B{cfg['batch']}", f"H{cfg['heads']}"]
    if hkv != cfg["heads"]:
        parts.append(f"Hkv{hkv}")
    parts.append(f"N{cfg['seq']}")
    if m != cfg["seq"]:
        parts.append(f"M{m}")
    parts += [f"P{cfg['prefix']}", f"D{cfg['head_dim']}", cfg["mask"]]
    return " ".join(parts)


def points(args: argparse.Namespace, device: torch.device, parser: argparse.ArgumentParser) -> list:
    given = {name: getattr(args, name) for name in PARAMS if getattr(args, name) is not None}
    if args.sweep or args.quick:
        if given:
            parser.error(f"--sweep / --quick set the shapes themselves; drop {sorted(given)}")
        base, axes = SWEEPS["quick" if args.quick else "cuda" if device.type == "cuda" else "cpu"]
        return sweep_points(base, axes)
    defaults = dict(batch=[4], heads=[8], gqa=[1], seq=[1024], kv_seq=[None], prefix=[16], head_dim=[64])
    values = {name: given.get(name, defaults.get(name)) for name in PARAMS}
    values["mask"] = given.get("mask", ["cross" if args.non_causal else "causal"])
    return product_points(values)


def _validate(cfg: dict, parser: argparse.ArgumentParser) -> None:
    if cfg["heads"] % cfg["gqa"]:
        parser.error(f"--gqa {cfg['gqa']} must divide --heads {cfg['heads']} (Hkv = Hq / ratio)")
    m = cfg["kv_seq"] or cfg["seq"]
    if cfg["mask"] == "causal" and m < cfg["seq"]:
        parser.error(f"causal attention needs --kv-seq M >= N, got M={m} < N={cfg['seq']} (use --mask cross)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", help="batch size(s) B (default 4)")
    parser.add_argument("--heads", type=int, nargs="+", help="query heads Hq (default 8)")
    parser.add_argument("--gqa", type=int, nargs="+", help="GQA ratio(s) Hq / Hkv (default 1)")
    parser.add_argument("--seq", type=int, nargs="+", help="query length(s) N (default 1024)")
    parser.add_argument("--kv-seq", type=int, nargs="+", help="key length(s) M (default: N)")
    parser.add_argument("--prefix", type=int, nargs="+", help="prefix length(s) P (default 16)")
    parser.add_argument("--head-dim", type=int, nargs="+", help="head dim(s) D (default 64)")
    parser.add_argument("--mask", nargs="+", choices=["causal", "cross"], help="default causal")
    parser.add_argument("--non-causal", action="store_true", help="same as --mask cross")
    parser.add_argument("--providers", nargs="+", default=None, help="only these providers (default: all)")
    parser.add_argument("--exclude", nargs="+", default=[], help="leave these providers out")
    parser.add_argument(
        "--flex-eager",
        action="store_true",
        help="FlexAttention uncompiled, as provider flex-attention-eager (no compile wait: smoke tests)",
    )
    common_args(parser, "attn.csv", modes=MODES)
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    for cfg, axes in points(args, device, parser):
        _validate(cfg, parser)
        rows = run_point(args, cfg, axes, device, dtype, parser, flex_compiled=not args.flex_eager)
        if not args.no_csv:
            append_csv(rows, args.csv, device)


def run_point(args, cfg: dict, axes: list[str], device, dtype, parser, flex_compiled: bool = True) -> list:
    tensors = make_tensors(cfg, device, dtype)
    factories = provider_factories(cfg, tensors, flex_compiled)
    for option, names in (("--providers", args.providers or []), ("--exclude", args.exclude)):
        unknown = set(names) - set(factories)
        if unknown:
            parser.error(f"{option}: unknown providers {sorted(unknown)}; known: {list(factories)}")
    providers = {
        name: make()
        for name, make in factories.items()
        if (not args.providers or name in args.providers) and name not in args.exclude
    }
    shape = shape_label(cfg)
    check = make_check(tensors, cfg["mask"] == "causal", dtype)
    params = {**cfg, "kv_seq": cfg["kv_seq"] or cfg["seq"], "kv_heads": cfg["heads"] // cfg["gqa"]}
    rows = run_providers(
        "attn", providers, check, args.modes, shape, dtype, device, args.warmup, args.repeats,
        extra=point_extra(params, axes),
    )  # fmt: skip
    print(f"prefix attention, {shape}, {dtype}, {device}")
    print_table(rows, baseline="peft-sdpa")
    return rows


if __name__ == "__main__":
    main()
