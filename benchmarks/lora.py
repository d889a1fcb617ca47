"""LoRA linear: our fused op against Hugging Face PEFT's LoRA ``Linear`` and the frozen base layer alone.

Providers:
  ptpeft-<backend>  ``pk.lora_linear`` (what ``pk.LoRALinear`` calls) on each backend this machine runs;
  peft              ``peft``'s LoRA layer (``get_peft_model`` on the same base weights);
  base-linear       the frozen ``nn.Linear`` alone: the floor a LoRA layer can approach.

The base weight is frozen (PEFT use); ``x`` requires grad, as it does inside a network.
Before timing (dropout off), each provider's output is checked against the float64 reference
of the function it computes; a provider that disagrees is reported, not timed. Without ``peft``
installed, its rows say so.

Sweeps (``--sweep``, one axis at a time around x (2048, IN), W 4096 x 4096, r 16):
  tokens 512 .. 16384; rank 8 / 16 / 64; IN x OUT of real models: 4096 x 4096 (LLaMA-7B attention),
  4096 x 11008 (LLaMA-7B MLP), 1536 x 8960 (Qwen2-VL-2B MLP).
``--quick``: tokens 512 and 2048, and rank 64 at 512, on 4096 x 4096.

Example: python benchmarks/lora.py --tokens 8 512 --features 1024 1024 --rank 16
         python benchmarks/lora.py --sweep --repeats 10
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import importlib.util
import math
from collections.abc import Callable

import torch
from torch import nn

import ptpeft_kernels as pk
from benchmarks.common import (
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

SWEEPS = {
    "full": (
        dict(tokens=2048, features="4096x4096", rank=16),
        {
            "tokens": [512, 1024, 2048, 4096, 8192, 16384],
            "rank": [8, 16, 64],
            "features": ["4096x4096", "4096x11008", "1536x8960"],
        },
    ),
    # rank 64 at 512 tokens, not 2048: the rank barely moves the cost, the tokens do (2 minutes budget)
    "quick": (dict(tokens=512, features="4096x4096", rank=16), {"tokens": [512, 2048], "rank": [16, 64]}),
}


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_layer(base: nn.Linear, rank: int, alpha: float, dropout: float) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    return peft.get_peft_model(_Holder(base), config).base_model.model.proj


def features_of(label: str) -> tuple[int, int]:
    fin, fout = (int(x) for x in label.split("x"))
    return fin, fout


def build_providers(
    leading: tuple[int, ...],
    fin: int,
    fout: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    alpha: float = 32.0,
    dropout: float = 0.0,
    bias: bool = False,
) -> tuple[dict[str, Provider], Callable[[str, torch.Tensor], str | None]]:
    """Every provider on x (*leading, IN); also check(name, output) against float64 (None with dropout)."""
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, bias=bias, device=device, dtype=dtype).requires_grad_(False)
    ours = pk.LoRALinear(base, r=rank, alpha=alpha, dropout=dropout).train()
    nn.init.normal_(ours.lora_B.weight, std=0.02)  # B = 0 would make LoRA's contribution trivially exact
    x = torch.randn(*leading, fin, device=device, dtype=dtype, requires_grad=True)
    lora_params = [ours.lora_A.weight, ours.lora_B.weight]

    providers: dict[str, Provider] = {}
    for backend in pk.available_backends():
        if backend == "torch" or device.type == "cuda":

            def fn(x, backend=backend):
                return pk.lora_linear(
                    x, base.weight, base.bias, *lora_params, ours.scaling, dropout_p=dropout, backend=backend
                )

            providers[f"ptpeft-{backend}"] = Provider(fn, (x,), [x, *lora_params])
    if importlib.util.find_spec("peft") is not None:
        theirs = peft_layer(nn.Linear(fin, fout, bias=bias, device=device, dtype=dtype), rank, alpha, dropout)
        with torch.no_grad():
            theirs.base_layer.weight.copy_(base.weight)
            if bias:
                theirs.base_layer.bias.copy_(base.bias)
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        theirs.train()
        peft_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight]
        providers["peft"] = Provider(theirs, (x,), [x, *peft_params])
    else:
        providers["peft"] = Provider(lambda x: None, skipped="peft is not installed")
    providers["base-linear"] = Provider(base, (x,), [x])

    weights = (base.weight, base.bias, *lora_params)
    with torch.no_grad():
        refs = {True: [], False: []}  # with LoRA / the base linear alone; float64, then same dtype
        for ref_dtype in (torch.float64, dtype):
            w, b, a, bb = (None if t is None else t.to(ref_dtype) for t in weights)
            xr = x.to(ref_dtype)
            refs[True].append(pk.lora_linear_ref(xr, w, b, a, bb, ours.scaling, upcast=False))
            refs[False].append(nn.functional.linear(xr, w, b))

    def check(name: str, out: torch.Tensor) -> str | None:
        if dropout:
            return None  # outputs are random: nothing to compare
        return provider_error(name, out, *refs[name != "base-linear"])

    return providers, check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="leading shape of x (default 8 512)"
    )
    parser.add_argument(
        "--features", type=int, nargs=2, default=None, metavar=("IN", "OUT"), help="1024 1024"
    )
    parser.add_argument("--rank", type=int, nargs="+", default=None, help="LoRA rank(s) (default 16)")
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--bias", action="store_true", help="give the base layer a bias")
    common_args(parser, "lora.csv")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    if args.sweep or args.quick:
        given = [f"--{n}" for n in ("tokens", "features", "rank") if getattr(args, n) is not None]
        if given:
            parser.error(f"--sweep / --quick set the shapes themselves; drop {given}")
        points = sweep_points(*SWEEPS["quick" if args.quick else "full"])
    else:
        features = "x".join(map(str, args.features or [1024, 1024]))
        points = product_points(
            {"tokens": [args.tokens or [8, 512]], "features": [features], "rank": args.rank or [16]}
        )
    for cfg, axes in points:
        leading = tuple(cfg["tokens"]) if isinstance(cfg["tokens"], list) else (cfg["tokens"],)
        fin, fout = features_of(cfg["features"])
        providers, check = build_providers(
            leading, fin, fout, cfg["rank"], device, dtype, args.alpha, args.dropout, args.bias
        )
        shape = f"x{leading + (fin,)} W{fout}x{fin} r{cfg['rank']}"
        params = {**cfg, "tokens": math.prod(leading), "in_features": fin, "out_features": fout}
        rows = run_providers(
            "lora", providers, check, args.modes, shape, dtype, device, args.warmup, args.repeats,
            extra=point_extra(params, axes),
        )  # fmt: skip
        print(f"LoRA linear, {shape}, {dtype}, {device}, W frozen")
        print_table(rows, baseline="peft")
        if not args.no_csv:
            append_csv(rows, args.csv, device)


if __name__ == "__main__":
    main()
