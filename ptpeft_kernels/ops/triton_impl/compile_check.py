"""Compile (never launch) every Triton kernel variant for a GPU architecture, on any machine.

    python -m ptpeft_kernels.ops.triton_impl.compile_check [--arch 90] [--quick]

The CPU interpreter accepts code that the GPU compiler rejects (dot shapes, layouts, shared
memory), and CI has no GPU. This runs Triton's real front end, its NVIDIA lowering and ptxas
(bundled with the Triton wheel) for ``sm_<arch>`` through a stand-in driver that only names the
target, so no CUDA device or driver is needed. It prints one line per variant with the shared
memory it needs and exits non-zero if any failed. Last run (Triton 3.9, CPU-only machine): all
78 variants compile for sm_90 and sm_80. Uses Triton internals (the driver class, ``warmup``),
so it may need adjusting for other Triton releases. Not a test: the full set takes minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _fake_driver(arch: int):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class TargetOnlyDriver(CudaDriver):
        def __init__(self):  # no CUDA library is loaded
            pass

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    return TargetOnlyDriver()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100)")
    parser.add_argument("--quick", action="store_true", help="one tile config per kernel variant")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter never compiles", file=sys.stderr)
        return 2

    import torch
    from triton.runtime.driver import driver

    driver.set_active(_fake_driver(args.arch))
    from . import gemm as G
    from . import lora as L
    from . import prefix_attention as PA

    results: list[tuple[str, bool, str]] = []

    def warm(kernel, kargs, kwargs, name):
        start = time.time()
        try:
            compiled = kernel.warmup(*kargs, grid=(1,), **kwargs)
            results.append((name, True, f"{time.time() - start:.1f}s shared={compiled.metadata.shared}"))
        except Exception as exc:  # report every failure, keep going
            results.append((name, False, repr(exc)[:2000]))
        print(("ok   " if results[-1][1] else "FAIL ") + name + "  " + results[-1][2], flush=True)

    def attention(dtype, d, causal, mode, fwd, bwd):
        b, hq, hkv, n, m, p = 2, 4, 2, 64, 80, 5
        q = torch.empty(b, hq, n, d, dtype=dtype)
        k = torch.empty(b, hkv, m, d, dtype=dtype)
        prefix, pstr, p = PA._prefix_args(torch.empty(hkv, p, d, dtype=dtype), k)
        mask = {0: None, 1: torch.ones(b, m, dtype=torch.bool), 2: torch.ones(b, hq, n, m, dtype=torch.bool)}
        mt, mstr, mode = PA._mask_args(mask[mode], q)
        out, lse = torch.empty_like(q), torch.empty(b, hq, n)
        meta = {**PA._head_meta(d), "CAUSAL": causal, "MASK_MODE": mode, "UPCAST": False}
        tag = f"{dtype} d{d} causal={causal} mask={mode}"
        fargs = (q, k, k, prefix, prefix, mt, out, lse, *q.stride(), *k.stride(), *k.stride(), *pstr, *pstr,
                 *mstr, *out.stride(), hq, n, m, p, hq // hkv, 0.1, 64, 128)  # fmt: skip
        kw = {**meta, **fwd.kwargs, "num_warps": fwd.num_warps, "num_stages": fwd.num_stages}
        warm(PA._attn_fwd_kernel, fargs, kw, f"attn fwd {tag} {fwd}")
        dp = torch.empty(b, hkv, p, d)
        bargs = (q, k, k, prefix, prefix, mt, out, lse, lse, q, k, k, dp, dp,
                 *q.stride(), *k.stride(), *k.stride(), *pstr, *pstr, *mstr, *out.stride(), *q.stride(),
                 *k.stride(), *k.stride(), *dp.stride(), *dp.stride(), hq, hkv, n, m, p, hq // hkv, 0.1, 0.1,
                 64, 128)  # fmt: skip
        kw = {**meta, **bwd.kwargs, "num_warps": bwd.num_warps, "num_stages": bwd.num_stages}
        warm(PA._attn_bwd_kernel, bargs, kw, f"attn bwd {tag} {bwd}")

    fwd_cfgs, bwd_cfgs = PA._fwd_configs(), PA._bwd_configs()
    pairs = list(zip(fwd_cfgs, bwd_cfgs + bwd_cfgs[:1] * (len(fwd_cfgs) - len(bwd_cfgs)), strict=True))
    for dtype, d, causal, mode in [
        (torch.bfloat16, 128, True, 0),
        (torch.float16, 64, False, 2),
        (torch.float32, 40, True, 1),
        (torch.bfloat16, 80, True, 1),
    ]:
        for fwd, bwd in pairs[:1] if args.quick or dtype == torch.float32 else pairs:
            attention(dtype, d, causal, mode, fwd, bwd)
    for d in (128, 40):
        q, lse = torch.empty(2, 4, 64, d, dtype=torch.bfloat16), torch.empty(2, 4, 64)
        warm(PA._bwd_prep_kernel, (q, q, lse, lse, lse, *q.stride(), *q.stride(), 4, 64),
             {"BLOCK_M": 64, **PA._head_meta(d)}, f"attn bwd prep d{d}")  # fmt: skip

    base = dict(ACT_A=0, ACT_B=0, ACT_GRAD=0, DROP_A=False, DROP_B=False, DROP_EXTRA=False,
                HAS_EXTRA=False, HAS_BIAS=False, HAS_RES=False, HAS_RSUM=False, SPLIT_K=1, BLOCK_R=16,
                UPCAST=False)  # fmt: skip
    variants = {
        "lora h": dict(DROP_A=True),
        "lora y": dict(HAS_EXTRA=True, HAS_BIAS=True),
        "lora dx dropout": dict(HAS_EXTRA=True, DROP_EXTRA=True),
        "lora dA": dict(DROP_B=True, SPLIT_K=4),
        "lora dB+db": dict(HAS_RSUM=True, SPLIT_K=2),
        "adapter up": dict(ACT_A=2, HAS_BIAS=True, HAS_RES=True),
        "adapter dWu+dbu": dict(ACT_B=1, HAS_RSUM=True),
        "adapter dh silu": dict(ACT_GRAD=4),
        "adapter dh relu": dict(ACT_GRAD=3),
    }
    configs = G._configs()
    for dtype in (torch.bfloat16, torch.float32):
        a, bm = torch.empty(256, 512, dtype=dtype), torch.empty(512, 256, dtype=dtype)
        c, bias = torch.empty(256, 256, dtype=dtype), torch.empty(256, dtype=dtype)
        a2, b2, rs = torch.empty(256, 16, dtype=dtype), torch.empty(16, 256, dtype=dtype), torch.empty(2, 256)
        gargs = (a, bm, c, 256, 256, 512, *a.stride(), *bm.stride(), 0, *c.stride(), a2, b2, 16,
                 *a2.stride(), *b2.stride(), 0.5, bias, c, *c.stride(), c, *c.stride(), rs, rs.stride(0),
                 1.0, 2**40 + 3, 0.1, 256, 256, 512)  # fmt: skip
        for name, flags in variants.items():
            every = dtype == torch.bfloat16 and name == "lora y" and not args.quick
            for cfg in configs if every else configs[:1] + configs[-1:]:
                kw = {**base, **flags, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                warm(G._gemm_kernel, gargs, kw, f"gemm {name} {dtype} {cfg}")
    mask_out = torch.empty(64, 64, dtype=torch.int8)
    mask_args = (mask_out, 64, 64, 2**40 + 3, 0.2)
    warm(L._keep_mask_kernel, mask_args, {"BLOCK_R": 32, "BLOCK_C": 32}, "dropout mask")

    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} compiled, {len(failed)} failed (sm_{args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
