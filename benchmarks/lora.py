"""LoRA linear: our fused layer against Hugging Face PEFT's LoRA ``Linear`` and the frozen base layer alone.

Providers:
  ptpeft-<backend>  ``pk.LoRALinear`` (the ``lora_linear`` op) on each backend this machine runs;
  peft              ``peft``'s LoRA layer (``get_peft_model`` on the same base weights);
  base-linear       the frozen ``nn.Linear`` alone: the floor a LoRA layer can approach.

The base weight is frozen (PEFT use); ``x`` requires grad, as it does inside a network.
Before timing (dropout off), each provider's output is checked against the float64 reference
of the function it computes. Without ``peft`` installed, its provider is left out (said so).

Example: python benchmarks/lora.py --tokens 8 512 --features 1024 1024 --rank 16
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import importlib.util

import torch
from torch import nn

import ptpeft_kernels as pk
from benchmarks.common import (
    append_csv,
    check_provider,
    common_args,
    measure,
    modes_for,
    print_table,
    setup,
)


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


def _check_providers(providers: dict, x: torch.Tensor, base: nn.Linear, ours: pk.LoRALinear) -> None:
    """Each provider against the float64 reference of its function (LoRA, or the base linear alone)."""
    weights = (base.weight, base.bias, ours.lora_A.weight, ours.lora_B.weight)
    with torch.no_grad():
        refs = {}
        for ref_dtype in (torch.float64, x.dtype):
            w, b, a, bb = (None if t is None else t.to(ref_dtype) for t in weights)
            xr = x.to(ref_dtype)
            lora = pk.lora_linear_ref(xr, w, b, a, bb, ours.scaling, upcast=False)
            refs.setdefault(True, []).append(lora)
            refs.setdefault(False, []).append(nn.functional.linear(xr, w, b))
        for name, (fn, _) in providers.items():
            check_provider(name, fn(), *refs[name != "base-linear"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 512], help="leading shape of x")
    parser.add_argument("--features", type=int, nargs=2, default=[1024, 1024], metavar=("IN", "OUT"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--bias", action="store_true", help="give the base layer a bias")
    common_args(parser, "lora.csv")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    fin, fout = args.features
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, bias=args.bias, device=device, dtype=dtype).requires_grad_(False)
    ours = pk.LoRALinear(base, r=args.rank, alpha=args.alpha, dropout=args.dropout)
    nn.init.normal_(ours.lora_B.weight, std=0.02)
    theirs = None
    if importlib.util.find_spec("peft") is not None:
        theirs = peft_layer(
            nn.Linear(fin, fout, bias=args.bias, device=device, dtype=dtype),
            args.rank,
            args.alpha,
            args.dropout,
        )
        with torch.no_grad():
            theirs.base_layer.weight.copy_(base.weight)
            if args.bias:
                theirs.base_layer.bias.copy_(base.bias)
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        theirs.train()
    else:
        print("peft is not installed: the peft provider is left out")
    ours.train()
    x = torch.randn(*args.tokens, fin, device=device, dtype=dtype, requires_grad=True)

    lora_params = [ours.lora_A.weight, ours.lora_B.weight]
    providers = {}
    for backend in pk.available_backends():
        if backend == "torch" or device.type == "cuda":
            providers[f"ptpeft-{backend}"] = (
                lambda backend=backend: pk.lora_linear(
                    x,
                    base.weight,
                    base.bias,
                    ours.lora_A.weight,
                    ours.lora_B.weight,
                    ours.scaling,
                    dropout_p=args.dropout,
                    backend=backend,
                ),
                [x, *lora_params],
            )
    if theirs is not None:
        peft_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight]
        providers["peft"] = (lambda: theirs(x), [x, *peft_params])
    providers["base-linear"] = (lambda: base(x), [x])
    if args.dropout == 0.0:
        _check_providers(providers, x, base, ours)

    shape = f"x{tuple(x.shape)} W{fout}x{fin} r{args.rank}"
    calls = [
        (name, mode, call, None)
        for name, (fn, inputs) in providers.items()
        for mode, call in modes_for(fn, inputs, args.modes).items()
    ]
    rows = measure("lora", calls, shape, dtype, device, args.warmup, args.repeats)
    print(f"LoRA linear, {shape}, {dtype}, {device}, W frozen")
    print_table(rows, baseline="peft")
    if not args.no_csv:
        append_csv(rows, args.csv, device)


if __name__ == "__main__":
    main()
