"""Reading benchmark CSVs back: rows grouped into runs, runs into sweep axes (for plot.py and report.py).

A run is the rows one invocation appended: same ``run_id`` (rows written before run ids existed:
same timestamp and command). A row lies on the sweep axes named in its ``sweep`` column; within a
run, the points of one axis differ in that parameter only, or also in the other swept axes when
the run was a product of values (then each combination of those is one group).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Columns that are not parameters of a point (measurement, provenance, derived parameters).
NOT_PARAMS = {
    "run_id", "timestamp", "device", "versions", "git", "command", "benchmark", "provider", "mode", "shape",
    "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mib", "tflops", "status", "sweep", "compile_s",
    "trainable_params", "kv_heads", "in_features", "out_features", "_file",
}  # fmt: skip


@dataclass
class BenchRun:
    key: str
    benchmark: str
    device: str
    rows: list[dict] = field(default_factory=list)

    @property
    def started(self) -> str:
        return min(r["timestamp"] for r in self.rows)

    @property
    def command(self) -> str:
        return self.rows[0].get("command", "")

    @property
    def dtypes(self) -> list[str]:
        return sorted({r["dtype"] for r in self.rows})

    @property
    def on_gpu(self) -> bool:
        return is_gpu(self.device)

    def axes(self) -> list[str]:
        """The swept axes, in the order the run met them."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for axis in filter(None, (row.get("sweep") or "").split(",")):
                seen[axis] = None
        return list(seen)

    def points(self) -> list[str]:
        """The shapes of the run, in the order they were measured."""
        return list(dict.fromkeys(r["shape"] for r in self.rows))

    def row(self, shape: str, provider: str, mode: str) -> dict | None:
        """The timed row (status ok) of (shape, provider, mode); the last one if repeated."""
        found = [
            r
            for r in self.rows
            if r["shape"] == shape and r["provider"] == provider and r["mode"] == mode and timed(r)
        ]
        return found[-1] if found else None

    def status(self, shape: str, provider: str, mode: str) -> str | None:
        """Why (shape, provider, mode) was not timed, or None."""
        for r in reversed(self.rows):
            if r["shape"] == shape and r["provider"] == provider and r["mode"] == mode and not timed(r):
                return r["status"]
        return None

    def providers(self) -> list[str]:
        return list(dict.fromkeys(r["provider"] for r in self.rows))


def timed(row: dict) -> bool:
    """A row with figures (rows written before the status column have none: they were all timed)."""
    return row.get("status") in (None, "", "ok") and row.get("median_ms") not in (None, "")


def is_gpu(device: str) -> bool:
    """CPU device names end in "(N threads)" (benchmarks/common.py's device_name)."""
    return re.search(r"\(\d+ threads\)$", device) is None


def read_rows(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in paths:
        with Path(path).open(newline="") as f:
            rows += [{**row, "_file": str(path)} for row in csv.DictReader(f)]
    return rows


def group_runs(rows: list[dict]) -> list[BenchRun]:
    """Runs in the order of their first timestamp."""
    runs: dict[tuple, BenchRun] = {}
    for row in rows:
        key = row.get("run_id") or f"{row['timestamp']} {row.get('command', '')}"
        run = runs.setdefault((key, row["benchmark"]), BenchRun(key, row["benchmark"], row["device"]))
        run.rows.append(row)
    return sorted(runs.values(), key=lambda r: r.started)


def param(value: str) -> float | str:
    """A parameter cell as a number when it is one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def axis_groups(run: BenchRun) -> list[tuple[str, dict, list[dict]]]:
    """(axis, the other swept axes' values, rows) for every figure of ``run``."""
    axes = run.axes()
    out = []
    for axis in axes:
        others = [a for a in axes if a != axis]
        groups: dict[tuple, list[dict]] = {}
        for row in run.rows:
            if axis in (row.get("sweep") or "").split(","):
                key = tuple((a, row.get(a, "")) for a in others)
                groups.setdefault(key, []).append(row)
        for key, rows in groups.items():
            fixed = {a: v for a, v in key if len({r.get(a) for r in rows}) == 1}
            out.append((axis, fixed if len(groups) > 1 else {}, rows))
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: str) -> str:
    return "cpu" if not is_gpu(device) else slug(device)
