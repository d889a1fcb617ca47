"""compile_check's bookkeeping (the compiling itself runs as its own CI step: ``.ci/run``)."""

import csv

import pytest

from ptpeft_kernels.ops.triton_impl import compile_check as cc
from ptpeft_kernels.ops.triton_impl import configs
from ptpeft_kernels.ops.triton_impl._compile_target import SHARED_LIMIT, parse_ptxas

LOG_SM90 = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd_kernel
    368 bytes stack frame, 676 bytes spill stores, 884 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 368 bytes cumulative stack size
"""
LOG_SM80 = """ptxas info    : Function properties for _gemm_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 175 registers, used 1 barriers, 1024 bytes smem, 552 bytes cmem[0]
"""


def test_parse_ptxas_reports():
    u = parse_ptxas(LOG_SM90)
    assert (u.regs, u.spill_stores, u.spill_loads, u.stack_bytes, u.static_shared) == (255, 676, 884, 368, 0)
    u = parse_ptxas(LOG_SM80)
    assert (u.regs, u.spill_stores, u.static_shared) == (175, 0, 1024)
    assert parse_ptxas("ptxas info    : 0 bytes gmem") is None


def test_shared_memory_limits_are_the_opt_in_maxima():
    # CUDA C++ Programming Guide, technical specifications per compute capability.
    assert SHARED_LIMIT[80] == 166_912 and SHARED_LIMIT[90] == 232_448


def _row(**kw):
    base = dict(arch=80, kernel="attn_fwd", dtype="float32", head_dim=128, block_d=128, flags="causal mask2",
                tiles="m16n32w4s1", num_warps=4, num_stages=1, regs=200, spill_stores=0, spill_loads=0,
                stack_bytes=0, shared_bytes=1000, shared_limit=SHARED_LIMIT[80], compile_s=1.0, status="ok")
    return cc.Row(**{**base, **kw})


def test_problems_flag_shared_memory_spills_and_failures():
    assert cc.problems(_row(), 0) == []
    assert "limit 166912" in cc.problems(_row(shared_bytes=229_888), 0)[0]
    assert cc.problems(_row(shared_bytes=166_912), 0) == []
    assert "spills 464 B" in cc.problems(_row(spill_stores=464), 0)[0]
    assert cc.problems(_row(spill_stores=8), 8) == []
    assert cc.problems(_row(status="FAIL: boom"), 0) == ["FAIL: boom"]


@pytest.mark.parametrize("arch", configs.ARCHS)
@pytest.mark.parametrize("quick", [True, False])
def test_variants_cover_every_config_class(quick, arch):
    todo = cc.variants(quick, arch)
    seen = {(v.kernel, v.dtype, v.head_dim, v.tiles) for v in todo}
    for kernel, table in cc.ATTN_TABLES.items():
        for (dclass, bucket), tiles in table.items():
            dtype = "float32" if dclass == "fp32" else "bfloat16"
            listed = configs.for_arch(tiles, arch)
            assert listed, f"no {kernel} config for sm_{arch} {dclass} D<={bucket}"
            for t in listed if not quick else listed[:1]:
                assert (kernel, dtype, bucket, t.name) in seen
            if dclass == "16bit" and not quick:  # fp16 at the default config
                assert (kernel, "float16", bucket, listed[0].name) in seen
            elsewhere = {t.name for t in tiles if arch not in t.archs}
            compiled = {v.tiles for v in todo if v.kernel == kernel and _dclass(v.dtype) == dclass
                        and configs.head_class(cc._block_d(v.head_dim)) == bucket}  # fmt: skip
            assert not elsewhere & compiled, f"configs not listed for sm_{arch} compiled for it"
    for dclass, tiles in configs.GEMM.items():
        listed = configs.for_arch(tiles, arch)
        for t in listed if not quick else listed[:1]:
            assert ("gemm", "float32" if dclass == "fp32" else "bfloat16", 0, t.name) in seen
    if quick:  # the CI subset compiles the heaviest flags only
        assert {v.flags for v in todo if v.kernel in cc.ATTN_TABLES} == {cc.HEAVY_ATTN}


@pytest.mark.parametrize("target,family", [(86, 86), (89, 86), (120, 86), (80, 80), (90, 90)])
def test_a_compile_target_compiles_its_familys_configs(target, family):
    """sm_89 / sm_120 launch family 86's tiles (arch_family), so that is what they must compile."""
    compiled = {
        (v.kernel, _dclass(v.dtype), configs.head_class(cc._block_d(v.head_dim)), v.tiles)
        for v in cc.variants(False, target)
    }
    for kernel, table in cc.ATTN_TABLES.items():
        for (dclass, bucket), tiles in table.items():
            for t in tiles:
                got = (kernel, dclass, bucket, t.name) in compiled
                assert got == (family in t.archs), (kernel, dclass, bucket, t.name, target)
    assert SHARED_LIMIT[target] == {80: 163, 86: 99, 89: 99, 90: 227, 120: 99}[target] * 1024


@pytest.mark.parametrize("arch", configs.ARCHS)
def test_every_variant_of_the_full_run_names_its_tiles(arch):
    """The full run crashed at its last variant (keep_mask: dtype "-") before writing the table."""
    for v in cc.variants(False, arch):
        tiles = cc._tiles_of(v)
        assert (tiles is None) == (v.tiles == "-"), v
        assert tiles is None or tiles.name == v.tiles


def _dclass(dtype):
    return "fp32" if dtype == "float32" else "16bit"


def test_write_csv_replaces_only_the_compiled_architectures(tmp_path):
    path = tmp_path / "res.csv"
    cc.write_csv(path, [_row(arch=80), _row(arch=90, regs=100)])
    cc.write_csv(path, [_row(arch=90, regs=111)])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["arch"], r["regs"]) for r in rows) == [("80", "200"), ("90", "111")]
    assert not list(tmp_path.glob("*.tmp"))
