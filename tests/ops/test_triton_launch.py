"""How the Triton kernels are launched: on the tensors' device, with tuners per device, and with the
``PTPEFT_AUTOTUNE`` switch choosing between the class's configs and its named default."""

import contextlib
import importlib

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from ptpeft_kernels.ops.triton_impl import configs
from tests.helpers import CUDA, DEVICE, triton_marks

pytestmark = triton_marks()
COMMON = importlib.import_module("ptpeft_kernels.ops.triton_impl._common")
LAUNCHING_MODULES = [
    importlib.import_module(f"ptpeft_kernels.ops.triton_impl.{name}")
    for name in ("_common", "prefix_attention", "attention_decode", "lora")
]
ALL_KERNELS = {"_attn_fwd_kernel", "_bwd_prep_kernel", "_attn_bwd_kernel", "_attn_decode_kernel",
               "_decode_merge_kernel", "_gemm_kernel", "_keep_mask_kernel"}  # fmt: skip


def _exercise_every_kernel():
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()

    for n in (2, 20):  # the small-N kernel (and its merge), then the general one
        q, k, v, p = rnd(1, 2, n, 16), rnd(1, 1, 40, 16), rnd(1, 1, 40, 16), rnd(1, 3, 16)
        pk.prefix_attention(q, k, v, p, p, backend="triton").sum().backward()
    x, w, a, b = rnd(5, 16), rnd(8, 16), rnd(4, 16), rnd(8, 4)
    pk.lora_linear(x, w, None, a, b, 0.5, dropout_p=0.25, backend="triton").sum().backward()
    backends.get_impl("lora_linear", "triton", "dropout_mask")((5, 16), 0.25, 3, torch.device(DEVICE))


@pytest.mark.skipif(CUDA, reason="watches the interpreter's launches; the two-GPU test covers CUDA")
def test_every_launch_runs_under_a_guard_for_its_tensors_device(monkeypatch):
    active: list[torch.device] = []
    launches = []

    @contextlib.contextmanager
    def guard(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    for module in LAUNCHING_MODULES:
        if hasattr(module, "device_guard"):
            monkeypatch.setattr(module, "device_guard", guard)
    interp = importlib.import_module("triton.runtime.interpreter").InterpretedFunction
    real_run = interp.run

    def run(self, *args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        launches.append((self.fn.__name__, active[-1] if active else None, device))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(interp, "run", run)
    _exercise_every_kernel()
    assert {name for name, _, _ in launches} == ALL_KERNELS
    unguarded = [(name, guarded, device) for name, guarded, device in launches if guarded != device]
    assert not unguarded, f"launched outside a guard for the tensors' device: {unguarded}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu_launch_there():
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for n in (20, 24))
    want = pk.prefix_attention(q, k, k, backend="torch")
    got = pk.prefix_attention(q.to("cuda:1"), k.to("cuda:1"), k.to("cuda:1"), backend="triton")
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


def test_tuners_are_cached_per_device_not_per_name(monkeypatch):
    monkeypatch.setattr(COMMON, "_tuned_cache", {})
    kernel = importlib.import_module("ptpeft_kernels.ops.triton_impl.prefix_attention")._attn_fwd_kernel
    tiles = configs.ATTN_FWD[("16bit", 64)][:3]
    first = COMMON.autotuned(kernel, "attn_fwd", tiles, ["N_KEY"], torch.device("cuda", 0))
    assert COMMON.autotuned(kernel, "attn_fwd", tiles, ["N_KEY"], torch.device("cuda", 0)) is first
    assert COMMON.autotuned(kernel, "attn_fwd", tiles, ["N_KEY"], torch.device("cuda", 1)) is not first
    assert COMMON.autotuned(kernel, "attn_fwd", tiles[:2], ["N_KEY"], torch.device("cuda", 0)) is not first
    assert [c.kwargs for c in first.configs] == [t.blocks for t in tiles]


def test_every_shape_class_has_a_named_default_per_architecture():
    for table in (configs.ATTN_FWD, configs.ATTN_BWD, configs.ATTN_DECODE):
        assert set(table) == {(c, b) for c in ("16bit", "fp32") for b in (64, 128)}
        for tiles in table.values():
            assert len({t.name for t in tiles}) == len(tiles)
            assert all(configs.for_arch(tiles, arch) for arch in configs.ARCHS)
    # By code generation and shared memory per block: 163 KB, 99 KB (consumer GPUs), 227 KB.
    assert configs.arch_family((8, 0)) == configs.arch_family((8, 7)) == 80
    assert configs.arch_family((8, 6)) == configs.arch_family((8, 9)) == configs.arch_family((12, 0)) == 86
    assert configs.arch_family((9, 0)) == configs.arch_family((10, 0)) == 90
    for d, bucket in ((16, 64), (40, 64), (64, 64), (80, 128), (128, 128)):
        block_d = max(16, 1 << (d - 1).bit_length())
        got = configs.attention_tiles(configs.ATTN_FWD, torch.float32, block_d)
        assert got == configs.ATTN_FWD[("fp32", bucket)]
    assert configs.gemm_tiles(torch.bfloat16, 4096, 8)[0].blocks["BLOCK_N"] == 32  # rank-8 output: narrow
    assert configs.gemm_tiles(torch.bfloat16, 4096, 4096)[0] == configs.GEMM["16bit"][0]


@pytest.mark.parametrize("value,all_configs", [(None, True), ("1", True), ("0", False)])
def test_autotune_switch(monkeypatch, value, all_configs):
    if value is None:
        monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    else:
        monkeypatch.setenv(configs.AUTOTUNE_ENV, value)
    tiles = configs.ATTN_FWD[("16bit", 128)]
    for arch in configs.ARCHS:
        listed = configs.for_arch(tiles, arch)
        assert configs.to_use(tiles, arch) == (listed if all_configs else listed[:1])


@pytest.mark.skipif(CUDA, reason="on a GPU every test launch goes this way")
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_gpu_launch_path_pins_the_default_or_tunes_the_class(monkeypatch, autotune):
    """The launch a GPU takes, run by the interpreter: pinned, the class default launches directly;
    tuned, the per-device tuner gets the whole class (here it just runs its first config)."""
    monkeypatch.setenv(configs.AUTOTUNE_ENV, autotune)
    monkeypatch.setattr(COMMON, "use_autotune", lambda device: True)
    tuned = []

    def fake_autotuned(kernel, name, tiles, key, device, prune=None):
        tuned.append((name, [t.name for t in tiles], device))
        return _FirstConfig(kernel, tiles[0])

    monkeypatch.setattr(COMMON, "autotuned", fake_autotuned)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 24, 16, generator=gen)
    got = pk.prefix_attention(q, k, k, backend="triton")
    torch.testing.assert_close(got, pk.prefix_attention(q, k, k, backend="torch"), atol=2e-5, rtol=2e-5)
    class_tiles = [t.name for t in configs.for_arch(configs.ATTN_FWD[("fp32", 64)], 80)]  # the CPU's family
    assert tuned == ([] if autotune == "0" else [("attn_fwd", class_tiles, q.device)])


class _FirstConfig:
    def __init__(self, kernel, tiles):
        self.kernel, self.tiles = kernel, tiles

    def __getitem__(self, grid):
        return lambda *args, **meta: self.kernel[grid](*args, **meta, **self.tiles.launch_kwargs())
