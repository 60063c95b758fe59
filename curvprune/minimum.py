r"""The exact minimum of curvature over many edges, by branch and bound.

A weight's score is the minimum of :math:`\kappa` over its edges (every position of a conv
weight) and over the calibration examples (method.md section 4). Only that minimum is reported,
so an edge needs its exact value only if it could be the minimum. The engine first bounds every
edge, :math:`lo_e \le \kappa_e \le hi_e` (:func:`curvprune.engine.bound_edges`; most edges are
settled there with :math:`lo_e = hi_e`). For a weight ``w`` let
:math:`U_w = \min_e hi_e` over its edges: the minimum is at most :math:`U_w`, so an edge with
:math:`lo_e \ge U_w` cannot be below it and is never solved. The others are solved in rounds,
each weight's lowest :math:`lo_e` first; every exact value lowers :math:`U_w`, which rules out
more edges. When no edge with :math:`lo_e < U_w` is left, :math:`U_w` is the exact minimum (an
edge whose ``hi`` set it would otherwise still be open, since its ``lo`` is below its ``hi``).

On the paper's LeNet-5 with 10 calibration examples this solves 35k of the 342k edge-examples
the bounds leave open (``benchmarks/engine_speed.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MinimumSearch"]


class MinimumSearch:
    """Exact per-weight minima of edge values over groups of edges and examples.

    Each group (a parametrised layer, or the channel graph) has ``num_weights`` weights and
    maps its edges to them with ``widx``. Feed it every example's bounds with :meth:`add`, then
    call :meth:`resolve` with a function that solves edges exactly.

    Args:
        widx: per group, the weight index of each edge (``[E_g]``, long).
        num_weights: per group, the number of weights.
        initial: per group, known upper bounds on the minima (e.g. exact minima of earlier
            batches); ``+inf`` when omitted.
    """

    def __init__(self, widx: list[torch.Tensor], num_weights: list[int],
                 initial: list[torch.Tensor] | None = None) -> None:
        if len(widx) != len(num_weights):
            raise ValueError("widx and num_weights need one entry per group.")
        self.widx = widx
        if initial is None:
            initial = [torch.full((n,), torch.inf, dtype=torch.float64, device=w.device)
                       for w, n in zip(widx, num_weights)]
        self.best = [b.clone() for b in initial]
        self._open: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in widx]
        self.opened = 0
        self.solved = 0

    def add(self, group: int, example: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record one example's bounds ``lo <= value <= hi`` for every edge of ``group``
        (``lo == hi`` where the value is known)."""
        widx = self.widx[group]
        best = self.best[group]
        best.scatter_reduce_(0, widx, hi, reduce="amin")
        unsettled = lo < hi
        self.opened += int(unsettled.sum())
        edges = torch.nonzero(unsettled & (lo < best[widx])).squeeze(1)
        # Earlier examples' open edges that this one's bounds rule out are dropped now, so that
        # only possible minima are held.
        parts = []
        for x, e, v in self._open[group]:
            keep = v < best[widx[e]]
            if keep.any():
                parts.append((x, e[keep], v[keep]))
        if edges.numel():
            parts.append((example, edges, lo[edges]))
        self._open[group] = parts

    @property
    def pending(self) -> int:
        """Open edge-examples: those :meth:`resolve` will solve or rule out."""
        return sum(int(e.numel()) for parts in self._open for _, e, _ in parts)

    def resolve(self, solve: Callable[[int, int, torch.Tensor], torch.Tensor],
                on_solved: Callable[[int], None] | None = None,
                on_progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """Solve edges until every minimum is exact; return the minima per group.

        ``solve(group, example, edges)`` returns the exact values of ``edges`` (indices into
        the group's edges) on that example. Each round solves, per weight, the open edges with
        the lowest ``lo`` (one per weight for four rounds, then twice as many each round, so
        that a weight with many open edges needs few rounds). ``on_solved(count)`` is called
        after each ``solve`` with the number solved so far, and ``on_progress(settled, total)``
        with the open edge-examples settled so far (solved, or ruled out by a solve) out of the
        :attr:`pending` ones at the start (for progress display).
        """
        total = self.pending
        settled = 0
        for group, parts in enumerate(self._open):
            if not parts:
                continue
            example = torch.cat([torch.full_like(e, x) for x, e, _ in parts])
            edges = torch.cat([e for _, e, _ in parts])
            lo = torch.cat([v for _, _, v in parts])
            self._open[group] = []
            widx, best = self.widx[group], self.best[group]
            take, round_ = 1, 0
            while True:
                keep = lo < best[widx[edges]]
                settled += int(edges.numel()) - int(keep.sum())
                example, edges, lo = example[keep], edges[keep], lo[keep]
                if not edges.numel():
                    break
                weight = widx[edges]
                order = torch.argsort(lo, stable=True)
                order = order[torch.argsort(weight[order], stable=True)]
                sorted_w = weight[order]
                start = torch.searchsorted(sorted_w, sorted_w, right=False)
                rank = torch.arange(order.numel(), device=order.device) - start
                chosen = torch.zeros(edges.numel(), dtype=torch.bool, device=edges.device)
                chosen[order[rank < take]] = True
                for x in torch.unique(example[chosen]).tolist():
                    now = torch.nonzero(chosen & (example == x)).squeeze(1)
                    value = solve(group, x, edges[now])
                    best.scatter_reduce_(0, widx[edges[now]], value, reduce="amin")
                    self.solved += now.numel()
                    settled += now.numel()
                    if on_solved is not None:
                        on_solved(self.solved)
                    if on_progress is not None:
                        on_progress(settled, total)
                example, edges, lo = example[~chosen], edges[~chosen], lo[~chosen]
                round_ += 1
                if round_ >= 4:
                    take *= 2
        return self.best
