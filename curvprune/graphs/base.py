r"""The edge problem, the unit of work both graphs hand to the transport kernels, and the
interface a graph implements for :func:`curvprune.neural_curvature`'s one loop.

An :class:`EdgeProblem` holds everything the curvature of a group of edges (a parametrised
layer of the neuron graph, or the layer edges of the channel graph) needs on one example: the
edges ``src -> dst`` with their lengths :math:`d = 1/|w|`, which are dead, the neighbour
measures of both sides (cut by :func:`~curvprune.transport.cut_measures`), the ground-distance
tables, the search slot (weight) of each edge and the bound on how far the cut moved each
kappa. It is built once per (group, example) and then bounded and solved as often as the
minimum search asks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from ..transport import (
    Distances,
    EngineOptions,
    EngineStats,
    bound_edges,
    cut_error,
    cut_measures,
    solve_edges,
)
from ..transport.measures import _Measure

__all__ = ["EdgeProblem", "EdgeGraph"]


@dataclass
class EdgeProblem:
    """The curvature problems of one group of edges on one example.

    Attributes:
        src, dst: ``[E]`` long, the edges' end nodes (ids the measures and tables index).
        length: ``[E]`` float64, :math:`d(i, j)`, the edge lengths (also the ground distance
            between the ends).
        dead: ``[E]`` bool, an end has activity 0 (kappa is 1).
        mu, nu: neighbour measures of the sources' and the targets' node sets (``None``: every
            node of that side is a point mass), cut within ``cut_tol / 2`` per edge.
        distances: the ground-distance tables the edges' problems read.
        slot: ``[E]`` long, the search slot of each edge (the weight it belongs to, or the edge
            itself where weights and edges are many-to-many).
        error: ``[E]`` float64, a bound on how far the cut moved each edge's kappa
            (:func:`~curvprune.transport.cut_error`).
    """

    src: torch.Tensor
    dst: torch.Tensor
    length: torch.Tensor
    dead: torch.Tensor
    mu: _Measure | None
    nu: _Measure | None
    distances: Distances
    slot: torch.Tensor
    error: torch.Tensor

    @classmethod
    def build(cls, src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor,
              dead: torch.Tensor, mu: _Measure | None, nu: _Measure | None,
              distances: Distances, slot: torch.Tensor, cut_tol: float) -> EdgeProblem:
        """Cut the measures within ``cut_tol / 2`` per edge (:func:`cut_measures`, over all
        these edges) and record the cut's error bound."""
        mu, nu = cut_measures(mu, nu, src, dst, length, cut_tol)
        return cls(src, dst, length, dead, mu, nu, distances, slot,
                   cut_error(mu, nu, src, dst, dead, cut_tol))

    def take(self, edges: torch.Tensor) -> EdgeProblem:
        """The problems of ``edges`` (indices) only, with the same measures."""
        return replace(self, src=self.src[edges], dst=self.dst[edges],
                       length=self.length[edges], dead=self.dead[edges],
                       slot=self.slot[edges], error=self.error[edges])

    def bounds(self, alpha: float, tolerance: float, *, stats: EngineStats,
               options: EngineOptions, ceiling: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Certified ``(lo, hi)`` on every edge's curvature under the uncut measures
        (:func:`~curvprune.transport.bound_edges` in interval mode, widened by ``error``;
        edges whose cheap lower bound reaches ``ceiling`` are screened: ``hi = +inf``)."""
        return bound_edges(self.src, self.dst, self.length, self.dead, self.mu, self.nu,
                           self.distances, alpha, certify_tol=tolerance, block=options.block,
                           stats=stats, settle=False, error=self.error, ceiling=ceiling)

    def solve(self, edges: torch.Tensor, alpha: float, *, stats: EngineStats,
              options: EngineOptions, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(value - error, value + error)`` for the live edges ``edges`` (indices), ``value``
        their exact curvature under the cut measures
        (:func:`~curvprune.transport.solve_edges`): bounds on the uncut curvature."""
        value = solve_edges(self.src[edges], self.dst[edges], self.length[edges], self.mu,
                            self.nu, self.distances, alpha, block=options.block, stats=stats,
                            threads=threads)
        error = self.error[edges]
        return value - error, value + error

    @property
    def nbytes(self) -> int:
        """Bytes this problem holds of its own (the measures and per-edge flags; the edges and
        distance tables are the graph's)."""
        total = self.dead.numel() * self.dead.element_size()
        total += self.error.numel() * self.error.element_size()
        for measure in (self.mu, self.nu):
            if measure is not None:
                for t in (measure.table, measure.mass, measure.has, measure.reach, measure.cut):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total


class EdgeGraph(Protocol):
    """What :func:`curvprune.neural_curvature`'s loop needs of a graph: groups of edges, each
    mapped to search slots (a weight's minimum is over its slot), and the edge problems of one
    example's activity (:class:`~curvprune.graphs.neuron.NeuronGraph` and
    :class:`~curvprune.graphs.channel.ChannelProblems` implement it)."""

    @property
    def num_groups(self) -> int: ...

    def slots(self, group: int) -> tuple[torch.Tensor, int]:
        """``(slot of each edge, number of slots)`` of ``group``."""
        ...

    def edge_problem(self, group: int, activity: Any, cut_tol: float) -> EdgeProblem:
        """The problems of every edge of ``group`` on the example whose activity is given."""
        ...
