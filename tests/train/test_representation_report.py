"""Report measures: before stage 1 and after every stage, against the pre-trained model."""

import pytest
import torch
from safetensors.torch import load_file

from ptpeft_kernels.analysis import cumulative_spectrum, rank_ratio_from_curve, spectrum_deviation
from ptpeft_kernels.train.run import train

from .conftest import TINY


def test_measures_before_stage1_and_after_every_stage_against_the_pretrained_model(tmp_path, tiny_assets):
    out = tmp_path / "run"
    report = train([*TINY, "--method", "pt-lora", "--steps", "4", "--output-dir", str(out)])
    saved = load_file(str(out / "base_features.safetensors"))
    base_curve = cumulative_spectrum([saved[str(i)] for i in range(len(saved))])

    pre = report["pretrained"]["representation"]
    assert pre["spectrum"] == pytest.approx(base_curve.tolist(), abs=1e-12)
    assert pre["rank_ratio"] == rank_ratio_from_curve(base_curve)
    assert pre["deviation"] == 0.0 and pre["cka"] == pytest.approx(1.0)

    assert [s["name"] for s in report["stages"]] == ["stage1-prefix", "stage2-lora"]
    for s in report["stages"]:
        rep = s["representation"]
        curve = torch.tensor(rep["spectrum"], dtype=torch.float64)
        assert curve.numel() == base_curve.numel() and curve[-1].item() == pytest.approx(1.0)
        assert rep["rank_ratio"] == rank_ratio_from_curve(curve, 0.9)
        # Compared with the pre-trained model's features, not with the stage's own (0 and 1 then).
        assert rep["deviation"] == pytest.approx(spectrum_deviation(base_curve, curve), abs=1e-12)
        assert rep["deviation"] > 0 and rep["cka"] < 1 - 1e-6
