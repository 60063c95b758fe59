r"""The result of a curvature scoring call and the ranking it induces.

Ranking (the paper's, made deterministic). Give each weight a value

* :math:`+\infty` if it has no edge (the weight is exactly zero, or it touches no position),
* :math:`2` if every one of its edges is dead on every calibration example,
* :math:`\kappa` otherwise (the minimum over its positions and examples, dead edges counting 1).

Live curvature is always below 2 (:math:`\kappa \le 1/(1-\alpha) < 2` for :math:`\alpha < 1/2`,
and :math:`\kappa = 1 - X/d` with :math:`X > -d` for :math:`\alpha \ge 1/2`), so dead weights sit
between the zero weights and every live weight. Order ``"pos"`` prunes the highest value first
(zero weights, then dead weights, then live weights from the most positive curvature down);
order ``"neg"`` prunes zero weights first and then the lowest value first (the paper's control).
Ties are broken by smaller ``|w|`` first, then by position (layer order, then the weight's
flattened index), so the ranking is a total order that does not depend on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["CurvatureResult", "LayerSummary"]

_ORDERS = ("pos", "neg")


@dataclass(frozen=True)
class LayerSummary:
    """Statistics of one scored weight."""

    name: str
    weights: int
    zero: int
    dead: int
    live: int
    edges_per_example: int
    kappa_min: float
    kappa_median: float
    kappa_max: float
    negative_share: float


@dataclass
class CurvatureResult:
    """Neural curvature of a model's weights.

    Attributes:
        kappa: ``{parameter name: tensor of the weight's shape}`` (float64, on the weight's
            device): the minimum curvature over the weight's positions and the calibration
            examples; an edge with a dead end counts as exactly 1.0; a weight with no edge
            (exactly zero) is ``+inf``.
        live: ``{parameter name: bool tensor}``: whether the weight has at least one live edge.
        modules: ``{parameter name: module}`` owning each weight (its attribute is ``"weight"``).
        alpha: the idleness used.
        granularity: ``"neuron"``.
        num_examples: calibration examples scored.
        edges_per_example: ``{parameter name: edges}`` (nonzero weights times positions).
        seconds: wall time of the scoring call.
        engine: how the engine resolved the live edges (see :class:`~curvprune.engine.EngineStats`).
    """

    kappa: dict[str, torch.Tensor]
    live: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    alpha: float
    granularity: str
    num_examples: int
    edges_per_example: dict[str, int]
    seconds: float
    engine: dict[str, int] = field(default_factory=dict)

    def rank_values(self) -> dict[str, torch.Tensor]:
        """The ranking value of each weight: ``+inf`` (no edge), ``2`` (dead) or kappa."""
        return {
            name: torch.where(torch.isinf(k), k, torch.where(self.live[name], k,
                                                             torch.full_like(k, 2.0)))
            for name, k in self.kappa.items()
        }

    def pruning_order(self, order: str = "pos") -> dict[str, torch.Tensor]:
        """Global pruning rank of every weight (0 = pruned first), as int64 tensors.

        Args:
            order: ``"pos"`` (highest curvature first, the paper's method) or ``"neg"`` (lowest
                first, the control).
        """
        if order not in _ORDERS:
            raise ValueError(f"order must be 'pos' or 'neg', not {order!r}.")
        names = list(self.kappa)
        values = self.rank_values()
        device = next(iter(values.values())).device if names else torch.device("cpu")
        flat_v = torch.cat([values[n].reshape(-1).to(device) for n in names])
        flat_w = torch.cat([
            self.modules[n].weight.detach().reshape(-1).abs().to(device, torch.float64)
            for n in names
        ])
        is_zero = torch.isinf(flat_v)
        key = flat_v if order == "neg" else -flat_v
        key = torch.where(is_zero, torch.full_like(key, -math.inf), key)
        perm = torch.argsort(flat_w, stable=True)
        perm = perm[torch.argsort(key[perm], stable=True)]
        ranks = torch.empty_like(perm)
        ranks[perm] = torch.arange(perm.numel(), device=device)
        out, start = {}, 0
        for n in names:
            size = values[n].numel()
            out[n] = ranks[start:start + size].view(values[n].shape).to(values[n].device)
            start += size
        return out

    def importance_scores(self, order: str = "pos") -> dict[tuple[nn.Module, str], torch.Tensor]:
        """Scores for :func:`torch.nn.utils.prune.global_unstructured`: higher means keep.

        Each score is the weight's global rank in :meth:`pruning_order` as float64 (exact up to
        2**53 weights), on the weight's device, keyed by ``(module, "weight")``.
        """
        ranks = self.pruning_order(order)
        return {(self.modules[n], "weight"): r.to(torch.float64) for n, r in ranks.items()}

    def layer_summaries(self) -> list[LayerSummary]:
        """Per-weight statistics: counts of zero, dead and live weights and kappa quantiles."""
        rows = []
        for name, k in self.kappa.items():
            live = self.live[name]
            scored = k[live]
            zero = int(torch.isinf(k).sum())
            rows.append(LayerSummary(
                name=name,
                weights=k.numel(),
                zero=zero,
                dead=k.numel() - zero - int(live.sum()),
                live=int(live.sum()),
                edges_per_example=self.edges_per_example[name],
                kappa_min=float(scored.min()) if scored.numel() else math.nan,
                kappa_median=float(scored.median()) if scored.numel() else math.nan,
                kappa_max=float(scored.max()) if scored.numel() else math.nan,
                negative_share=float((scored < 0).double().mean()) if scored.numel() else math.nan,
            ))
        return rows

    def summary(self) -> str:
        """A plain-text table of :meth:`layer_summaries` with the totals."""
        lines = [
            f"neural curvature ({self.granularity}, alpha={self.alpha}) on {self.num_examples} "
            f"examples, {sum(self.edges_per_example.values())} edges per example, "
            f"{self.seconds:.2f} s",
            f"{'weight':<28}{'weights':>9}{'zero':>8}{'dead':>8}{'live':>8}"
            f"{'k min':>9}{'k med':>9}{'k max':>9}{'neg %':>7}",
        ]
        for r in self.layer_summaries():
            lines.append(
                f"{r.name:<28}{r.weights:>9}{r.zero:>8}{r.dead:>8}{r.live:>8}"
                f"{r.kappa_min:>9.3f}{r.kappa_median:>9.3f}{r.kappa_max:>9.3f}"
                f"{100 * r.negative_share:>7.1f}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"CurvatureResult(granularity={self.granularity!r}, alpha={self.alpha}, "
                f"weights={list(self.kappa)}, num_examples={self.num_examples}, "
                f"seconds={self.seconds:.3f})")
