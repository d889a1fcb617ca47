"""Rewrite the README's performance block from the benchmark CSVs (and draw its figures).

Reads every benchmark CSV under ``benchmarks/results/`` (the CPU ones at the top, GPU suite folders
below it), picks for each benchmark and device kind the run to show — a ``--sweep`` run before a
``--quick`` run before any other, the latest within each kind; the real-shaped training step and the
built-in model's are separate — and writes, between the two markers in README.md: per run, its
device, date, command, git revision and versions, a table of every point (ours against each
baseline, time and peak memory, ratios), links to its figures (``plot.py``, redrawn here), and the
issue's targets with the measured figure, met / missed and by how much. Nothing in the block is
typed by hand; a target with no measurement says so.

Example: python benchmarks/report.py                 # rewrite README.md, redraw the PNGs
         python benchmarks/report.py --check         # exit 1 if README.md differs from the CSVs
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import csv
import os
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.csvruns import BenchRun, axis_groups, group_runs, param, read_rows
from benchmarks.plot import figure_name, plot_group

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = (
    "<!-- BEGIN benchmarks/report.py: generated from benchmarks/results; edit report.py, not this block -->"
)
END = "<!-- END benchmarks/report.py -->"
NEEDED_COLUMNS = {"benchmark", "provider", "mode", "shape", "median_ms", "timestamp", "device"}
OURS = ("ptpeft-cuda", "ptpeft-triton", "ptpeft-torch")  # the first one a run timed is "ours"


# ----------------------------------------------------------------------------- choosing runs


def benchmark_csvs(root: Path = RESULTS) -> list[Path]:
    """CSV files with benchmark rows (gpu_suite's verify.csv and the like have other columns)."""
    found = []
    for path in sorted(root.rglob("*.csv")):
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if set(header) >= NEEDED_COLUMNS:
            found.append(path)
    return found


def kind(run: BenchRun) -> str:
    """What a run measures; the training step's real-shaped and built-in runs are told apart."""
    if run.benchmark == "train_step":
        models = {r.get("model") or "builtin" for r in run.rows}
        return "train_step" if models == {"builtin"} else "train_step_real"
    return run.benchmark


def choose(runs: list[BenchRun]) -> dict[tuple[str, bool], BenchRun]:
    """{(kind, on a GPU): the run to show}: a --sweep run, else --quick, else any; the latest of those."""

    def rank(run: BenchRun) -> tuple[int, str]:
        words = run.command.split()
        return (2 if "--sweep" in words else 1 if "--quick" in words else 0, run.started)

    chosen: dict[tuple[str, bool], BenchRun] = {}
    for run in runs:
        key = (kind(run), run.on_gpu)
        if key not in chosen or rank(run) >= rank(chosen[key]):
            chosen[key] = run
    return chosen


# ----------------------------------------------------------------------------- cells


def ours(run: BenchRun) -> str | None:
    return next((p for p in OURS if any(r["provider"] == p and r.get("status", "ok") in ("", "ok")
                                        for r in run.rows)), None)  # fmt: skip


def _value(run: BenchRun, shape: str, provider: str | None, mode: str, column: str) -> float | None:
    if provider is None:
        return None
    row = run.row(shape, provider, mode)
    return None if row is None or row.get(column) in (None, "") else float(row[column])


def _missing(run: BenchRun, shape: str, provider: str | None, mode: str) -> str:
    status = None if provider is None else run.status(shape, provider, mode)
    return "-" if status is None else status.split(":")[0]


def figure(column: str, provider_of: Callable[[BenchRun], str | None], mode: str, fmt: str):
    """A cell: ``column`` of provider's row in ``mode`` (its status word when it was not timed)."""

    def cell(run: BenchRun, shape: str) -> str:
        provider = provider_of(run)
        value = _value(run, shape, provider, mode, column)
        return _missing(run, shape, provider, mode) if value is None else format(value, fmt)

    return cell


def ratio(column: str, top: Callable, bottom: Callable, mode: str):
    """A cell: top's ``column`` over bottom's, as ``0.72x``."""

    def cell(run: BenchRun, shape: str) -> str:
        a = _value(run, shape, top(run), mode, column)
        b = _value(run, shape, bottom(run), mode, column)
        return "-" if a is None or not b else f"{a / b:.2f}x"

    return cell


def named(provider: str) -> Callable[[BenchRun], str]:
    return lambda run: provider


def flex_mode(run: BenchRun) -> str:
    """FlexAttention's comparison mode: the training forward where it has one (GPU), else inference."""
    timed_forward = any(
        r["provider"] == "flex-attention" and r["mode"] == "forward" and r.get("status") == "ok"
        for r in run.rows
    )
    return "forward" if timed_forward else "inference"


def flex_cell(column: str, provider_of: Callable, fmt: str = ".1f"):
    def cell(run: BenchRun, shape: str) -> str:
        return figure(column, provider_of, flex_mode(run), fmt)(run, shape)

    return cell


def flex_ratio(run: BenchRun, shape: str) -> str:
    return ratio("median_ms", ours, named("flex-attention"), flex_mode(run))(run, shape)


def compile_cell(run: BenchRun, shape: str) -> str:
    row = run.row(shape, "flex-attention", flex_mode(run))
    return "-" if row is None or not row.get("compile_s") else f"{float(row['compile_s']):.1f}"


COLUMNS: dict[str, list[tuple[str, Callable]]] = {
    "attn": [
        ("ours fwd+bwd ms", figure("median_ms", ours, "full", ".1f")),
        ("PEFT path ms", figure("median_ms", named("peft-sdpa"), "full", ".1f")),
        ("vs PEFT", ratio("median_ms", ours, named("peft-sdpa"), "full")),
        ("ours MiB", figure("peak_mib", ours, "full", ".1f")),
        ("PEFT MiB", figure("peak_mib", named("peft-sdpa"), "full", ".1f")),
        ("vs PEFT", ratio("peak_mib", ours, named("peft-sdpa"), "full")),
        ("SDPA no prefix ms", figure("median_ms", named("sdpa-noprefix"), "full", ".1f")),
        ("vs ceiling", ratio("median_ms", ours, named("sdpa-noprefix"), "full")),
        ("flash-attn ms", figure("median_ms", named("flash-attn"), "full", ".1f")),
        ("ours fwd ms*", flex_cell("median_ms", ours)),
        ("Flex fwd ms*", flex_cell("median_ms", named("flex-attention"))),
        ("vs Flex", flex_ratio),
        ("Flex compile s", compile_cell),
    ],
    "lora": [
        ("ours fwd+bwd ms", figure("median_ms", ours, "full", ".1f")),
        ("PEFT ms", figure("median_ms", named("peft"), "full", ".1f")),
        ("vs PEFT", ratio("median_ms", ours, named("peft"), "full")),
        ("base Linear ms", figure("median_ms", named("base-linear"), "full", ".1f")),
        ("vs base", ratio("median_ms", ours, named("base-linear"), "full")),
        ("ours MiB", figure("peak_mib", ours, "full", ".1f")),
        ("PEFT MiB", figure("peak_mib", named("peft"), "full", ".1f")),
        ("vs PEFT", ratio("peak_mib", ours, named("peft"), "full")),
    ],
    "adapter": [
        ("ours fwd+bwd ms", figure("median_ms", ours, "full", ".1f")),
        ("unfused ms", figure("median_ms", named("unfused"), "full", ".1f")),
        ("vs unfused", ratio("median_ms", ours, named("unfused"), "full")),
        ("ours MiB", figure("peak_mib", ours, "full", ".1f")),
        ("unfused MiB", figure("peak_mib", named("unfused"), "full", ".1f")),
        ("vs unfused", ratio("peak_mib", ours, named("unfused"), "full")),
    ],
}
_STEP = [
    ("ptpeft-stage2", "stage 2 (prefix + LoRA)"),
    ("ptpeft-lora", "our LoRA"),
    ("peft-lora", "PEFT LoRA"),
]
COLUMNS["train_step"] = [
    *[(f"{label} ms", figure("median_ms", named(p), "full", ".1f")) for p, label in _STEP],
    ("stage 2 vs PEFT LoRA", ratio("median_ms", named("ptpeft-stage2"), named("peft-lora"), "full")),
    ("our LoRA vs PEFT LoRA", ratio("median_ms", named("ptpeft-lora"), named("peft-lora"), "full")),
    *[(f"{label} MiB", figure("peak_mib", named(p), "full", ".1f")) for p, label in _STEP],
]
COLUMNS["train_step_real"] = [
    *COLUMNS["train_step"][:3],
    ("PEFT prefix ms", figure("median_ms", named("peft-prefix"), "full", ".1f")),
    *COLUMNS["train_step"][3:],
    ("PEFT prefix MiB", figure("peak_mib", named("peft-prefix"), "full", ".1f")),
]
TITLES = {
    "attn": "Prefix attention (`benchmarks/attn.py`)",
    "lora": "LoRA linear (`benchmarks/lora.py`)",
    "adapter": "Bottleneck adapter (`benchmarks/adapter.py`)",
    "train_step_real": "Training step, real-shaped decoder layers (`benchmarks/train_step.py --shape ...`)",
    "train_step": "Training step, the built-in model (`benchmarks/train_step.py`)",
}
NOTES = {
    "attn": "fwd+bwd = forward and backward (mode `full`). *Forward compared with FlexAttention: "
    "without autograd (mode `inference`) where FlexAttention has no backward (the CPU), else the "
    "training forward. Flex compile s: its first call less the median (never in the timings; near "
    "zero when the inductor's on-disk cache already held that shape's kernel).",
    "train_step": "ms = one optimizer step (forward, backward, AdamW, zero_grad); MiB = its peak.",
}
NOTES["train_step_real"] = NOTES["train_step"]


# ----------------------------------------------------------------------------- targets


def verdict(ratios: list[tuple[str, float, float]]) -> tuple[str, str]:
    """(figure, verdict) over (where, measured ratio, bound): every ratio within its bound."""
    if not ratios:
        return "not measured", "not measured"
    cells = ", ".join(f"{where} {r:.2f}x" for where, r, _ in ratios)
    worst = max(ratios, key=lambda t: t[1] - t[2])
    where, r, bound = worst
    if r <= bound:
        return f"{cells}; closest: {where} {r:.3f}x vs <= {bound:.2f}x ({bound - r:.3f}x to spare)", "met"
    misses = [t for t in ratios if t[1] > t[2]]
    return (
        f"{cells}; worst: {where} {r:.3f}x vs <= {bound:.2f}x (over by {r - bound:.3f}x); "
        f"{len(misses)} of {len(ratios)} points miss",
        "missed",
    )


def _ratios(run, shapes, top, bottom, column, mode, bound_of) -> list[tuple[str, float, float]]:
    out = []
    for shape in shapes:
        a = _value(run, shape, top(run), mode, column)
        b = _value(run, shape, bottom(run), mode, column)
        if a is not None and b:
            out.append((shape, a / b, bound_of(shape)))
    return out


def _rows_on(run: BenchRun, axis: str) -> list[str]:
    """Shapes of the points on ``axis`` (every point when the run swept nothing or not that axis)."""
    on = [r["shape"] for r in run.rows if axis in (r.get("sweep") or "").split(",")]
    return list(dict.fromkeys(on)) or run.points()


def _first(run: BenchRun, shape: str) -> dict:
    return next(r for r in run.rows if r["shape"] == shape)


def _n_of(run: BenchRun, shape: str) -> int:
    row = _first(run, shape)
    if row.get("seq"):
        return int(param(row["seq"]))
    return int(next(w[1:] for w in shape.split() if w.startswith("N") and w[1:].isdigit()))


def attn_cpu_targets(run: BenchRun | None) -> list[tuple[str, str, str]]:
    names = [
        "fwd+bwd time <= 0.8x the PEFT path at every swept N >= 256 (<= 1.0x below)",
        "fwd+bwd peak memory <= 0.7x the PEFT path at every swept N >= 256 (<= 1.0x below)",
        "fwd+bwd within 1.15x of SDPA on the unprefixed sequence, at P = 16",
        "forward faster than compiled FlexAttention",
    ]
    if run is None:
        return [(n, "no CPU attention run", "not measured") for n in names]
    shapes = _rows_on(run, "seq")
    p16 = [s for s in shapes if "P16" in s.split()]

    def bound(time_bound):
        return lambda shape: time_bound if _n_of(run, shape) >= 256 else 1.0

    peft = named("peft-sdpa")
    checks = [
        _ratios(run, shapes, ours, peft, "median_ms", "full", bound(0.8)),
        _ratios(run, shapes, ours, peft, "peak_mib", "full", bound(0.7)),
        _ratios(run, p16, ours, named("sdpa-noprefix"), "median_ms", "full", lambda s: 1.15),
        _ratios(run, run.points(), ours, named("flex-attention"), "median_ms", flex_mode(run), lambda s: 1.0),
    ]
    swept_n = len({_n_of(run, s) for s in shapes}) > 1
    out = []
    for i, (name, ratios) in enumerate(zip(names, checks, strict=True)):
        figure_text, result = verdict(ratios)
        if i < 2 and not swept_n and ratios:  # "at every swept N": one N is not a sweep
            figure_text, result = f"{figure_text} (one N only: no N sweep in this run)", "not measured"
        out.append((name, figure_text, result))
    return out


def step_cpu_targets(run: BenchRun | None) -> list[tuple[str, str, str]]:
    names = [
        (
            "stage 2 (prefix + LoRA) step time <= 1.0x PEFT's LoRA-only step",
            "ptpeft-stage2",
            "median_ms",
            1.0,
        ),
        ("our LoRA step time <= 0.95x PEFT's LoRA step", "ptpeft-lora", "median_ms", 0.95),
        ("stage 2 step peak memory <= PEFT's LoRA step", "ptpeft-stage2", "peak_mib", 1.0),
        ("our LoRA step peak memory <= PEFT's LoRA step", "ptpeft-lora", "peak_mib", 1.0),
    ]
    where = "Qwen2-VL-2B-shaped layer, 640 tokens, float32: "
    if run is None:
        return [(where + n, "no CPU real-shaped step run", "not measured") for n, *_ in names]
    shapes = [
        s
        for s in run.points()
        if (row := _first(run, s)).get("model") == "qwen2-vl-2b"
        and row.get("seq") == "640"
        and row["dtype"] == "float32"
    ]
    out = []
    for name, provider, column, bound in names:
        ratios = _ratios(
            run, shapes, named(provider), named("peft-lora"), column, "full", lambda s, b=bound: b
        )
        out.append((where + name, *verdict(ratios)))
    return out


def gpu_targets(attn: BenchRun | None, lora: BenchRun | None) -> list[tuple[str, str, str]]:
    where = "bf16, D=128, N=4096: "
    out = []
    for name, baseline, bound in (
        ("attention fwd+bwd >= 1.5x faster than the PEFT path", "peft-sdpa", 1 / 1.5),
        ("attention fwd+bwd >= 0.9x of SDPA (flash) on the unprefixed sequence", "sdpa-noprefix", 1 / 0.9),
    ):
        shapes = [] if attn is None else [
            s for s in attn.points()
            if set(s.split()) >= {"N4096", "D128"} and _first(attn, s)["dtype"] == "bfloat16"
        ]  # fmt: skip
        ratios = [] if attn is None else _ratios(attn, shapes, ours, named(baseline), "median_ms", "full",
                                                 lambda s, b=bound: b)  # fmt: skip
        out.append((where + name, *verdict(ratios)))
    ratios = [] if lora is None else _ratios(
        lora, lora.points(), ours, named("base-linear"), "median_ms", "full", lambda s: 1.15
    )  # fmt: skip
    out.append(("LoRA fwd+bwd <= 1.15x the frozen base GEMM", *verdict(ratios)))
    return out


# ----------------------------------------------------------------------------- rendering


def run_header(run: BenchRun) -> str:
    first = run.rows[0]
    git = first.get("git") or "not recorded"
    run_id = f"run `{run.key}`" if first.get("run_id") else "no run id"
    text = (
        f"{run.device}, {', '.join(run.dtypes)}, {run.started[:10]} ({run_id}, git `{git}`); "
        f"`{first.get('command', '?')}`; {first.get('versions', '')}"
    )
    if "status" not in first:
        text += (
            ". Written before the harness recorded a status per row: its providers were not checked "
            "against float64 by this version of the scripts, and its PEFT path may predate the current one"
        )
    return text


def table(run: BenchRun, k: str) -> list[str]:
    columns = COLUMNS[k]
    lines = ["| shape | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for shape in run.points():
        lines.append(f"| {shape} | " + " | ".join(cell(run, shape) for _, cell in columns) + " |")
    return lines


def untimed_lines(run: BenchRun) -> list[str]:
    seen: dict[tuple[str, str], list[str]] = {}
    for r in run.rows:
        if r.get("status") not in (None, "", "ok"):
            seen.setdefault((r["provider"], r["status"]), []).append(r["mode"])
    return [
        f"- not timed: {p} ({', '.join(dict.fromkeys(modes))}): {status}"
        for (p, status), modes in seen.items()
    ]


def figures(run: BenchRun, plots: Path) -> list[tuple[str, Path, list]]:
    return [
        (f"{axis} {fixed or ''}".strip(), plots / figure_name(run, axis, fixed), (axis, fixed, rows))
        for axis, fixed, rows in axis_groups(run)
    ]


def section(run: BenchRun, k: str, draw: bool, plots: Path, base: Path) -> list[str]:
    lines = [f"**{TITLES[k]}** — {run_header(run)}", "", *table(run, k), ""]
    if k in NOTES:
        lines += [NOTES[k], ""]
    lines += untimed_lines(run)
    figs = figures(run, plots)
    if figs:
        links = []
        for label, path, (axis, fixed, rows) in figs:
            if draw:
                plot_group(run, axis, fixed, rows, plots)
            links.append(f"[{label}]({Path(os.path.relpath(path, base)).as_posix()})")
        lines += ["", "Figures (time and peak memory per provider): " + ", ".join(links)]
    return [*lines, ""]


def target_table(rows: list[tuple[str, str, str]]) -> list[str]:
    return [
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {n} | {f} | {v} |" for n, f, v in rows],
        "",
    ]


def render(draw: bool = True, root: Path = RESULTS, base: Path = ROOT) -> str:
    """The README block from the CSVs under ``root``; figures in ``root/plots`` (drawn when ``draw``),
    linked relative to ``base`` (the README's folder)."""
    plots = root / "plots"
    runs = group_runs(read_rows(benchmark_csvs(root)))
    chosen = choose(runs)
    lines = [
        BEGIN,
        "",
        "Generated by `python benchmarks/report.py` from the CSVs under `benchmarks/results/`; the "
        "figures are medians of interleaved runs, the ratios ours over the baseline (below 1 = ours "
        "faster / smaller). Every provider was checked against a float64 reference before it was "
        "timed; one that was not timed says why. Per benchmark the run shown is the latest `--sweep` "
        "run of that device kind, else the latest `--quick` run, else the latest run.",
        "",
        "To measure again (each appends to `benchmarks/results/<name>.csv`): `python benchmarks/attn.py "
        "--sweep`, `python benchmarks/lora.py --sweep`, `python benchmarks/adapter.py --sweep`, `python "
        "benchmarks/train_step.py --sweep` (real-shaped layers) and `python benchmarks/train_step.py` (the "
        "built-in model), then `python benchmarks/report.py` (rewrites this block, redraws "
        "`benchmarks/results/plots/`). `--quick` runs a representative subset of each in minutes; on a GPU "
        "add `--dtype bfloat16` (the sweeps there reach N = 16384), or run `benchmarks/gpu_suite.py`. "
        "`python benchmarks/plot.py CSV` draws any CSV's sweeps. Micro-benchmarks for regressions between "
        "commits: `python -m pytest benchmarks/ --benchmark-only --benchmark-autosave`, later "
        "`--benchmark-compare`.",
        "",
        "### CPU",
        "",
    ]
    for k in TITLES:
        run = chosen.get((k, False))
        lines += (
            section(run, k, draw, plots, base) if run else [f"**{TITLES[k]}** — no CPU run in the CSVs.", ""]
        )
    lines += ["Targets (CPU, measured side by side in the runs above):", ""]
    lines += target_table(attn_cpu_targets(chosen.get(("attn", False))) + step_cpu_targets(
        chosen.get(("train_step_real", False))))  # fmt: skip
    lines += ["### GPU", ""]
    gpu = [k for k in TITLES if (k, True) in chosen]
    if not gpu:
        lines += [
            "No GPU run in the CSVs yet (`benchmarks/gpu_suite.py`, or a script's `--sweep` on a GPU).",
            "",
        ]
    for k in gpu:
        lines += section(chosen[(k, True)], k, draw, plots, base)
    lines += ["Targets (GPU):", ""]
    lines += target_table(gpu_targets(chosen.get(("attn", True)), chosen.get(("lora", True))))
    lines.append(END)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"README.md must hold exactly one {BEGIN!r} ... {END!r} pair, in that order")
    head, rest = text.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder of the CSVs (benchmarks/results)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the README block is not what the CSVs give"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not redraw the PNGs")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = replace_block(
        text, render(not (args.check or args.no_plots), args.results, args.readme.resolve().parent)
    )
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    tmp = args.readme.with_name(args.readme.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, args.readme)
    print(f"rewrote the performance block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
