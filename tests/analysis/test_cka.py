"""Linear CKA: identity, invariances, independence, the textbook HSIC form, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from ptpeft_kernels.analysis import cka


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


def rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    return q


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA written as HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the centring matrix H."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ (x @ x.T) @ h
    lm = h @ (y @ y.T) @ h
    return float((k * lm).sum() / torch.sqrt((k * k).sum() * (lm * lm).sum()))


# n > d (feature-space Gram) and n < d (sample-space Gram) take different code paths.
SHAPES = [(300, 12, 20), (10, 24, 16)]


@pytest.mark.parametrize("n, d1, d2", SHAPES)
def test_self_similarity_is_one(gen, n, d1, d2):
    x = torch.randn(n, d1, generator=gen)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n, d1, d2", SHAPES)
def test_matches_hsic_form(gen, n, d1, d2):
    x = torch.randn(n, d1, generator=gen)
    y = torch.randn(n, d2, generator=gen) + 0.5 * x[:, :1]
    assert cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-12)


@pytest.mark.parametrize("n, d1, d2", SHAPES)
def test_isotropic_scaling_rotation_and_translation_invariance(gen, n, d1, d2):
    x = torch.randn(n, d1, dtype=torch.float64, generator=gen)
    y = torch.tanh(x @ torch.randn(d1, d2, dtype=torch.float64, generator=gen)) + 0.3 * torch.randn(
        n, d2, dtype=torch.float64, generator=gen
    )
    ref = cka(x, y)
    assert 0.05 < ref < 0.99
    assert cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, x @ rotation(d1, gen)) == pytest.approx(1.0, abs=1e-12)
    assert cka(0.01 * x, 50.0 * y) == pytest.approx(ref, abs=1e-12)
    assert cka(x @ rotation(d1, gen), y @ rotation(d2, gen)) == pytest.approx(ref, abs=1e-12)
    assert cka(x + 5.0, y - 2.0) == pytest.approx(ref, abs=1e-12)
    # An anisotropic rescaling is not an invariance of linear CKA (so the checks above can fail).
    squash = torch.diag(torch.logspace(0, -2, d1, dtype=torch.float64))
    assert cka(x, x @ squash) < 0.99


def test_independent_features_score_low(gen):
    x = torch.randn(4000, 16, generator=gen)
    y = torch.randn(4000, 16, generator=gen)
    # Expected value about d / (n + d) = 0.004 for independent Gaussians.
    assert cka(x, y) < 0.05


def test_per_sample_lists_concatenate_over_tokens(gen):
    samples_x = [torch.randn(n, 8, generator=gen) for n in (5, 9, 3)]
    samples_y = [
        torch.randn(n, 6, generator=gen) + s[:, :6] for n, s in zip((5, 9, 3), samples_x, strict=True)
    ]
    expected = cka(torch.cat(samples_x), torch.cat(samples_y))
    assert cka(samples_x, samples_y) == pytest.approx(expected, abs=1e-14)
    # (S, L, d) tensors are flattened over samples and tokens the same way.
    x3, y3 = torch.randn(4, 5, 8, generator=gen), torch.randn(4, 5, 8, generator=gen)
    assert cka(x3, y3) == pytest.approx(cka(x3.reshape(20, 8), list(y3)), abs=1e-14)


def test_bad_inputs(gen):
    x = torch.randn(10, 4, generator=gen)
    with pytest.raises(ValueError, match="10 rows but adapted has 9"):
        cka(x, x[:9])
    with pytest.raises(ValueError, match="sample 1 has 4 vs 5 rows"):
        cka([x[:3], x[3:7]], [x[:3], x[3:8]])
    with pytest.raises(ValueError, match="2 vs 1 samples"):
        cka([x[:3], x[3:7]], [x[:7]])
    with pytest.raises(ValueError, match="at least 2 rows"):
        cka(x[:1], x[:1])
    with pytest.raises(ValueError, match="constant"):
        cka(x, torch.ones(10, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        cka(x, torch.full((10, 4), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        cka(x, torch.ones(10, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        cka([], [])
