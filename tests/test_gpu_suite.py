"""benchmarks/gpu_suite.py: its target verdicts, and its whole bench phase at smoke shapes on the CPU."""

import csv

from benchmarks import gpu_suite

FIELDS = ["device", "provider", "mode", "shape", "median_ms", "peak_mib"]


def _write(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for provider, mode, shape, median, peak in rows:
            writer.writerow(dict(zip(FIELDS, ["GPU X", provider, mode, shape, median, peak], strict=True)))


def _target_rows(text: str) -> dict[tuple[str, str], str]:
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "needs" in line]
    return {(r[1].strip(), r[2].strip()): r[4].strip() + " " + r[5].strip() for r in rows}


def test_summary_marks_each_target_met_or_missed(tmp_path):
    shape = "B8 H16 N2048 P32 D128 causal"
    _write(
        tmp_path / "attn.csv",
        [
            ("ptpeft-triton", "full", shape, 10.0, 1.0),
            ("ptpeft-triton", "forward", shape, 99.0, 1.0),  # other modes must not be read
            ("ptpeft-torch", "full", shape, 20.0, 1.0),
            ("peft-sdpa", "full", shape, 14.0, 1.0),
            ("sdpa-noprefix", "full", shape, 8.0, 1.0),
        ],
    )
    _write(
        tmp_path / "lora.csv",
        [("ptpeft-triton", "full", "x", 11.6, 1.0), ("base-linear", "full", "x", 10.0, 1.0)],
    )
    _write(
        tmp_path / "attn_memory.csv",
        [("ptpeft-triton", "full", f"B8 H16 N{n} P32 D128 causal", 1.0, n / 512) for n in (1024, 4096)],
    )
    gpu_suite.phase_summary(tmp_path, None, {"bench": 0})
    text = (tmp_path / "summary.md").read_text()
    rows = _target_rows(text)
    assert rows[("attn >= 1.3x faster than the PEFT path", "ptpeft-triton")].startswith("0.714x")  # 10/14
    assert rows[("attn >= 1.3x faster than the PEFT path", "ptpeft-triton")].endswith("met")
    assert rows[("attn >= 1.3x faster than the PEFT path", "ptpeft-torch")].startswith("1.429x")
    assert rows[("attn >= 1.3x faster than the PEFT path", "ptpeft-torch")].endswith("MISSED")
    assert rows[("attn >= 0.9x of SDPA without prefix", "ptpeft-triton")].startswith("1.250x")
    assert rows[("attn >= 0.9x of SDPA without prefix", "ptpeft-triton")].endswith("MISSED")
    assert rows[("LoRA <= 1.15x the frozen base linear", "ptpeft-triton")].startswith("1.160x")
    assert rows[("LoRA <= 1.15x the frozen base linear", "ptpeft-triton")].endswith("MISSED")
    assert "| adapter >= 1.5x faster than unfused | - | not measured |" in text
    assert "| ptpeft-triton | 2.0 | 8.0 |" in text  # memory by N: 1024 and 4096
    assert "GPU X" in text


def test_bench_phase_runs_every_script_at_smoke_shapes(tmp_path):
    code = gpu_suite.main(
        ["--out", str(tmp_path), "--phases", "bench", "summary", "--smoke", "--repeats", "1"]
    )
    log = (tmp_path / "bench.log").read_text()
    assert code == 0, log[-3000:]
    for name in ("attn.csv", "lora.csv", "adapter.csv", "attn_memory.csv", "train_step.csv"):
        assert list(csv.DictReader((tmp_path / name).open())), name
    rows = _target_rows((tmp_path / "summary.md").read_text())
    # On the CPU only the torch backend is timed: one verdict row per target, each with a ratio.
    assert {provider for _, provider in rows} == {"ptpeft-torch"} and len(rows) == len(gpu_suite.TARGETS)
    assert all(v.split("x")[0].replace(".", "").isdigit() for v in rows.values())
