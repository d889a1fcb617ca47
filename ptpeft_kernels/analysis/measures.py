"""One representation report: every measure of a model's hidden states against the pre-trained
model's, with bootstrap intervals. The training driver writes it into ``report.json`` (per
evaluation point and data distribution); ``reproduce`` aggregates it.

Keys of the report (a JSON-ready dict):

- ``rank_ratio`` (percent, the paper's measure), ``effective_rank`` (mean per-sample effective
  rank, Roy & Vetterli 2007), ``deviation`` (max gap of the cumulative spectra against the
  pre-trained model's, 0 = identical), ``cka`` (linear CKA to the pre-trained model, 1 = same);
- ``spectrum`` (the averaged cumulative spectrum), ``spectrum_length`` (n: the rank ratio moves
  in steps of 100 / n points), ``samples`` (S), ``positions`` (rows per sample), ``real_positions``
  (share of those rows that are real tokens, not padding; ``None`` when not known), ``threshold``;
- ``ci``: ``{measure: [low, high]}`` percentile bootstrap intervals over evaluation samples, and
  ``bootstrap``: ``{"resamples", "seed", "confidence"}`` (absent with ``resamples=0``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import bootstrap as B
from .cka import cka
from .features import collect_features, pad_to_length
from .spectrum import check_threshold, effective_ranks, normalized_spectra, rank_ratio_from_curve

MEASURES = ("rank_ratio", "effective_rank", "deviation", "cka")
FILLS = ("repeat", "pad")


def repeated_text(text: str, length: int) -> str:
    """``text`` repeated (space-separated) until it has at least ``length`` words, so that its tokens,
    at least one per word, fill ``length`` positions: the "repeat" fill of a fixed-length measurement,
    where a sample shorter than the measured length continues with its own caption instead of
    padding, and every measured position is a real token the model reads."""
    words = len(text.split())
    if words == 0:
        raise ValueError("cannot repeat an empty text to a fixed length")
    return " ".join([text] * -(-length // words))


def fixed_length_features(
    model: nn.Module,
    batches: Iterable[Mapping[str, object]],
    length: int,
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], float | None]:
    """Last-layer hidden states of the first ``length`` positions of every sample (right padding
    where a sample is shorter; see :mod:`.features`), and the share of real positions among them.

    ``length=0``: every sample's own positions, padding dropped (the spectrum then truncates all
    samples to the shortest one); the share is ``None`` then.
    """
    if length == 0:
        return collect_features(model, list(batches), layer=-1, device=device), None
    padded, real = [], 0
    for batch in batches:
        out, counts = pad_to_length(batch, length, pad_token_id)
        padded.append(out)
        real += sum(counts)
    feats = collect_features(model, padded, layer=-1, device=device, length=length)
    return feats, real / (length * len(feats))


def representation_report(
    base: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor],
    *,
    threshold: float = 0.9,
    resamples: int = B.DEFAULT_RESAMPLES,
    seed: int = B.DEFAULT_SEED,
    confidence: float = B.DEFAULT_CONFIDENCE,
    real_positions: float | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The report of ``features`` (per-sample (L, d) hidden states) against ``base`` (the
    pre-trained model's on the same samples), and the bootstrap replicates of every measure
    (``{measure: float64 (resamples,)}``, empty with ``resamples=0``)."""
    threshold = check_threshold(threshold)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise ValueError(f"resamples must be an int >= 0, got {resamples!r}")
    same = features is base
    p_base = normalized_spectra(base)
    p = p_base if same else normalized_spectra(features)
    if p.shape != p_base.shape:
        raise ValueError(
            f"base and features give spectra of shapes {tuple(p_base.shape)} and {tuple(p.shape)}; measure "
            "the same samples with the same number of positions"
        )
    curve = p.mean(dim=0).cumsum(dim=0)
    eranks = effective_ranks(p)
    report: dict = {
        "rank_ratio": rank_ratio_from_curve(curve, threshold),
        "effective_rank": float(eranks.mean()),
        "deviation": 0.0 if same else float((curve - p_base.mean(dim=0).cumsum(dim=0)).abs().max()),
        "cka": 1.0 if same else cka(base, features),
        "spectrum": curve.tolist(),
        "spectrum_length": int(p.shape[1]),
        "samples": int(p.shape[0]),
        "positions": min(int(f.shape[0]) for f in features),
        "real_positions": real_positions,
        "threshold": threshold,
    }
    replicates: dict[str, torch.Tensor] = {}
    if resamples:
        counts = B.resample_counts(p.shape[0], resamples, seed)
        replicates["rank_ratio"] = B.rank_ratio_replicates(p, counts, threshold)
        replicates["effective_rank"] = B.mean_replicates(eranks, counts)
        if same:
            replicates["deviation"] = torch.zeros(resamples, dtype=torch.float64)
            replicates["cka"] = torch.ones(resamples, dtype=torch.float64)
        else:
            replicates["deviation"] = B.deviation_replicates(p_base, p, counts)
            replicates["cka"] = B.cka_replicates(base, features, counts)
        report["ci"] = {k: list(B.percentile_interval(v, confidence)) for k, v in replicates.items()}
        report["bootstrap"] = {"resamples": resamples, "seed": seed, "confidence": confidence}
    return report, replicates
