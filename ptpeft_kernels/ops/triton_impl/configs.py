"""Tile configurations of every Triton kernel: one list per shape class, its first entry the default.

A *shape class* is what decides which tiles can work at all: the operand width (16-bit types run
on tensor cores, float32 with IEEE products runs on FMA units and needs half-size tiles) and, for
attention, the head-dim bucket (``BLOCK_D`` <= 64, or 128). Autotuning times the class's list; with
``PTPEFT_AUTOTUNE=0`` every launch uses the class default instead, so one compile per kernel variant
serves a whole GPU validation run.

Every config compiles for the families it lists (80, 86, 90: ``arch_family``; a launch uses the list
of its device's family) within the shared-memory limit, and without register spills at the heaviest
flags (``python -m ptpeft_kernels.ops.triton_impl.compile_check`` checks it; the figures, and the
spills the full run finds at other flags and head dims, are in
``benchmarks/results/triton_resources.csv``). None is timed on a GPU yet: the lists are the usual
Ampere/Hopper flash-attention and GEMM tiles, cut to what fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

AUTOTUNE_ENV = "PTPEFT_AUTOTUNE"


def autotune_enabled() -> bool:
    """False when ``PTPEFT_AUTOTUNE=0``: launch each shape class's default config.

    Reads the switch through ``ptpeft_kernels._env`` where that module exists (one reader for
    every kernel); this fallback reads the variable the same way ("0" off, "1" or unset on).
    """
    try:
        from ..._env import autotune_enabled as shared
    except ImportError:
        return os.environ.get(AUTOTUNE_ENV, "").strip() != "0"
    return shared()


# The config families every config is compiled and resource-checked for (arch_family maps a GPU to
# one); a config that spills or overflows shared memory on one lists only the others. sm_80 (A100:
# mma.sync, operands in registers) and sm_90 (H100/H200: wgmma, operands from shared memory) differ
# enough that each has tiles the other cannot hold; 86 is sm_80's code with 99 KB of shared memory per
# block instead of 163 KB (RTX 30 / 40, A10, L4, L40S, and consumer Blackwell, sm_120).
ARCHS = (80, 86, 90)


@dataclass(frozen=True)
class Tiles:
    """One named kernel config: block sizes plus warps and pipeline stages, for ``archs``."""

    name: str
    blocks: dict = field(hash=False)
    num_warps: int
    num_stages: int
    archs: tuple[int, ...] = ARCHS

    def config(self) -> triton.Config:
        return triton.Config(dict(self.blocks), num_warps=self.num_warps, num_stages=self.num_stages)

    def launch_kwargs(self) -> dict:
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


def dtype_class(dtype: torch.dtype) -> str:
    """``"fp32"`` (FMA-unit products) or ``"16bit"`` (fp16 / bf16 on tensor cores)."""
    return "fp32" if dtype == torch.float32 else "16bit"


def head_class(block_d: int) -> int:
    """Head-dim bucket of the attention tiles: 64 (BLOCK_D 16, 32, 64) or 128."""
    return 64 if block_d <= 64 else 128


def _fwd(m: int, n: int, w: int, s: int, archs: tuple[int, ...] = ARCHS) -> Tiles:
    return Tiles(f"m{m}n{n}w{w}s{s}", {"BLOCK_M": m, "BLOCK_N": n}, w, s, archs)


def _bwd(m1: int, n1: int, m2: int, n2: int, w: int, s: int, archs: tuple[int, ...] = ARCHS) -> Tiles:
    blocks = {"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2}
    return Tiles(f"kv{m1}x{n1}-q{m2}x{n2}w{w}s{s}", blocks, w, s, archs)


def _dec(n: int, w: int, s: int, archs: tuple[int, ...] = ARCHS) -> Tiles:
    return Tiles(f"n{n}w{w}s{s}", {"BLOCK_N": n}, w, s, archs)


def _gemm(m: int, n: int, k: int, w: int, s: int, archs: tuple[int, ...] = ARCHS) -> Tiles:
    blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
    return Tiles(f"m{m}n{n}k{k}w{w}s{s}", blocks, w, s, archs)


# The tables below keep only configs that compile for their architectures without a register spill
# at the heaviest flags (causal + full mask), chosen by compiling candidates with compile_check's
# machinery (Triton 3.9, 2026-12-03). Rejected there, per class (spill stores, bytes per thread):
#   bf16 fwd D<=64 128x64 4 warps (20 B sm_80, 32 B sm_90); bf16 fwd D=128 128x64 8 warps and
#   64x64 on sm_80 (24 B, 12 B); bf16 bwd D<=64 on sm_80 every key tile wider than 16x32 (64-1476 B);
#   bf16 bwd D=128 kv32x64 / kv32x32 / kv16x64 4 warps (128-400 B); fp32 with IEEE products keeps whole
#   K-slices of both operands in registers, so 128x64 tiles at D=128 spilled 127 KB (sm_80) and needed
#   229,888 B of shared memory; TF32x3 was no better (255 registers and spills at 64x32, D=128).
# Register figures in the comments: sm_80 / sm_90.

# ----------------------------------------------------------------------------- attention forward
# (dtype class, head bucket) -> tiles, default first (per architecture: the first listed for it).
ATTN_FWD: dict[tuple[str, int], list[Tiles]] = {
    ("16bit", 64): [_fwd(128, 64, 8, 3),  # 195 / 171 registers
                    _fwd(64, 64, 4, 3), _fwd(128, 32, 4, 3), _fwd(64, 32, 4, 4)],
    ("16bit", 128): [_fwd(128, 64, 8, 3, (90,)),  # sm_90 225
                     _fwd(128, 32, 8, 3),  # 183 / 166: the sm_80 default
                     _fwd(64, 64, 4, 3, (90,)), _fwd(64, 32, 4, 3)],
    ("fp32", 64): [_fwd(32, 32, 8, 2),  # 75 / 116
                   _fwd(16, 64, 4, 2), _fwd(32, 32, 4, 2), _fwd(16, 32, 4, 2)],
    # Family 86: m32n32w8s1 spills 28 B at d80 and m16n32w8s2 4 B at d128 on sm_86; m16n32w4s1 is clean.
    ("fp32", 128): [_fwd(32, 32, 8, 1, (80, 90)),  # 210 / 198
                    _fwd(16, 32, 8, 2, (80, 90)), _fwd(16, 32, 4, 1)],
}  # fmt: skip

# ----------------------------------------------------------------------------- attention backward
# Key-tile programs (M1 x N1) want wide key tiles and short query steps, query-tile programs
# (M2 x N2) the reverse; one launch holds both, so one config sets both.
ATTN_BWD: dict[tuple[str, int], list[Tiles]] = {
    # Family 86 defaults (sm_86, 2026-12-03, every flag setting and head dim of the class): 16-bit D<=64
    # kv16x32-q32x16w4s3 and D=128 kv16x32-q32x16w4s2 compile clean where the other families' defaults
    # spill 4 B (d16, d80); fp32 D<=64 kv16x16-q16x16w4s2, where every other candidate spilled 32-156 B
    # at D=64 / 40 (it spills 24 B at d16 with a full mask); fp32 D=128 kv16x32-q32x16w4s1 (clean).
    ("16bit", 64): [_bwd(32, 64, 64, 32, 8, 3, (90,)),  # sm_90 228
                    _bwd(16, 32, 32, 16, 4, 2, (80, 90)),  # 216 / 220: the sm_80 default
                    _bwd(16, 64, 64, 16, 4, 3, (90,)), _bwd(32, 128, 128, 32, 8, 3, (90,)),
                    _bwd(16, 32, 32, 16, 4, 3, (80, 86))],
    ("16bit", 128): [_bwd(16, 64, 64, 16, 8, 2, (80, 90)),  # 243 / 254
                     _bwd(16, 32, 32, 16, 4, 2), _bwd(32, 64, 64, 32, 8, 1, (80, 86))],
    ("fp32", 64): [_bwd(32, 32, 32, 32, 8, 2, (80, 90)),  # 192 / 184
                   _bwd(16, 32, 32, 16, 8, 2, (90,)), _bwd(16, 32, 32, 16, 4, 2, (90,)),
                   _bwd(16, 64, 64, 16, 8, 2, (80,)), _bwd(16, 16, 16, 16, 4, 2, (86,))],
    ("fp32", 128): [_bwd(32, 32, 32, 32, 8, 1, (80, 90)),  # 166 / 164
                    _bwd(16, 32, 32, 16, 4, 1), _bwd(16, 16, 16, 16, 4, 1, (80, 90))],
}  # fmt: skip

# ----------------------------------------------------------------------------- small-N (decode) forward
# BLOCK_M is fixed at 16 rows (the GQA group's query rows packed together); the key tile varies.
DECODE_BLOCK_M = 16
ATTN_DECODE: dict[tuple[str, int], list[Tiles]] = {
    ("16bit", 64): [_dec(64, 4, 2),  # 128 / 101
                    _dec(128, 4, 3), _dec(32, 4, 3), _dec(64, 2, 3)],
    # Family 86 (99 KB): without a mask the key loops pipeline num_stages K/V buffers each, and every
    # config above needs 103-270 KB there (sm_86, 2026-12-03); two stages of 64 or 32 keys fit.
    ("16bit", 128): [_dec(64, 4, 3, (80, 90)),  # 128 / 110
                     _dec(128, 8, 3, (80, 90)), _dec(128, 4, 2, (80, 90)), _dec(32, 4, 4, (80,)),
                     _dec(64, 4, 2, (86,)), _dec(32, 4, 2, (86,))],
    ("fp32", 64): [_dec(32, 8, 2),  # 64 / 67
                   _dec(64, 8, 2), _dec(16, 4, 2), _dec(32, 4, 2)],
    ("fp32", 128): [_dec(32, 8, 2),  # 64 / 70
                    _dec(16, 8, 2), _dec(32, 4, 1), _dec(16, 4, 2, (90,))],
}  # fmt: skip
# Key-range splits are whole multiples of this many keys, so that every BLOCK_N above divides them
# and the split grid (and its partial-result buffers) does not depend on the config being timed.
DECODE_KEY_QUANTUM = 128

# ----------------------------------------------------------------------------- GEMM (LoRA, adapter)
# Large square tiles for the big GEMMs, narrow ones for the rank-r products (pruned by output width).
GEMM: dict[str, list[Tiles]] = {
    # 128x64 spills 160 B on sm_80 with the adapter's GELU-tanh epilogue (full compile_check, 2026-12-03).
    "16bit": [_gemm(128, 128, 64, 8, 3), _gemm(128, 64, 64, 4, 4, (86, 90)), _gemm(64, 128, 64, 4, 4),
              _gemm(64, 64, 64, 4, 3), _gemm(128, 32, 64, 4, 4), _gemm(64, 32, 128, 4, 3),
              _gemm(32, 32, 128, 4, 3)],
    "fp32": [_gemm(64, 64, 32, 4, 2), _gemm(128, 64, 32, 8, 2), _gemm(64, 32, 32, 4, 3),
             _gemm(32, 64, 32, 4, 3), _gemm(32, 32, 64, 4, 2)],
}  # fmt: skip


def gemm_fits(tiles: Tiles, m: int, n: int) -> bool:
    """A tile at most one power of two wider than the output (rank-r products have N = r <= 64)."""
    return tiles.blocks["BLOCK_N"] <= max(32, triton.next_power_of_2(n)) and tiles.blocks["BLOCK_M"] <= max(
        32, triton.next_power_of_2(m)
    )


def gemm_tiles(dtype: torch.dtype, m: int, n: int) -> list[Tiles]:
    """The GEMM tiles that fit an (m x n) output, default first (the largest that fits)."""
    kept = [t for t in GEMM[dtype_class(dtype)] if gemm_fits(t, m, n)]
    return kept or GEMM[dtype_class(dtype)][-1:]


def attention_tiles(table: dict, dtype: torch.dtype, block_d: int) -> list[Tiles]:
    return table[(dtype_class(dtype), head_class(block_d))]


def arch_family(capability: tuple[int, int]) -> int:
    """The config family of a compute capability, by the code Triton generates and the shared memory a
    block may use (the CUDA C++ Programming Guide's compute-capability table):

    - 90: Hopper and data-centre Blackwell (9.x, 10.x, 11.x; 227 KB);
    - 80: A100 and Jetson Orin (8.0, 8.7; 163 KB);
    - 86: the rest (8.6, 8.9, consumer Blackwell 12.x; 99 KB, Ampere-style mma.sync). Before this family
      existed, 8.6 / 8.9 took sm_80's tiles and 12.x sm_90's, some needing more shared memory than
      those GPUs have (Triton's autotuner skips such a config; with PTPEFT_AUTOTUNE=0 the launch failed).
    """
    capability = tuple(capability)
    if (9, 0) <= capability < (12, 0):
        return 90
    if capability in ((8, 0), (8, 7)):
        return 80
    return 86


def for_arch(tiles: list[Tiles], arch: int) -> list[Tiles]:
    return [t for t in tiles if arch in t.archs]


def to_use(tiles: list[Tiles], arch: int) -> list[Tiles]:
    """The configs a launch on ``arch`` may choose from: all of the class's configs for that
    architecture, or (``PTPEFT_AUTOTUNE=0``) its default, the first of them."""
    usable = for_arch(tiles, arch)
    return usable if autotune_enabled() else usable[:1]


# The backward's delta = rowsum(dO * O) pass is elementwise: 64 rows of O and dO per program.
PREP_BLOCK_M = 64
