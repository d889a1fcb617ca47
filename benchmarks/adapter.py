"""Bottleneck adapter: our fused op against the unfused module (Linear, activation, Linear, residual add).

Before timing, each provider's output is checked against the float64 reference.

Example: python benchmarks/adapter.py --tokens 8192 --width 4096 --bottleneck 64
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse

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
from ptpeft_kernels.ops.activations import ACTIVATIONS, activate


class UnfusedAdapter(nn.Module):
    """The adapter as adapter libraries write it: y = x + s * up(act(down(x)))."""

    def __init__(self, width: int, bottleneck: int, activation: str, scaling: float):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.activation, self.scaling = activation, scaling

    def forward(self, x):
        return x + self.scaling * self.up(activate(self.down(x), self.activation))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 512], help="leading shape of x")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--bottleneck", type=int, default=64)
    parser.add_argument("--activation", default="gelu", choices=ACTIVATIONS)
    parser.add_argument("--scaling", type=float, default=1.0)
    common_args(parser, "adapter.csv")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    torch.manual_seed(0)
    reference = UnfusedAdapter(args.width, args.bottleneck, args.activation, args.scaling).to(device, dtype)
    nn.init.normal_(reference.up.weight, std=0.02)
    ours = pk.BottleneckAdapter(
        args.width, args.bottleneck, args.activation, args.scaling, device=device, dtype=dtype
    )
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(*args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)

    providers = {}
    for backend in pk.available_backends():
        if backend == "torch" or device.type == "cuda":
            providers[f"ptpeft-{backend}"] = (
                lambda backend=backend: pk.adapter(
                    x,
                    ours.down.weight,
                    ours.down.bias,
                    ours.up.weight,
                    ours.up.bias,
                    activation=args.activation,
                    scaling=args.scaling,
                    backend=backend,
                ),
                [x, *ours.parameters()],
            )
    providers["unfused"] = (lambda: reference(x), [x, *reference.parameters()])
    with torch.no_grad():
        weights = (ours.down.weight, ours.down.bias, ours.up.weight, ours.up.bias)
        refs = [
            pk.adapter_ref(
                x.to(ref_dtype),
                *(t.to(ref_dtype) for t in weights),
                activation=args.activation,
                scaling=args.scaling,
                upcast=False,
            )
            for ref_dtype in (torch.float64, dtype)
        ]
        for name, (fn, _) in providers.items():
            check_provider(name, fn(), *refs)

    shape = f"x{tuple(x.shape)} bottleneck{args.bottleneck} {args.activation}"
    calls = [
        (name, mode, call, None)
        for name, (fn, inputs) in providers.items()
        for mode, call in modes_for(fn, inputs, args.modes).items()
    ]
    rows = measure("adapter", calls, shape, dtype, device, args.warmup, args.repeats)
    print(f"bottleneck adapter, {shape}, {dtype}, {device}")
    print_table(rows, baseline="unfused")
    if not args.no_csv:
        append_csv(rows, args.csv, device)


if __name__ == "__main__":
    main()
