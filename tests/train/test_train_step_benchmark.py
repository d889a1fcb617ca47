"""benchmarks/train_step.py runs on the tiny model and logs every provider (no timing asserted)."""

import csv

from benchmarks import train_step


def test_train_step_benchmark_runs_and_appends_csv(tmp_path, capsys):
    path = tmp_path / "train_step.csv"
    train_step.main(
        [
            "--preset",
            "tiny",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--csv",
            str(path),
        ]
    )
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(path.open()))
    assert {r["provider"] for r in rows} == {"ptpeft-stage2", "ptpeft-lora", "peft-lora"}
    assert {r["mode"] for r in rows} == {"forward", "full"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["device"] and r["timestamp"] and "peft" in r["versions"]
        assert int(r["trainable_params"]) > 0 and r["provider"] in printed
