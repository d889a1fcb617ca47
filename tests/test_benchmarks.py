"""The benchmark scripts run end to end on tiny shapes and log what they measured (no timing asserted)."""

import csv

import pytest

from benchmarks import adapter, attn, lora


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
