"""The kernels' shared vocabulary: the ground-distance tables an edge set reads
(:class:`Distances`), the engine's counters (:class:`EngineStats`), the default tolerance, and the
chunking helpers that bound the vectorised kernels' memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CERTIFY_TOL", "Distances", "EngineStats"]

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
    form). ``certified``: settled by the bounds of :func:`bound_edges`. ``full_swap``: solved
    in closed form (every unit swaps). ``solved``: solved by network simplex. ``bounded``: left
    open by the bounds but never needed, since it cannot be its weight's minimum
    (:mod:`curvprune.transport.minimum`). ``shared_problems``: the ``(p, q)`` problems solved for the
    bounds (one per distinct pair of neighbour measures).
    """

    dead: int = 0
    point_mass: int = 0
    certified: int = 0
    full_swap: int = 0
    solved: int = 0
    bounded: int = 0
    shared_problems: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


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


def _chunks(index: torch.Tensor, block: int, width: int) -> tuple[torch.Tensor, ...]:
    """Split ``index`` so that each chunk times ``width`` stays within ``block`` entries."""
    if index.numel() == 0:
        return ()
    return index.split(max(1, block // max(1, width)))


def _weighted_sum(mass: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    return torch.where(mass > 0, mass * cost, torch.zeros((), dtype=cost.dtype,
                                                          device=cost.device)).sum(dim=1)

