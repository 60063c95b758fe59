"""The kernels' shared vocabulary: the ground-distance tables an edge set reads
(:class:`Distances`), the engine's counters (:class:`EngineStats`), the default tolerance, and the
chunking helpers that bound the vectorised kernels' memory."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["CERTIFY_TOL", "Distances", "EngineOptions", "EngineStats"]

#: Default tolerance of the engine's shortcuts, in units of kappa (a few ulps). In the
#: per-edge functions (``certify_tol``): half of it for cutting negligible masses from the
#: measures (:func:`cut_measures`), half for settling an edge whose bounds are that close
#: (:func:`bound_edges`), so every kappa is within it of the exact value. In
#: :func:`curvprune.neural_curvature` it is the default ``tolerance``: the largest width of a
#: weight's certified interval. 0 turns the shortcuts off.
CERTIFY_TOL = 1e-14


@dataclass
class EngineStats:
    """Counts of how the engine resolved each (edge, example).

    ``dead``: an end has activity 0 (kappa 1). ``point_mass``: a side is a point mass (closed
    form). ``certified``: settled by the bounds of :func:`~curvprune.transport.bound_edges`.
    ``full_swap``: solved in closed form (every unit swaps). ``solved``: solved by network
    simplex. ``ruled_out``: left open by its own bounds but never solved, because other edges'
    values showed it cannot be its weight's minimum (:mod:`curvprune.transport.minimum`; the
    old name ``bounded`` still reads it, with a ``DeprecationWarning``). ``shared_problems``:
    the ``(p, q)`` problems solved for the bounds (one per distinct pair of neighbour
    measures). ``screened``: left open, but shown by the swap plan's cheap bound to be no
    lower than its weight's minimum over the earlier examples (less the tolerance), so never
    bounded further (:func:`~curvprune.transport.bound_edges`). ``tightened``: held open by
    the minimum search after every example's bounds, then bounded again edge by edge (the
    re-costed plan and the dual at every breakpoint) before any exact solve
    (:meth:`~curvprune.transport.MinimumSearch.resolve`); it is then also counted as solved or
    ruled out.
    """

    dead: int = 0
    point_mass: int = 0
    certified: int = 0
    full_swap: int = 0
    solved: int = 0
    ruled_out: int = 0
    shared_problems: int = 0
    screened: int = 0
    tightened: int = 0

    @property
    def bounded(self) -> int:
        """Deprecated name of :attr:`ruled_out`."""
        warnings.warn("EngineStats.bounded is deprecated; use ruled_out (open edges that were "
                      "never solved because they cannot be their weight's minimum).",
                      DeprecationWarning, stacklevel=2)
        return self.ruled_out

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def add(self, other: EngineStats) -> None:
        """Add ``other``'s counts to these (the counts of work done apart, on a pool)."""
        for name, value in other.as_dict().items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class EngineOptions:
    """The engine's tuning knobs, passed down from :func:`curvprune.neural_curvature`
    (``options=``). None of them changes a score (tests run them at extreme values against the
    reference): they trade memory for speed.

    Attributes:
        block: float64 entries per vectorised chunk of the kernels (bounds and exact solves);
            bounds their peak memory.
        min_plus_block: entries per chunk of the min-plus products that fill the neuron
            graph's hop tables (:meth:`curvprune.graphs.neuron.HopTable.compose`).
        window_fraction: a conv hop table is stored windowed when its window covers at most
            this fraction of the target layer's positions, else dense
            (:class:`curvprune.graphs.neuron.HopTable`); ``0`` stores every table dense.
        problem_cache_bytes: bytes of solve sets (the edges of one layer or group on one
            example that the minimum search holds open, with their ends' measure rows:
            :class:`curvprune.graphs.base.SolveSet`) kept between the bounding pass and the
            exact solve rounds (a set of an earlier group displaces later groups' sets: the
            search resolves the groups in order); past it, a set is rebuilt (its edge problem
            built again) when the search reaches its group, and kept for that group's rounds
            if it fits.
    """

    block: int = 1 << 22
    min_plus_block: int = 1 << 22
    window_fraction: float = 0.5
    problem_cache_bytes: int = 1 << 29

    def __post_init__(self) -> None:
        for name in ("block", "min_plus_block", "problem_cache_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (
                    0 if name == "problem_cache_bytes" else 1):
                raise ValueError(f"EngineOptions.{name} must be a positive integer, got "
                                 f"{value!r}.")
        fraction = self.window_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
                0.0 <= fraction <= 1.0):
            raise ValueError(f"EngineOptions.window_fraction must be a number in [0, 1], got "
                             f"{fraction!r}.")


@dataclass
class Distances:
    """Ground distances an edge set needs, as tables indexed by the measures' node ids.

    ``d_kj[k, j]``: from ``i``'s neighbours to ``j``; ``d_im[i, m]``: from ``i`` to ``j``'s
    neighbours; ``d_km[k, m]``: between the neighbours. For the layered neuron graph these are
    the hop tables of consecutive layers; for the channel graph, one all-pairs table.
    """

    d_kj: Any
    d_im: Any
    d_km: Any


def _gather_rows(table: Any, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """``table[rows[e], cols[e, s]]`` with padded columns (``-1``) mapped to column 0."""
    return table[rows[:, None], cols.clamp(min=0)]


def _cross(table: Any, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``table[rows[e, s], cols[e, t]]`` as ``[E, S, T]``: the ground costs between two node
    sets per edge (every problem's cost block at once).

    A dense table (a 2-D tensor, or a table whose ``dense_values`` is one, like a dense
    :class:`curvprune.graphs.neuron.HopTable`) on the CPU is read with one ``numpy.take`` of
    flat indices, about 2.5 times faster than torch's two-index gather; the values are the
    same (a gather copies them). Anything else is indexed as ``table[rows, cols]``."""
    values = table if isinstance(table, torch.Tensor) else getattr(table, "dense_values", None)
    if (values is None or values.dim() != 2 or values.device.type != "cpu"
            or values.requires_grad or not values.is_contiguous() or rows.numel() == 0):
        return table[rows[:, :, None], cols[:, None, :]]
    flat = (rows * values.shape[1]).numpy()[:, :, None] + cols.numpy()[:, None, :]
    return torch.from_numpy(np.take(values.numpy().reshape(-1), flat))


def _chunks(index: torch.Tensor, block: int, width: int) -> tuple[torch.Tensor, ...]:
    """Split ``index`` so that each chunk times ``width`` stays within ``block`` entries."""
    if index.numel() == 0:
        return ()
    return index.split(max(1, block // max(1, width)))


def _weighted_sum(mass: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``sum_s mass[..., s] * cost[..., s]`` over the slots with mass (the last axis)."""
    return torch.where(mass > 0, mass * cost, torch.zeros((), dtype=cost.dtype,
                                                          device=cost.device)).sum(dim=-1)

