"""Time and peak memory against each swept dimension, one line per provider: one PNG per figure.

For every run in the CSVs (by default the latest run of each benchmark on each device) and every
swept axis of it, a figure with two rows (median time with its p20-p80 band; peak memory) and one
column per mode. Logarithmic axes where the values span more than 8x. Providers that were not
timed at a point (wrong, unsupported, skipped) have no marker there; the legend names them.

Example: python benchmarks/plot.py benchmarks/results/attn.csv
         python benchmarks/plot.py benchmarks/results/*.csv --out /tmp/plots --all-runs
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/<name>.py`: make the repository root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
from pathlib import Path

from benchmarks.csvruns import BenchRun, axis_groups, device_slug, group_runs, param, read_rows, slug, timed

PLOTS_DIR = Path(__file__).resolve().parent / "results" / "plots"
MODE_ORDER = ("inference", "forward", "backward", "full")
AXIS_LABELS = {
    "seq": "sequence length N",
    "prefix": "prefix length P",
    "head_dim": "head dim D",
    "gqa": "GQA ratio Hq/Hkv",
    "mask": "mask",
    "tokens": "tokens",
    "rank": "LoRA rank",
    "features": "IN x OUT",
    "width": "width",
    "bottleneck": "bottleneck",
    "batch": "batch",
    "shape": "model shape",
}


def figure_name(run: BenchRun, axis: str, fixed: dict) -> str:
    """A stable file name: benchmark, axis, device, dtype (and the fixed values of a product run)."""
    parts = [run.benchmark, axis, device_slug(run.device), "-".join(run.dtypes)]
    parts += [f"{k}{v}" for k, v in fixed.items()]
    return slug("_".join(parts)).replace("-", "_") + ".png"


def _wide(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > 8


def plot_group(run: BenchRun, axis: str, fixed: dict, rows: list[dict], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
    xs_raw = list(dict.fromkeys(r.get(axis, "") for r in rows))
    numeric = all(isinstance(param(x), float) for x in xs_raw)
    xs_sorted = sorted(xs_raw, key=lambda x: param(x) if numeric else xs_raw.index(x))
    position = {x: (param(x) if numeric else i) for i, x in enumerate(xs_sorted)}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}  # one color per provider in every panel
    fig, grid = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 6.5), squeeze=False)
    for col, mode in enumerate(modes):
        for metric_row, (metric, label) in enumerate((("median_ms", "median ms"), ("peak_mib", "peak MiB"))):
            ax = grid[metric_row][col]
            values = []
            for provider in providers:
                pts = sorted(
                    (position[r.get(axis, "")], float(r[metric]), r)
                    for r in rows
                    if r["provider"] == provider and r["mode"] == mode and timed(r)
                )
                if not pts:
                    continue
                x, y = [p[0] for p in pts], [p[1] for p in pts]
                values += y
                ax.plot(x, y, marker="o", label=provider, color=colors[provider])
                if metric == "median_ms":
                    low, high = [float(p[2]["p20_ms"]) for p in pts], [float(p[2]["p80_ms"]) for p in pts]
                    ax.fill_between(x, low, high, alpha=0.2, color=colors[provider])
            if numeric and _wide([position[x] for x in xs_sorted]):
                ax.set_xscale("log", base=2)
            if _wide(values):
                ax.set_yscale("log")
            ax.set_xticks([position[x] for x in xs_sorted], [str(x) for x in xs_sorted])
            ax.set_xlabel(AXIS_LABELS.get(axis, axis))
            ax.set_ylabel(label)
            ax.set_title(mode if metric_row == 0 else "")
            ax.grid(True, alpha=0.3)
    untimed: dict[str, set[str]] = {}  # "provider status-kind" -> modes
    for r in rows:
        if not timed(r):
            untimed.setdefault(f"{r['provider']} {r['status'].split(':')[0]}", set()).add(r["mode"])
    handles, labels = grid[0][0].get_legend_handles_labels()
    for ax in grid.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5))
    title = f"{run.benchmark}: {AXIS_LABELS.get(axis, axis)} sweep, {run.device}, {', '.join(run.dtypes)}"
    if fixed:
        title += " (" + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ")"
    title += f"\nrun {run.key}, {run.started}"
    if untimed:
        cells = [f"{what} ({', '.join(m for m in MODE_ORDER if m in ms)})" for what, ms in untimed.items()]
        title += "\nnot timed: " + "; ".join(cells)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.92))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / figure_name(run, axis, fixed)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_run(run: BenchRun, out_dir: Path) -> list[Path]:
    """Every figure of ``run`` (none when it swept nothing)."""
    return [plot_group(run, axis, fixed, rows, out_dir) for axis, fixed, rows in axis_groups(run)]


def latest_runs(runs: list[BenchRun]) -> list[BenchRun]:
    """The latest run that swept something, per (benchmark, device)."""
    latest: dict[tuple[str, str], BenchRun] = {}
    for run in runs:  # in start order: later ones replace earlier ones
        if run.axes():
            latest[(run.benchmark, run.device)] = run
    return list(latest.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", nargs="+", type=Path, help="benchmark CSV(s)")
    parser.add_argument(
        "--out", type=Path, default=PLOTS_DIR, help="folder for the PNGs (benchmarks/results/plots)"
    )
    parser.add_argument("--all-runs", action="store_true", help="every run, not only the latest per device")
    parser.add_argument("--run-id", nargs="+", default=None, help="only these runs")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.csv if not p.is_file()]
    if missing:
        parser.error(f"no such CSV file: {', '.join(missing)}")
    runs = group_runs(read_rows(args.csv))
    if args.run_id:
        runs = [r for r in runs if r.key in args.run_id]
    elif not args.all_runs:
        runs = latest_runs(runs)
    if not any(r.axes() for r in runs):
        raise SystemExit(
            "nothing to plot: no run in these CSVs swept a dimension (rows without a sweep column)"
        )
    for run in runs:
        for path in plot_run(run, args.out):
            print(path)


if __name__ == "__main__":
    main()
