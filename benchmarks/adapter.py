"""Bottleneck adapter: our fused op against the unfused module (Linear, activation, Linear, residual add).

Providers:
  ptpeft-<backend>  ``pk.adapter`` (what ``pk.BottleneckAdapter`` calls) on each backend this machine runs;
  unfused           the adapter as adapter libraries (and PEFT-style bottleneck modules) write it:
                    ``x + s * up(act(down(x)))`` from two ``nn.Linear`` and the activation.

Before timing, each provider's output is checked against the float64 reference; a provider that
disagrees is reported, not timed.

Sweeps (``--sweep``, one axis at a time around x (2048, 4096), bottleneck 64, GELU):
  tokens 512 .. 16384; width 1536 (Qwen2-VL-2B) / 4096 (LLaMA-7B); bottleneck 16 / 64 / 256.
``--quick``: tokens 512 and 2048, and bottleneck 256 at 2048, width 4096.

Example: python benchmarks/adapter.py --tokens 8192 --width 4096 --bottleneck 64
         python benchmarks/adapter.py --sweep --repeats 10
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
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
from ptpeft_kernels.ops.activations import ACTIVATIONS, activate

SWEEPS = {
    "full": (
        dict(tokens=2048, width=4096, bottleneck=64),
        {"tokens": [512, 1024, 2048, 4096, 8192, 16384], "width": [1536, 4096], "bottleneck": [16, 64, 256]},
    ),
    "quick": (dict(tokens=2048, width=4096, bottleneck=64), {"tokens": [512, 2048], "bottleneck": [64, 256]}),
}


class UnfusedAdapter(nn.Module):
    """The adapter as adapter libraries write it: y = x + s * up(act(down(x)))."""

    def __init__(self, width: int, bottleneck: int, activation: str, scaling: float):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.activation, self.scaling = activation, scaling

    def forward(self, x):
        return x + self.scaling * self.up(activate(self.down(x), self.activation))


def build_providers(
    leading: tuple[int, ...],
    width: int,
    bottleneck: int,
    device: torch.device,
    dtype: torch.dtype,
    activation: str = "gelu",
    scaling: float = 1.0,
) -> tuple[dict[str, Provider], Callable[[str, torch.Tensor], str | None]]:
    """Every provider on x (*leading, width); also check(name, output) against float64."""
    torch.manual_seed(0)
    reference = UnfusedAdapter(width, bottleneck, activation, scaling).to(device, dtype)
    nn.init.normal_(reference.up.weight, std=0.02)
    ours = pk.BottleneckAdapter(width, bottleneck, activation, scaling, device=device, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(*leading, width, device=device, dtype=dtype, requires_grad=True)
    weights = (ours.down.weight, ours.down.bias, ours.up.weight, ours.up.bias)

    providers: dict[str, Provider] = {}
    for backend in pk.available_backends():
        if backend == "torch" or device.type == "cuda":

            def fn(x, backend=backend):
                return pk.adapter(x, *weights, activation=activation, scaling=scaling, backend=backend)

            providers[f"ptpeft-{backend}"] = Provider(fn, (x,), [x, *weights])
    providers["unfused"] = Provider(reference, (x,), [x, *reference.parameters()])
    with torch.no_grad():
        refs = [
            pk.adapter_ref(
                x.to(ref_dtype),
                *(t.to(ref_dtype) for t in weights),
                activation=activation,
                scaling=scaling,
                upcast=False,
            )
            for ref_dtype in (torch.float64, dtype)
        ]

    def check(name: str, out: torch.Tensor) -> str | None:
        return provider_error(name, out, *refs)

    return providers, check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=None, help="leading shape of x (default 8 512)"
    )
    parser.add_argument("--width", type=int, nargs="+", default=None, help="model width(s) (default 1024)")
    parser.add_argument("--bottleneck", type=int, nargs="+", default=None, help="bottleneck(s) (default 64)")
    parser.add_argument("--activation", default="gelu", choices=ACTIVATIONS)
    parser.add_argument("--scaling", type=float, default=1.0)
    common_args(parser, "adapter.csv")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    if args.sweep or args.quick:
        given = [f"--{n}" for n in ("tokens", "width", "bottleneck") if getattr(args, n) is not None]
        if given:
            parser.error(f"--sweep / --quick set the shapes themselves; drop {given}")
        points = sweep_points(*SWEEPS["quick" if args.quick else "full"])
    else:
        points = product_points(
            {
                "tokens": [args.tokens or [8, 512]],
                "width": args.width or [1024],
                "bottleneck": args.bottleneck or [64],
            }
        )
    for cfg, axes in points:
        leading = tuple(cfg["tokens"]) if isinstance(cfg["tokens"], list) else (cfg["tokens"],)
        providers, check = build_providers(
            leading, cfg["width"], cfg["bottleneck"], device, dtype, args.activation, args.scaling
        )
        shape = f"x{leading + (cfg['width'],)} bottleneck{cfg['bottleneck']} {args.activation}"
        params = {**cfg, "tokens": math.prod(leading), "activation": args.activation}
        rows = run_providers(
            "adapter", providers, check, args.modes, shape, dtype, device, args.warmup, args.repeats,
            extra=point_extra(params, axes),
        )  # fmt: skip
        print(f"bottleneck adapter, {shape}, {dtype}, {device}")
        print_table(rows, baseline="unfused")
        if not args.no_csv:
            append_csv(rows, args.csv, device)


if __name__ == "__main__":
    main()
