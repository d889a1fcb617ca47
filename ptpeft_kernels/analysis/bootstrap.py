"""Bootstrap confidence intervals over evaluation samples for the representation measures.

The samples (images with their prompt and caption) are what a measurement is uncertain about:
another draw of evaluation samples gives another rank ratio. A *replicate* redraws ``S`` samples
with replacement from the ``S`` measured ones and recomputes the measure on them; the interval is
the percentile interval of ``resamples`` replicates (Efron & Tibshirani 1993, ch. 13).

Defaults: 1000 resamples, 95 % intervals, resample draws from ``torch.Generator`` seed 0. The
draws depend only on (seed, S, resamples), so every model measured on the same samples gets the
*same* redraws: replicate b of one run and replicate b of another describe the same resampled
evaluation set, and averaging replicate b over seeds gives a replicate of the seed mean (what
``reproduce`` does for methods trained with several seeds).

Every replicate is computed from per-sample quantities, without a second pass over the model:

- rank ratio: the mean of the resampled normalised spectra, its cumulative sum, the threshold;
- effective rank: the mean of the resampled per-sample effective ranks;
- spectrum deviation: both models' spectra resampled with the same draw, max gap of the curves;
- linear CKA over all tokens of the resampled samples (a sample drawn twice counts its tokens
  twice), from per-sample sufficient statistics (:func:`cka_replicates`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spectrum import _REACH_TOL, as_sample_list, check_threshold

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0

# Per-sample (d1 x d2) statistics of the feature-space CKA route are kept in memory up to this many
# float64 values (1 GiB); wider models take the token-Gram route, whose memory does not grow with d.
_FEATURE_ROUTE_MAX_VALUES = 2**27


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def resample_counts(
    num_samples: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> torch.Tensor:
    """How often each sample is drawn in each replicate: float64 (resamples, num_samples), rows sum
    to ``num_samples``. Deterministic in (num_samples, resamples, seed)."""
    _check_count("num_samples", num_samples, 1)
    _check_count("resamples", resamples, 1)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, num_samples, (resamples, num_samples), generator=gen)
    counts = torch.zeros(resamples, num_samples, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts


def percentile_interval(
    replicates: torch.Tensor, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of 1-D ``replicates`` (linear interpolation)."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if replicates.dim() != 1 or replicates.numel() == 0:
        raise ValueError(f"replicates must be a non-empty 1-D tensor, got shape {tuple(replicates.shape)}")
    alpha = (1.0 - float(confidence)) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lo, hi = torch.quantile(replicates.double(), q).tolist()
    return float(lo), float(hi)


def _check_counts(counts: torch.Tensor, num_samples: int) -> torch.Tensor:
    if counts.dim() != 2 or counts.shape[1] != num_samples:
        raise ValueError(
            f"counts must be (resamples, {num_samples}) for {num_samples} samples, got {tuple(counts.shape)}"
        )
    return counts.to(torch.float64)


def rank_ratios_from_curves(curves: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Rank ratio (percent) of each row of a (B, n) batch of cumulative spectra: float64 (B,)."""
    threshold = check_threshold(threshold)
    n = curves.shape[1]
    reached = curves >= threshold - _REACH_TOL
    # The first index reaching the threshold; the last entry is 1 up to round-off, so n at most.
    k = torch.where(
        reached.any(dim=1),
        reached.double().argmax(dim=1) + 1,
        torch.full_like(reached[:, 0], n, dtype=torch.long),
    )
    return 100.0 * k.double() / n


def rank_ratio_replicates(
    spectra: torch.Tensor, counts: torch.Tensor, threshold: float = 0.9
) -> torch.Tensor:
    """Rank ratio of each replicate from per-sample normalised spectra (S, n): float64 (B,)."""
    counts = _check_counts(counts, spectra.shape[0])
    mean = counts @ spectra.double() / spectra.shape[0]
    return rank_ratios_from_curves(mean.cumsum(dim=1), threshold)


def mean_replicates(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The mean of per-sample ``values`` (S,) in each replicate: float64 (B,)."""
    counts = _check_counts(counts, values.shape[0])
    return counts @ values.double() / values.shape[0]


def deviation_replicates(
    base_spectra: torch.Tensor, spectra: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Spectrum deviation (max gap of the cumulative curves) of each replicate, both models'
    per-sample spectra (S, n) resampled with the same draw: float64 (B,)."""
    if base_spectra.shape != spectra.shape:
        raise ValueError(
            f"base and adapted spectra must have the same (S, n) shape, got {tuple(base_spectra.shape)} and "
            f"{tuple(spectra.shape)}"
        )
    counts = _check_counts(counts, spectra.shape[0])
    diff = counts @ (spectra.double() - base_spectra.double()) / spectra.shape[0]
    return diff.cumsum(dim=1).abs().amax(dim=1)


# ----------------------------------------------------------------------------------- CKA


def _per_sample(features: object, name: str) -> list[torch.Tensor]:
    return [s.detach().to(device="cpu", dtype=torch.float64) for s in as_sample_list(features, name)]


def cka_replicates(
    base: Sequence[torch.Tensor] | torch.Tensor,
    adapted: Sequence[torch.Tensor] | torch.Tensor,
    counts: torch.Tensor,
    route: str = "auto",
) -> torch.Tensor:
    """Linear CKA (see :func:`ptpeft_kernels.analysis.cka`) of each replicate: float64 (B,).

    Replicate b uses every token of sample i ``counts[b, i]`` times. With weights w_i per sample,
    N = sum_i w_i n_i tokens and per-sample sums s_i = X_i^T 1,

        C_xy = sum_i w_i X_i^T Y_i - (sum_i w_i s^x_i)(sum_i w_i s^y_i)^T / N,
        CKA  = ||C_xy||_F^2 / (||C_xx||_F ||C_yy||_F).

    The squared norms expand into per-sample-pair quantities computed once (then O(S^3) per
    replicate): ``route="features"`` takes them from each sample's (d x d) products,
    ``route="tokens"`` from token Gram blocks (memory independent of the width d, cost N^2 d);
    ``"auto"`` picks features when their products fit in 1 GiB. Both are exact; tests compare
    them with a direct computation.
    """
    xs, ys = _per_sample(base, "base"), _per_sample(adapted, "adapted")
    if [x.shape[0] for x in xs] != [y.shape[0] for y in ys]:
        raise ValueError("base and adapted per-sample lengths differ; CKA pairs rows of the same tokens")
    counts = _check_counts(counts, len(xs))
    if route not in ("auto", "features", "tokens"):
        raise ValueError(f"route must be 'auto', 'features' or 'tokens', got {route!r}")
    d1, d2 = xs[0].shape[1], ys[0].shape[1]
    if route == "auto":
        route = (
            "features" if len(xs) * (d1 * d1 + d2 * d2 + d1 * d2) <= _FEATURE_ROUTE_MAX_VALUES else "tokens"
        )
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.float64)
    sx = torch.stack([x.sum(dim=0) for x in xs])  # (S, d1)
    sy = torch.stack([y.sum(dim=0) for y in ys])  # (S, d2)
    if route == "features":
        sq = _frobenius_features(xs, ys, sx, sy, lengths, counts)
    else:
        sq = _frobenius_tokens(xs, ys, sx, sy, lengths, counts)
    cross, norm_x, norm_y = sq
    value = cross / (norm_x.sqrt() * norm_y.sqrt())
    return value.clamp(0.0, 1.0)


def _frobenius_features(xs, ys, sx, sy, lengths, counts):
    """||C_xy||^2, ||C_xx||^2, ||C_yy||^2 per replicate, the pair terms of :func:`_assemble` taken
    from per-sample (d x d) products: G = P P^T over flattened products, T_i = S_x P_i S_y^T."""

    def pair_terms(a_list, b_list, sa, sb):
        prods = torch.stack([a.T @ b for a, b in zip(a_list, b_list, strict=True)])  # (S, da, db)
        flat = prods.flatten(1)
        return flat @ flat.T, sa @ prods @ sb.T  # (S, S) and (S, S, S): [i, j, k] = s_j^T P_i s_k

    return _assemble(
        pair_terms(xs, ys, sx, sy),
        pair_terms(xs, xs, sx, sx),
        pair_terms(ys, ys, sy, sy),
        sx,
        sy,
        lengths,
        counts,
    )


def _frobenius_tokens(xs, ys, sx, sy, lengths, counts):
    """The same pair terms from token Gram blocks, without any (d x d) matrix:
    G_ij = <X_i^T Y_i, X_j^T Y_j> = sum((X_i X_j^T) * (Y_i Y_j^T)), T_ijk = (X_i s^x_j) . (Y_i s^y_k)."""
    s = len(xs)

    def pair_terms(a_list, b_list, sa, sb):
        g = torch.empty(s, s, dtype=torch.float64)
        t = torch.empty(s, s, s, dtype=torch.float64)
        a_all, b_all = torch.cat(a_list), torch.cat(b_list)
        offsets = [0]
        for a in a_list:
            offsets.append(offsets[-1] + a.shape[0])
        for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            blocks = (a @ a_all.T) * (b @ b_all.T)  # (n_i, N): Hadamard of the two token Gram rows
            sums = blocks.sum(dim=0)
            g[i] = torch.stack([sums[offsets[j] : offsets[j + 1]].sum() for j in range(s)])
            t[i] = (a @ sa.T).T @ (b @ sb.T)  # (S, S): [j, k] = (X_i s_j) . (Y_i s_k)
        return g, t

    return _assemble(
        pair_terms(xs, ys, sx, sy),
        pair_terms(xs, xs, sx, sx),
        pair_terms(ys, ys, sy, sy),
        sx,
        sy,
        lengths,
        counts,
    )


def _assemble(xy, xx, yy, sx, sy, lengths, counts):
    """Per replicate (weights w = counts[b], N = w . lengths):

    ||sum_i w_i X_i^T Y_i - N m_x m_y^T||^2
        = w^T G w - 2 sum_ijk w_i w_j w_k T_ijk / N + (w^T U w)(w^T V w) / N^2

    with U_jk = s^x_j . s^x_k and V likewise for y; the same for (x, x) and (y, y). Costs O(S^3) per
    replicate whatever the width."""
    s = sx.shape[0]
    w = counts
    n = w @ lengths

    def quad(m):
        return ((w @ m) * w).sum(dim=1)

    def cubic(t):
        # sum_i w_i sum_jk w_j w_k t[i, j, k]
        inner = (w @ t.reshape(s, s * s)).view(-1, s, s)
        return torch.einsum("bjk,bj,bk->b", inner, w, w)

    qx, qy = quad(sx @ sx.T), quad(sy @ sy.T)
    out = []
    for (g, t), (qa, qb) in ((xy, (qx, qy)), (xx, (qx, qx)), (yy, (qy, qy))):
        out.append(quad(g) - 2.0 * cubic(t) / n + qa * qb / n.square())
    return tuple(out)
