"""The benchmark scripts run end to end on tiny shapes and log what they measured (no timing asserted)."""

import argparse
import contextlib
import csv
import time

import pytest
import torch

from benchmarks import adapter, attn, common, lora


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the suite's other CPU-heavy tests: with two xdist workers on two cores, two
    threads each oversubscribe the machine and a tiny op waits milliseconds for its second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMOKE = [
    (
        attn,
        [
            "--batch",
            "1",
            "--heads",
            "4",
            "--gqa",
            "1",
            "2",
            "--seq",
            "16",
            "--prefix",
            "3",
            "--head-dim",
            "8",
            "--flex-eager",
        ],
    ),  # fmt: skip
    (lora, ["--tokens", "2", "8", "--features", "16", "12", "--rank", "4", "--bias"]),
    (adapter, ["--tokens", "2", "8", "--width", "16", "--bottleneck", "4", "--activation", "silu"]),
]


@pytest.mark.parametrize("script,args", SMOKE, ids=["attn", "lora", "adapter"])
def test_benchmark_script_runs_and_appends_csv(script, args, tmp_path, capsys):
    """Every provider either agrees with float64 and is timed, or says why not (no timing asserted)."""
    path = tmp_path / "out.csv"
    script.main([*args, "--repeats", "2", "--warmup", "0", "--csv", str(path)])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    timed = [r for r in rows if r["status"] == "ok"]
    assert "ptpeft-torch" in {r["provider"] for r in timed} and len({r["provider"] for r in timed}) >= 2
    assert not [r for r in rows if r["status"].startswith("wrong")]  # every provider computes the function
    modes = (
        {"inference", "forward", "backward", "full"} if script is attn else {"forward", "backward", "full"}
    )
    assert {r["mode"] for r in timed} == modes
    for row in timed:
        assert float(row["median_ms"]) > 0 and float(row["peak_mib"]) >= 0
        assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    for row in rows:
        assert row["device"] and "torch" in row["versions"] and row["timestamp"] and row["run_id"]
        assert row["provider"] in printed
        if row["status"] != "ok":
            assert row["median_ms"] == "" and row["peak_mib"] == ""
    assert len({r["run_id"] for r in rows}) == 1  # one invocation, one run id, whatever its points
    if script is attn:
        by = {(r["provider"], r["mode"], r["gqa"]): r for r in rows}
        assert {r["gqa"] for r in rows} == {"1", "2"} and {r["sweep"] for r in rows} == {"gqa"}
        assert by[("flex-attention-eager", "inference", "2")]["status"] == "ok"
        assert by[("flex-attention-eager", "full", "1")]["status"].startswith(
            "unsupported: FlexAttention does not support backward on CPU"
        )
        assert by[("flash-attn", "full", "1")]["status"] == "skipped: flash_attn is not installed"
        # TFLOP/s: 4 B Hq D x visible pairs, 3.5x that for fwd+bwd (16 queries: 3 prefix keys + the triangle)
        full = by[("ptpeft-torch", "full", "2")]
        flops = 3.5 * 4 * 1 * 4 * 8 * (16 * 3 + 16 * 17 // 2)
        assert float(full["tflops"]) == pytest.approx(
            flops / (float(full["median_ms"]) * 1e-3) / 1e12, rel=1e-6
        )


@pytest.mark.parametrize(
    "n,m,p,causal", [(16, 16, 3, True), (5, 9, 0, True), (7, 7, 2, False), (4, 11, 5, False), (1, 6, 1, True)]
)
def test_attention_flops_count_every_visible_pair_exactly(n, m, p, causal):
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal:
        keep = keep.tril(m - n)  # bottom-right: query i sees key j iff j <= i + (M - N)
    assert attn.visible_pairs(n, m, p, causal) == n * p + int(keep.sum())


def test_a_provider_that_disagrees_or_cannot_run_a_mode_is_reported_not_timed():
    x = torch.randn(4, 3, requires_grad=True)

    def no_backward(x):
        if torch.is_grad_enabled():
            raise NotImplementedError("no backward here")
        return x * 2

    providers = {
        "right": common.Provider(lambda x: x * 2, (x,), [x]),
        "wrong": common.Provider(lambda x: x * 2.01, (x,), [x]),
        "forward-only": common.Provider(no_backward, (x,), [x]),
        "absent": common.Provider(lambda x: x, skipped="not installed"),
    }
    ref = (x.detach() * 2).double()

    def check(name, out):
        return common.provider_error(name, out, ref, ref.float())

    rows = common.run_providers(
        "t", providers, check, ["inference", "full"], "s", torch.float32, torch.device("cpu"), 0, 2, {"k": 1}
    )
    status = {(r.provider, r.mode): r.status for r in rows}
    assert status[("right", "inference")] == status[("right", "full")] == "ok"
    assert status[("wrong", "full")].startswith(
        "wrong: provider wrong does not compute the benchmarked function"
    )
    assert status[("forward-only", "inference")] == "ok"
    assert status[("forward-only", "full")] == "unsupported: no backward here"
    assert status[("absent", "full")] == "skipped: not installed"
    for r in rows:
        assert (r.median_ms is None) == (r.status != "ok") and r.extra["k"] == 1


def test_compile_time_is_the_first_call_less_the_median_and_never_timed():
    """The first call of a compiled provider is its float64 check: that is where it compiles."""
    x = torch.randn(3)
    calls = []

    def compiles_on_first_call(x):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # the "compilation"
        return x * 2

    provider = common.Provider(compiles_on_first_call, (x,), [], compiled=True)
    rows = common.run_providers(
        "t", {"c": provider}, lambda n, o: None, ["inference"], "s", torch.float32, torch.device("cpu"), 0, 3
    )
    assert rows[0].extra["compile_s"] >= 0.25 and rows[0].median_ms < 250  # compiled once, never timed


def test_any_other_exception_of_a_provider_propagates():
    x = torch.randn(2, requires_grad=True)

    def broken(x):
        raise RuntimeError("kernel crashed")

    with pytest.raises(RuntimeError, match="kernel crashed"):
        common.run_providers(
            "t", {"b": common.Provider(broken, (x,), [x])}, lambda n, o: None, ["full"], "s",
            torch.float32, torch.device("cpu"), 0, 1,
        )  # fmt: skip


def test_sweeps_measure_the_shared_base_point_once_and_name_its_axes():
    points = common.sweep_points({"n": 2, "p": 0}, {"n": [1, 2, 4], "p": [0, 16]})
    assert points == [({"n": 1, "p": 0}, ["n"]), ({"n": 2, "p": 0}, ["n", "p"]), ({"n": 4, "p": 0}, ["n"]),
                      ({"n": 2, "p": 16}, ["p"])]  # fmt: skip
    assert common.product_points({"n": [1, 2], "p": [0], "d": [8, 16]})[1] == (
        {"n": 1, "p": 0, "d": 16},
        ["n", "d"],
    )
    with pytest.raises(ValueError, match="sweep axis 'x' is not a parameter"):
        common.sweep_points({"n": 1}, {"x": [1]})


def test_a_parameter_named_like_a_column_is_refused(tmp_path):
    row = common.Row("t", "p", "full", "B1 N8", "float32", 1.0, 1.0, 1.0, 0.0, extra={"shape": "qwen"})
    with pytest.raises(ValueError, match=r"row extra columns \['shape'\] would overwrite"):
        common.append_csv([row], tmp_path / "x.csv", torch.device("cpu"))


def test_rows_of_different_providers_may_carry_different_extra_columns(tmp_path):
    rows = [
        common.Row("t", "a", "full", "s", "float32", 1.0, 1.0, 1.0, 0.0, extra={"n": 1}),
        common.Row("t", "b", "full", "s", "float32", 2.0, 2.0, 2.0, 0.0, extra={"n": 1, "compile_s": 9.5}),
    ]
    common.append_csv(rows, tmp_path / "x.csv", torch.device("cpu"))
    written = list(csv.DictReader((tmp_path / "x.csv").open()))
    assert [r["compile_s"] for r in written] == ["", "9.5"]  # the first row's keys alone would drop it


def test_gpu_suite_counts_one_of_ours_that_was_not_timed_as_a_miss(tmp_path):
    from benchmarks import gpu_suite

    args = argparse.Namespace(out=tmp_path, smoke=False, budget_s=360.0, autotune=False, workers=0, repeats=1)
    run = gpu_suite.Run(args)
    fields = ["run_id", "provider", "mode", "shape", "median_ms", "status"]
    with (tmp_path / "attn_memory.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for n, ours, theirs in ((2048, "1.0", "9.0"), (4096, "", "12.0")):
            shape = f"B8 H16 N{n} P32 D128 causal"
            w.writerow(dict(run_id=run.id, provider="peft-sdpa", mode="full", shape=shape, median_ms=theirs,
                            status="ok"))  # fmt: skip
            w.writerow(dict(run_id=run.id, provider="ptpeft-triton", mode="full", shape=shape, median_ms=ours,
                            status="ok" if ours else "wrong: max error 1e-1"))  # fmt: skip
    evaluate = gpu_suite.ratio_target(
        "attn_memory.csv", "peft-sdpa", 1 / 1.5, shape_has=gpu_suite._largest_memory_n
    )
    assert evaluate(run) == [
        ("ptpeft-triton: not timed (wrong: max error 1e-1)", "missed")
    ]  # N=2048 not read


def test_rows_carry_the_run_id_and_an_older_csv_gets_the_column(tmp_path, monkeypatch):
    path = tmp_path / "old.csv"
    path.write_text("timestamp,provider,median_ms\n2026-01-01,peft,1.5\n")  # written before run ids existed
    monkeypatch.setenv(common.RUN_ID_VAR, "run-7")
    row = common.Row("attn", "ptpeft-torch", "full", "x", "float32", 2.0, 1.9, 2.1, 0.5)
    common.append_csv([row], path, torch.device("cpu"))
    rows = list(csv.DictReader(path.open()))
    assert [r["run_id"] for r in rows] == ["", "run-7"]
    assert rows[0]["median_ms"] == "1.5" and rows[1]["median_ms"] == "2.0"  # nothing shifted columns
    assert rows[1]["provider"] == "ptpeft-torch" and rows[0]["provider"] == "peft"


def test_cuda_timing_uses_events_around_each_call_after_an_l2_flush(monkeypatch):
    """Without a GPU: fake events on a fake GPU clock that each call advances by a known amount."""
    log, clock = [], [0.0]

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock[0]
            log.append("record")

        def elapsed_time(self, end):
            return end.at - self.at

    class Flush:
        def zero_(self):
            clock[0] += 100.0  # a flush inside the events would add 100 ms to a measurement
            log.append("flush")

    durations = iter([7.0, 2.0, 3.0])  # warm-up, then the two timed calls

    def fn():
        clock[0] += next(durations)
        log.append("call")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(common, "_l2_flush_buffer", lambda device: Flush())
    monkeypatch.setattr(common.time, "perf_counter", lambda: pytest.fail("perf_counter timed a CUDA call"))
    assert common.time_ms(fn, torch.device("cuda"), warmup=1, repeats=2) == [2.0, 3.0]
    assert log == ["call", "sync"] + ["flush", "record", "call", "record"] * 2 + ["sync"]


def test_a_provider_that_computes_another_function_stops_the_benchmark():
    ref = torch.randn(4, 8, dtype=torch.float64)
    same = ref.to(torch.bfloat16)
    common.check_provider("close", ref.to(torch.bfloat16), ref, same)  # rounding alone passes
    with pytest.raises(SystemExit, match="provider wrong does not compute the benchmarked function"):
        common.check_provider("wrong", (ref * 1.1).to(torch.bfloat16), ref, same)
    with pytest.raises(SystemExit, match="provider nan does not compute"):
        common.check_provider("nan", torch.full_like(same, float("nan")), ref, same)
