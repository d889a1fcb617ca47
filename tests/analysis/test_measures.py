"""Effective rank, bootstrap intervals and fixed-length features against independent float64
computations: every replicate is recomputed from the resampled sample list with the plain measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptpeft_kernels import analysis as A
from ptpeft_kernels.analysis import bootstrap as B
from ptpeft_kernels.analysis.features import pad_to_length
from ptpeft_kernels.analysis.measures import fixed_length_features, repeated_text, representation_report

from .test_spectrum import with_singular_values


def _np_erank(matrix: torch.Tensor) -> float:
    s = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _samples(seed: int, count: int = 7, rows: int = 9, width: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows + i % 3, width, generator=gen, dtype=torch.float64) for i in range(count)]


def _resampled(samples: list[torch.Tensor], counts_row: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for i, c in enumerate(counts_row.long().tolist()):
        out += [samples[i]] * c
    return out


def test_effective_rank_known_spectra_and_numpy():
    gen = torch.Generator().manual_seed(0)
    flat = with_singular_values([2.0] * 5, 8, 5, gen)
    one = with_singular_values([3.0], 8, 5, gen)
    assert A.effective_rank([flat]) == pytest.approx(5.0, rel=1e-12)
    assert A.effective_rank([one]) == pytest.approx(1.0, abs=1e-6)  # the zero tail: 0 log 0 = 0
    # s = 4, 3, 2, 1: exp of the entropy of (.4, .3, .2, .1).
    m = with_singular_values([4.0, 3.0, 2.0, 1.0], 6, 4, gen)
    want = math.exp(-sum(p * math.log(p) for p in (0.4, 0.3, 0.2, 0.1)))
    assert A.effective_rank([m]) == pytest.approx(want, rel=1e-12)
    samples = _samples(1)
    common = min(s.shape[0] for s in samples)
    per = [_np_erank(s[:common]) for s in samples]
    torch.testing.assert_close(
        A.effective_ranks(samples), torch.tensor(per, dtype=torch.float64), rtol=1e-10, atol=0
    )
    assert A.effective_rank(samples) == pytest.approx(sum(per) / len(per), rel=1e-10)


def test_resample_counts_are_seeded_draws_with_replacement():
    c = B.resample_counts(5, 40, seed=3)
    assert c.shape == (40, 5) and torch.all(c.sum(dim=1) == 5) and torch.all(c == c.round())
    assert torch.equal(c, B.resample_counts(5, 40, seed=3))
    assert not torch.equal(c, B.resample_counts(5, 40, seed=4))
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        B.resample_counts(5, 0)


def test_percentile_interval_matches_numpy():
    values = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 9.0, 7.0], dtype=torch.float64)
    lo, hi = B.percentile_interval(values, 0.8)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(values.numpy(), [10, 90])), abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        B.percentile_interval(values, 1.0)


@pytest.mark.parametrize("route", ["features", "tokens", "auto"])
def test_every_replicate_equals_the_measure_on_the_resampled_samples(route):
    base = _samples(2)
    mix = torch.randn(6, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    adapted = [s @ mix + 0.2 * s[:, :5] ** 2 for s in base]  # another width: CKA allows d1 != d2
    adapted_same_width = [s + 0.3 * s.roll(1, dims=1) ** 2 for s in base]
    counts = B.resample_counts(len(base), 12, seed=5)
    cka_reps = B.cka_replicates(base, adapted, counts, route=route)
    spectra_b, spectra_a = A.normalized_spectra(base), A.normalized_spectra(adapted_same_width)
    rr = B.rank_ratio_replicates(spectra_a, counts, 0.8)
    er = B.mean_replicates(A.effective_ranks(adapted_same_width), counts)
    dev = B.deviation_replicates(spectra_b, spectra_a, counts)
    common = min(s.shape[0] for s in base)
    for b, row in enumerate(counts):
        xs, ys, zs = _resampled(base, row), _resampled(adapted, row), _resampled(adapted_same_width, row)
        assert cka_reps[b].item() == pytest.approx(A.cka(torch.cat(xs), torch.cat(ys)), rel=1e-9, abs=1e-12)
        cut = [z[:common] for z in zs]  # the resampled set's own shortest sample may be longer
        assert rr[b].item() == A.remaining_rank_ratio(cut, 0.8)
        assert er[b].item() == pytest.approx(np.mean([_np_erank(z) for z in cut]), rel=1e-9)
        want = A.spectrum_deviation([x[:common] for x in xs], cut)
        assert dev[b].item() == pytest.approx(want, abs=1e-12)


def test_representation_report_values_intervals_and_resolution():
    base = [s[:8] for s in _samples(3, count=10, rows=8, width=12)]
    adapted = [s + 0.5 * s.roll(2, dims=1) for s in base]
    rep, reps = representation_report(base, adapted, threshold=0.9, resamples=200, seed=1)
    assert rep["rank_ratio"] == A.remaining_rank_ratio(adapted)
    assert rep["effective_rank"] == pytest.approx(np.mean([_np_erank(a) for a in adapted]), rel=1e-10)
    assert rep["deviation"] == pytest.approx(A.spectrum_deviation(base, adapted), abs=1e-14)
    assert rep["cka"] == A.cka(base, adapted)
    assert rep["spectrum_length"] == 8 and rep["positions"] == 8 and rep["samples"] == 10
    for k in ("rank_ratio", "effective_rank", "deviation", "cka"):
        lo, hi = rep["ci"][k]
        assert (lo, hi) == B.percentile_interval(reps[k], 0.95) and lo <= hi
    assert rep["ci"]["effective_rank"][0] <= rep["effective_rank"] <= rep["ci"]["effective_rank"][1]
    same, same_reps = representation_report(base, base, resamples=20)
    assert same["deviation"] == 0.0 and same["cka"] == 1.0 and torch.all(same_reps["cka"] == 1)
    plain, none = representation_report(base, adapted, resamples=0)
    assert "ci" not in plain and none == {}


def test_pad_to_length_pads_every_per_token_tensor_and_counts_real_positions():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7], [5, 6, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[-100, 6, 7], [-100, 6, -100]]),
        "pixel_values": torch.ones(2, 3, 4, 4),
    }
    out, real = pad_to_length(batch, 5, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 6, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert out["labels"][:, 3:].eq(-100).all() and out["pixel_values"] is batch["pixel_values"]
    assert real == [3, 2]
    longer, real2 = pad_to_length(batch, 2, 0)
    assert longer["input_ids"] is batch["input_ids"] and real2 == [2, 2]
    left = dict(batch, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="not right-padded"):
        pad_to_length(left, 5, 0)


def test_fixed_length_features_are_the_model_outputs_on_the_padded_sequence(tiny_llama):
    batch = {
        "input_ids": torch.tensor([[4, 5, 6, 7], [8, 9, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    feats, share = fixed_length_features(tiny_llama, [batch], length=6, pad_token_id=0)
    assert [f.shape for f in feats] == [(6, 32), (6, 32)] and share == pytest.approx(6 / 12)
    padded = {"input_ids": torch.tensor([[4, 5, 6, 7, 0, 0], [8, 9, 0, 0, 0, 0]])}
    padded["attention_mask"] = (torch.arange(6) < torch.tensor([[4], [2]])).long()
    with torch.no_grad():
        hidden = tiny_llama(**padded, output_hidden_states=True).hidden_states[-1]
        alone = tiny_llama(input_ids=torch.tensor([[8, 9]]), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(torch.stack(feats), hidden, atol=1e-5, rtol=0)
    # The real positions are what the model computes for that sample alone (causal, right padding).
    torch.testing.assert_close(feats[1][:2], alone[0], atol=1e-5, rtol=0)
    truncated, share2 = fixed_length_features(tiny_llama, [batch], length=3, pad_token_id=0)
    assert all(f.shape == (3, 32) for f in truncated) and share2 == pytest.approx(5 / 6)


def test_repeat_fill_continues_the_text_with_itself_to_at_least_the_length():
    assert (
        repeated_text("two shapes : a red circle .", 10)
        == "two shapes : a red circle . two shapes : a red circle ."
    )
    assert repeated_text("a b c", 3) == "a b c" and len(repeated_text("a b c", 7).split()) == 9
    with pytest.raises(ValueError, match="empty"):
        repeated_text("  ", 5)
