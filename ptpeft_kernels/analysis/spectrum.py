"""Singular-value spectra of hidden states and the paper's remaining rank ratio.

Definition (Kim et al. 2024, DESIGN.md). For each sample take its hidden states F_i (L x d) and
their singular values s_i (descending, length n = min(L, d)); normalise p_i = s_i / sum(s_i);
average p = mean_i p_i; take the cumulative sum c = cumsum(p) (c[n-1] = 1). The remaining rank
ratio is ``k / n * 100`` where **k is 1-based: the number of singular values needed** for the
cumulative sum to reach the threshold, i.e. the smallest k with c[k-1] >= threshold. A flat
spectrum of full rank n thus gives ceil(0.9 n) / n (90 % for n = 10); a spectrum with one
non-zero singular value gives 1 / n.

Samples of different lengths. Averaging normalised spectra needs one spectrum length, so every
sample is cut to its first ``m = min_i L_i`` rows (tokens) before the SVD and n = min(m, d).
Why truncation rather than zero-padding the short spectra: a padded short sample looks low-rank
*because it is short*, so the ratio would mix sequence length into what is meant to measure the
geometry of the representation; truncation compares every sample on the same number of tokens,
so the average is exactly the paper's recipe. For causal language models the first m hidden
states do not depend on later tokens, so the truncated rows are exactly what the model computes
for the first m tokens alone. The cost is discarded tokens, so a warning is raised when
truncation drops more than half of all rows; drop very short samples, or batch similar lengths,
to avoid it.

Resolution. The ratio moves in steps of 100 / n points. The driver and ``reproduce`` therefore
measure a fixed number of positions per sample (``--rank-length``, 128 by default: see
:func:`ptpeft_kernels.analysis.features.pad_to_length`), so n = min(128, d) and a step is at most
one point wherever d >= 100; its continuous companion is the effective rank below.

Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"):
for one matrix with singular values s, p = s / sum(s) and ``erank = exp(-sum_k p_k log p_k)``
(0 log 0 = 0), a real number in [1, n]: 1 for rank one, n for a flat spectrum. Reported as the
mean over samples of each sample's effective rank.

All SVDs run in float64 (hidden states of large models arrive in bfloat16 / float32; their tail
singular values carry the information the ratio is about).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

Features = Sequence[torch.Tensor] | torch.Tensor

# Cumulative sums of normalised float64 spectra carry round-off of order n * 1e-16. Without a
# tolerance, exact cases such as 9 of 10 equal singular values (c = 0.8999999999999999 against a
# threshold of 0.9) would need one singular value more than they do.
_REACH_TOL = 1e-10

# Truncating to the shortest sample dropping more than this share of all rows gets a warning.
_DROP_WARN = 0.5


def check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a real number in (0, 1], got {type(threshold).__name__}")
    value = float(threshold)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return value


def _check_matrix(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a real floating dtype, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (L, d) matrix, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return t


def as_sample_list(features: object, name: str = "features") -> list[torch.Tensor]:
    """Validate ``features`` (a sequence of (L_i, d) tensors or one (S, L, d) tensor) into a list."""
    if isinstance(features, torch.Tensor):
        if features.dim() != 3:
            raise ValueError(
                f"{name} as a tensor must be 3-D (S, L, d), got shape {tuple(features.shape)}; "
                "wrap a single (L, d) sample in a list"
            )
        if features.shape[0] == 0:
            raise ValueError(f"{name} has no samples (shape {tuple(features.shape)})")
        samples = list(features.unbind(0))
    elif isinstance(features, (list, tuple)):
        if len(features) == 0:
            raise ValueError(f"{name} is an empty sequence; it needs at least one (L, d) sample")
        samples = list(features)
    else:
        raise TypeError(
            f"{name} must be a list of (L_i, d) tensors or one (S, L, d) tensor, "
            f"got {type(features).__name__}"
        )
    for i, s in enumerate(samples):
        _check_matrix(f"{name}[{i}]", s)
    widths = {s.shape[1] for s in samples}
    if len(widths) > 1:
        raise ValueError(f"{name}: every sample needs the same feature width d, got widths {sorted(widths)}")
    return samples


def common_rows(samples: Sequence[torch.Tensor]) -> int:
    """The number of rows every sample is truncated to (the shortest sample's length)."""
    lengths = [s.shape[0] for s in samples]
    m = min(lengths)
    dropped = sum(lengths) - m * len(lengths)
    if dropped > _DROP_WARN * sum(lengths):
        warnings.warn(
            f"samples have lengths {min(lengths)}..{max(lengths)}; truncating all to the shortest ({m} rows) "
            f"drops {dropped} of {sum(lengths)} rows. Drop very short samples or group similar lengths.",
            stacklevel=3,
        )
    return m


def normalized_spectra(features: Features) -> torch.Tensor:
    """Per-sample singular values normalised to sum 1: float64 (S, n), n = min(min_i L_i, d).

    Samples are truncated to their first ``min_i L_i`` rows (see the module docstring).
    """
    samples = as_sample_list(features)
    m = common_rows(samples)
    if all(s.shape[0] == m for s in samples):
        stacked = torch.stack([s.detach() for s in samples])
    else:
        stacked = torch.stack([s.detach()[:m] for s in samples])
    # One batched SVD; svdvals returns descending values.
    sv = torch.linalg.svdvals(stacked.to(device="cpu", dtype=torch.float64))
    totals = sv.sum(dim=1, keepdim=True)
    zero = (totals.squeeze(1) <= 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"features samples {zero[:10]} are all-zero matrices; their spectrum cannot be normalised"
        )
    return sv / totals


def cumulative_spectrum(features: Features) -> torch.Tensor:
    """The averaged cumulative normalised spectrum: float64 (n,), non-decreasing, last value 1.

    ``curve[j]`` is the share of the (sample-averaged) singular value mass held by the j + 1
    largest singular values.
    """
    curve = normalized_spectra(features).mean(dim=0).cumsum(dim=0)
    return curve


def effective_ranks(features: Features | torch.Tensor) -> torch.Tensor:
    """Per-sample effective rank (Roy & Vetterli 2007): float64 (S,), each in [1, n].

    ``features`` as for :func:`normalized_spectra`, or an already computed (S, n) tensor of
    normalised spectra (rows summing to 1, as :func:`normalized_spectra` returns).
    """
    if isinstance(features, torch.Tensor) and features.dim() == 2:
        p = _check_spectra("spectra", features)
    else:
        p = normalized_spectra(features)
    # 0 log 0 = 0: xlogy gives exactly that.
    entropy = -torch.special.xlogy(p, p).sum(dim=1)
    return entropy.exp()


def effective_rank(features: Features) -> float:
    """Mean over samples of the per-sample effective rank (see :func:`effective_ranks`)."""
    return float(effective_ranks(features).mean())


def _check_spectra(name: str, spectra: torch.Tensor) -> torch.Tensor:
    if not spectra.is_floating_point() or spectra.dim() != 2 or 0 in spectra.shape:
        raise ValueError(
            f"{name} must be a non-empty floating (S, n) tensor of normalised spectra, got "
            f"{spectra.dtype} {tuple(spectra.shape)}"
        )
    p = spectra.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must hold finite non-negative values")
    sums = p.sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
        raise ValueError(
            f"{name}: every row must sum to 1 (normalised spectra), got sums {sums[:4].tolist()}"
        )
    return p


def rank_ratio_from_curve(curve: torch.Tensor, threshold: float = 0.9) -> float:
    """The remaining rank ratio (percent) of a cumulative spectrum from :func:`cumulative_spectrum`."""
    threshold = check_threshold(threshold)
    curve = _check_curve("curve", curve)
    reached = (curve >= threshold - _REACH_TOL).nonzero()
    # The last entry is 1 up to round-off, so some index always reaches any threshold <= 1.
    k = int(reached[0, 0]) + 1 if reached.numel() else curve.numel()
    return 100.0 * k / curve.numel()


def remaining_rank_ratio(features: Features, threshold: float = 0.9) -> float:
    """The paper's remaining rank ratio in percent (see the module docstring for the definition).

    Args:
        features: a list of per-sample (L_i, d) hidden states, or one (S, L, d) tensor.
        threshold: the cumulative share of singular value mass to reach, in (0, 1].

    Returns:
        ``100 * k / n`` with k the number of singular values (1-based count) needed for the
        averaged cumulative spectrum to reach ``threshold`` and n = min(min_i L_i, d).
    """
    threshold = check_threshold(threshold)
    return rank_ratio_from_curve(cumulative_spectrum(features), threshold)


def _check_curve(name: str, curve: object) -> torch.Tensor:
    if not isinstance(curve, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(curve).__name__}")
    if curve.dim() != 1 or curve.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D cumulative spectrum, got shape {tuple(curve.shape)}"
        )
    if not torch.isfinite(curve).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return curve.detach().to(device="cpu", dtype=torch.float64)


def spectrum_deviation(base: Features, adapted: Features) -> float:
    """Max absolute gap between the cumulative spectra of ``base`` and ``adapted`` features.

    Unlike the rank ratio, which moves in steps of 100 / n percent, this is continuous: it sees
    a spectrum that flattened or sharpened without crossing the threshold at another index.
    Each argument is features (as for :func:`cumulative_spectrum`) or an already computed 1-D
    cumulative spectrum; both curves must have the same length n (same data, same width).
    Returns a value in [0, 1]: 0 for identical spectra.
    """
    curves = []
    for name, value in (("base", base), ("adapted", adapted)):
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            curves.append(_check_curve(name, value))
        else:
            curves.append(cumulative_spectrum(value))
    a, b = curves
    if a.numel() != b.numel():
        raise ValueError(
            f"base and adapted spectra have lengths {a.numel()} and {b.numel()}; compare features of the "
            "same samples from models with the same hidden width"
        )
    return float((a - b).abs().max())
