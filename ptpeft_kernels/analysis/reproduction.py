"""Tables, verdicts and the plot of ``python -m ptpeft_kernels.reproduce``, from per-run reports.

Everything here reads the ``report.json`` dictionaries the training driver writes; nothing trains.
One *run* is one method with one seed; its figures are those of its **last stage** (for pt-* the
model after stage 2) against the pre-trained model, whose own figures come from each report's
``pretrained`` entry (the same model and data for every run).

The verdicts compare means over seeds and say, for every comparison, whether the gap is larger
than the two standard deviations added (``beyond the seed spread``) or not — a rough guard against
reading seed noise as an effect, not a significance test.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Kim et al. 2024, Table 1 (BLIP-2), as quoted in DESIGN.md: remaining rank ratio in percent.
# Only these four are quoted; no paper figure is given here for the other methods.
PAPER_RANK_RATIO = {"pretrained": 68.2, "prefix": 68.2, "lora": 52.0, "full": 47.0}
PAPER_SOURCE = "Kim et al. 2024, Table 1, BLIP-2, as quoted in DESIGN.md"

# Claim (c): "a score at least close to the best" means at least this share of the best mean score.
CLOSE_TO_BEST = 0.95

WEIGHT_MODIFYING = ("lora", "adapter", "full")
METHOD_ORDER = ("prefix", "lora", "adapter", "full", "pt-lora", "pt-adapter")
PRETRAINED = "pretrained"


@dataclass(frozen=True)
class Stat:
    """Values of one quantity over seeds: mean and sample standard deviation (``None`` for one value)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def fmt(self, spec: str) -> str:
        if self.std is None:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} ± {format(self.std, spec)}"


def _stat(values: Sequence[float]) -> Stat:
    vals = tuple(float(v) for v in values)
    if not vals:
        raise ValueError("no values to summarise")
    return Stat(vals)


@dataclass
class RunResult:
    """The figures of one finished run (its last stage) and of the pre-trained model in that run."""

    method: str
    seed: int
    run_dir: str
    report: dict[str, Any]

    @property
    def last(self) -> dict[str, Any]:
        return self.report["stages"][-1]

    @property
    def primary(self) -> str:
        return self.report["primary_metric"]

    @property
    def scores(self) -> dict[str, float]:
        return self.last["scores"]

    @property
    def representation(self) -> dict[str, Any]:
        rep = self.last.get("representation")
        if not rep:
            raise ValueError(
                f"{self.run_dir}: report.json has no representation measures (was --rank-samples 0 given?)"
            )
        return rep

    @property
    def trainable_stages(self) -> list[int]:
        return [int(s["trainable_params"]) for s in self.report["stages"]]

    @property
    def time_s(self) -> float:
        """Training plus evaluation time of every stage and of the pre-trained model (no start-up)."""
        return float(self.report["total_time_s"])

    @property
    def train_time_s(self) -> float:
        return float(sum(s["train_time_s"] for s in self.report["stages"]))

    @property
    def steps(self) -> int:
        return int(self.report["global_steps"])


@dataclass
class MethodSummary:
    method: str
    runs: list[RunResult]
    trainable_params: int
    trainable_stages: list[int]
    scores: dict[str, Stat]
    rank_ratio: Stat
    deviation: Stat
    cka: Stat
    time_s: Stat | None
    train_time_s: Stat | None
    spectrum: list[float] | None  # the seed-averaged cumulative spectrum

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class Verdict:
    claim: str
    status: str  # "agrees" | "partly" | "disagrees" | "not tested"
    details: list[str] = field(default_factory=list)


@dataclass
class Reproduction:
    task: str
    primary: str
    steps: int
    methods: dict[str, MethodSummary]  # "pretrained" first, then the methods in METHOD_ORDER
    spectrum_length: int | None

    @property
    def trained(self) -> dict[str, MethodSummary]:
        return {k: v for k, v in self.methods.items() if k != PRETRAINED}


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float] | None:
    if not curves or any(c is None for c in curves):
        return None
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:
        return None
    return [statistics.fmean(vals) for vals in zip(*curves, strict=True)]


def summarize(runs: Sequence[RunResult]) -> Reproduction:
    """Aggregate finished runs per method (mean and std over seeds) plus the pre-trained model."""
    if not runs:
        raise ValueError("no runs to summarise")
    tasks = {r.report["task"] for r in runs}
    primaries = {r.primary for r in runs}
    if len(tasks) != 1 or len(primaries) != 1:
        raise ValueError(f"runs of different tasks cannot share a table: {sorted(tasks)}")
    steps = {r.steps for r in runs}
    if len(steps) != 1:
        raise ValueError(f"runs with different step budgets cannot share a table: {sorted(steps)}")
    for r in runs:
        if not r.report.get("complete"):
            raise ValueError(f"{r.run_dir}: the run is not finished (report.json says complete: false)")
    by_method: dict[str, list[RunResult]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    order = [m for m in METHOD_ORDER if m in by_method] + sorted(set(by_method) - set(METHOD_ORDER))

    methods: dict[str, MethodSummary] = {}
    pre_reps = [r.report["pretrained"].get("representation") or {} for r in runs]
    if any("rank_ratio" not in rep for rep in pre_reps):
        raise ValueError("a report has no representation measures of the pre-trained model")
    pre_scores = {k: _stat([r.report["pretrained"]["scores"][k] for r in runs]) for k in runs[0].scores}
    methods[PRETRAINED] = MethodSummary(
        method=PRETRAINED,
        runs=list(runs),
        trainable_params=0,
        trainable_stages=[0],
        scores=pre_scores,
        rank_ratio=_stat([rep["rank_ratio"] for rep in pre_reps]),
        deviation=_stat([rep["deviation"] for rep in pre_reps]),
        cka=_stat([rep["cka"] for rep in pre_reps]),
        time_s=None,
        train_time_s=None,
        spectrum=_mean_curve([rep.get("spectrum") for rep in pre_reps]),
    )
    for m in order:
        rs = sorted(by_method[m], key=lambda r: r.seed)
        stages = {tuple(r.trainable_stages) for r in rs}
        if len(stages) != 1:
            raise ValueError(f"{m}: runs disagree on trainable parameters per stage: {sorted(stages)}")
        reps = [r.representation for r in rs]
        methods[m] = MethodSummary(
            method=m,
            runs=rs,
            trainable_params=rs[0].trainable_stages[-1],
            trainable_stages=rs[0].trainable_stages,
            scores={k: _stat([r.scores[k] for r in rs]) for k in rs[0].scores},
            rank_ratio=_stat([rep["rank_ratio"] for rep in reps]),
            deviation=_stat([rep["deviation"] for rep in reps]),
            cka=_stat([rep["cka"] for rep in reps]),
            time_s=_stat([r.time_s for r in rs]),
            train_time_s=_stat([r.train_time_s for r in rs]),
            spectrum=_mean_curve([rep.get("spectrum") for rep in reps]),
        )
    spectrum = methods[PRETRAINED].spectrum
    return Reproduction(
        task=tasks.pop(),
        primary=primaries.pop(),
        steps=steps.pop(),
        methods=methods,
        spectrum_length=len(spectrum) if spectrum else None,
    )


# ----------------------------------------------------------------------------------- verdicts


def _spread(a: Stat, b: Stat) -> str:
    if a.std is None or b.std is None:
        return "one seed: no spread to compare with"
    gap = abs(a.mean - b.mean)
    return "beyond the seed spread" if gap > a.std + b.std else "within the seed spread"


def _compare(name_a: str, a: Stat, name_b: str, b: Stat, spec: str, want: str) -> tuple[bool, str]:
    """Does ``a`` compare to ``b`` as ``want`` ("lower" | "higher")? With a sentence saying so."""
    holds = a.mean < b.mean if want == "lower" else a.mean > b.mean
    return holds, (
        f"{name_a} {format(a.mean, spec)} vs {name_b} {format(b.mean, spec)}: "
        f"{'yes' if holds else 'no'}, {_spread(a, b)}"
    )


def _status(flags: Sequence[bool]) -> str:
    if not flags:
        return "not tested"
    if all(flags):
        return "agrees"
    return "partly" if any(flags) else "disagrees"


def verdicts(rep: Reproduction) -> list[Verdict]:
    """The paper's three claims, judged on this reproduction's numbers."""
    ms = rep.trained
    pre = rep.methods[PRETRAINED]
    out: list[Verdict] = []

    # (a) weight-modifying methods lower the rank ratio / move the spectrum more than prefix-tuning.
    claim_a = (
        "(a) weight-modifying methods (LoRA, adapters, full fine-tuning) lower the remaining rank "
        "ratio (below the pre-trained model's and prefix-tuning's) and move the spectrum more than "
        "prefix-tuning"
    )
    wm = [m for m in WEIGHT_MODIFYING if m in ms]
    if "prefix" not in ms or not wm:
        out.append(Verdict(claim_a, "not tested", ["needs prefix and at least one of lora, adapter, full"]))
    else:
        p = ms["prefix"]
        flags, details = [], []
        for m in wm:
            # "Lower" is a decrease from the pre-trained model, not only a smaller increase than prefix's.
            ok_pre, t_pre = _compare(m, ms[m].rank_ratio, "pre-trained", pre.rank_ratio, ".1f", "lower")
            ok_r, t_r = _compare(m, ms[m].rank_ratio, "prefix", p.rank_ratio, ".1f", "lower")
            ok_d, t_d = _compare(m, ms[m].deviation, "prefix", p.deviation, ".3f", "higher")
            _, t_c = _compare(m, ms[m].cka, "prefix", p.cka, ".3f", "lower")
            flags += [ok_pre and ok_r, ok_d]
            details.append(f"rank ratio lowered: {t_pre}")
            details.append(f"rank ratio lower than prefix's: {t_r}")
            details.append(f"spectrum deviation larger: {t_d}")
            details.append(f"(not judged) CKA to the pre-trained model lower: {t_c}")
        out.append(Verdict(claim_a, _status(flags), details))

    # (b) prefix-tuning preserves the pre-trained rank ratio.
    claim_b = "(b) prefix-tuning preserves the pre-trained representation space (rank ratio unchanged)"
    if "prefix" not in ms:
        out.append(Verdict(claim_b, "not tested", ["needs prefix"]))
    else:
        p = ms["prefix"]
        same = all(v == pre.rank_ratio.mean for v in p.rank_ratio.values) and pre.rank_ratio.std in (
            None,
            0.0,
        )
        details = [
            f"rank ratio: prefix {p.rank_ratio.fmt('.1f')} vs pre-trained {pre.rank_ratio.fmt('.1f')}: "
            f"{'unchanged in every seed' if same else 'changed'}"
        ]
        flags = [same]
        others = [m for m in WEIGHT_MODIFYING if m in ms]
        if others:
            smallest = all(p.deviation.mean < ms[m].deviation.mean for m in others)
            flags.append(smallest)
            details.append(
                f"spectrum deviation: prefix {p.deviation.mean:.3f} is "
                f"{'smaller' if smallest else 'not smaller'} than every weight-modifying method's ("
                + ", ".join(f"{m} {ms[m].deviation.mean:.3f}" for m in others)
                + ")"
            )
        details.append(f"(not judged) CKA to the pre-trained model: prefix {p.cka.fmt('.3f')}")
        out.append(Verdict(claim_b, _status(flags), details))

    # (c) PT-PEFT: a score close to the best and a representation closer to the pre-trained one.
    claim_c = (
        f"(c) pt-* gets a score at least close to the best (>= {CLOSE_TO_BEST:.0%} of the best mean "
        f"{rep.primary}) and a representation closer to the pre-trained one than its plain PEFT counterpart"
    )
    pairs = [(k, f"pt-{k}") for k in ("lora", "adapter") if k in ms and f"pt-{k}" in ms]
    if not pairs:
        out.append(Verdict(claim_c, "not tested", ["needs lora and pt-lora, or adapter and pt-adapter"]))
    else:
        best_m = max(ms, key=lambda m: ms[m].scores[rep.primary].mean)
        best = ms[best_m].scores[rep.primary].mean
        flags, details = [], []
        for plain, pt in pairs:
            s = ms[pt].scores[rep.primary].mean
            close = s >= CLOSE_TO_BEST * best
            _, t_s = _compare(
                pt, ms[pt].scores[rep.primary], plain, ms[plain].scores[rep.primary], ".1f", "higher"
            )
            ok_d, t_d = _compare(pt, ms[pt].deviation, plain, ms[plain].deviation, ".3f", "lower")
            ok_c, t_c = _compare(pt, ms[pt].cka, plain, ms[plain].cka, ".3f", "higher")
            _, t_r = _compare(pt, ms[pt].rank_ratio, plain, ms[plain].rank_ratio, ".1f", "higher")
            flags += [close, ok_d, ok_c]
            details.append(
                f"{pt} {rep.primary} {s:.1f} is "
                + (f"{s / best:.1%} of" if best > 0 else "at least")
                + f" the best ({best_m} {best:.1f}): "
                f"{'close' if close else 'not close'}"
            )
            details.append(f"(not judged) {rep.primary} higher than {plain}: {t_s}")
            details.append(f"spectrum deviation smaller: {t_d}")
            details.append(f"CKA to the pre-trained model higher: {t_c}")
            details.append(f"(not judged) rank ratio higher: {t_r}")
        out.append(Verdict(claim_c, _status(flags), details))
    return out


# ----------------------------------------------------------------------------------- tables


def _label(m: str) -> str:
    return "pre-trained" if m == PRETRAINED else m


def _trainable(s: MethodSummary) -> str:
    if len(s.trainable_stages) > 1:
        return " / ".join(f"{v:,}" for v in s.trainable_stages)
    return f"{s.trainable_params:,}"


def result_rows(rep: Reproduction) -> list[list[str]]:
    """The main table as strings: header first."""
    header = [
        "method",
        "trainable params",
        rep.primary,
        "rank ratio %",
        "deviation",
        "CKA",
        "time s",
    ]
    rows = [header]
    for m, s in rep.methods.items():
        rows.append(
            [
                _label(m),
                _trainable(s),
                s.scores[rep.primary].fmt(".1f"),
                s.rank_ratio.fmt(".1f"),
                s.deviation.fmt(".3f"),
                s.cka.fmt(".3f"),
                s.time_s.fmt(".0f") if s.time_s is not None else "-",
            ]
        )
    return rows


def paper_rows(rep: Reproduction) -> list[list[str]]:
    pre = rep.methods[PRETRAINED].rank_ratio.mean
    header = [
        "method",
        "paper rank ratio % (BLIP-2)",
        "paper change vs pre-trained",
        "this run rank ratio %",
        "this run change vs pre-trained",
    ]
    rows = [header]
    for m, s in rep.methods.items():
        paper = PAPER_RANK_RATIO.get(m)
        rows.append(
            [
                _label(m),
                f"{paper:.1f}" if paper is not None else "not quoted",
                f"{paper - PAPER_RANK_RATIO[PRETRAINED]:+.1f}" if paper is not None else "-",
                s.rank_ratio.fmt(".1f"),
                f"{s.rank_ratio.mean - pre:+.1f}",
            ]
        )
    return rows


def ordering(rep: Reproduction) -> str:
    """Methods by decreasing mean rank ratio, ties joined with '='."""
    items = sorted(rep.methods.items(), key=lambda kv: -kv[1].rank_ratio.mean)
    parts: list[str] = []
    prev: float | None = None
    for m, s in items:
        v = s.rank_ratio.mean
        if prev is not None:
            parts.append(" = " if math.isclose(v, prev, abs_tol=1e-9) else " > ")
        parts.append(f"{_label(m)} {v:.1f}")
        prev = v
    return "".join(parts)


def paper_ordering() -> str:
    return "pre-trained 68.2 = prefix 68.2 > lora 52.0 > full 47.0"


def run_rows(rep: Reproduction) -> list[list[str]]:
    header = ["method", "seed", rep.primary, "rank ratio %", "deviation", "CKA", "time s", "run"]
    rows = [header]
    for m, s in rep.trained.items():
        for r in s.runs:
            rr = r.representation
            rows.append(
                [
                    m,
                    str(r.seed),
                    f"{r.scores[rep.primary]:.1f}",
                    f"{rr['rank_ratio']:.1f}",
                    f"{rr['deviation']:.3f}",
                    f"{rr['cka']:.3f}",
                    f"{r.time_s:.0f}",
                    os.path.basename(r.run_dir),
                ]
            )
    return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def verdict_lines(vs: Sequence[Verdict]) -> list[str]:
    lines = []
    for v in vs:
        lines.append(f"- {v.claim}: **{v.status}**")
        lines += [f"  - {d}" for d in v.details]
    return lines


def overall(vs: Sequence[Verdict]) -> str:
    tested = [v for v in vs if v.status != "not tested"]
    if not tested:
        return "No claim could be tested with these methods."
    summary = "; ".join(f"{v.claim.split(')')[0]}) {v.status}" for v in tested)
    if all(v.status == "agrees" for v in tested):
        head = "The small-scale result agrees with every tested claim of the paper"
    elif all(v.status == "disagrees" for v in tested):
        head = "The small-scale result disagrees with every tested claim of the paper"
    else:
        head = "The small-scale result agrees with the paper only in part"
    return f"{head}: {summary}."


def markdown(rep: Reproduction, meta: Mapping[str, str], plot_name: str | None) -> str:
    """``reproduce.md``: settings, the table, the paper side by side, the verdicts, the runs."""
    vs = verdicts(rep)
    n_seeds = sorted({len(s.runs) for s in rep.trained.values()})
    lines = ["# Small-scale reproduction: representation space after PEFT (PT-PEFT, Kim et al. 2024)", ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines.append(
        f"- every method trains {rep.steps} optimizer steps in total (pt-*: stage 1 prefix-tuning, then "
        "stage 2 LoRA / adapters with the prefixes); figures are of the last stage"
    )
    if rep.spectrum_length:
        lines.append(
            f"- the rank ratio moves in steps of 100 / {rep.spectrum_length} = "
            f"{100 / rep.spectrum_length:.1f} points (spectrum length n = {rep.spectrum_length}: the "
            "hidden states are truncated to the shortest sample's tokens); the spectrum deviation (max gap "
            "of the cumulative spectra, 0 = identical) and linear CKA (1 = same geometry) are continuous"
        )
    lines += [
        "",
        f"## Results (mean ± std over {'/'.join(map(str, n_seeds))} seeds)",
        "",
        "Deviation and CKA are measured against the pre-trained model on the same evaluation samples. "
        "Trainable parameters of pt-* are given per stage (stage 1 / stage 2). "
        "Time: training plus evaluation of one run (mean over seeds), without start-up.",
        "",
        markdown_table(result_rows(rep)),
        "",
    ]
    if plot_name:
        lines += [f"![score vs representation measures, and cumulative spectra]({plot_name})", ""]
    lines += [
        f"## Side by side with the paper ({PAPER_SOURCE})",
        "",
        markdown_table(paper_rows(rep)),
        "",
        f"- paper ordering by rank ratio: {paper_ordering()}",
        f"- this run's ordering by rank ratio: {ordering(rep)}",
        "",
        "## Agreement with the paper's claims (computed from the numbers above)",
        "",
        overall(vs),
        "",
        *verdict_lines(vs),
        "",
        "## Per run",
        "",
        markdown_table(run_rows(rep)),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CSV


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v


def write_csv(path: str | os.PathLike, rep: Reproduction) -> None:
    """One row per method (the pre-trained model first): means and standard deviations over seeds."""
    score_names = list(rep.methods[PRETRAINED].scores)
    fields = ["method", "runs", "seeds", "steps", "trainable_params", "trainable_params_per_stage"]
    for name in [*score_names, "rank_ratio", "deviation", "cka", "time_s", "train_time_s"]:
        fields += [f"{name}_mean", f"{name}_std"]
    fields.append("paper_rank_ratio")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for m, s in rep.methods.items():
            row: list[Any] = [
                m,
                len(s.runs),
                " ".join(str(r.seed) for r in s.runs) if m != PRETRAINED else "",
                rep.steps if m != PRETRAINED else 0,
                s.trainable_params,
                ";".join(str(v) for v in s.trainable_stages),
            ]
            stats = [s.scores[k] for k in score_names] + [s.rank_ratio, s.deviation, s.cka]
            stats += [s.time_s, s.train_time_s]
            for st in stats:
                row += [_csv_value(st.mean if st else None), _csv_value(st.std if st else None)]
            row.append(_csv_value(PAPER_RANK_RATIO.get(m)))
            w.writerow(row)


def write_runs_csv(path: str | os.PathLike, rep: Reproduction) -> None:
    """One row per run: the exact figures of its report.json."""
    score_names = list(rep.methods[PRETRAINED].scores)
    fields = ["method", "seed", "run_dir", "steps", "trainable_params", *score_names]
    fields += ["rank_ratio", "deviation", "cka", "time_s", "train_time_s"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for m, s in rep.trained.items():
            for r in s.runs:
                rr = r.representation
                w.writerow(
                    [
                        m,
                        r.seed,
                        r.run_dir,
                        r.steps,
                        r.trainable_stages[-1],
                        *[_csv_value(float(r.scores[k])) for k in score_names],
                        _csv_value(float(rr["rank_ratio"])),
                        _csv_value(float(rr["deviation"])),
                        _csv_value(float(rr["cka"])),
                        _csv_value(r.time_s),
                        _csv_value(r.train_time_s),
                    ]
                )


# ----------------------------------------------------------------------------------- plot


def plot(rep: Reproduction, path: str | os.PathLike) -> None:
    """Three panels: score vs rank ratio and score vs spectrum deviation (mean ± std over seeds,
    one marker per method), and the seed-averaged cumulative spectra of every method over the
    pre-trained model's."""
    from .plots import _MARKERS, _STYLES, _new_figure

    fig = _new_figure((15.0, 4.6))
    axes = fig.subplots(1, 3)
    colors = {m: f"C{i}" for i, m in enumerate(rep.methods)}
    for ax, attr, xlabel in (
        (axes[0], "rank_ratio", "remaining rank ratio (%)"),
        (axes[1], "deviation", "spectrum deviation from pre-trained (max gap)"),
    ):
        for i, (m, s) in enumerate(rep.methods.items()):
            x: Stat = getattr(s, attr)
            y = s.scores[rep.primary]
            ax.errorbar(
                x.mean,
                y.mean,
                xerr=x.std or 0.0,
                yerr=y.std or 0.0,
                marker=_MARKERS[i % len(_MARKERS)] if m != PRETRAINED else "*",
                markersize=8 if m != PRETRAINED else 13,
                color=colors[m],
                linestyle="none",
                capsize=3,
                label=_label(m),
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{rep.primary} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{rep.primary} vs rank ratio")
    axes[1].set_title(f"{rep.primary} vs spectrum deviation")
    axes[0].legend(fontsize="small")

    ax = axes[2]
    for i, (m, s) in enumerate(rep.methods.items()):
        if not s.spectrum:
            continue
        n = len(s.spectrum)
        xs = [100.0 * k / n for k in range(n + 1)]
        ax.plot(
            xs,
            [0.0, *s.spectrum],
            drawstyle="steps-post",
            linestyle=_STYLES[i % len(_STYLES)],
            color=colors[m],
            linewidth=2.2 if m == PRETRAINED else 1.3,
            label=f"{_label(m)} ({s.rank_ratio.mean:.1f} %)",
        )
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("singular values kept (% of spectrum length)")
    ax.set_ylabel("cumulative share of singular value mass")
    ax.set_title("cumulative spectra (seed mean), last layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="mean rank ratio")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)


__all__ = [
    "CLOSE_TO_BEST",
    "PAPER_RANK_RATIO",
    "MethodSummary",
    "Reproduction",
    "RunResult",
    "Stat",
    "Verdict",
    "markdown",
    "ordering",
    "plot",
    "result_rows",
    "run_rows",
    "summarize",
    "text_table",
    "verdicts",
    "write_csv",
    "write_runs_csv",
]
