"""Report measures: before stage 1 and after every stage, against the pre-trained model, on the
downstream and the pre-training distribution, at a fixed number of positions per sample."""

import math

import pytest
import torch
from safetensors.torch import load_file

from ptpeft_kernels.analysis import cumulative_spectrum, rank_ratio_from_curve, spectrum_deviation
from ptpeft_kernels.train.run import train

from .conftest import TINY


def _erank(features: list[torch.Tensor]) -> float:
    """Roy & Vetterli's effective rank per sample, averaged, straight from the definition."""
    values = []
    for f in features:
        s = torch.linalg.svdvals(f.double())
        p = s / s.sum()
        values.append(math.exp(-sum(float(x) * math.log(float(x)) for x in p if x > 0)))
    return sum(values) / len(values)


def test_measures_before_stage1_and_after_every_stage_against_the_pretrained_model(tmp_path, tiny_assets):
    out = tmp_path / "run"
    report = train(
        [*TINY, "--method", "pt-lora", "--steps", "4", "--output-dir", str(out), "--rank-bootstrap", "50"]
    )
    saved = load_file(str(out / "base_features.safetensors"))
    for dist in ("downstream", "pretrain"):
        base = [saved[f"{dist}/{i}"] for i in range(4)]
        # --rank-length 128 (default): 128 positions per sample; the tiny model is 32 wide, so n = 32.
        assert all(f.shape == (128, 32) for f in base)
        base_curve = cumulative_spectrum(base)
        pre = report["pretrained"]["representation"]
        pre = pre if dist == "downstream" else pre["pretrain_distribution"]
        assert pre["spectrum"] == pytest.approx(base_curve.tolist(), abs=1e-12)
        assert pre["rank_ratio"] == rank_ratio_from_curve(base_curve)
        assert pre["spectrum_length"] == 32 and pre["positions"] == 128 and pre["samples"] == 4
        # --rank-fill repeat (default): the ~20-token samples continue with their own caption, no padding.
        assert pre["real_positions"] == 1.0
        assert pre["effective_rank"] == pytest.approx(_erank(base), rel=1e-6)
        assert pre["deviation"] == 0.0 and pre["cka"] == pytest.approx(1.0)
        assert pre["bootstrap"] == {"resamples": 50, "seed": 0, "confidence": 0.95}
        lo, hi = pre["ci"]["effective_rank"]
        assert lo <= pre["effective_rank"] <= hi

        assert [s["name"] for s in report["stages"]] == ["stage1-prefix", "stage2-lora"]
        for s in report["stages"]:
            rep = (
                s["representation"] if dist == "downstream" else s["representation"]["pretrain_distribution"]
            )
            curve = torch.tensor(rep["spectrum"], dtype=torch.float64)
            assert curve.numel() == base_curve.numel() and curve[-1].item() == pytest.approx(1.0)
            assert rep["rank_ratio"] == rank_ratio_from_curve(curve, 0.9)
            # Compared with the pre-trained model's features, not with the stage's own (0 and 1 then).
            assert rep["deviation"] == pytest.approx(spectrum_deviation(base_curve, curve), abs=1e-12)
            assert rep["deviation"] > 0 and rep["cka"] < 1 - 1e-6
            assert set(rep["ci"]) == {"rank_ratio", "effective_rank", "deviation", "cka"}
            boot = load_file(str(out / f"bootstrap-{s['name']}.safetensors"))
            assert boot[f"{dist}/cka"].shape == (50,)
