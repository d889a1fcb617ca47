"""Compile (never launch) every launchable Triton kernel variant for sm_80 / 86 / 90 and check its resources.

    python -m ptpeft_kernels.ops.triton_impl.compile_check [--arch 80 86 90] [--quick] [--csv PATH] [--jobs N]

The CPU interpreter accepts code the GPU compiler rejects (dot shapes, layouts, shared memory)
and never shows register spills, and CI has no GPU. This compiles each variant with Triton's real
NVIDIA back end and ptxas (see ``_compile_target``), records registers, spill bytes, stack and
shared memory per variant, and exits non-zero when a variant fails to compile, needs more shared
memory than the architecture lets one block have, or spills more than ``--max-spill`` bytes.

An ``--arch`` is a compile target; it compiles the configs of its family (``configs.arch_family``:
``--arch 120`` compiles family 86's for sm_120 against sm_120's limit).

Variants: every (kernel, dtype class, head-dim bucket, tile config) listed for the architecture, at
the kernel's heaviest flags (causal with a full mask for attention; the LoRA output and the adapter
up-projection epilogues for the GEMM); at each class's default config also fp16, every other flag
setting the ops launch, and the head dims 16, 32, 40 and 80. ``--quick`` keeps each class's default
at the heaviest flags, bf16 standing for fp16: the CI subset. The full run writes
``benchmarks/results/triton_resources.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from . import configs as C
from ._compile_target import SHARED_LIMIT

DEFAULT_CSV = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "triton_resources.csv"
DEFAULT_MAX_SPILL = 0  # bytes of spill stores per thread a shipped config may have


@dataclass(frozen=True)
class Variant:
    kernel: str  # attn_fwd | attn_bwd | attn_decode | decode_merge | bwd_prep | gemm | keep_mask
    dtype: str  # float16 | bfloat16 | float32
    head_dim: int  # attention HEAD_D; 0 for the GEMM and the dropout mask
    flags: str  # attention: "causal mask2" etc.; GEMM: the launch it stands for
    tiles: str  # a configs.Tiles name, or "-" for kernels without a config table

    def __str__(self) -> str:
        return f"{self.kernel} {self.dtype} d{self.head_dim} [{self.flags}] {self.tiles}"


@dataclass
class Row:
    arch: int
    kernel: str
    dtype: str
    head_dim: int
    block_d: int
    flags: str
    tiles: str
    num_warps: int
    num_stages: int
    regs: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    shared_limit: int
    compile_s: float | None  # Triton + ptxas wall seconds; None when Triton's cache had the kernel
    status: str  # ok | FAIL: <why>


ATTN_FLAGS = {"causal mask2": (True, 2), "causal mask0": (True, 0), "causal mask1": (True, 1),
              "noncausal mask0": (False, 0)}  # fmt: skip
HEAVY_ATTN = "causal mask2"
GEMM_FLAGS = {
    "lora y": dict(HAS_EXTRA=True, HAS_BIAS=True),
    "lora h dropout": dict(DROP_A=True),
    "lora dx dropout": dict(HAS_EXTRA=True, DROP_EXTRA=True),
    "lora dA dropout split": dict(DROP_B=True, SPLIT_K=4),
    "lora dB+db split": dict(HAS_RSUM=True, SPLIT_K=2),
    "adapter up gelu_tanh": dict(ACT_A=2, HAS_BIAS=True, HAS_RES=True),
    "adapter dWu+dbu gelu": dict(ACT_B=1, HAS_RSUM=True),
    "adapter dh silu": dict(ACT_GRAD=4),
    "adapter dh relu": dict(ACT_GRAD=3),
}
ATTN_TABLES = {"attn_fwd": C.ATTN_FWD, "attn_bwd": C.ATTN_BWD, "attn_decode": C.ATTN_DECODE}
DTYPES = ("float16", "bfloat16", "float32")
QUICK_DTYPES = ("bfloat16", "float32")  # one per dtype class: fp16 compiles to the same tiles as bf16
BUCKET_DIMS = (16, 32, 64, 128)  # one head dim per BLOCK_D bucket ...
ODD_DIMS = (40, 80)  # ... and the non-power-of-two dims of common models (masked head-dim lanes)


def _block_d(head_dim: int) -> int:
    from ._attention_common import head_meta

    return head_meta(head_dim)["BLOCK_D"]


def _dclass(dtype: str) -> str:
    return "fp32" if dtype == "float32" else "16bit"


def _tiles_of(v: Variant):
    import torch

    if v.kernel not in ATTN_TABLES and v.kernel != "gemm":
        return None  # no config table (keep_mask's dtype is "-", not a torch dtype)
    dtype = getattr(torch, v.dtype)
    if v.kernel in ATTN_TABLES:
        block_d = _block_d(v.head_dim)
        options = C.attention_tiles(ATTN_TABLES[v.kernel], dtype, block_d)
    else:
        options = C.GEMM[C.dtype_class(dtype)]
    return next(t for t in options if t.name == v.tiles)


def variants(quick: bool, arch: int) -> list[Variant]:
    """The variants to compile for ``sm_<arch>`` (only the configs listed for that architecture's family).

    Full: every config at head dims 64 and 128 in bf16 and fp32 at the heaviest flags; at each
    class's default config also fp16, the other flag settings, and head dims 16, 32, 40, 80 (smaller
    or masked head-dim tiles of the same class). Quick (CI): each class's default at the heaviest flags.
    """
    family = C.arch_family((arch // 10, arch % 10))
    out: list[Variant] = []
    for kernel, table in ATTN_TABLES.items():
        for dtype in QUICK_DTYPES if quick else DTYPES:
            for d in (64, 128) if quick else BUCKET_DIMS + ODD_DIMS:
                tiles = C.for_arch(table[(_dclass(dtype), C.head_class(_block_d(d)))], family)
                for i, t in enumerate(tiles):
                    default = i == 0
                    every_config = d in (64, 128) and dtype != "float16"
                    if not default and (quick or not every_config):
                        continue
                    extra_flags = default and not quick and d in BUCKET_DIMS
                    flags = list(ATTN_FLAGS) if extra_flags else [HEAVY_ATTN]
                    out += [Variant(kernel, dtype, d, f, t.name) for f in flags]
    for dtype in QUICK_DTYPES if quick else DTYPES:
        for d in (64, 128) if quick else BUCKET_DIMS + ODD_DIMS:
            out.append(Variant("bwd_prep", dtype, d, "-", "-"))
            out.append(Variant("decode_merge", dtype, d, "-", "-"))
    heavy_gemm = ["lora y", "adapter up gelu_tanh"]
    for dtype in QUICK_DTYPES if quick else DTYPES:
        for i, t in enumerate(C.for_arch(C.GEMM[_dclass(dtype)], family)):
            if i > 0 and (quick or dtype == "float16"):
                continue
            for f in GEMM_FLAGS if i == 0 and not quick else heavy_gemm:
                out.append(Variant("gemm", dtype, 0, f, t.name))
    if not quick:
        out.append(Variant("keep_mask", "-", 0, "-", "-"))

    def first(v: Variant) -> int:  # every config of every class first, then the default's variations
        main = v.flags in (HEAVY_ATTN, "lora y", "adapter up gelu_tanh", "-") and v.dtype != "float16"
        return 0 if main and v.head_dim in (0, 64, 128) else 1

    return sorted(out, key=first)


def _build(v: Variant):
    """(jit kernel, positional args, keyword args) of a variant, on CPU tensors of a small shape."""
    import torch

    from . import attention_decode as AD
    from . import gemm as G
    from . import lora as L
    from . import prefix_attention as PA
    from ._attention_common import head_meta, mask_args, prefix_args

    tiles = _tiles_of(v)
    launch = tiles.launch_kwargs() if tiles is not None else {}
    if v.kernel == "keep_mask":
        out = torch.empty(64, 64, dtype=torch.int8)
        return L._keep_mask_kernel, (out, 64, 64, 2**40 + 3, 0.2), {"BLOCK_R": 32, "BLOCK_C": 32}
    dtype = getattr(torch, v.dtype)
    if v.kernel == "gemm":
        a, bm = torch.empty(256, 512, dtype=dtype), torch.empty(512, 256, dtype=dtype)
        c, bias = torch.empty(256, 256, dtype=dtype), torch.empty(256, dtype=dtype)
        a2, b2, rs = torch.empty(256, 16, dtype=dtype), torch.empty(16, 256, dtype=dtype), torch.empty(2, 256)
        gargs = (a, bm, c, 256, 256, 512, *a.stride(), *bm.stride(), 0, *c.stride(), a2, b2, 16,
                 *a2.stride(), *b2.stride(), 0.5, bias, c, *c.stride(), c, *c.stride(), rs, rs.stride(0),
                 1.0, 2**40 + 3, 0.1, 256, 256, 512)  # fmt: skip
        base = dict(ACT_A=0, ACT_B=0, ACT_GRAD=0, DROP_A=False, DROP_B=False, DROP_EXTRA=False,
                    HAS_EXTRA=False, HAS_BIAS=False, HAS_RES=False, HAS_RSUM=False, SPLIT_K=1, BLOCK_R=16,
                    UPCAST=False)  # fmt: skip
        return G._gemm_kernel, gargs, {**base, **GEMM_FLAGS[v.flags], **launch}

    d = v.head_dim
    b, hq, hkv, n, m = 2, 4, 2, 64, 80
    head = head_meta(d)
    q = torch.empty(b, hq, n, d, dtype=dtype)
    k = torch.empty(b, hkv, m, d, dtype=dtype)
    lse = torch.empty(b, hq, n)
    if v.kernel == "bwd_prep":
        return PA._bwd_prep_kernel, (q, q, lse, lse, lse, *q.stride(), *q.stride(), hq, n), {
            "BLOCK_M": C.PREP_BLOCK_M, **head}
    if v.kernel == "decode_merge":
        part = torch.empty(3, b * hq * n, d)
        return AD._decode_merge_kernel, (part, lse, q, lse, *q.stride(), hq, n, b * hq * n, 3), {
            "HEAD_D": d, "BLOCK_R": AD.MERGE_BLOCK_R, "BLOCK_D": head["BLOCK_D"]}
    causal, mode = ATTN_FLAGS[v.flags]
    prefix, pstr, p = prefix_args(torch.empty(hkv, 5, d, dtype=dtype), k)
    masks = {0: None, 1: torch.ones(b, m, dtype=torch.bool), 2: torch.ones(b, hq, n, m, dtype=torch.bool)}
    mt, mstr, mode = mask_args(masks[mode], q)
    out = torch.empty_like(q)
    meta = {**head, "CAUSAL": causal, "MASK_MODE": mode, "UPCAST": False, **launch}
    scale = 0.1
    if v.kernel == "attn_fwd":
        args = (q, k, k, prefix, prefix, mt, out, lse, *q.stride(), *k.stride(), *k.stride(), *pstr, *pstr,
                *mstr, *out.stride(), hq, n, m, p, hq // hkv, scale, 64, 128)  # fmt: skip
        return PA._attn_fwd_kernel, args, meta
    if v.kernel == "attn_decode":
        part = torch.empty(3, b * hq * n, d)
        args = (q, k, k, prefix, prefix, mt, out, lse, part, lse, *q.stride(), *k.stride(), *k.stride(),
                *pstr, *pstr, *mstr, *out.stride(), hq, hkv, n, m, p, hq // hkv, scale, 128, 1, b * hq * n,
                64, 128)  # fmt: skip
        return AD._attn_decode_kernel, args, {**meta, "SPLIT": True, "BLOCK_M": C.DECODE_BLOCK_M}
    dp = torch.empty(b, hkv, 5, d)
    args = (q, k, k, prefix, prefix, mt, out, lse, lse, q, k, k, dp, dp,
            *q.stride(), *k.stride(), *k.stride(), *pstr, *pstr, *mstr, *out.stride(), *q.stride(),
            *k.stride(), *k.stride(), *dp.stride(), *dp.stride(), hq, hkv, n, m, p, hq // hkv, scale, scale,
            64, 128)  # fmt: skip
    return PA._attn_bwd_kernel, args, meta


def compile_variant(v: Variant, arch: int) -> Row:
    from ._compile_target import compile_and_measure

    tiles = _tiles_of(v)
    block_d = _block_d(v.head_dim) if v.head_dim else 0
    warps = tiles.num_warps if tiles else 4
    stages = tiles.num_stages if tiles else 3
    limit = SHARED_LIMIT[arch]
    try:
        kernel, args, kwargs = _build(v)
        compiled, usage, seconds = compile_and_measure(kernel, args, kwargs, arch)
        warps, stages = compiled.metadata.num_warps, compiled.metadata.num_stages
        shared = compiled.metadata.shared + usage.static_shared
        return Row(arch, v.kernel, v.dtype, v.head_dim, block_d, v.flags, v.tiles, warps, stages, usage.regs,
                   usage.spill_stores, usage.spill_loads, usage.stack_bytes, shared, limit,
                   None if seconds is None else round(seconds, 1), "ok")  # fmt: skip
    except Exception as exc:  # report every failure, keep going
        why = " ".join(repr(exc).split())[:300]
        return Row(arch, v.kernel, v.dtype, v.head_dim, block_d, v.flags, v.tiles, warps, stages,
                   -1, -1, -1, -1, -1, limit, None, f"FAIL: {why}")  # fmt: skip


def problems(row: Row, max_spill: int) -> list[str]:
    """Why a compiled variant cannot ship: failed, over the shared-memory limit, or spilling."""
    if row.status != "ok":
        return [row.status]
    found = []
    if row.shared_bytes > row.shared_limit:
        found.append(f"shared memory {row.shared_bytes} B > sm_{row.arch} limit {row.shared_limit} B")
    if row.spill_stores > max_spill:
        found.append(f"spills {row.spill_stores} B of stores per thread (bound {max_spill} B)")
    return found


def _worker_init(arch: int) -> None:
    from ._compile_target import use_target

    use_target(arch)


def run(todo: dict[int, list[Variant]], jobs: int, max_spill: int, on_row=None) -> tuple[list[Row], list]:
    """Compile ``todo[arch]`` for each architecture; ``on_row(rows)`` after each variant.

    One worker process per architecture at least: Triton keeps compiled kernels per device with the
    target it first saw, so a process must never switch targets. The architectures' variants are
    interleaved, so that a run cut short has rows of both.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no driver state inherited
    per_arch = max(1, jobs // len(todo))
    pools = {arch: ProcessPoolExecutor(per_arch, mp_context=ctx, initializer=_worker_init, initargs=(arch,))
             for arch in todo}  # fmt: skip
    tasks = [t for group in itertools.zip_longest(*[[(v, a) for v in vs] for a, vs in todo.items()])
             for t in group if t is not None]  # fmt: skip
    rows: list[Row] = []
    failures: list[str] = []
    try:
        futures = [pools[arch].submit(compile_variant, v, arch) for v, arch in tasks]
        for future in futures:
            rows.append(_report(future.result(), max_spill, failures))
            if on_row is not None:
                on_row(rows)
    finally:
        for pool in pools.values():
            pool.shutdown(cancel_futures=True)
    return rows, failures


def _report(row: Row, max_spill: int, failures: list[str]) -> Row:
    bad = problems(row, max_spill)
    name = f"sm_{row.arch} {row.kernel} {row.dtype} d{row.head_dim} [{row.flags}] {row.tiles}"
    if bad:
        failures.append(f"{name}: {'; '.join(bad)}")
    took = "cached" if row.compile_s is None else f"{row.compile_s}s"
    figures = (f"regs={row.regs} spill={row.spill_stores} stack={row.stack_bytes} shared={row.shared_bytes} "
               f"{took}" if row.status == "ok" else row.status)  # fmt: skip
    print(("FAIL " if bad else "ok   ") + name + "  " + figures, flush=True)
    return row


def headline(rows: list[Row]) -> list[str]:
    """Per (arch, kernel, dtype class, head-dim bucket): max registers, max spill stores, max shared."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.status == "ok":
            cls = "fp32" if r.dtype == "float32" else ("-" if r.dtype == "-" else "16bit")
            groups.setdefault((r.arch, r.kernel, cls, r.block_d), []).append(r)
    lines = []
    for (arch, kernel, cls, bd), rs in sorted(groups.items()):
        regs, spill = max(r.regs for r in rs), max(r.spill_stores for r in rs)
        shared = max(r.shared_bytes for r in rs)
        lines.append(f"sm_{arch} {kernel:12s} {cls:5s} D<={bd:<3d} variants={len(rs):3d} "
                     f"max regs={regs:3d} max spill={spill:5d} B max shared={shared:6d} B")  # fmt: skip
    return lines


def write_csv(path: Path, rows: list[Row]) -> None:
    """Replace ``path``'s rows of the compiled architectures (atomically: temp file + rename)."""
    import triton

    names = [f.name for f in fields(Row)] + ["triton", "date"]
    archs = {r.arch for r in rows}
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["arch"]) not in archs]
    stamp = {"triton": triton.__version__, "date": datetime.date.today().isoformat()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows({**asdict(r), **stamp} for r in rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(C.ARCHS),
                        help="compile targets, compute capability x 10 (each compiles its family's "
                        "configs)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the default config per class (CI subset)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="where to write the table (default: benchmarks/results/triton_resources.csv "
                        "for a full run, none for --quick)")  # fmt: skip
    parser.add_argument("--max-spill", type=int, default=DEFAULT_MAX_SPILL, help="spill-store bytes allowed")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--only", default="", help="compile only variants whose name contains this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter never compiles", file=sys.stderr)
        return 2
    unknown = [a for a in args.arch if a not in SHARED_LIMIT]
    if unknown:
        print(f"no shared-memory limit known for {unknown}; known: {sorted(SHARED_LIMIT)}", file=sys.stderr)
        return 2
    todo = {arch: [v for v in variants(args.quick, arch) if args.only in str(v)] for arch in args.arch}
    print("compiling " + ", ".join(f"{len(v)} variants for sm_{a}" for a, v in todo.items()), flush=True)
    csv_path = args.csv if args.csv is not None else (None if args.quick or args.only else DEFAULT_CSV)
    save = None if csv_path is None else lambda rows: write_csv(csv_path, rows)
    rows, failures = run(todo, args.jobs, args.max_spill, on_row=save)
    print("\n".join(headline(rows)))
    if csv_path is not None:
        print(f"wrote {csv_path}")
    print(f"{len(rows) - len(failures)} ok, {len(failures)} failed")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
