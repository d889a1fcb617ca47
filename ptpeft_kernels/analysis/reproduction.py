"""Tables, verdicts and the plot of ``python -m ptpeft_kernels.reproduce``, from per-run reports.

Everything here reads the ``report.json`` dictionaries the training driver writes; nothing trains.
One *run* is one method with one seed; its figures are those of its **last stage** (for pt-* the
model after stage 2) against the pre-trained model, whose own figures come from each report's
``pretrained`` entry (the same model and data for every run).

Every measure (rank ratio, effective rank, spectrum deviation, CKA) comes with a 95 % bootstrap
interval over evaluation samples: the driver saves each run's bootstrap replicates
(``bootstrap-<stage>.safetensors``, the same resample draws in every run), replicate b is averaged
over a method's seeds, and the interval of the seed mean is the percentile interval of those
averages (the run's own interval from ``report.json`` where the replicates are missing).

The verdicts judge every comparison as ``yes`` (it holds and the two intervals are disjoint),
``no`` (the opposite holds, disjoint) or ``within noise``: the intervals overlap, or — with
several seeds — the gap of the means is within the two seed standard deviations added. A claim
agrees when every judged comparison says yes, disagrees when every one says no, is ``within
noise`` when none is resolved, and holds ``partly`` otherwise. They are computed on the
downstream evaluation samples and, where the runs measured them, on samples of the model's
pre-training distribution (what the model keeps of what it learned before).
"""

from __future__ import annotations

import csv
import json
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
MEASURES = ("rank_ratio", "effective_rank", "deviation", "cka")
DISTRIBUTIONS = ("downstream", "pretrain")
DIST_LABEL = {"downstream": "downstream evaluation samples", "pretrain": "pre-training distribution samples"}
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


@dataclass(frozen=True)
class Measure:
    """One representation measure of a method: its values over seeds and the bootstrap interval of
    their mean over evaluation samples (``None`` where no interval was recorded)."""

    stat: Stat
    ci: tuple[float, float] | None

    @property
    def mean(self) -> float:
        return self.stat.mean

    @property
    def std(self) -> float | None:
        return self.stat.std

    def fmt(self, spec: str) -> str:
        text = self.stat.fmt(spec)
        if self.ci is not None:
            text += f" [{format(self.ci[0], spec)}, {format(self.ci[1], spec)}]"
        return text


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

    def measures(self, point: str, dist: str) -> dict[str, Any] | None:
        """The representation dict of evaluation point ``point`` ("pretrained" or "last") on ``dist``."""
        rep = (self.report["pretrained"] if point == PRETRAINED else self.last).get("representation") or {}
        return rep if dist == "downstream" else rep.get("pretrain_distribution")

    def replicates(self, point: str, dist: str, measure: str) -> Any:
        """The bootstrap replicates (float64 tensor) the driver saved, or ``None``."""
        name = PRETRAINED if point == PRETRAINED else self.last.get("name", "")
        path = os.path.join(self.run_dir, f"bootstrap-{name}.safetensors")
        if not os.path.isfile(path):
            return None
        from safetensors.torch import load_file

        return load_file(path).get(f"{dist}/{measure}")

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
    measures: dict[str, dict[str, Measure]]  # {distribution: {measure: Measure}}
    time_s: Stat | None
    train_time_s: Stat | None
    spectra: dict[str, list[float] | None]  # the seed-averaged cumulative spectrum per distribution

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def rank_ratio(self) -> Measure:
        return self.measures["downstream"]["rank_ratio"]

    @property
    def effective_rank(self) -> Measure:
        return self.measures["downstream"]["effective_rank"]

    @property
    def deviation(self) -> Measure:
        return self.measures["downstream"]["deviation"]

    @property
    def cka(self) -> Measure:
        return self.measures["downstream"]["cka"]

    @property
    def spectrum(self) -> list[float] | None:
        return self.spectra.get("downstream")


@dataclass
class Verdict:
    claim: str
    status: str  # "agrees" | "partly" | "disagrees" | "within noise" | "not tested"
    details: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)  # "yes" | "no" | "within noise", judged ones

    def counts(self) -> str:
        n = {k: self.outcomes.count(k) for k in ("yes", "no", "within noise")}
        return f"{n['yes']} yes, {n['no']} no, {n['within noise']} within noise"


@dataclass
class Reproduction:
    task: str
    primary: str
    steps: int
    methods: dict[str, MethodSummary]  # "pretrained" first, then the methods in METHOD_ORDER
    spectrum_length: int | None
    distributions: tuple[str, ...] = ("downstream",)  # measured in every run
    positions: int | None = None  # rows per sample
    real_positions: dict[str, float] = field(default_factory=dict)  # share of real tokens per distribution
    resamples: int | None = None
    fill: str | None = None  # how samples shorter than `positions` were filled ("repeat", "pad")

    @property
    def trained(self) -> dict[str, MethodSummary]:
        return {k: v for k, v in self.methods.items() if k != PRETRAINED}


def _mean_curve(curves: Sequence[Sequence[float] | None]) -> list[float] | None:
    if not curves or any(c is None for c in curves):
        return None
    lengths = {len(c) for c in curves}  # type: ignore[arg-type]
    if len(lengths) != 1:
        return None
    return [statistics.fmean(vals) for vals in zip(*curves, strict=True)]  # type: ignore[misc]


def _measure(runs: Sequence[RunResult], point: str, dist: str, key: str) -> Measure:
    reps = [r.measures(point, dist) for r in runs]
    stat = _stat([rep[key] for rep in reps])  # type: ignore[index]
    ci: tuple[float, float] | None = None
    replicates = [r.replicates(point, dist, key) for r in runs]
    if all(x is not None for x in replicates) and len({x.shape for x in replicates}) == 1:
        from .bootstrap import percentile_interval

        conf = float(((reps[0] or {}).get("bootstrap") or {}).get("confidence", 0.95))
        ci = percentile_interval(sum(x.double() for x in replicates) / len(replicates), conf)
    elif len(runs) == 1 and "ci" in (reps[0] or {}):
        lo, hi = reps[0]["ci"][key]  # type: ignore[index]
        ci = (float(lo), float(hi))
    return Measure(stat, ci)


def _summary_measures(
    runs: Sequence[RunResult], point: str, dists: Sequence[str]
) -> tuple[dict[str, dict[str, Measure]], dict[str, list[float] | None]]:
    measures: dict[str, dict[str, Measure]] = {}
    spectra: dict[str, list[float] | None] = {}
    for d in dists:
        reps = [r.measures(point, d) or {} for r in runs]
        # Reports written before the effective rank existed have none: their measure is left out.
        measures[d] = {k: _measure(runs, point, d, k) for k in MEASURES if all(k in rep for rep in reps)}
        spectra[d] = _mean_curve([rep.get("spectrum") for rep in reps])
    return measures, spectra


def summarize(runs: Sequence[RunResult]) -> Reproduction:
    """Aggregate finished runs per method (mean and std over seeds, intervals of the mean over
    evaluation samples) plus the pre-trained model."""
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
    pre_reps = [r.report["pretrained"].get("representation") or {} for r in runs]
    if any("rank_ratio" not in rep for rep in pre_reps):
        raise ValueError("a report has no representation measures of the pre-trained model")
    dists = tuple(
        d for d in DISTRIBUTIONS if all(r.measures(PRETRAINED, d) and r.measures("last", d) for r in runs)
    )

    methods: dict[str, MethodSummary] = {}
    pre_scores = {k: _stat([r.report["pretrained"]["scores"][k] for r in runs]) for k in runs[0].scores}
    # The pre-trained model is the same in every run; one run per seed gives its interval (others repeat it).
    one_per_seed = list({r.seed: r for r in runs}.values())
    measures, spectra = _summary_measures(one_per_seed, PRETRAINED, dists)
    methods[PRETRAINED] = MethodSummary(
        method=PRETRAINED,
        runs=list(runs),
        trainable_params=0,
        trainable_stages=[0],
        scores=pre_scores,
        measures=measures,
        time_s=None,
        train_time_s=None,
        spectra=spectra,
    )
    for m in order:
        rs = sorted(by_method[m], key=lambda r: r.seed)
        stages = {tuple(r.trainable_stages) for r in rs}
        if len(stages) != 1:
            raise ValueError(f"{m}: runs disagree on trainable parameters per stage: {sorted(stages)}")
        for r in rs:
            r.representation  # noqa: B018 - raises a clear error where measures are missing
        measures, spectra = _summary_measures(rs, "last", dists)
        methods[m] = MethodSummary(
            method=m,
            runs=rs,
            trainable_params=rs[0].trainable_stages[-1],
            trainable_stages=rs[0].trainable_stages,
            scores={k: _stat([r.scores[k] for r in rs]) for k in rs[0].scores},
            measures=measures,
            time_s=_stat([r.time_s for r in rs]),
            train_time_s=_stat([r.train_time_s for r in rs]),
            spectra=spectra,
        )
    spectrum = methods[PRETRAINED].spectrum
    first = pre_reps[0]
    real = {
        d: float((runs[0].measures(PRETRAINED, d) or {}).get("real_positions"))
        for d in dists
        if (runs[0].measures(PRETRAINED, d) or {}).get("real_positions") is not None
    }
    return Reproduction(
        task=tasks.pop(),
        primary=primaries.pop(),
        steps=steps.pop(),
        methods=methods,
        spectrum_length=first.get("spectrum_length", len(spectrum) if spectrum else None),
        distributions=dists,
        positions=first.get("positions"),
        real_positions=real,
        resamples=(first.get("bootstrap") or {}).get("resamples"),
        fill=first.get("fill"),
    )


# ----------------------------------------------------------------------------------- verdicts


def _noise(a: Measure, b: Measure) -> str | None:
    """Why the two cannot be told apart (``None`` when they can)."""
    if a.ci is not None and b.ci is not None and a.ci[0] <= b.ci[1] and b.ci[0] <= a.ci[1]:
        return "the bootstrap intervals overlap"
    if a.std is not None and b.std is not None and abs(a.mean - b.mean) <= a.std + b.std:
        return "the gap is within the seed spread"
    return None


def _judge(name_a: str, a: Measure, name_b: str, b: Measure, spec: str, want: str) -> tuple[str, str]:
    """``a`` vs ``b`` where the claim wants ``a`` ``want`` ("lower" | "higher" | "same") than ``b``:
    ("yes" | "no" | "within noise", a sentence saying so)."""
    noise = _noise(a, b)
    if want == "same":
        outcome = "yes" if noise else "no"
        why = f"within noise ({noise})" if noise else "resolved: the intervals are disjoint"
    else:
        holds = a.mean < b.mean if want == "lower" else a.mean > b.mean
        outcome = "within noise" if noise else ("yes" if holds else "no")
        why = f"within noise ({noise})" if noise else f"{'yes' if holds else 'no'}, beyond the noise"
    if a.ci is None and b.ci is None and (a.std is None or b.std is None):
        why += "; no interval recorded, one seed"
    return outcome, f"{name_a} {a.fmt(spec)} vs {name_b} {b.fmt(spec)}: {why}"


def _status(outcomes: Sequence[str]) -> str:
    if not outcomes:
        return "not tested"
    if all(o == "yes" for o in outcomes):
        return "agrees"
    if all(o == "no" for o in outcomes):
        return "disagrees"
    if all(o == "within noise" for o in outcomes):
        return "within noise"
    return "partly"


def _get(s: MethodSummary, dist: str, key: str) -> Measure | None:
    return s.measures.get(dist, {}).get(key)


def verdicts(rep: Reproduction, dist: str = "downstream") -> list[Verdict]:
    """The paper's three claims, judged on this reproduction's numbers on ``dist``."""
    ms = rep.trained
    pre = rep.methods[PRETRAINED]
    out: list[Verdict] = []
    rank_keys = [k for k in ("rank_ratio", "effective_rank") if _get(pre, dist, k) is not None]
    spec = {"rank_ratio": ".1f", "effective_rank": ".2f", "deviation": ".3f", "cka": ".3f"}
    label = {"rank_ratio": "rank ratio", "effective_rank": "effective rank"}

    def judge(outcomes, details, text, m_a, a_name, m_b, b_name, key, want, judged=True):
        a, b = _get(m_a, dist, key), _get(m_b, dist, key)
        if a is None or b is None:
            return
        outcome, sentence = _judge(a_name, a, b_name, b, spec[key], want)
        if judged:
            outcomes.append(outcome)
            details.append(f"{text}: {sentence}")
        else:
            details.append(f"(not judged) {text}: {sentence}")

    claim_a = (
        "(a) weight-modifying methods (LoRA, adapters, full fine-tuning) lower the remaining rank "
        "ratio and the effective rank (below the pre-trained model's and prefix-tuning's) and move the "
        "spectrum more than prefix-tuning"
    )
    wm = [m for m in WEIGHT_MODIFYING if m in ms]
    if "prefix" not in ms or not wm:
        out.append(Verdict(claim_a, "not tested", ["needs prefix and at least one of lora, adapter, full"]))
    else:
        p = ms["prefix"]
        outcomes: list[str] = []
        details: list[str] = []
        for m in wm:
            for k in rank_keys:
                judge(outcomes, details, f"{label[k]} lowered", ms[m], m, pre, "pre-trained", k, "lower")
                judge(outcomes, details, f"{label[k]} lower than prefix's", ms[m], m, p, "prefix", k, "lower")
            judge(
                outcomes, details, "spectrum deviation larger", ms[m], m, p, "prefix", "deviation", "higher"
            )
            judge(
                outcomes,
                details,
                "CKA to the pre-trained model lower",
                ms[m],
                m,
                p,
                "prefix",
                "cka",
                "lower",
                judged=False,
            )
        out.append(Verdict(claim_a, _status(outcomes), details, outcomes))

    claim_b = (
        "(b) prefix-tuning preserves the pre-trained representation space (rank ratio and effective rank "
        "within noise of the pre-trained model's; the smallest spectrum deviation)"
    )
    if "prefix" not in ms:
        out.append(Verdict(claim_b, "not tested", ["needs prefix"]))
    else:
        p = ms["prefix"]
        outcomes, details = [], []
        for k in rank_keys:
            judge(outcomes, details, f"{label[k]} unchanged", p, "prefix", pre, "pre-trained", k, "same")
        for m in wm:
            judge(
                outcomes, details, "spectrum deviation smaller", p, "prefix", ms[m], m, "deviation", "lower"
            )
        c = _get(p, dist, "cka")
        if c is not None:
            details.append(f"(not judged) CKA to the pre-trained model: prefix {c.fmt('.3f')}")
        out.append(Verdict(claim_b, _status(outcomes), details, outcomes))

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
        outcomes, details = [], []
        for plain, pt in pairs:
            s = ms[pt].scores[rep.primary].mean
            close = s >= CLOSE_TO_BEST * best
            outcomes.append("yes" if close else "no")
            details.append(
                f"{pt} {rep.primary} {s:.1f} is "
                + (f"{s / best:.1%} of" if best > 0 else "at least")
                + f" the best ({best_m} {best:.1f}): {'close' if close else 'not close'}"
            )
            sp, sq = ms[pt].scores[rep.primary], ms[plain].scores[rep.primary]
            details.append(
                f"(not judged) {rep.primary} higher than {plain}: {pt} {sp.fmt('.1f')} vs "
                f"{plain} {sq.fmt('.1f')}"
            )
            judge(
                outcomes,
                details,
                "spectrum deviation smaller",
                ms[pt],
                pt,
                ms[plain],
                plain,
                "deviation",
                "lower",
            )
            judge(
                outcomes,
                details,
                "CKA to the pre-trained model higher",
                ms[pt],
                pt,
                ms[plain],
                plain,
                "cka",
                "higher",
            )
            for k in rank_keys:
                judge(
                    outcomes,
                    details,
                    f"{label[k]} higher",
                    ms[pt],
                    pt,
                    ms[plain],
                    plain,
                    k,
                    "higher",
                    judged=False,
                )
        out.append(Verdict(claim_c, _status(outcomes), details, outcomes))
    return out


# ----------------------------------------------------------------------------------- tables


def _label(m: str) -> str:
    return "pre-trained" if m == PRETRAINED else m


def _trainable(s: MethodSummary) -> str:
    if len(s.trainable_stages) > 1:
        return " / ".join(f"{v:,}" for v in s.trainable_stages)
    return f"{s.trainable_params:,}"


def _cell(s: MethodSummary, dist: str, key: str, spec: str) -> str:
    m = _get(s, dist, key)
    return m.fmt(spec) if m is not None else "-"


def result_rows(rep: Reproduction, dist: str = "downstream") -> list[list[str]]:
    """The main table as strings: header first. Measures: mean ± std over seeds [95 % interval]."""
    n = f" (n = {rep.spectrum_length})" if rep.spectrum_length else ""
    header = [
        "method",
        "trainable params",
        rep.primary,
        f"rank ratio %{n}",
        "effective rank",
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
                _cell(s, dist, "rank_ratio", ".1f"),
                _cell(s, dist, "effective_rank", ".2f"),
                _cell(s, dist, "deviation", ".3f"),
                _cell(s, dist, "cka", ".3f"),
                s.time_s.fmt(".0f") if s.time_s is not None else "-",
            ]
        )
    return rows


def paper_rows(rep: Reproduction, dist: str = "downstream") -> list[list[str]]:
    pre = rep.methods[PRETRAINED].measures[dist]["rank_ratio"].mean
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
        rr = s.measures[dist]["rank_ratio"]
        rows.append(
            [
                _label(m),
                f"{paper:.1f}" if paper is not None else "not quoted",
                f"{paper - PAPER_RANK_RATIO[PRETRAINED]:+.1f}" if paper is not None else "-",
                rr.fmt(".1f"),
                f"{rr.mean - pre:+.1f}",
            ]
        )
    return rows


def ordering(rep: Reproduction, dist: str = "downstream") -> str:
    """Methods by decreasing mean rank ratio, ties joined with '='."""
    items = sorted(rep.methods.items(), key=lambda kv: -kv[1].measures[dist]["rank_ratio"].mean)
    parts: list[str] = []
    prev: float | None = None
    for m, s in items:
        v = s.measures[dist]["rank_ratio"].mean
        if prev is not None:
            parts.append(" = " if math.isclose(v, prev, abs_tol=1e-9) else " > ")
        parts.append(f"{_label(m)} {v:.1f}")
        prev = v
    return "".join(parts)


def paper_ordering() -> str:
    return "pre-trained 68.2 = prefix 68.2 > lora 52.0 > full 47.0"


def run_rows(rep: Reproduction) -> list[list[str]]:
    header = [
        "method",
        "seed",
        rep.primary,
        "rank ratio %",
        "effective rank",
        "deviation",
        "CKA",
        "time s",
        "run",
    ]
    rows = [header]
    for m, s in rep.trained.items():
        for r in s.runs:
            rr = r.representation
            er = rr.get("effective_rank")
            rows.append(
                [
                    m,
                    str(r.seed),
                    f"{r.scores[rep.primary]:.1f}",
                    f"{rr['rank_ratio']:.1f}",
                    f"{er:.2f}" if er is not None else "-",
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
        counts = f" ({v.counts()})" if v.outcomes else ""
        lines.append(f"- {v.claim}: **{v.status}**{counts}")
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
    elif all(v.status == "within noise" for v in tested):
        head = "The small-scale result cannot tell any tested claim of the paper from noise"
    else:
        head = "The small-scale result agrees with the paper only in part"
    return f"{head}: {summary}."


def resolution_line(rep: Reproduction) -> str:
    """How finely the rank ratio resolves, with the spectrum length: printed with every figure."""
    if not rep.spectrum_length:
        return "spectrum length unknown"
    n = rep.spectrum_length
    text = f"rank ratio over a spectrum of n = {n} singular values: steps of 100 / {n} = {100 / n:.2f} points"
    if rep.positions:
        text += f"; {rep.positions} positions per sample"
    if rep.fill:
        text += f", filled by {rep.fill}"
    if rep.real_positions and min(rep.real_positions.values()) < 1.0:
        text += (
            " ("
            + ", ".join(
                f"{share:.0%} real tokens on the {'downstream' if d == 'downstream' else 'pre-training'} "
                "samples"
                for d, share in rep.real_positions.items()
            )
            + ", the rest right padding)"
        )
    return text


def markdown(rep: Reproduction, meta: Mapping[str, str], plot_name: str | None) -> str:
    """``reproduce.md``: settings, the tables, the paper side by side, the verdicts, the runs."""
    n_seeds = sorted({len(s.runs) for s in rep.trained.values()})
    lines = ["# Small-scale reproduction: representation space after PEFT (PT-PEFT, Kim et al. 2024)", ""]
    for k, v in meta.items():
        lines.append(f"- {k}: {v}")
    lines.append(
        f"- every method trains {rep.steps} optimizer steps in total (pt-*: stage 1 prefix-tuning, then "
        "stage 2 LoRA / adapters with the prefixes); figures are of the last stage"
    )
    lines.append(f"- {resolution_line(rep)}")
    lines.append(
        "- effective rank: Roy & Vetterli 2007, exp of the entropy of each sample's normalised singular "
        "values, mean over samples; spectrum deviation: max gap of the cumulative spectra (0 = identical); "
        "CKA: linear CKA to the pre-trained model (1 = same geometry)"
    )
    if rep.resamples:
        lines.append(
            f"- [brackets]: 95 % bootstrap intervals over evaluation samples ({rep.resamples} resamples, "
            "seed 0; for several seeds, of the seed mean); a comparison is 'within noise' when the intervals "
            "overlap or, with several seeds, the gap is within the seed spread"
        )
    lines += ["", f"Results: mean ± std over {'/'.join(map(str, n_seeds))} seeds."]
    for d in rep.distributions:
        lines += [
            "",
            f"## Results on the {DIST_LABEL[d]}",
            "",
            "Deviation and CKA are measured against the pre-trained model on the same samples. "
            "Trainable parameters of pt-* are given per stage (stage 1 / stage 2). "
            "Time: training plus evaluation of one run (mean over seeds), without start-up.",
            "",
            markdown_table(result_rows(rep, d)),
        ]
    lines.append("")
    if plot_name:
        lines += [f"![score vs representation measures, and cumulative spectra]({plot_name})", ""]
    lines += [
        f"## Side by side with the paper ({PAPER_SOURCE})",
        "",
        markdown_table(paper_rows(rep)),
        "",
        f"- paper ordering by rank ratio: {paper_ordering()}",
        f"- this run's ordering by rank ratio ({DIST_LABEL['downstream']}): {ordering(rep)}",
    ]
    if "pretrain" in rep.distributions:
        lines.append(
            f"- this run's ordering by rank ratio ({DIST_LABEL['pretrain']}): {ordering(rep, 'pretrain')}"
        )
    for d in rep.distributions:
        vs = verdicts(rep, d)
        lines += [
            "",
            f"## Agreement with the paper's claims on the {DIST_LABEL[d]} (computed from the numbers)",
            "",
            overall(vs),
            "",
            *verdict_lines(vs),
        ]
    lines += ["", "## Per run (downstream samples)", "", markdown_table(run_rows(rep)), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CSV


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    return repr(v) if isinstance(v, float) else v


def write_csv(path: str | os.PathLike, rep: Reproduction) -> None:
    """One row per method (the pre-trained model first): means, standard deviations over seeds and
    interval bounds; measures on the pre-training distribution prefixed ``pretrain_``."""
    score_names = list(rep.methods[PRETRAINED].scores)
    fields = ["method", "runs", "seeds", "steps", "trainable_params", "trainable_params_per_stage"]
    for name in [*score_names, "time_s", "train_time_s"]:
        fields += [f"{name}_mean", f"{name}_std"]
    for d in rep.distributions:
        pre = "" if d == "downstream" else "pretrain_"
        for key in MEASURES:
            fields += [f"{pre}{key}_{x}" for x in ("mean", "std", "ci_low", "ci_high")]
    fields += ["spectrum_length", "paper_rank_ratio"]
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
            for st in [*(s.scores[k] for k in score_names), s.time_s, s.train_time_s]:
                row += [_csv_value(st.mean if st else None), _csv_value(st.std if st else None)]
            for d in rep.distributions:
                for key in MEASURES:
                    me = _get(s, d, key)
                    ci = me.ci if me is not None and me.ci is not None else (None, None)
                    row += [_csv_value(me.mean if me else None), _csv_value(me.std if me else None)]
                    row += [_csv_value(ci[0]), _csv_value(ci[1])]
            row += [rep.spectrum_length or "", _csv_value(PAPER_RANK_RATIO.get(m))]
            w.writerow(row)


def write_runs_csv(path: str | os.PathLike, rep: Reproduction) -> None:
    """One row per run: the exact figures of its report.json (downstream, then pre-training samples)."""
    score_names = list(rep.methods[PRETRAINED].scores)
    fields = ["method", "seed", "run_dir", "steps", "trainable_params", *score_names]
    for d in rep.distributions:
        pre = "" if d == "downstream" else "pretrain_"
        fields += [f"{pre}{k}" for k in MEASURES]
    fields += ["time_s", "train_time_s"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for m, s in rep.trained.items():
            for r in s.runs:
                row = [m, r.seed, r.run_dir, r.steps, r.trainable_stages[-1]]
                row += [_csv_value(float(r.scores[k])) for k in score_names]
                for d in rep.distributions:
                    rr = r.measures("last", d) or {}
                    row += [_csv_value(float(rr[k])) if k in rr else "" for k in MEASURES]
                row += [_csv_value(r.time_s), _csv_value(r.train_time_s)]
                w.writerow(row)


def write_json(path: str | os.PathLike, rep: Reproduction) -> None:
    """The summary as JSON: per method and distribution, every measure's mean, std and interval."""
    data = {
        "task": rep.task,
        "primary_metric": rep.primary,
        "steps": rep.steps,
        "spectrum_length": rep.spectrum_length,
        "positions": rep.positions,
        "real_positions": rep.real_positions,
        "resamples": rep.resamples,
        "methods": {
            m: {
                "scores": {k: {"mean": v.mean, "std": v.std} for k, v in s.scores.items()},
                **{
                    d: {
                        k: {"mean": me.mean, "std": me.std, "ci": list(me.ci) if me.ci else None}
                        for k, me in s.measures.get(d, {}).items()
                    }
                    for d in rep.distributions
                },
            }
            for m, s in rep.methods.items()
        },
        "verdicts": {
            d: [{"claim": v.claim, "status": v.status, "outcomes": v.outcomes} for v in verdicts(rep, d)]
            for d in rep.distributions
        },
    }
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


# ----------------------------------------------------------------------------------- plot


def plot(rep: Reproduction, path: str | os.PathLike) -> None:
    """Three panels: score vs rank ratio and score vs effective rank (mean over seeds; x error bars:
    the 95 % bootstrap interval, y: the seed std), and the seed-averaged cumulative spectra of every
    method over the pre-trained model's; the spectrum length is in the titles."""
    from .plots import _MARKERS, _STYLES, _new_figure

    fig = _new_figure((15.0, 4.6))
    axes = fig.subplots(1, 3)
    colors = {m: f"C{i}" for i, m in enumerate(rep.methods)}
    n = rep.spectrum_length
    n_text = f" (n = {n})" if n else ""
    for ax, key, xlabel in (
        (axes[0], "rank_ratio", f"remaining rank ratio (%){n_text}"),
        (axes[1], "effective_rank", "effective rank (Roy & Vetterli)"),
    ):
        for i, (m, s) in enumerate(rep.methods.items()):
            x = _get(s, "downstream", key)
            if x is None:
                continue
            y = s.scores[rep.primary]
            xerr = [[x.mean - x.ci[0]], [x.ci[1] - x.mean]] if x.ci else (x.std or 0.0)
            ax.errorbar(
                x.mean,
                y.mean,
                xerr=xerr,
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
    axes[0].set_title(f"{rep.primary} vs rank ratio{n_text}")
    axes[1].set_title(f"{rep.primary} vs effective rank")
    axes[0].legend(fontsize="small")

    ax = axes[2]
    for i, (m, s) in enumerate(rep.methods.items()):
        if not s.spectrum:
            continue
        k = len(s.spectrum)
        xs = [100.0 * j / k for j in range(k + 1)]
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
    ax.set_title(f"cumulative spectra (seed mean), last layer{n_text}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="mean rank ratio")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)


__all__ = [
    "CLOSE_TO_BEST",
    "PAPER_RANK_RATIO",
    "Measure",
    "MethodSummary",
    "Reproduction",
    "RunResult",
    "Stat",
    "Verdict",
    "markdown",
    "ordering",
    "plot",
    "resolution_line",
    "result_rows",
    "run_rows",
    "summarize",
    "text_table",
    "verdicts",
    "write_csv",
    "write_json",
    "write_runs_csv",
]
