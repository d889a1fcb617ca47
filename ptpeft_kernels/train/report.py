"""Run outputs: ``metrics.jsonl``, ``report.json``, the loss-curve PNG and the terminal table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each time).

    :meth:`truncate` cuts the file back to a line count recorded in a checkpoint, so a
    resumed run does not repeat lines written after that checkpoint.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.lines = 0
        if enabled and self.path.is_file():
            with open(self.path) as fh:
                self.lines = sum(1 for _ in fh)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
        self.lines += 1

    def truncate(self, lines: int) -> None:
        if not self.enabled or not self.path.is_file():
            self.lines = 0
            return
        with open(self.path) as fh:
            kept = [line for _, line in zip(range(lines), fh, strict=False)]
        atomic_write_text(self.path, "".join(kept))
        self.lines = len(kept)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_report(run_dir: str | os.PathLike, report: dict[str, Any]) -> Path:
    path = Path(run_dir) / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def plot_losses(run_dir: str | os.PathLike, records: list[dict[str, Any]], primary: str) -> Path | None:
    """Training loss per global step (one colour per stage) and the evaluation points on a
    second axis; written to ``loss_curve.png``. Returns ``None`` when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and primary in r.get("scores", {})]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    stages = list(dict.fromkeys(r["stage"] for r in train))
    for stage in stages:
        pts = [(r["global_step"], r["loss"]) for r in train if r["stage"] == stage]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"loss ({stage})", linewidth=1.4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(
            [r["global_step"] for r in evals],
            [r["scores"][primary] for r in evals],
            "o--",
            color="black",
            label=f"{primary} (eval)",
        )
        for r in evals:
            ax2.annotate(
                f"{r['scores'][primary]:.1f}",
                (r["global_step"], r["scores"][primary]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax2.set_ylabel(primary)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    else:
        ax.legend(fontsize=8)
    ax.set_title("training loss and evaluation")
    fig.tight_layout()
    path = Path(run_dir) / "loss_curve.png"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def format_table(report: dict[str, Any]) -> str:
    """The final terminal table: one row for the pre-trained model and one per stage."""
    metric_names: list[str] = []
    rows = [report.get("pretrained", {})] + list(report.get("stages", []))
    for r in rows:
        for k in r.get("scores") or {}:
            if k not in metric_names:
                metric_names.append(k)
    header = ["stage", "trainable", *metric_names, "rank %", "eff. rank", "CKA", "time s", "peak MB"]
    lines = []
    for r in rows:
        scores = r.get("scores") or {}
        rank = r.get("representation") or {}
        lines.append(
            [
                r.get("name", "-"),
                f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "-",
                *[_fmt(scores.get(m)) for m in metric_names],
                _fmt(rank.get("rank_ratio"), ".1f"),
                _fmt(rank.get("effective_rank"), ".1f"),
                _fmt(rank.get("cka"), ".3f"),
                _fmt(r.get("wall_time_s"), ".1f"),
                _fmt(r.get("peak_memory_mb"), ".0f"),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    out = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=False))
        )
    ]
    out.append("  ".join("-" * w for w in widths))
    for row in lines:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=False))
            )
        )
    title = f"{report.get('method')} on {report.get('task')} ({report.get('model')})"
    n = (report.get("pretrained", {}).get("representation") or {}).get("spectrum_length")
    foot = (
        f"\nrank ratio over a spectrum of n = {n} singular values (steps of {100 / n:.2f} points)"
        if n
        else ""
    )
    return title + "\n" + "\n".join(out) + foot
