"""The cuda backend's kernels against their baselines, with the CUDA issue's targets computed.

  decode   split-KV decode attention (N = 1) over a shared prefix and a KV cache, against the
           Triton backend and SDPA on the prefix and cache concatenated beforehand (the copy
           not timed: a stricter baseline than the per-step concatenation it stands for).
           Bandwidth share = the bytes the kernel must read (K/V cache once, the shared prefix
           once, q) per second over the device-to-device copy bandwidth measured in the same run.
           Targets: share >= 70 % at B=16; faster than SDPA and Triton; B=1's share >= B=16's / 1.5.
  lora     lora_linear (frozen base weight, x requiring grad) against the bare cuBLAS base GEMM
           (F.linear). Target at r=16: at most 10 % over the base, forward and backward.
  adapter  the adapter on the cuda backend against the torch and triton backends (no target).

Prints a table per benchmark and one "TARGET ..." line per target, appends rows to
benchmarks/results/cuda_ops.csv and, with --summary, writes the verdicts as markdown.

Example (GPU, extension built): python benchmarks/cuda_ops.py --summary /tmp/r/cuda_summary.md
  --smoke: tiny shapes and 2 repeats, to test the plumbing in seconds.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ptpeft_kernels as pk
from benchmarks.common import (
    RESULTS_DIR,
    Row,
    append_csv,
    assert_same_function,
    measure,
    modes_for,
    print_table,
)

SHAPES = {
    "target": dict(batches=(16, 1), hq=32, hkv=8, prefix=32, cache=4096, head_dim=128,
                   lora=(8192, 4096, 4096, 16), adapter=(8192, 4096, 64), copy_mib=1024),
    "smoke": dict(batches=(2, 1), hq=4, hkv=2, prefix=3, cache=100, head_dim=64,
                  lora=(64, 128, 96, 16), adapter=(64, 128, 16), copy_mib=8),
}  # fmt: skip


def copy_bandwidth(device: torch.device, mib: int, warmup: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), the achievable ceiling."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    rows = measure("cuda_copy", [("copy", "forward", lambda: dst.copy_(src), None)], f"{mib}MiB", torch.uint8,
                   device, warmup, repeats)  # fmt: skip
    return 2 * src.numel() / (rows[0].median_ms * 1e-3)


def _decode_rows(b: int, s: dict, device, dtype, warmup, repeats, copy_bps) -> list[Row]:
    hq, hkv, p, m, d = s["hq"], s["hkv"], s["prefix"], s["cache"], s["head_dim"]
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, hkv, m, d, device=device, dtype=dtype) for _ in range(2))
    pk_, pv_ = (torch.randn(hkv, p, d, device=device, dtype=dtype) for _ in range(2))
    keys = torch.cat([pk_.expand(b, -1, -1, -1), k], dim=2)
    values = torch.cat([pv_.expand(b, -1, -1, -1), v], dim=2)
    calls = {
        "ptpeft-cuda": lambda: pk.prefix_attention(q, k, v, pk_, pv_, backend="cuda"),
        "ptpeft-triton": lambda: pk.prefix_attention(q, k, v, pk_, pv_, backend="triton"),
        "sdpa-concat": lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True),
    }
    shape = f"B{b} Hq{hq} Hkv{hkv} N1 P{p} M{m} D{d}"
    with torch.no_grad():
        ref = calls["sdpa-concat"]()
        for name in ("ptpeft-cuda", "ptpeft-triton"):
            assert_same_function(calls[name](), ref)
        timed = [(name, "forward", fn, None) for name, fn in calls.items()]
        found = measure("cuda_decode", timed, shape, dtype, device, warmup, repeats)
    elem = torch.finfo(dtype).bits // 8
    must_read = (2 * b * hkv * m * d + 2 * hkv * p * d + b * hq * d) * elem
    for row in found:
        bps = must_read / (row.median_ms * 1e-3)
        row.extra = {
            "bytes_read": must_read,
            "GB_per_s": round(bps / 1e9, 1),
            "bandwidth_share": round(bps / copy_bps, 3),
        }
    print(f"\ndecode {shape} ({dtype}); copy bandwidth {copy_bps / 1e9:.0f} GB/s")
    print_table(found, baseline="sdpa-concat")
    return found


def bench_decode(s: dict, device, dtype, warmup, repeats, copy_bps) -> tuple[list[Row], list[tuple]]:
    rows, targets, shares = [], [], {}
    big = max(s["batches"])
    for b in s["batches"]:
        found = _decode_rows(b, s, device, dtype, warmup, repeats, copy_bps)
        t = {r.provider: r for r in found}
        shares[b] = t["ptpeft-cuda"].extra["bandwidth_share"]
        if b == big:
            targets.append((f"decode B={b} bandwidth share >= 0.70", shares[b], shares[b] >= 0.70))
            for other in ("sdpa-concat", "ptpeft-triton"):
                ratio = t["ptpeft-cuda"].median_ms / t[other].median_ms
                targets.append(
                    (f"decode B={b} faster than {other} (time ratio < 1)", round(ratio, 3), ratio < 1.0)
                )
        rows += found
    if 1 in shares and big != 1:
        floor = shares[big] / 1.5
        targets.append(
            (f"decode B=1 share within 1.5x of B={big}'s (>= {floor:.3f})", shares[1], shares[1] >= floor)
        )
    return rows, targets


def bench_lora(s: dict, device, dtype, warmup, repeats) -> tuple[list[Row], list[tuple]]:
    tokens, in_f, out_f, r = s["lora"]
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5  # frozen
    a = (torch.randn(r, in_f, device=device, dtype=dtype) / in_f**0.5).requires_grad_()
    b = torch.randn(out_f, r, device=device, dtype=dtype).requires_grad_()
    providers = {
        "base-cublas": (lambda: F.linear(x, w), [x]),
        "ptpeft-cuda": (lambda: pk.lora_linear(x, w, None, a, b, 2.0, backend="cuda"), [x, a, b]),
    }
    calls = []
    for name, (fn, inputs) in providers.items():
        for mode, call in modes_for(fn, inputs, ["forward", "backward"]).items():
            calls.append((name, mode, call, None))
    shape = f"T{tokens} in{in_f} out{out_f} r{r}"
    rows = measure("cuda_lora", calls, shape, dtype, device, warmup, repeats)
    print(f"\nlora {shape} ({dtype})")
    print_table(rows, baseline="base-cublas")
    targets = []
    for mode in ("forward", "backward"):
        t = {row.provider: row for row in rows if row.mode == mode}
        overhead = t["ptpeft-cuda"].median_ms / t["base-cublas"].median_ms - 1.0
        targets.append((f"lora r={r} {mode} overhead over the cuBLAS base GEMM <= 10 %", round(overhead, 3),
                        overhead <= 0.10))  # fmt: skip
    return rows, targets


def bench_adapter(s: dict, device, dtype, warmup, repeats) -> list[Row]:
    tokens, width, bottleneck = s["adapter"]
    x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
    wd = (torch.randn(bottleneck, width, device=device, dtype=dtype) / width**0.5).requires_grad_()
    wu = (torch.randn(width, bottleneck, device=device, dtype=dtype) / bottleneck**0.5).requires_grad_()
    bd = torch.zeros(bottleneck, device=device, dtype=dtype, requires_grad=True)
    bu = torch.zeros(width, device=device, dtype=dtype, requires_grad=True)
    calls = []
    for backend in ("cuda", "triton", "torch"):
        fn = lambda backend=backend: pk.adapter(x, wd, bd, wu, bu, backend=backend)
        for mode, call in modes_for(fn, [x, wd, bd, wu, bu], ["forward", "full"]).items():
            calls.append((f"ptpeft-{backend}", mode, call, None))
    shape = f"T{tokens} d{width} r{bottleneck}"
    rows = measure("cuda_adapter", calls, shape, dtype, device, warmup, repeats)
    print(f"\nadapter {shape} ({dtype})")
    print_table(rows, baseline="ptpeft-torch")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--what", nargs="+", default=["decode", "lora", "adapter"],
                        choices=["decode", "lora", "adapter"])  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: test the plumbing")
    parser.add_argument("--csv", type=Path, default=RESULTS_DIR / "cuda_ops.csv")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument(
        "--summary", type=Path, default=None, help="write the target verdicts here (markdown)"
    )
    args = parser.parse_args(argv)
    if "cuda" not in pk.available_backends():
        from ptpeft_kernels import backends

        print(f"the cuda backend cannot run here: {backends._machine_reason('cuda')}", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    s = SHAPES["smoke" if args.smoke else "target"]
    warmup, repeats = (1, 2) if args.smoke else (args.warmup, args.repeats)
    rows, targets = [], []
    if "decode" in args.what:
        copy_bps = copy_bandwidth(device, s["copy_mib"], warmup, repeats)
        found, t = bench_decode(s, device, dtype, warmup, repeats, copy_bps)
        rows, targets = rows + found, targets + t
    if "lora" in args.what:
        found, t = bench_lora(s, device, dtype, warmup, repeats)
        rows, targets = rows + found, targets + t
    if "adapter" in args.what:
        rows += bench_adapter(s, device, dtype, warmup, repeats)
    if rows and not args.no_csv:
        append_csv(rows, args.csv, device)
    lines = [f"TARGET {name}: {value} -> {'met' if ok else 'MISSED'}" for name, value, ok in targets]
    print("\n" + "\n".join(lines))
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        head = f"# cuda backend targets ({torch.cuda.get_device_name(device)}, {args.dtype})\n\n"
        body = "\n".join(f"- {name}: {value} — {'met' if ok else 'missed'}" for name, value, ok in targets)
        args.summary.write_text(head + body + ("\n" if body else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
