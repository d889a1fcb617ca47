"""Plot helpers write PNGs headless and draw what they are given."""

from __future__ import annotations

import pytest
import torch

from ptpeft_kernels.analysis import cumulative_spectrum, plot_cumulative_spectra, plot_rank_ratio_per_layer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cumulative_spectra_plot(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 12, 8, generator=gen)
    low_rank = [torch.randn(12, 2, generator=gen) @ torch.randn(2, 8, generator=gen) for _ in range(3)]
    path = tmp_path / "sub" / "spectra.png"
    fig = plot_cumulative_spectra(
        {"base": feats, "lora": low_rank, "curve": cumulative_spectrum(feats)}, path
    )
    assert path.read_bytes().startswith(PNG_MAGIC)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    # Three curves, each labelled with its rank ratio, and the threshold line.
    assert labels[:3] == ["base (87.5 %)", "lora (25.0 %)", "curve (87.5 %)"]
    assert len(ax.lines) == 4
    # The staircase starts at (0, 0) and ends at (100 %, 1).
    x, y = ax.lines[0].get_data()
    assert (x[0], y[0]) == (0.0, 0.0)
    assert x[-1] == 100.0 and y[-1] == pytest.approx(1.0)


def test_rank_ratio_per_layer_plot(tmp_path):
    path = tmp_path / "layers.png"
    fig = plot_rank_ratio_per_layer(
        {"base": {0: 50.0, 2: 70.0, 1: 60.0}, "lora": {0: 50.0, 1: 40.0, 2: 30.0}}, path
    )
    assert path.read_bytes().startswith(PNG_MAGIC)
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [0, 1, 2] and list(y) == [50.0, 60.0, 70.0]


def test_plot_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        plot_cumulative_spectra({})
    with pytest.raises(ValueError, match="empty"):
        plot_rank_ratio_per_layer({})
    with pytest.raises(ValueError, match="no layers"):
        plot_rank_ratio_per_layer({"a": {}})
    with pytest.raises(ValueError, match="threshold"):
        plot_cumulative_spectra({"a": torch.randn(1, 3, 3)}, threshold=2.0)
