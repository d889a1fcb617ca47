"""compare_representations on in-memory models: rows, loaders, one-shot batch generators."""

from __future__ import annotations

import copy

import pytest
import torch

from ptpeft_kernels.analysis import compare_representations

from .conftest import make_llama


def test_compare_in_memory_models_with_a_generator_of_batches():
    base = make_llama()
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.layers[0].self_attn.o_proj.weight.mul_(-3.0)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 19, (4, 10), generator=gen)} for _ in range(2)]
    loads = []

    def load_same():
        loads.append(1)
        return copy.deepcopy(base)

    result = compare_representations(
        base, {"changed": changed, "same": load_same}, (b for b in data), layers=[1, -1], threshold=0.8
    )
    assert loads == [1]
    assert [(r["model"], r["layer"]) for r in result.rows] == [
        ("base", 1),
        ("base", 2),
        ("changed", 1),
        ("changed", 2),
        ("same", 1),
        ("same", 2),
    ]
    rows = {(r["model"], r["layer"]): r for r in result.rows}
    assert rows["same", 2]["deviation"] == 0.0 and rows["same", 2]["cka"] == pytest.approx(1.0, abs=1e-12)
    assert rows["changed", 1]["deviation"] > 1e-3 and rows["changed", 1]["cka"] < 0.999
    assert result.ratios["changed"][1] == rows["changed", 1]["rank_ratio"]
    # The continuous companion and the resolution beside every ratio.
    for (name, layer), row in rows.items():
        assert row["spectrum_length"] == result.curves[layer][name].numel()
        assert 1.0 <= row["effective_rank"] <= row["spectrum_length"]
    assert result.curves[2]["base"].shape == (10,)
    with pytest.raises(ValueError, match="clashes"):
        compare_representations(base, {"base": changed}, data)
