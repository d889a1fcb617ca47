"""benchmarks/gpu_suite.py: the target verdicts it writes from the benchmark CSVs (no GPU needed)."""

import csv

from benchmarks import gpu_suite

FIELDS = ["device", "provider", "mode", "shape", "median_ms", "peak_mib"]


def _write(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for provider, mode, shape, median, peak in rows:
            writer.writerow(dict(zip(FIELDS, ["GPU X", provider, mode, shape, median, peak], strict=True)))


def test_summary_marks_each_target_met_or_missed(tmp_path):
    shape = "B8 H16 N2048 P32 D128 causal"
    _write(
        tmp_path / "attn.csv",
        [
            ("ptpeft-triton", "full", shape, 10.0, 1.0),
            ("ptpeft-triton", "forward", shape, 99.0, 1.0),  # other modes must not be read
            ("peft-sdpa", "full", shape, 14.0, 1.0),  # 10/14 = 0.714 <= 0.769: met
            ("sdpa-noprefix", "full", shape, 8.0, 1.0),  # 10/8 = 1.25 > 1.111: missed
        ],
    )
    _write(
        tmp_path / "lora.csv",
        [("ptpeft-triton", "full", "x", 11.6, 1.0), ("base-linear", "full", "x", 10.0, 1.0)],  # 1.16x: missed
    )
    _write(
        tmp_path / "attn_memory.csv",
        [("ptpeft-triton", "full", f"B8 H16 N{n} P32 D128 causal", 1.0, n / 512) for n in (1024, 4096)],
    )
    gpu_suite.phase_summary(tmp_path, None, {"bench": 0})
    text = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.714x" in rows["attn >= 1.3x faster than PEFT path"] and "| met |" in rows[
        "attn >= 1.3x faster than PEFT path"
    ]
    assert "1.250x" in rows["attn >= 0.9x of flash SDPA, no prefix"] and "MISSED" in rows[
        "attn >= 0.9x of flash SDPA, no prefix"
    ]
    assert "1.160x" in rows["LoRA <= 1.15x frozen base linear"] and "MISSED" in rows[
        "LoRA <= 1.15x frozen base linear"
    ]
    assert "not measured" in rows["adapter >= 1.5x faster than unfused"]
    assert "| ptpeft-triton | 2.0 | - | 8.0 |" in text
    assert "GPU X" in text
