r"""The exact minimum of curvature over many edges, by branch and bound.

A weight's score is the minimum of :math:`\kappa` over its edges (every position of a conv
weight) and over the calibration examples (method.md section 4). Only that minimum is reported,
so an edge needs its exact value only if it could be the minimum. The engine first bounds every
edge, :math:`lo_e \le \kappa_e \le hi_e` (:func:`curvprune.transport.bound_edges`; most edges are
settled there with :math:`lo_e = hi_e`). For a weight ``w`` let
:math:`U_w = \min_e hi_e` over its edges: the minimum is at most :math:`U_w`, so an edge with
:math:`lo_e \ge U_w` cannot be below it and is never solved. The others are solved in rounds,
each weight's lowest :math:`lo_e` first; every exact value lowers :math:`U_w`, which rules out
more edges. When no edge with :math:`lo_e < U_w` is left, :math:`U_w` is the exact minimum (an
edge whose ``hi`` set it would otherwise still be open, since its ``lo`` is below its ``hi``).

On the paper's LeNet-5 with 10 calibration examples this solves 35k of the 342k edge-examples
the bounds leave open (``benchmarks/engine_speed.py``).

**Intervals.** Let :math:`L_w = \min_e lo_e` over the weight's edge-examples (with a solved
edge's exact value as its ``lo``). Since :math:`m_w = \min_e \kappa_e` and
:math:`lo_e \le \kappa_e \le hi_e` for every ``e``, :math:`L_w \le m_w \le U_w` at every
stage (the minimum of lower bounds is a lower bound of the minimum; the minimum is at most any
one of its terms). With a ``tolerance`` :math:`\tau`, an edge is only kept for solving while
:math:`lo_e < U_w - \tau`; the others are folded into a running minimum of their ``lo``
(:meth:`MinimumSearch.lower`). :math:`U_w` only decreases, so an edge once folded stays at
:math:`lo_e \ge U_w - \tau`; when nothing is left to solve every edge has
:math:`lo_e \ge U_w - \tau`, hence :math:`U_w - L_w \le \tau`. With :math:`\tau = 0` this
is the exact search above.

**A tolerance on node means.** A channel's curvature is a mean of its edges' minima,
:math:`\kappa(v) = \sum_{e \ni v} c_e m_e / C_v` with :math:`C_v = \sum_{e \ni v} c_e`
(:meth:`CurvatureResult.node_kappa <curvprune.result.CurvatureResult.node_kappa>`: ``c_e = 1``
for ``"mean"``, the weight norm for ``"weighted"``), so
:math:`\sum_e c_e L_e / C_v \le \kappa(v) \le \sum_e c_e U_e / C_v`, an interval of width
:math:`W_v = \sum_{e \ni v} c_e (U_e - L_e) / C_v`. Given the nodes (:class:`NodeMeans`), the
search spends the tolerance on :math:`W_v` instead of on each edge: an open edge-example is
also dropped (folded into :math:`L_e`) once both ends of its edge have :math:`W_v \le \tau`,
and each round solves, at each node still wider than :math:`\tau`, its widest edges (by
:math:`c_e (U_e - L_e)`) until their widths cover the excess. Here :math:`L_e` counts the
held edge-examples' ``lo`` too, so neither a drop nor a fold changes it, and solving only
raises :math:`L_e` and lowers :math:`U_e`: :math:`W_v` never grows. At the end every edge
either has :math:`U_e - L_e \le \tau` (nothing of it held: the rule above) or was dropped
when both its ends had :math:`W_v \le \tau`; a node with no dropped edge is a mean of widths
at most :math:`\tau`; so every node has :math:`W_v \le \tau`, while single edges may be
wider.

**Tightening before solving.** Bounds tighter than the bounding pass's but cheaper than a
solve (the edge-by-edge ones of :func:`curvprune.transport.bound_edges`) are worth their cost
only on edge-examples that can still move an interval, and which those are is known only once
every example is bounded. So :meth:`MinimumSearch.resolve` takes them then (``tighten``), for
the edge-examples it holds, before any solve: a tighter ``lo`` replaces the held one (both are
lower bounds of the same value, the larger is kept) and a tighter ``hi`` lowers :math:`U_w`,
so every statement above still holds. With a tolerance on node means, only the wide nodes'
widest slots are tightened, in rounds (:meth:`MinimumSearch._tighten`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

__all__ = ["MinimumSearch", "NodeMeans"]

#: Relative margin under the tolerance at which a node counts as narrow, so that the node
#: widths recomputed from the final bounds (other float sums) stay within the tolerance.
_NODE_MARGIN = 1e-12


@dataclass
class NodeMeans:
    """The nodes whose curvature is a weighted mean of slot minima (module docstring), for a
    tolerance on those means instead of on each slot; one slot per edge.

    Attributes:
        ends: per group, ``[2, num_slots]`` (long): the two nodes of each slot's edge.
        weight: per group, ``[num_slots]`` (float64, positive): each slot's coefficient
            :math:`c_e` in the means of both its ends.
        total: ``[num_nodes]`` (float64): :math:`C_v`, the sum of :math:`c_e` over every edge
            of the node in every group (a node without edges: 0, never wide).
    """

    ends: list[torch.Tensor]
    weight: list[torch.Tensor]
    total: torch.Tensor


class MinimumSearch:
    """Per-weight minima of edge values over groups of edges and examples, exact or to within
    a tolerance.

    Each group (a parametrised layer, or the channel graph) has ``num_weights`` weights and
    maps its edges to them with ``widx``. Feed it every example's bounds with :meth:`add`, then
    call :meth:`resolve` with a function that solves edges exactly.

    Args:
        widx: per group, the weight index of each edge (``[E_g]``, long).
        num_weights: per group, the number of weights.
        initial: per group, known upper bounds on the minima (e.g. exact minima of earlier
            batches); ``+inf`` when omitted.
        tolerance: stop solving a weight's edges once ``U_w - L_w <= tolerance`` (module
            docstring); ``0`` finds every minimum exactly.
        nodes: spend the tolerance on these nodes' means of slot minima instead (module
            docstring, "A tolerance on node means"); slots may then be wider.
    """

    def __init__(self, widx: list[torch.Tensor], num_weights: list[int],
                 initial: list[torch.Tensor] | None = None, tolerance: float = 0.0,
                 nodes: NodeMeans | None = None) -> None:
        if len(widx) != len(num_weights):
            raise ValueError("widx and num_weights need one entry per group.")
        if nodes is not None and (len(nodes.ends) != len(widx) or any(
                e.shape != (2, n) for e, n in zip(nodes.ends, num_weights))):
            raise ValueError("nodes needs, per group, the two ends of every slot.")
        self.widx = widx
        self.nodes = nodes
        self.tolerance = float(tolerance)
        if initial is None:
            initial = [torch.full((n,), torch.inf, dtype=torch.float64, device=w.device)
                       for w, n in zip(widx, num_weights)]
        self.best = [b.clone() for b in initial]
        self.floor = [torch.full_like(b, torch.inf) for b in self.best]
        self._open: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in widx]
        self.opened = 0
        self.solved = 0

    def _fold(self, group: int, edges: torch.Tensor, lo: torch.Tensor) -> None:
        """Fold edges that are no longer held into the running minimum of lower bounds."""
        if edges.numel():
            self.floor[group].scatter_reduce_(0, self.widx[group][edges], lo, reduce="amin")

    def ceiling(self, group: int) -> torch.Tensor:
        """Per edge of ``group``, ``U_w - tolerance`` of its weight now: an edge whose lower
        bound on a later example is at least this cannot move its weight's interval (it is
        folded by :meth:`add` whatever its upper bound), so it needs no tighter bound."""
        return self.best[group][self.widx[group]] - self.tolerance

    def add(self, group: int, example: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record one example's bounds ``lo <= value <= hi`` for every edge of ``group``
        (``lo == hi`` where the value is known; ``hi = +inf`` where only ``lo`` is, for an
        edge screened by :meth:`ceiling`)."""
        widx = self.widx[group]
        best = self.best[group]
        tol = self.tolerance
        best.scatter_reduce_(0, widx, hi, reduce="amin")
        unsettled = hi - lo > tol
        held = unsettled & (lo < best[widx] - tol)
        # A screened edge (hi = +inf, lo at least its ceiling) is never held: not counted open.
        self.opened += int((unsettled & (held | (hi < torch.inf))).sum())
        edges = torch.nonzero(held).squeeze(1)
        rest = torch.nonzero(~held).squeeze(1)
        self._fold(group, rest, lo[rest])
        # Earlier examples' open edges that this one's bounds rule out are dropped now, so that
        # only possible minima are held.
        parts = []
        for x, e, v in self._open[group]:
            keep = v < best[widx[e]] - tol
            self._fold(group, e[~keep], v[~keep])
            if keep.any():
                parts.append((x, e[keep], v[keep]))
        if edges.numel():
            parts.append((example, edges, lo[edges]))
        self._open[group] = parts

    def held(self, group: int, example: int) -> torch.Tensor:
        """The group's open edges on ``example`` (indices; empty when none): :meth:`resolve`
        solves only among these, and later :meth:`add` calls only drop some, so the scoring
        loop keeps just their problems (:meth:`~curvprune.graphs.base.EdgeProblem.keep`)."""
        parts = [e for x, e, _ in self._open[group] if x == example]
        return torch.cat(parts) if parts else self.widx[group][:0]

    @property
    def pending(self) -> int:
        """Open edge-examples: those :meth:`resolve` will solve or rule out."""
        return sum(int(e.numel()) for parts in self._open for _, e, _ in parts)

    def lower(self) -> list[torch.Tensor]:
        """Per group, ``L_w``: a lower bound on each minimum (call after :meth:`resolve`, which
        returns the upper bounds ``U_w``; the two are equal when the tolerance is 0)."""
        return [torch.minimum(f, b) for f, b in zip(self.floor, self.best)]

    def resolve(self, solve: Callable[[int, int, torch.Tensor], torch.Tensor],
                on_solved: Callable[[int], None] | None = None,
                on_progress: Callable[[int, int], None] | None = None,
                tighten: Callable[[int, list[tuple[int, torch.Tensor, torch.Tensor]]],
                                  Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
                ) -> list[torch.Tensor]:
        """Solve edges until every minimum is within the tolerance; return the upper bounds
        ``U_w`` per group (the exact minima when the tolerance is 0).

        ``solve(group, jobs)`` returns, for each ``(example, edges)`` of ``jobs`` in order, the
        exact values of ``edges`` (indices into the group's edges) on that example, or a pair
        ``(lo, hi)`` of tighter bounds on them (the engine's solves on cut measures); a round's
        jobs are independent (one per example), so they may run in parallel, and the values
        are read in order as they come. Each round solves, per weight, the open edges with
        the lowest ``lo`` (one per weight for four rounds, then twice as many each round, so
        that a weight with many open edges needs few rounds). ``on_solved(count)`` is called
        after each ``solve`` with the number solved so far, and ``on_progress(settled, total)``
        with the open edge-examples settled so far (solved, or ruled out by a solve) out of the
        :attr:`pending` ones at the start (for progress display).

        ``tighten(group, jobs)``, if given, returns tighter bounds ``(lo, hi)`` on open edges,
        cheaper than a solve, for each ``(example, edges, ceiling)`` of ``jobs`` (in order;
        the jobs are independent, so they may run in parallel; ``ceiling``: per edge, its
        weight's :math:`U_w` less the tolerance, at and above which a lower bound rules the
        edge out, so that it needs no tighter upper bound): before a group's first solve
        (with a tolerance on node means, before any group's), every
        edge-example still held is tightened once (with a tolerance on node means, only as
        many as the wide nodes need: :meth:`_tighten`); it stays held with the larger lower
        bound, and the smaller upper bound lowers its weight's :math:`U_w`. The rounds then
        solve among what is still held.
        """
        total = self.pending
        settled = 0
        nodes = self.nodes
        if nodes is not None:  # every group's share of each node's width, held edges counted
            sums = sum(self._node_share(g, *self._held(g)) for g in range(len(self._open)))
            narrow = self.tolerance * (1 - _NODE_MARGIN) * nodes.total
        if tighten is not None and nodes is not None:
            # Nodes join groups: every group is tightened before any is solved, so that no
            # group solves for a width that another group's tightening would have removed.
            for group in range(len(self._open)):
                others = sums - self._node_share(group, *self._held(group))
                self._tighten(group, tighten, others, narrow)
                sums = others + self._node_share(group, *self._held(group))
        for group in range(len(self._open)):
            if tighten is not None and nodes is None:  # the groups are independent
                self._tighten(group, tighten)
            parts = self._open[group]
            if not parts:
                continue
            example = torch.cat([torch.full_like(e, x) for x, e, _ in parts])
            edges = torch.cat([e for _, e, _ in parts])
            lo = torch.cat([v for _, _, v in parts])
            self._open[group] = []
            widx, best = self.widx[group], self.best[group]
            if nodes is not None:
                others = sums - self._node_share(group, edges, lo)
            take, round_ = 1, 0
            while True:
                keep = lo < best[widx[edges]] - self.tolerance
                pick = None
                if nodes is not None:
                    share = self._node_share(group, edges, lo)
                    excess = others + share - narrow
                    keep &= self._at_wide(group, edges, excess)
                settled += int(edges.numel()) - int(keep.sum())
                self._fold(group, edges[~keep], lo[~keep])
                example, edges, lo = example[keep], edges[keep], lo[keep]
                if not edges.numel():
                    break
                weight = widx[edges]
                if nodes is not None:
                    pick = self._widest(group, edges, lo, excess)
                order = torch.argsort(lo, stable=True)
                order = order[torch.argsort(weight[order], stable=True)]
                sorted_w = weight[order]
                start = torch.searchsorted(sorted_w, sorted_w, right=False)
                rank = torch.arange(order.numel(), device=order.device) - start
                chosen = torch.zeros(edges.numel(), dtype=torch.bool, device=edges.device)
                chosen[order[rank < take]] = True
                if pick is not None:
                    chosen &= pick[weight]
                xs = torch.unique(example[chosen]).tolist()
                nows = [torch.nonzero(chosen & (example == x)).squeeze(1) for x in xs]
                jobs = [(x, edges[now]) for x, now in zip(xs, nows)]
                for now, value in zip(nows, solve(group, jobs)):
                    if isinstance(value, tuple):
                        # Both are lower bounds of the same edge-example: keep the larger, so
                        # that a solve never widens an interval.
                        self._fold(group, edges[now], torch.maximum(value[0], lo[now]))
                        value = value[1]
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
            if nodes is not None:
                sums = others + self._node_share(group, edges, lo)
        return self.best

    def _tighten(self, group: int, tighten: Callable, others: torch.Tensor | None = None,
                 narrow: torch.Tensor | None = None) -> None:
        """:meth:`resolve`'s first pass on one group: its held edge-examples get
        ``tighten``'s bounds, each at most once. With a tolerance on node means (``others``:
        the other groups' shares of the node widths, ``narrow``: the tolerance times
        :math:`C_v`) only edges with an end wider than the tolerance are tightened, in rounds:
        at each wide node, its widest slots until their widths cover the node's excess
        (times :math:`2^r` in round ``r``, so that few rounds are needed), every held example
        of them; then the widths again. (Tightening only each slot's lowest held examples
        first tightened more in all: 1.82M edge-examples against 1.46M on mobilenetv3_large
        with 16 images.)"""
        widx, best = self.widx[group], self.best[group]
        parts = [(x, e, v.clone()) for x, e, v in self._open[group]]
        self._open[group] = parts
        done = [torch.zeros_like(e, dtype=torch.bool) for _, e, _ in parts]
        round_ = 0
        while parts:
            ceiling = self.ceiling(group)
            want = [(v < ceiling[e]) & ~t for (_, e, v), t in zip(parts, done)]
            if others is not None:
                edges, lo = self._held(group)
                excess = others + self._node_share(group, edges, lo) - narrow
                want = [w & self._at_wide(group, e, excess) for w, (_, e, _) in zip(want, parts)]
                among = torch.cat(want)
                if not among.any():
                    break
                pick = self._widest(group, edges, lo, excess * 2.0 ** round_, among)
                want = [w & pick[widx[e]] for w, (_, e, _) in zip(want, parts)]
            jobs = [(x, e[at], v, at, t) for (x, e, v), w, t in zip(parts, want, done)
                    for at in [torch.nonzero(w).squeeze(1)] if at.numel()]
            asked = [(x, e, ceiling[e]) for x, e, *_ in jobs]
            for (_, edges, v, at, t), (new_lo, new_hi) in zip(jobs, tighten(group, asked)):
                v[at] = torch.maximum(v[at], new_lo)
                best.scatter_reduce_(0, widx[edges], new_hi, reduce="amin")
                t[at] = True
            if others is None:
                break
            round_ += 1

    # -- a tolerance on node means ------------------------------------------------------------

    def _held(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's open edge-examples before :meth:`resolve`: ``(edges, lo)``."""
        parts = self._open[group]
        empty = self.widx[group][:0]
        if not parts:
            return empty, empty.to(torch.float64)
        return torch.cat([e for _, e, _ in parts]), torch.cat([v for _, _, v in parts])

    def _slot_widths(self, group: int, edges: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """:math:`c_e (U_e - L_e)` per slot, :math:`L_e` counting the held ``lo`` (``edges``)
        too; finite (an unbounded width is clamped far above any tolerance), 0 for a slot
        with no bound at all."""
        lower = torch.minimum(self.floor[group], self.best[group])
        lower = lower.scatter_reduce(0, self.widx[group][edges], lo, reduce="amin")
        width = (self.best[group] - lower).nan_to_num(nan=0.0).clamp(max=1e30)
        return width * self.nodes.weight[group]

    def _node_share(self, group: int, edges: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        r"""The group's part of :math:`\sum_e c_e (U_e - L_e)` at every node."""
        width = self._slot_widths(group, edges, lo)
        ends = self.nodes.ends[group]
        out = torch.zeros_like(self.nodes.total)
        return out.index_add_(0, ends[0], width).index_add_(0, ends[1], width)

    def _at_wide(self, group: int, edges: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
        """Whether each held edge-example's edge has an end still wider than the tolerance."""
        slot = self.widx[group][edges]
        ends = self.nodes.ends[group]
        return (excess[ends[0][slot]] > 0) | (excess[ends[1][slot]] > 0)

    def _widest(self, group: int, edges: torch.Tensor, lo: torch.Tensor,
                excess: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
        """Per slot, whether to solve it this round: at each node wider than the tolerance, its
        held slots (those of ``edges``; of ``edges[among]`` if given) by decreasing width per
        held example (the solves that may remove it) until their widths cover the node's
        excess (at least one)."""
        slot = self.widx[group][edges]
        count = torch.bincount(slot, minlength=self.best[group].numel())
        slots = torch.unique(slot if among is None else slot[among])
        count = count[slots]
        width = self._slot_widths(group, edges, lo)[slots]
        value = width / count
        pick = torch.zeros(self.best[group].numel(), dtype=torch.bool, device=edges.device)
        for end in self.nodes.ends[group]:
            node = end[slots]
            wide = torch.nonzero(excess[node] > 0).squeeze(1)
            if not wide.numel():
                continue
            order = torch.argsort(-value[wide], stable=True)
            order = wide[order[torch.argsort(node[wide][order], stable=True)]]
            ranked, covered = node[order], width[order]
            total = torch.cumsum(covered, 0)
            first = torch.searchsorted(ranked, ranked, right=False)
            before = total - covered - (total[first] - covered[first])
            pick[slots[order[before < excess[ranked]]]] = True
        return pick

