r"""Curvature statistics of a :class:`~curvprune.result.CurvatureResult`: summary per layer,
the most negative (bottleneck) weights and histograms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..result import CurvatureResult

__all__ = [
    "CurvatureStatistics",
    "Bottlenecks",
    "Histogram",
    "curvature_statistics",
    "most_negative",
    "histogram",
]

# --------------------------------------------------------------------------------------------
# Curvature statistics
# --------------------------------------------------------------------------------------------

_DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class CurvatureStatistics:
    """Curvature statistics of one weight tensor (over its live weights).

    The counts, ``kappa_min``/``kappa_median``/``kappa_max`` and ``negative_share`` come from
    :meth:`CurvatureResult.layer_summaries() <curvprune.result.CurvatureResult.layer_summaries>`.

    Attributes:
        name: the weight name.
        weights: number of weights.
        zero: weights that are exactly zero (no edge; kappa ``+inf``).
        dead: non-zero weights every edge of which has an inactive end.
        live: the remaining weights (the ones the statistics describe).
        mean: mean kappa of the live weights (NaN if none).
        std: population standard deviation (``ddof=0``) of the live kappa (NaN if none).
        quantiles: ``{q: kappa quantile}`` of the live weights (linear interpolation).
        kappa_min, kappa_median, kappa_max: of the live weights, as ``layer_summaries`` gives
            them (``torch.median``: for an even count the lower of the two middle values,
            whereas ``quantiles[0.5]`` interpolates between them).
        negative: live weights with kappa < 0 (bottlenecks).
        negative_share: ``negative / live`` (NaN if no live weight).
    """

    name: str
    weights: int
    zero: int
    dead: int
    live: int
    mean: float
    std: float
    quantiles: dict[float, float]
    kappa_min: float
    kappa_median: float
    kappa_max: float
    negative: int
    negative_share: float


def _live_kappa(result: CurvatureResult, name: str) -> np.ndarray:
    k = result.kappa[name].detach().cpu().to(torch.float64).reshape(-1)
    live = result.live[name].detach().cpu().reshape(-1)
    return k[live].numpy()


def _check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(q) for q in quantiles)
    if any(not (0.0 <= q <= 1.0) for q in values):
        raise ValueError(f"quantiles must lie in [0, 1]; got {list(quantiles)}.")
    return values


def curvature_statistics(result: CurvatureResult,
                         quantiles: Sequence[float] = _DEFAULT_QUANTILES
                         ) -> list[CurvatureStatistics]:
    r"""Per-layer statistics of the curvature of the live weights, in chain order.

    With :math:`K` the live kappa values of a layer (:math:`n = |K|`):
    mean :math:`\bar\kappa = \frac1n \sum_{k \in K} k`, standard deviation
    :math:`\sqrt{\frac1n \sum (k - \bar\kappa)^2}`, quantiles by linear interpolation
    (:func:`numpy.quantile`), negative share :math:`|\{k \in K: k < 0\}| / n`; the counts of
    zero, dead and live weights as in :meth:`CurvatureResult.layer_summaries()
    <curvprune.result.CurvatureResult.layer_summaries>`, which supplies them.

    Args:
        result: a :class:`~curvprune.result.CurvatureResult`.
        quantiles: the levels in ``[0, 1]`` to report.
    """
    levels = _check_quantiles(quantiles)
    rows = []
    for summary in result.layer_summaries():
        values = _live_kappa(result, summary.name)
        if values.size:
            mean = float(values.mean())
            std = float(values.std())
            qs = dict(zip(levels, (float(v) for v in np.quantile(values, levels)))) \
                if levels else {}
        else:
            mean = std = math.nan
            qs = {q: math.nan for q in levels}
        share = summary.negative_share
        rows.append(CurvatureStatistics(
            name=summary.name, weights=summary.weights, zero=summary.zero, dead=summary.dead,
            live=summary.live, mean=mean, std=std, quantiles=qs,
            kappa_min=summary.kappa_min, kappa_median=summary.kappa_median,
            kappa_max=summary.kappa_max,
            negative=round(share * summary.live) if summary.live else 0,
            negative_share=share,
        ))
    return rows


@dataclass(frozen=True)
class Bottlenecks:
    """The lowest-curvature live weights of one weight tensor, lowest first.

    Attributes:
        name: the weight name.
        index: ``[m, ndim]`` int64: the weight's index of each (``weight[tuple(index[r])]``).
        flat: ``[m]`` int64: the same as flat (row-major) indices.
        kappa: ``[m]`` float64: their kappa, ascending (ties: lower flat index first).
    """

    name: str
    index: np.ndarray
    flat: np.ndarray
    kappa: np.ndarray


def most_negative(result: CurvatureResult, k: int = 10, *,
                  negative_only: bool = False) -> dict[str, Bottlenecks]:
    r"""The ``k`` live weights of lowest curvature of every layer (the bottlenecks).

    Negative :math:`\kappa` marks a bottleneck (important, pruned last). Per layer, the live
    weights are sorted by :math:`\kappa` ascending (stable: ties by flat index) and the first
    ``min(k, live)`` returned; with ``negative_only`` only those with :math:`\kappa < 0`.
    Dead and zero weights are never listed.

    Args:
        result: a :class:`~curvprune.result.CurvatureResult`.
        k: how many per layer (a non-negative int).
        negative_only: drop weights with :math:`\kappa \ge 0`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative integer, not {k!r}.")
    out = {}
    for name, kappa in result.kappa.items():
        values = kappa.detach().cpu().to(torch.float64).reshape(-1).numpy()
        live = result.live[name].detach().cpu().reshape(-1).numpy()
        flat = np.flatnonzero(live)
        order = np.argsort(values[flat], kind="stable")[:k]
        flat = flat[order]
        chosen = values[flat]
        if negative_only:
            keep = chosen < 0
            flat, chosen = flat[keep], chosen[keep]
        index = np.stack(np.unravel_index(flat, tuple(kappa.shape)), axis=1).astype(np.int64) \
            if flat.size else np.zeros((0, kappa.dim()), dtype=np.int64)
        out[name] = Bottlenecks(name, index, flat.astype(np.int64), chosen)
    return out


@dataclass(frozen=True)
class Histogram:
    """Histogram of the live kappa of one weight tensor.

    Attributes:
        name: the weight name.
        counts: ``[bins]`` int64 counts.
        edges: ``[bins + 1]`` float64 bin edges (``numpy.histogram``'s: the last bin is closed).
        live, dead, zero: the weight counts (only ``live`` weights are in ``counts``).
    """

    name: str
    counts: np.ndarray
    edges: np.ndarray
    live: int
    dead: int
    zero: int


def histogram(result: CurvatureResult, bins: int | Sequence[float] = 50, *,
              range: tuple[float, float] | None = None,
              shared: bool = True) -> dict[str, Histogram]:
    """Histogram data of the live kappa of every layer, ready to plot (``plt.stairs(counts,
    edges)``).

    Args:
        result: a :class:`~curvprune.result.CurvatureResult`.
        bins: number of bins, or the bin edges (increasing).
        range: ``(low, high)`` of the bins when ``bins`` is a number. By default the range
            spans the live kappa of all layers when ``shared`` (one set of edges for every
            layer, so the layers can be compared), else of each layer.
        shared: use one set of edges for all layers.

    Dead and zero weights are left out of ``counts`` and reported as counts beside them.
    """
    live = {name: _live_kappa(result, name) for name in result.kappa}
    summaries = {s.name: s for s in result.layer_summaries()}
    if isinstance(bins, int) and not isinstance(bins, bool) and range is None and shared:
        everything = np.concatenate(list(live.values())) if live else np.zeros(0)
        if everything.size:
            range = (float(everything.min()), float(everything.max()))
    out = {}
    for name, values in live.items():
        counts, edges = np.histogram(values, bins=bins, range=range)
        s = summaries[name]
        out[name] = Histogram(name, counts.astype(np.int64), edges.astype(np.float64),
                              s.live, s.dead, s.zero)
    return out
