r"""The edge problem, the unit of work both graphs hand to the transport kernels, and the
interface a graph implements for :func:`curvprune.neural_curvature`'s one loop.

An :class:`EdgeProblem` holds everything the curvature of a group of edges (a parametrised
layer of the neuron graph, or the layer edges of the channel graph) needs on one example: the
edges ``src -> dst`` with their lengths :math:`d = 1/|w|`, which are dead, the neighbour
measures of both sides (cut by :func:`~curvprune.transport.cut_measures`), the ground-distance
tables, the search slot (weight) of each edge and the bound on how far the cut moved each
kappa. It is built once per (group, example) and bounded; the edges the minimum search may
still need solved are then kept as a :class:`SolveSet` (those edges and the measure rows of
their ends only), which is solved as often as the search asks.
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

__all__ = ["EdgeProblem", "SolveSet", "EdgeGraph"]


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

    def keep(self, edges: torch.Tensor) -> SolveSet:
        """What exact solves of ``edges`` (indices) read, and nothing more: those edges, and
        the rows of the measures at their sources and targets (full width, so each solve is
        bitwise the one :meth:`solve` gives)."""
        edges = torch.unique(edges)
        src, dst = self.src[edges], self.dst[edges]
        mu, src_row = _rows(self.mu, src)
        nu, dst_row = _rows(self.nu, dst)
        return SolveSet(edges, src, dst, self.length[edges], self.error[edges], mu, nu,
                        src_row, dst_row, self.distances)

    def bounds(self, alpha: float, tolerance: float, *, stats: EngineStats,
               options: EngineOptions, ceiling: torch.Tensor | None = None,
               tighten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Certified ``(lo, hi)`` on every edge's curvature under the uncut measures
        (:func:`~curvprune.transport.bound_edges` in interval mode, widened by ``error``;
        edges whose cheap lower bound reaches ``ceiling`` are screened: ``hi = +inf``;
        ``tighten=False``: the open edges are not tightened edge by edge)."""
        return bound_edges(self.src, self.dst, self.length, self.dead, self.mu, self.nu,
                           self.distances, alpha, certify_tol=tolerance, block=options.block,
                           stats=stats, settle=False, error=self.error, ceiling=ceiling,
                           tighten=tighten)

    def solve(self, edges: torch.Tensor, alpha: float, *, stats: EngineStats,
              options: EngineOptions, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(value - error, value + error)`` for the live edges ``edges`` (indices), ``value``
        their exact curvature under the cut measures
        (:func:`~curvprune.transport.solve_edges`): bounds on the uncut curvature. The same
        as ``self.keep(edges).solve(edges, ...)``."""
        return self.keep(edges).solve(edges, alpha, stats=stats, options=options,
                                      threads=threads)

    @property
    def nbytes(self) -> int:
        """Bytes this problem holds of its own (the measures and per-edge flags; the edges and
        distance tables are the graph's)."""
        return _tensor_bytes(self.dead, self.error, *_measure_tensors(self.mu),
                             *_measure_tensors(self.nu))


def _measure_tensors(measure: _Measure | None) -> tuple[torch.Tensor | None, ...]:
    if measure is None:
        return ()
    return measure.table, measure.mass, measure.has, measure.reach, measure.cut


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of ``tensors`` (``None`` counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _rows(measure: _Measure | None, nodes: torch.Tensor
          ) -> tuple[_Measure | None, torch.Tensor]:
    """``measure``'s rows at ``nodes`` only, and each node's row in them; the neighbour ids
    as int32 where they fit (a quarter less memory per kept entry: :func:`_wide` reads them
    back as int64, the same ids)."""
    if measure is None:
        return None, nodes
    unique, row = torch.unique(nodes, return_inverse=True)
    table = measure.table[unique]
    if table.numel() and int(table.max()) < 2**31:
        table = table.to(torch.int32)
    return _Measure(table, measure.mass[unique], measure.has[unique],
                    measure.reach[unique]), row


def _wide(measure: _Measure | None) -> _Measure | None:
    """``measure`` with int64 neighbour ids, as the transport kernels read them (their index
    arithmetic, e.g. flat indices into a distance table, must not wrap at 32 bits)."""
    if measure is None or measure.table.dtype == torch.int64:
        return measure
    return replace(measure, table=measure.table.long())


@dataclass
class SolveSet:
    """Some edges of an :class:`EdgeProblem` (``edges``, sorted indices into its edges),
    ready for exact solves: their ends, lengths and cut errors, and the measures' rows at
    their ends only (``src_row`` / ``dst_row``: each edge's row; the node ids ``src`` /
    ``dst`` still index the distance tables). Made by :meth:`EdgeProblem.keep`; it holds
    far less than the problem when few edges are kept, which is what lets the scoring loop
    keep one per (group, example) between the minimum search's rounds."""

    edges: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    length: torch.Tensor
    error: torch.Tensor
    mu: _Measure | None
    nu: _Measure | None
    src_row: torch.Tensor
    dst_row: torch.Tensor
    distances: Distances

    def _at(self, edges: torch.Tensor, caller: str) -> torch.Tensor:
        """Positions of ``edges`` (indices into the problem's edges) among the kept ones."""
        at = torch.searchsorted(self.edges, edges)
        if at.numel() and (int(at.max()) >= self.edges.numel()
                           or not torch.equal(self.edges[at], edges)):
            raise ValueError(f"SolveSet.{caller}: an edge was not kept (EdgeProblem.keep).")
        return at

    def bounds(self, edges: torch.Tensor, alpha: float, tolerance: float, *,
               stats: EngineStats, options: EngineOptions,
               ceiling: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`EdgeProblem.bounds` of ``edges`` (kept ones; ``ceiling`` per edge of
        ``edges``), with the edge-by-edge tightening, from the kept measure rows alone: the
        edges are renamed to their rows (``src_row`` / ``dst_row``) and the tables that read
        an end (``d_kj`` by its target, ``d_im`` by its source) are read through the same
        renaming, so every value is the one the problem's own nodes give."""
        at = self._at(edges, "bounds")
        src_node = _node_of_row(self.src_row, self.src)
        dst_node = _node_of_row(self.dst_row, self.dst)
        tables = Distances(_Renamed(self.distances.d_kj, cols=dst_node),
                           _Renamed(self.distances.d_im, rows=src_node), self.distances.d_km)
        return bound_edges(self.src_row[at], self.dst_row[at], self.length[at],
                           torch.zeros(at.numel(), dtype=torch.bool, device=at.device),
                           _wide(self.mu), _wide(self.nu), tables, alpha, certify_tol=tolerance,
                           block=options.block, stats=stats, settle=False,
                           error=self.error[at], ceiling=ceiling)

    def solve(self, edges: torch.Tensor, alpha: float, *, stats: EngineStats,
              options: EngineOptions, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`EdgeProblem.solve` of ``edges`` (indices into the problem's edges, each one
        of the kept ``edges``), bitwise."""
        at = self._at(edges, "solve")
        value = solve_edges(self.src[at], self.dst[at], self.length[at], _wide(self.mu),
                            _wide(self.nu), self.distances, alpha, block=options.block, stats=stats,
                            threads=threads, src_row=self.src_row[at],
                            dst_row=self.dst_row[at])
        error = self.error[at]
        return value - error, value + error

    @property
    def nbytes(self) -> int:
        """Bytes it holds (the distance tables are the graph's)."""
        return _tensor_bytes(self.edges, self.src, self.dst, self.length, self.error,
                             self.src_row, self.dst_row, *_measure_tensors(self.mu),
                             *_measure_tensors(self.nu))


def _node_of_row(row: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """The node id of each measure row (``row[e]`` is the row of node ``node[e]``)."""
    out = torch.zeros(int(row.max()) + 1 if row.numel() else 0, dtype=node.dtype,
                      device=node.device)
    return out.scatter_(0, row, node)


class _Renamed:
    """A distance table read with renamed rows or columns:
    ``self[r, c] = table[rows[r], cols[c]]`` (``None``: not renamed)."""

    def __init__(self, table: Any, *, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> None:
        self.table, self.rows, self.cols = table, rows, cols

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        r, c = key
        return self.table[self.rows[r] if self.rows is not None else r,
                          self.cols[c] if self.cols is not None else c]


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
