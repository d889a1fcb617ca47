"""The benchmark scripts run end to end on tiny shapes and log what they measured (no timing asserted)."""

import contextlib
import csv

import pytest
import torch

from benchmarks import adapter, attn, common, lora


@pytest.mark.parametrize(
    "script,args",
    [
        (attn, ["--batch", "1", "--heads", "2", "--seq", "16", "--prefix", "3", "--head-dim", "8"]),
        (lora, ["--tokens", "2", "8", "--features", "16", "12", "--rank", "4", "--bias"]),
        (adapter, ["--tokens", "2", "8", "--width", "16", "--bottleneck", "4", "--activation", "silu"]),
    ],
)
def test_benchmark_script_runs_and_appends_csv(script, args, tmp_path, capsys):
    path = tmp_path / "out.csv"
    script.main([*args, "--repeats", "2", "--warmup", "0", "--csv", str(path)])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    providers = {r["provider"] for r in rows}
    assert "ptpeft-torch" in providers and len(providers) >= 2
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["peak_mib"]) >= 0
        assert row["device"] and "torch" in row["versions"] and row["timestamp"]
        assert row["provider"] in printed


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
