"""Plots of cumulative spectra and per-layer rank ratios.

Figures are built on matplotlib's Agg canvas directly (no pyplot), so plotting works headless and
never changes the backend or global state of a caller's interactive session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .spectrum import check_threshold, cumulative_spectrum, rank_ratio_from_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# Variants that barely move the representation overlap their base exactly; cycling dash patterns and
# markers keeps every line visible.
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "x")


def _new_figure(size: tuple[float, float]) -> Figure:
    # Imported here so `import ptpeft_kernels` does not pay for matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)


def plot_cumulative_spectra(
    spectra: Mapping[str, object],
    path: str | os.PathLike | None = None,
    threshold: float = 0.9,
    title: str | None = None,
) -> Figure:
    """Cumulative normalised spectra of several named feature sets on one plot.

    Args:
        spectra: ``{name: features or 1-D cumulative spectrum}`` (see :func:`cumulative_spectrum`).
        path: write a PNG there when given.
        threshold: drawn as a horizontal line; each legend entry shows its rank ratio at it.

    The x axis is the singular value index as a percentage of the spectrum length, so curves of
    different lengths share the axis and the threshold crossing reads off as the rank ratio.
    """
    threshold = check_threshold(threshold)
    if not spectra:
        raise ValueError("spectra is empty; pass at least one named feature set")
    fig = _new_figure((6.4, 4.4))
    ax = fig.add_subplot()
    for i, (name, value) in enumerate(spectra.items()):
        curve = value if isinstance(value, torch.Tensor) and value.dim() == 1 else cumulative_spectrum(value)
        curve = curve.detach().double().cpu()
        n = curve.numel()
        # Keeping k of n singular values holds curve[k - 1] of the mass; (0, 0) starts the staircase.
        x = torch.arange(0, n + 1, dtype=torch.float64) * (100.0 / n)
        y = torch.cat([curve.new_zeros(1), curve])
        ratio = rank_ratio_from_curve(curve, threshold)
        ax.plot(
            x.numpy(),
            y.numpy(),
            label=f"{name} ({ratio:.1f} %)",
            drawstyle="steps-post",
            linestyle=_STYLES[i % len(_STYLES)],
        )
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("singular values kept (% of spectrum length)")
    ax.set_ylabel("cumulative share of singular value mass")
    ax.set_title(title or "Cumulative singular value spectrum")
    ax.grid(alpha=0.3)
    ax.legend(title=f"rank ratio at {threshold:g}", fontsize="small")
    _save(fig, path)
    return fig


def plot_rank_ratio_per_layer(
    ratios: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike | None = None,
    threshold: float = 0.9,
    title: str | None = None,
) -> Figure:
    """Remaining rank ratio (percent) against layer index, one line per named model.

    Args:
        ratios: ``{name: {layer_index: rank_ratio_percent}}``.
        path: write a PNG there when given.
        threshold: only used in the axis label.
    """
    threshold = check_threshold(threshold)
    if not ratios:
        raise ValueError("ratios is empty; pass at least one named model")
    fig = _new_figure((6.4, 4.4))
    ax = fig.add_subplot()
    layers_seen: set[int] = set()
    for i, (name, per_layer) in enumerate(ratios.items()):
        if not per_layer:
            raise ValueError(f"ratios[{name!r}] has no layers")
        layers = sorted(per_layer)
        layers_seen.update(layers)
        ax.plot(
            layers,
            [per_layer[k] for k in layers],
            marker=_MARKERS[i % len(_MARKERS)],
            linestyle=_STYLES[i % len(_STYLES)],
            label=name,
        )
    ax.set_xticks(sorted(layers_seen))
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(f"remaining rank ratio at {threshold:g} (%)")
    ax.set_title(title or "Remaining rank ratio per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return fig
