"""Representation-space measures: how much an adapter changes a model's hidden states.

- :func:`remaining_rank_ratio` — the paper's rank ratio (percent) of hidden-state spectra;
- :func:`cumulative_spectrum`, :func:`spectrum_deviation` — the curve behind it and the max gap
  between two curves (continuous, sees changes smaller than one rank step);
- :func:`effective_rank` — Roy & Vetterli's effective rank, the rank ratio's continuous companion;
- :mod:`.bootstrap`, :func:`representation_report` — bootstrap intervals over evaluation samples
  and the report the training driver writes (every measure with its interval);
- :func:`cka` — linear centred kernel alignment between two feature sets of the same inputs;
- :func:`collect_features` / :func:`collect_layers` — per-sample hidden states without padding;
- :func:`compare_representations` — all of the above for adapted models against their base;
- :func:`plot_cumulative_spectra`, :func:`plot_rank_ratio_per_layer` — PNG plots.
"""

from .cka import cka
from .compare import Comparison, compare_representations
from .features import collect_features, collect_layers, find_vision_tower, pad_to_length
from .measures import representation_report
from .plots import plot_cumulative_spectra, plot_rank_ratio_per_layer
from .spectrum import (
    cumulative_spectrum,
    effective_rank,
    effective_ranks,
    normalized_spectra,
    rank_ratio_from_curve,
    remaining_rank_ratio,
    spectrum_deviation,
)

__all__ = [
    "Comparison",
    "cka",
    "compare_representations",
    "collect_features",
    "collect_layers",
    "cumulative_spectrum",
    "effective_rank",
    "effective_ranks",
    "find_vision_tower",
    "normalized_spectra",
    "pad_to_length",
    "plot_cumulative_spectra",
    "plot_rank_ratio_per_layer",
    "rank_ratio_from_curve",
    "remaining_rank_ratio",
    "representation_report",
    "spectrum_deviation",
]
