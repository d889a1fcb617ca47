"""``python -m ptpeft_kernels.reproduce``: a tiny end-to-end run, its tables against the per-run reports,
reuse of finished runs, refused options, and the verdicts on made-up numbers."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptpeft_kernels.analysis import reproduction as R
from ptpeft_kernels.reproduce import build_parser, main, reproduce

# A few steps of the tiny built-in model with a handful of evaluation samples: seconds per run.
TINY_TRAIN = [
    "--batch-size",
    "4",
    "--eval-batch-size",
    "8",
    "--max-new-tokens",
    "4",
    "--rank-samples",
    "4",
    "--rank-bootstrap",
    "40",
    "--rank-length",
    "24",
]
METHODS = ["lora", "pt-lora"]
SEEDS = 2


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ptpeft-cache")


def _argv(out: Path, cache: Path, steps: int = 2) -> list[str]:
    return [
        "--builtin-preset",
        "tiny",
        "--cache-dir",
        str(cache),
        "--methods",
        *METHODS,
        "--seeds",
        str(SEEDS),
        "--steps",
        str(steps),
        "--output-dir",
        str(out),
        "--quiet",
        "--",
        *TINY_TRAIN,
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cache):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("reproduce")
    try:
        result = reproduce(_argv(out, tiny_cache))
    finally:
        torch.set_num_threads(threads)
    return out, result


def _reports(out: Path) -> dict[tuple[str, int], dict]:
    return {
        (m, s): json.loads((out / "runs" / f"{m}-seed{s}" / "report.json").read_text())
        for m in METHODS
        for s in range(SEEDS)
    }


KEYS = ("CIDEr", "rank_ratio", "effective_rank", "deviation", "cka")


def _last(report: dict) -> tuple[float, ...]:
    st = report["stages"][-1]
    rep = st["representation"]
    return (st["scores"]["CIDEr"], *(rep[k] for k in KEYS[1:]))


def _fmt(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.fmean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def test_tiny_reproduction_writes_tables_equal_to_the_run_reports(tiny_run):
    out, result = tiny_run
    assert result["trained"] == len(METHODS) * SEEDS and result["reused"] == 0
    for name in ("reproduce.md", "reproduce.csv", "reproduce_runs.csv", "reproduce.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "reproduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = _reports(out)
    for (m, s), rep in reports.items():
        assert rep["complete"] and rep["method"] == m and rep["global_steps"] == 2
        assert json.loads((out / "runs" / f"{m}-seed{s}" / "config.json").read_text())["seed"] == s

    # One row per run: exactly the numbers of its report.json.
    with open(out / "reproduce_runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], int(r["seed"])) for r in rows] == list(reports)
    for r in rows:
        want = _last(reports[(r["method"], int(r["seed"]))])
        got = tuple(float(r[k]) for k in KEYS)
        assert got == want
        pre = reports[(r["method"], int(r["seed"]))]["stages"][-1]["representation"]["pretrain_distribution"]
        assert float(r["pretrain_rank_ratio"]) == pre["rank_ratio"]

    # One row per method: means and standard deviations over the seeds' reports.
    with open(out / "reproduce.csv") as fh:
        agg = {r["method"]: r for r in csv.DictReader(fh)}
    assert list(agg) == ["pretrained", *METHODS]
    assert (
        float(agg["lora"]["paper_rank_ratio"]) == 52.0
        and float(agg["pretrained"]["paper_rank_ratio"]) == 68.2
    )
    assert agg["pt-lora"]["paper_rank_ratio"] == ""
    md = (out / "reproduce.md").read_text()
    for m in METHODS:
        per_seed = [_last(reports[(m, s)]) for s in range(SEEDS)]
        for i, key in enumerate(KEYS):
            vals = [v[i] for v in per_seed]
            assert float(agg[m][f"{key}_mean"]) == pytest.approx(statistics.fmean(vals), abs=1e-12)
            assert float(agg[m][f"{key}_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
        # The interval of the seed mean: percentiles of the replicates averaged over seeds.
        boots = [
            load_file(
                str(
                    out
                    / "runs"
                    / f"{m}-seed{s}"
                    / f"bootstrap-{reports[(m, s)]['stages'][-1]['name']}.safetensors"
                )
            )
            for s in range(SEEDS)
        ]
        q = torch.tensor([0.025, 0.975], dtype=torch.float64)
        for s, b in enumerate(boots):  # each run saved the replicates its own report's interval came from
            ci = reports[(m, s)]["stages"][-1]["representation"]["ci"]
            for key in KEYS[1:]:
                saved = b[f"downstream/{key}"]
                assert saved.dtype == torch.float64, key  # float32 would round them: other intervals
                assert ci[key] == pytest.approx(torch.quantile(saved, q).tolist(), abs=1e-12), key
        for key in KEYS[1:]:
            mean_reps = sum(b[f"downstream/{key}"].double() for b in boots) / SEEDS
            lo, hi = torch.quantile(mean_reps, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
            assert float(agg[m][f"{key}_ci_low"]) == pytest.approx(lo, abs=1e-12)
            assert float(agg[m][f"{key}_ci_high"]) == pytest.approx(hi, abs=1e-12)
        assert int(agg[m]["trainable_params"]) == reports[(m, 0)]["stages"][-1]["trainable_params"]
        # The markdown row shows the same statistics, formatted.
        row = next(line for line in md.splitlines() if line.startswith(f"| {m} |"))
        rr = agg[m]
        cell = f"{_fmt([v[1] for v in per_seed], '.1f')} [{float(rr['rank_ratio_ci_low']):.1f}, "
        cell += f"{float(rr['rank_ratio_ci_high']):.1f}]"
        assert f"| {_fmt([v[0] for v in per_seed], '.1f')} | {cell} |" in row, (row, cell)
    pre = [r["pretrained"]["representation"]["rank_ratio"] for r in reports.values()]
    assert float(agg["pretrained"]["rank_ratio_mean"]) == pytest.approx(statistics.fmean(pre), abs=1e-12)
    # The paper's numbers side by side, the verdicts, the plot link.
    assert "| lora | 52.0 | -16.2 |" in md and "| pre-trained | 68.2 | +0.0 |" in md
    assert "(a) weight-modifying" in md and "(c) pt-*" in md and "![" in md and "reproduce.png" in md
    # The spectrum length and the resolution are printed with the tables; both distributions reported.
    assert "rank ratio % (n = 24)" in md and "steps of 100 / 24 = 4.17 points" in md
    assert "## Results on the pre-training distribution samples" in md


def test_rerun_reuses_finished_runs_and_continues_unfinished_ones(tiny_run, tiny_cache, capsys):
    out, _ = tiny_run
    before = _reports(out)
    # An interrupted run: its report is gone, its checkpoints are there.
    (out / "runs" / "pt-lora-seed1" / "report.json").unlink()
    mtime = (out / "runs" / "lora-seed0" / "report.json").stat().st_mtime_ns
    threads = torch.get_num_threads()
    try:
        result = reproduce(_argv(out, tiny_cache))
    finally:
        torch.set_num_threads(threads)
    assert result["trained"] == 1 and result["reused"] == len(METHODS) * SEEDS - 1
    assert (out / "runs" / "lora-seed0" / "report.json").stat().st_mtime_ns == mtime
    after = _reports(out)
    assert {k: _last(v) for k, v in after.items()} == {k: _last(v) for k, v in before.items()}
    assert "--resume" in (out / "runs" / "pt-lora-seed1" / "driver.log").read_text()
    history = json.loads((out / "reproduce_log.json").read_text())
    assert [h["trained"] for h in history][-2:] == [len(METHODS) * SEEDS, 1]
    assert "earlier invocations on this output directory" in (out / "reproduce.md").read_text()


def test_parallel_jobs_give_the_numbers_of_the_sequential_runs(tiny_run, tiny_cache, tmp_path):
    out, _ = tiny_run
    argv = _argv(tmp_path / "par", tiny_cache)
    argv[argv.index("--methods") + 1 : argv.index("--seeds")] = ["lora"]
    result = reproduce(["--jobs", "2", *argv])
    assert result["trained"] == SEEDS
    for s in range(SEEDS):
        par = json.loads((tmp_path / "par" / "runs" / f"lora-seed{s}" / "report.json").read_text())
        assert _last(par) == _last(_reports(out)[("lora", s)])


def test_other_settings_in_the_same_output_dir_are_refused(tiny_run, tiny_cache, capsys):
    out, _ = tiny_run
    assert main(_argv(out, tiny_cache, steps=3)) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps" in err


@pytest.mark.parametrize("opt", ["--method", "--meth", "--seed", "--output-dir=x", "--resume", "--model"])
def test_options_reproduce_sets_itself_are_refused_after_the_separator(tmp_path, opt, capsys):
    assert main(["--output-dir", str(tmp_path / "o"), "--", opt, "full"]) == 2
    assert "set by reproduce itself" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_explains_every_option():
    text = build_parser().format_help()
    for opt in ("--methods", "--seeds", "--steps", "--task", "--output-dir", "--quick", "--quiet", "--jobs"):
        assert opt in text
    assert "-- TRAIN_OPTIONS" in text


# ----------------------------------------------------------------------------------- verdicts


def _fake(
    method: str, seed: int, score: float, rank: float, dev: float, cka: float, width: float
) -> R.RunResult:
    """A finished run whose measures carry intervals of half-width ``width`` (relative for rank,
    effective rank = rank / 10); the pre-trained model: rank ratio 60, effective rank 6."""
    curve = [0.5, 0.8, 1.0]

    def rep(r: float, d: float, c: float) -> dict:
        vals = {"rank_ratio": r, "effective_rank": r / 10, "deviation": d, "cka": c}
        ci = {k: [v - width * max(abs(v), 0.01), v + width * max(abs(v), 0.01)] for k, v in vals.items()}
        return {**vals, "spectrum": curve, "spectrum_length": 3, "ci": ci}

    report = {
        "task": "caption",
        "primary_metric": "CIDEr",
        "complete": True,
        "global_steps": 10,
        "total_time_s": 5.0,
        "pretrained": {"scores": {"CIDEr": 30.0}, "representation": rep(60.0, 0.0, 1.0)},
        "stages": [
            {
                "trainable_params": 100,
                "train_time_s": 4.0,
                "scores": {"CIDEr": score},
                "representation": rep(rank, dev, cka),
            }
        ],
    }
    return R.RunResult(method, seed, f"/runs/{method}-seed{seed}", report)


def _summary(table: dict[str, tuple[float, float, float, float]], width: float = 0.001) -> R.Reproduction:
    return R.summarize([_fake(m, 0, *vals, width) for m, vals in table.items()])


PAPER_LIKE = {
    "prefix": (80.0, 60.0, 0.010, 0.95),
    "lora": (100.0, 50.0, 0.080, 0.70),
    "full": (105.0, 45.0, 0.100, 0.60),
    "pt-lora": (104.0, 55.0, 0.040, 0.85),
}


def test_verdicts_agree_when_the_numbers_follow_the_paper_beyond_the_intervals():
    vs = R.verdicts(_summary(PAPER_LIKE))
    assert [v.status for v in vs] == ["agrees", "agrees", "agrees"]
    assert R.overall(vs).startswith("The small-scale result agrees with every tested claim")
    # (b): prefix's rank ratio is judged the same as the pre-trained model's because the intervals overlap.
    assert any(
        d.startswith("rank ratio unchanged: prefix 60.0 [59.9, 60.1] vs pre-trained") for d in vs[1].details
    )


def test_verdicts_disagree_when_the_numbers_contradict_the_paper():
    contrary = {
        "prefix": (80.0, 45.0, 0.200, 0.50),  # prefix collapses the space the most
        "lora": (100.0, 65.0, 0.010, 0.95),
        "full": (105.0, 65.0, 0.020, 0.90),
        "pt-lora": (50.0, 45.0, 0.300, 0.40),  # far from the best score, further from pre-trained
    }
    vs = R.verdicts(_summary(contrary))
    assert [v.status for v in vs] == ["disagrees", "disagrees", "disagrees"]


def test_overlapping_intervals_are_within_noise_not_agreement():
    # PAPER_LIKE's ordering with every interval +-30 %: the rank gaps are inside it, the deviation gaps not.
    vs = R.verdicts(_summary(PAPER_LIKE, width=0.3))
    assert vs[0].outcomes == ["within noise"] * 4 + ["yes"] + ["within noise"] * 4 + ["yes"]
    assert vs[0].status == "partly" and "the bootstrap intervals overlap" in vs[0].details[0]
    # (b): "unchanged" is judged yes exactly because prefix and pre-trained cannot be told apart.
    assert vs[1].status == "agrees"
    assert vs[2].outcomes == ["yes", "yes", "within noise"]  # close to the best; deviation; CKA
    close = {
        "prefix": (80.0, 60.0, 0.050, 0.95),
        "lora": (100.0, 55.0, 0.060, 0.9),
        "full": (101.0, 56.0, 0.055, 0.9),
    }
    vs = R.verdicts(_summary(close, width=0.3))
    assert vs[0].status == "within noise" and set(vs[0].outcomes) == {"within noise"}
    assert R.overall(vs[:1]).startswith("The small-scale result cannot tell any tested claim")


def test_seed_spread_also_counts_as_noise():
    runs = []
    for seed, jitter in enumerate((-8.0, 8.0)):
        for m, (score, rank, dev, cka) in PAPER_LIKE.items():
            runs.append(_fake(m, seed, score, rank + (jitter if m == "lora" else 0.0), dev, cka, 0.001))
    rep = R.summarize(runs)
    lora = rep.methods["lora"].rank_ratio
    # No replicate files here, several seeds: no interval, the seed spread decides.
    assert lora.ci is None and lora.std == pytest.approx(math.sqrt(128))  # > the gap of 10
    outcome, text = R._judge("lora", lora, "prefix", rep.methods["prefix"].rank_ratio, ".1f", "lower")
    assert outcome == "within noise" and "seed spread" in text


def test_verdicts_report_partial_agreement_and_untested_claims():
    mixed = dict(PAPER_LIKE, lora=(100.0, 60.0, 0.080, 0.70))  # lora keeps the rank ratio, moves the spectrum
    vs = R.verdicts(_summary(mixed))
    assert vs[0].status == "partly" and any("lora 60.0 [59.9, 60.1] vs prefix" in d for d in vs[0].details)
    only = R.verdicts(_summary({"lora": PAPER_LIKE["lora"], "full": PAPER_LIKE["full"]}))
    assert [v.status for v in only] == ["not tested"] * 3


def test_rank_ordering_and_paper_table():
    rep = _summary(PAPER_LIKE)
    assert R.ordering(rep) == "pre-trained 60.0 = prefix 60.0 > pt-lora 55.0 > lora 50.0 > full 45.0"
    rows = {r[0]: r for r in R.paper_rows(rep)}
    assert rows["full"][1:3] == ["47.0", "-21.2"] and rows["full"][4] == "-15.0"
    assert rows["pt-lora"][1] == "not quoted"


def test_under_torchrun_every_run_is_one_distributed_training(tiny_run, tiny_cache, tmp_path):
    """Two processes run the same runs together (one process group for all of them); rank 0 writes
    the tables, and each run equals its single-process counterpart of the module's reproduction."""
    import os
    import subprocess
    import sys

    out, _ = tiny_run
    argv = _argv(tmp_path / "ddp", tiny_cache)
    argv[argv.index("--methods") + 1 : argv.index("--seeds")] = ["lora"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "ptpeft_kernels.reproduce", *argv], env=env, capture_output=True, text=True, timeout=900
    )
    # A rank that fails prints "error: ..." (reproduce.main, exit 2) long before the other rank's traceback
    # and torchrun's report fill the end of stderr: show those lines too.
    errors = "\n".join(line for line in proc.stderr.splitlines() if "error:" in line)
    assert proc.returncode == 0, errors + "\n...\n" + proc.stderr[-3000:]
    assert proc.stdout.count("wall time") == 1  # rank 0 alone prints the result
    for m, seed in (("lora", 0), ("lora", 1)):
        ddp = json.loads((tmp_path / "ddp" / "runs" / f"{m}-seed{seed}" / "report.json").read_text())
        ref = _reports(out)[(m, seed)]
        assert ddp["world_size"] == 2 and ddp["complete"]
        # Same global batch, same run (the driver's DDP guarantee) up to the all-reduce's round-off.
        assert _last(ddp) == pytest.approx(_last(ref), rel=1e-4, abs=1e-4)
    assert "torchrun --nproc_per_node=2" in (tmp_path / "ddp" / "reproduce.md").read_text()


def test_a_signal_during_a_run_ends_with_the_reproduce_hint_not_a_traceback(
    tiny_run, tiny_cache, tmp_path, monkeypatch, capsys
):
    """A Ctrl-C of ``reproduce`` (one run at a time) reaches it as the driver's ``Interrupted``:
    before the fix it escaped ``main`` as a traceback ending in the driver's ``--resume DIR`` advice."""
    import signal

    import ptpeft_kernels.reproduce as reproduce_module
    from ptpeft_kernels.train.interrupt import Interrupted

    driver_message = (
        "interrupted by SIGINT: finished global step 1 (stage full, step 1); checkpoint step-0000001 "
        "written in /x/runs/full-seed0. Continue the run with:\n  python -m ptpeft_kernels.train --resume /x"
    )

    def interrupted(argv, log_path):
        raise Interrupted(signal.SIGINT, driver_message)

    monkeypatch.setattr(reproduce_module, "_train_one", interrupted)
    assert main(_argv(tmp_path / "o", tiny_cache)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "checkpoint step-0000001 written in /x/runs/full-seed0." in err
    assert "run the same reproduce command again to continue" in err
    assert "--resume" not in err and "Traceback" not in err
