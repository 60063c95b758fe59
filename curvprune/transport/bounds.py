r"""Certified bounds on the curvature of many edges at once, without solving any edge's own
transport problem: dead edges, point masses, and the shared problems ``X0 = OT(p, q; C)`` with
their potentials (the certificate of :mod:`curvprune.transport`).

The shared problems are solved once per distinct pair of neighbour measures; each edge's bounds
are then read from sorted per-node-key tables (:func:`_factored_bounds`) in
:math:`O(\log d_k + \log d_m)`, not evaluated over the supports (:math:`O(d_k + d_m)`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import CERTIFY_TOL, Distances, EngineStats, _chunks, _gather_rows, _weighted_sum
from .measures import _Measure
from .solver import _solve_one

__all__ = ["bound_edges"]

def bound_edges(
    src: torch.Tensor,
    dst: torch.Tensor,
    d: torch.Tensor,
    dead: torch.Tensor,
    mu: _Measure | None,
    nu: _Measure | None,
    tables: Distances,
    alpha: float,
    *,
    certify_tol: float = CERTIFY_TOL,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    settle: bool = True,
    error: torch.Tensor | None = None,
    ceiling: torch.Tensor | None = None,
    tighten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Bounds ``lo <= kappa <= hi`` (float64 ``[E]``) on the curvatures of edges ``src -> dst``
    of distance ``d`` on one example; ``lo == hi`` where the value is settled.

    With ``settle=False`` (interval mode, used by :func:`curvprune.neural_curvature`) no edge
    is collapsed onto one of its bounds: ``lo`` and ``hi`` are widened by ``error`` (a bound
    per edge on how far the measures' cut moved kappa, :func:`cut_error`), so that they
    bracket the curvature of the uncut measures, and edges whose widened bounds are at most
    ``certify_tol`` apart are counted as certified.

    ``dead`` edges get 1 and point-mass sides their closed forms (their sums per key, or,
    for a narrow side, gathered for every pair of the layer at once, bit for bit the same);
    ``mu``/``nu`` are the neighbour measures of the sources' and the targets' node sets
    (``None``: every node of that side is a point mass). For the other edges, with
    :math:`X = (W_1 - \alpha d)/(1 - \alpha)` so that :math:`\kappa = 1 - X / d`, the
    shared problem :math:`X_0 = OT(p, q; C)` and its optimal potentials ``(f, g)`` give

    .. math::

        \max_t \sum_k p_k \min(f_k + t, A_k) + \sum_m q_m \min(g_m - t, B_m) - s
        \;\le\; X \;\le\; \min\big(X_0,\ \lambda (p \cdot A + q \cdot B)
        + (1 - \lambda) X_0\big),

    with :math:`A_k = D(k, j)`, :math:`B_m = D(i, m) - d`,
    :math:`\lambda = \min(1, \alpha / (1 - \alpha))` and ``s`` the potentials' own
    feasibility residual. The left side is the value of a dual-feasible point of the edge's
    problem (clipping ``f + t`` and ``g - t`` keeps :math:`f + g \le C` and adds the swap
    constraints; the atoms take :math:`\alpha d`), so it holds for every alpha. The right side
    is the cost of the no-swap plan and of a plan that routes a share :math:`\lambda` of every
    unit through the atoms (``k -> j`` and ``i -> m``; the atoms hold :math:`\alpha`, so the
    share is all of it only for :math:`\alpha \ge 1/2`) and the rest by the shared plan. It is
    maximised over ``t`` at three points: the largest ``t`` that clips no row, the smallest that
    clips no column, and their midpoint; when the first is not below the second, no term is
    clipped and the two sides meet at :math:`X_0` (the certificate of the module docstring).
    Bounds at most ``certify_tol / 2`` apart settle the edge at ``lo``, the cost of a plan.
    The evaluation is factored by row and column keys (:func:`_factored_bounds`). An edge
    still open after that gets both sides tightened, edge by edge: first the right side, with
    the shared problem's optimal plan re-costed under its own costs,
    :math:`\lambda R + (1 - \lambda) X_0` with
    :math:`R = \sum_{km} \pi_{km} \min(C_{km}, A_k + B_m)` (:func:`_recost_plans`); then,
    if still open, the left side maximised over every ``t`` (:func:`_dual_breakpoints`; when
    ``certify_tol`` is at least 1e-9, below which it certifies nothing).

    **Screening** (``ceiling``, a value per edge; interval mode only). When
    :math:`\alpha \ge 1/2` the swap plan alone gives :math:`X \le p \cdot A + q \cdot B`,
    i.e. :math:`\kappa \ge 1 - (p \cdot A + q \cdot B)/d`, in :math:`O(d_k + d_m)` per
    row and column key (or for every pair of the layer at once, where that is cheaper: by
    gathering a narrow side, :func:`_gathered_sums`, or by one matrix product,
    :func:`_product_sums`) and without any shared problem. An edge whose this
    lower bound (less ``error``) is at least its ``ceiling`` gets it as ``lo`` and
    ``hi = +inf`` (unknown), and its shared problem is never built. The minimum search
    passes ``U_w - tolerance`` (the best upper bound of the edge's weight over the earlier
    examples, less the tolerance) as the ceiling: such an edge cannot move its weight's
    interval
    (:mod:`curvprune.transport.minimum`), so it needs no tighter bound. Counted as
    ``screened``. For the same reason an open edge whose shared-problem lower bound (less
    ``error``) reaches its ceiling is not tightened edge by edge (for every alpha).

    ``tighten=False`` skips the edge-by-edge tightening: the scoring loop bounds every
    example that way, and the minimum search tightens only the edges it still holds once
    every example is bounded (:meth:`curvprune.transport.MinimumSearch.resolve`, through
    :meth:`curvprune.graphs.base.SolveSet.bounds`, with the final ceilings).
    """
    stats = stats if stats is not None else EngineStats()
    kappa = torch.ones_like(d)
    stats.dead += int(dead.sum())
    mu_point = ~mu.has[src] if mu is not None else torch.ones_like(dead)
    nu_point = ~nu.has[dst] if nu is not None else torch.ones_like(dead)
    live = ~dead
    both = live & mu_point & nu_point
    kappa[both] = 0.0
    sel = torch.nonzero(live & mu_point & ~nu_point).squeeze(1)
    sel2 = torch.nonzero(live & ~mu_point & nu_point).squeeze(1)
    general = torch.nonzero(live & ~mu_point & ~nu_point).squeeze(1)
    screen = bool(general.numel()) and ceiling is not None and not settle and alpha >= 0.5
    # Both sides' sums for every pair of the layer at once where a side is narrow
    # (_gathered_sums, the keyed sums' values bit for bit), read by the point-mass closed
    # forms and the screen alike; else each is summed per key below.
    row_all = col_all = None
    if (sel2.numel() or screen) and _by_gathering(
            mu, tables.d_kj, sel2.numel() + screen * general.numel(), block, rows_first=True):
        row_all = _gathered_sums(mu, tables.d_kj, block, rows_first=True)
    if (sel.numel() or screen) and _by_gathering(
            nu, tables.d_im, sel.numel() + screen * general.numel(), block, rows_first=False):
        col_all = _gathered_sums(nu, tables.d_im, block, rows_first=False)
    # Per node, a key equal for equal neighbour parts: computed once, for the sides summed
    # per key and for the shared problems.
    p_key = _measure_keys(mu) if (sel2.numel() and row_all is None) or general.numel() \
        else None
    q_key = _measure_keys(nu) if (sel.numel() and col_all is None) or general.numel() \
        else None
    # mu = delta_i: kappa = 1 - sum_m q_m D(i, m) / d; the sum depends on (i, q_j) only.
    if sel.numel():
        i, j = src[sel], dst[sel]
        sums = col_all[j, i] if col_all is not None else \
            _col_sums(tables, i, j, nu, _groups(i, q_key[j]), block)
        kappa[sel] = 1.0 - sums / d[sel]
    # nu = delta_j: kappa = 1 - sum_k p_k D(k, j) / d; the sum depends on (p_i, j) only.
    if sel2.numel():
        i, j = src[sel2], dst[sel2]
        sums = row_all[i, j] if row_all is not None else \
            _row_sums(tables, i, j, mu, _groups(p_key[i], j), block)
        kappa[sel2] = 1.0 - sums / d[sel2]
    stats.point_mass += int(both.sum()) + sel.numel() + sel2.numel()
    upper = kappa.clone()
    keys = None  # the general edges' row and column keys, when the screen has them
    if screen:
        i, j = src[general], dst[general]
        # A side not gathered is summed by one matrix product over the layer when that is
        # cheaper than once per key (then its keys are left for _factored_bounds to find).
        if row_all is None and _by_product(mu, tables.d_kj, i.numel(), block):
            row_all = _product_sums(mu, tables.d_kj, rows_first=True)
        if col_all is None and _by_product(nu, tables.d_im, i.numel(), block):
            col_all = _product_sums(nu, tables.d_im, rows_first=False)
        rows = None if row_all is not None else _groups(p_key[i], j)
        cols = None if col_all is not None else _groups(i, q_key[j])
        low = _swap_lower(tables, i, j, d[general], mu, nu, row_all, col_all, rows, cols,
                          block)
        out = (low - error[general] if error is not None else low) >= ceiling[general]
        screened = general[out]
        kappa[screened], upper[screened] = low[out], math.inf  # widened by error below
        stats.screened += screened.numel()
        general = general[~out]
        if general.numel():
            keys = tuple(None if k is None else _subgroups(k, ~out) for k in (rows, cols))
    if general.numel():
        # Open after the shared bounds: wider than the tolerance once widened by the cut error.
        width = certify_tol - 2 * error[general] if error is not None else certify_tol
        # Not worth tightening: a lower bound (less the cut error) at least the ceiling.
        floor = None
        if ceiling is not None and not settle:
            floor = ceiling[general] + error[general] if error is not None else ceiling[general]
        kappa[general], upper[general] = _shared_bounds(
            tables, src[general], dst[general], d[general], mu, nu, p_key, q_key, alpha,
            certify_tol, block, stats, settle, keys, width, floor, tighten)
    if not settle:
        if error is not None:
            kappa, upper = kappa - error, upper + error
        stats.certified += int((upper[general] - kappa[general] <= certify_tol).sum())
    return kappa, upper


def _swap_lower(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                mu: _Measure, nu: _Measure, row_all: torch.Tensor | None,
                col_all: torch.Tensor | None, rows: _Keys | None, cols: _Keys | None,
                block: int) -> torch.Tensor:
    r""":math:`1 - (p \cdot A + q \cdot B) / d`, the lower bound on kappa of the swap plan
    (every unit of ``p`` to ``j``, ``i`` to every unit of ``q``; a plan when
    :math:`\alpha \ge 1/2`), for edges with two neighbour parts. :math:`p \cdot A` depends
    on the row key ``(p_i, j)`` and :math:`\sum_m q_m D(i, m)` on the column key
    ``(i, q_j)``: each is read from a side's sums over every pair of the layer (``row_all``
    ``[i, j]``, ``col_all`` ``[j, i]``: :func:`_gathered_sums` or :func:`_product_sums`),
    or, for a side without them, summed once per key (``rows`` and ``cols``,
    :func:`_groups`)."""
    p_a = row_all[src, dst] if row_all is not None else \
        _row_sums(tables, src, dst, mu, rows, block)
    q_d = col_all[dst, src] if col_all is not None else \
        _col_sums(tables, src, dst, nu, cols, block)
    q_total = torch.where(nu.mass > 0, nu.mass, 0.0).sum(1)[dst]
    return 1.0 - (p_a + q_d - d * q_total) / d


def _row_sums(tables: Distances, src: torch.Tensor, dst: torch.Tensor, mu: _Measure,
              rows: _Keys, block: int) -> torch.Tensor:
    r""":math:`p \cdot A = \sum_k p_k D(k, j)` per edge ``i -> j`` (``p = p_i``), summed once
    per row key ``(p_i, j)`` (``rows``: :func:`_groups` of those keys)."""
    return _keyed(rows, block, mu.mass.shape[1],
                  lambda e: _weighted_sum(mu.mass[src[e]],
                                          tables.d_kj[mu.table[src[e]].clamp(min=0),
                                                      dst[e][:, None]]))


def _col_sums(tables: Distances, src: torch.Tensor, dst: torch.Tensor, nu: _Measure,
              cols: _Keys, block: int) -> torch.Tensor:
    r""":math:`\sum_m q_m D(i, m)` per edge ``i -> j`` (``q = q_j``), summed once per column
    key ``(i, q_j)`` (``cols``: :func:`_groups` of those keys)."""
    return _keyed(cols, block, nu.mass.shape[1],
                  lambda e: _weighted_sum(nu.mass[dst[e]],
                                          _gather_rows(tables.d_im, src[e], nu.table[dst[e]])))


#: A side of the screen is summed by a matrix product over the whole layer
#: (:func:`_product_sums`) when its multiply-adds are at most this many times the entries the
#: keyed sums would read (one per edge and support slot, an upper bound on theirs). Measured
#: on every layer of vit_small (its second image, one thread): the product was the faster at
#: every ratio up to 1158 (0.030 s against 0.036 s there; 0.008 s against 0.1-0.4 s at ratio
#: about 1, the layers with wide supports), the keyed sums paying for their grouping sort.
_PRODUCT_RATIO = 512


def _by_product(measure: _Measure, table: object, edges: int, block: int) -> bool:
    """Whether :func:`_product_sums` is the cheaper way to sum ``measure`` against ``table``
    for ``edges`` edges: a dense table, fewer multiply-adds than ``_PRODUCT_RATIO`` times the
    keyed reads, and its matrices within ``block`` entries each."""
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        return False
    nodes, width = measure.mass.shape
    return (nodes * max(table.shape) <= block
            and nodes * table.shape[0] * table.shape[1] <= _PRODUCT_RATIO * edges * max(width, 1))


def _product_sums(measure: _Measure, table: torch.Tensor, *, rows_first: bool) -> torch.Tensor:
    r"""A measure's masses summed against a distance table, for every pair of the layer at
    once, as ``[measure's nodes, other nodes]``: with the measure as a dense matrix :math:`P`
    (``[nodes, support set]``), :math:`(P D)[i, j] = \sum_k p_{ik} D(k, j)` (``rows_first``:
    :math:`p \cdot A` of :func:`_row_sums`, read at ``[i, j]``) or
    :math:`(D P^T)^T[j, i] = \sum_m q_{jm} D(i, m)` (:func:`_col_sums`, read at ``[j, i]``).
    The same sums as the keyed ones (another order of the float additions); an infinite
    distance with mass on it gives ``inf``, as there."""
    nodes = measure.mass.shape[0]
    size = table.shape[0] if rows_first else table.shape[1]
    mass = torch.where(measure.mass > 0, measure.mass, 0.0).to(table.dtype)
    dense = torch.zeros((nodes, size), dtype=table.dtype, device=table.device)
    dense.scatter_add_(1, measure.table.clamp(min=0), mass)  # padding adds 0 to slot 0
    finite = torch.isfinite(table)
    whole = bool(finite.all())
    values = table if whole else torch.where(finite, table, 0.0)
    sums = dense @ values if rows_first else values @ dense.T
    if not whole:
        held = (dense > 0).to(table.dtype)
        far = ~finite
        reach = held @ far.to(table.dtype) if rows_first else far.to(table.dtype) @ held.T
        sums = torch.where(reach > 0, math.inf, sums)
    return sums if rows_first else sums.T


#: A side is summed for every pair of the layer by gathering (:func:`_gathered_sums`) when its
#: measure's support slots, times this, are at most the support set the matrix product would
#: sum over (and the pairs at most twice the edges that read them). Measured on vit_small's
#: layers (its eleventh image, one thread, a scratch script): a gathered entry costs about 13 ns,
#: a multiply-add of the product about 0.14 ns (so they break even near 94); with 1 or 2
#: slots against 384-768, 2.8-16 ms gathered against 9-65 ms by product and 23-166 ms by keys.
_GATHER_RATIO = 64


def _by_gathering(measure: _Measure | None, table: object, edges: int, block: int, *,
                  rows_first: bool) -> bool:
    """Whether :func:`_gathered_sums` is the cheaper way to sum ``measure`` against ``table``
    for ``edges`` edges (those that read the sums): a dense table, a measure at most
    ``1 / _GATHER_RATIO`` as wide as the support set the matrix product would sum over, and
    at most twice as many pairs as ``edges`` and ``block`` entries of sums."""
    if measure is None or not isinstance(table, torch.Tensor) or table.dim() != 2:
        return False
    nodes, width = measure.mass.shape
    size, others = (table.shape[0], table.shape[1]) if rows_first else \
        (table.shape[1], table.shape[0])
    return (width * _GATHER_RATIO <= size and nodes * others <= 2 * edges
            and nodes * others <= block)


def _gathered_sums(measure: _Measure, table: torch.Tensor, block: int, *,
                   rows_first: bool) -> torch.Tensor:
    r"""The sums of :func:`_product_sums` (``[measure's nodes, other nodes]``: ``[i, j]``
    :math:`\sum_k p_{ik} D(k, j)` with ``rows_first``, else ``[j, i]``
    :math:`\sum_m q_{jm} D(i, m)`), by gathering each pair's distances to the measure's
    support slots, ``block`` entries at a time.

    Each pair's sum is the keyed sums' (:func:`_row_sums`, :func:`_col_sums`) bit for bit:
    the same products ``mass * D`` of the support slots in slot order, summed over the last,
    contiguous axis (the transposed table is gathered for ``rows_first``); an infinite
    distance with mass on it gives ``inf``, as there."""
    nodes, width = measure.mass.shape
    values = table.T.contiguous() if rows_first else table  # [others, support set]
    slots = measure.table.clamp(min=0)
    out = torch.empty((values.shape[0], nodes), dtype=table.dtype, device=table.device)
    for part in _chunks(torch.arange(values.shape[0], device=table.device), block,
                        nodes * max(1, width)):
        out[part] = _weighted_sum(measure.mass, values[part][:, slots])
    return out.T


def _shared_bounds(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                   mu: _Measure, nu: _Measure, p_key: torch.Tensor, q_key: torch.Tensor,
                   alpha: float, certify_tol: float, block: int, stats: EngineStats,
                   settle: bool = True,
                   keys: tuple[_Keys | None, _Keys | None] | None = None,
                   width: torch.Tensor | float = 0.0, floor: torch.Tensor | None = None,
                   tighten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(lo, hi)`` of :func:`bound_edges` for edges with two neighbour parts.

    Solves ``X0 = OT(p, q; C)`` once per distinct ``(p, q)`` pair (:func:`_shared_problems`),
    then evaluates every edge's bounds by :func:`_factored_bounds`, in
    :math:`O(\log d_k + \log d_m)` per edge (``keys``: the edges' row and column keys, where
    already grouped). The edges still open after that (interval wider than ``width``, or
    than ``certify_tol / 2`` when settling) get both sides tightened edge by edge: first
    the re-costed plan (:func:`_recost_plans`), then, for those still open,
    the dual at every breakpoint (:func:`_dual_breakpoints`); except those whose lower bound
    on kappa is at least their ``floor`` (the minimum search's ceiling plus the cut error:
    such an edge cannot move its weight's interval,
    :meth:`~curvprune.transport.minimum.MinimumSearch.ceiling`), or all of them with
    ``tighten=False``.
    """
    shared = _shared_problems(tables, src, dst, mu, nu, p_key, q_key, block, stats)
    lower, upper = _factored_bounds(tables, src, dst, d, mu, nu, shared, alpha, block, keys)
    # Edges the bounds leave open (and below their floor) get, when the atoms can swap, their
    # shared plan re-costed; those still open after that, their dual at every breakpoint.
    limit = torch.as_tensor(certify_tol / 2 if settle else width, dtype=d.dtype,
                            device=d.device).expand_as(d)

    def still_open(e: torch.Tensor) -> torch.Tensor:
        wide = (lower[e] - upper[e]) / d[e] < -limit[e]
        return e[wide & (1.0 - upper[e] / d[e] < floor[e])] if floor is not None else e[wide]

    edges = still_open(torch.arange(d.numel(), device=d.device)) if tighten else d[:0].long()
    lam = min(1.0, alpha / (1.0 - alpha))
    if edges.numel() and lam > 0:
        recost = _recost_plans(tables, src, dst, d, mu, nu, shared, edges, block)
        upper[edges] = torch.minimum(
            upper[edges], lam * recost + (1.0 - lam) * shared.x0[shared.pair[edges]])
        edges = still_open(edges)
    if edges.numel() and certify_tol >= _BREAKPOINTS_FROM:
        lower[edges] = torch.maximum(lower[edges], _dual_breakpoints(
            tables, src, dst, d, mu, nu, shared, edges, block))
    lo, hi = 1.0 - upper / d, 1.0 - lower / d
    if settle:
        settled = hi - lo <= certify_tol / 2
        hi[settled] = lo[settled]
        stats.certified += int(settled.sum())
    return lo, hi


#: The dual bound at every breakpoint (:func:`_dual_breakpoints`) is used from this tolerance
#: on. Below it no edge can be certified by it and it lowers few minima: on the trained
#: LeNet-5 (10 images, tolerance 1e-14) it saved 2 of 20,864 exact solves for 0.9 s of its
#: own (in its first version), while at 0.01 it saved 2,009 of 15,581 in about the same time.
_BREAKPOINTS_FROM = 1e-9


@dataclass
class _Shared:
    """The shared problems of an edge set: per edge its pair (``pair``, into the other fields),
    ``p_key`` / ``q_key`` per node (equal keys: equal neighbour parts, table and masses), and
    per pair ``X0``, the optimal potentials ``f`` / ``g`` (0 past the supports) and their
    feasibility residual ``slack``; how it was solved (``kind``: ``SINGLE``, ``TWO`` atoms, or
    by the ``SIMPLEX``), and the simplex's optimal plans, entry by entry (``plan``: per pair
    the range ``start[s]:start[s + 1]`` of the node ids ``k`` / ``m`` and masses; the closed
    forms' plans are recomputed where needed, :func:`_edge_plans`)."""

    pair: torch.Tensor
    p_key: torch.Tensor
    q_key: torch.Tensor
    x0: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    slack: torch.Tensor
    kind: torch.Tensor
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


#: :attr:`_Shared.kind` of a pair: a single-atom side, a two-atom side, the network simplex.
SINGLE, TWO, SIMPLEX = 0, 1, 2


def _shared_problems(tables: Distances, src: torch.Tensor, dst: torch.Tensor, mu: _Measure,
                     nu: _Measure, p_key: torch.Tensor, q_key: torch.Tensor, block: int,
                     stats: EngineStats) -> _Shared:
    r"""Solves ``X0 = OT(p, q; C)`` once per distinct ``(p, q)`` pair (``p_key`` / ``q_key``:
    :func:`_measure_keys`; bounded memory: the shared problems' cost blocks are built a chunk
    at a time).

    A pair one of whose sides is a single atom is solved in closed form, all such pairs at
    once (:func:`_single_atom_problems`), and so is a pair with a side of two atoms
    (:func:`_two_atom_problems`, a sort); the others by POT's network simplex, one by one
    (:func:`~curvprune.transport.solver._solve_one`)."""
    device = src.device
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    pair_of_edge, pairs, first = _groups(p_key[src], q_key[dst])
    rep_i, rep_j = src[first], dst[first]
    stats.shared_problems += pairs
    x0 = torch.empty(pairs, dtype=torch.float64, device=device)
    f_pad = torch.zeros((pairs, dk), dtype=torch.float64, device=device)
    g_pad = torch.zeros((pairs, dm), dtype=torch.float64, device=device)
    slack = torch.zeros(pairs, dtype=torch.float64, device=device)
    p_atoms, q_atoms = (p_mass[rep_i] > 0).sum(1), (q_mass[rep_j] > 0).sum(1)
    single = (p_atoms == 1) | (q_atoms == 1)
    for part in _chunks(torch.nonzero(single).squeeze(1), block, dk + dm):
        x0[part], f_pad[part], g_pad[part] = _single_atom_problems(
            tables, k_tab[rep_i[part]], p_mass[rep_i[part]], m_tab[rep_j[part]],
            q_mass[rep_j[part]])
    two = ~single & ((p_atoms == 2) | (q_atoms == 2))
    for part in _chunks(torch.nonzero(two).squeeze(1), block, 8 * (dk + dm)):
        x0[part], f_pad[part], g_pad[part], slack[part] = _two_atom_problems(
            tables, k_tab[rep_i[part]], p_mass[rep_i[part]], m_tab[rep_j[part]],
            q_mass[rep_j[part]])
    rest = torch.nonzero(~single & ~two).squeeze(1)
    kind = torch.full((pairs,), SIMPLEX, dtype=torch.int8, device=device)
    kind[single], kind[two] = SINGLE, TWO
    x0_np, f_np, g_np, slack_np = (t.cpu().numpy() for t in (x0, f_pad, g_pad, slack))
    plan_parts: list[tuple[np.ndarray, ...]] = []
    # A chunk holds about eight arrays of its cost block's size at once (the costs and their
    # support, the plans and their stack, the residuals' terms): an eighth of ``block`` each
    # keeps the chunk within ``block`` entries (VGG-9's third conv: 0.3 GiB less at its peak).
    for part in _chunks(rest, max(1, block // 8), dk * dm):
        ri, rj = rep_i[part], rep_j[part]
        pm, qm = p_mass[ri], q_mass[rj]
        support = (pm > 0)[:, :, None] & (qm > 0)[:, None, :]
        cost = torch.where(support, tables.d_km[k_tab[ri].clamp(min=0)[:, :, None],
                                                m_tab[rj].clamp(min=0)[:, None, :]], 0.0)
        pm_np, qm_np, cost_np = pm.cpu().numpy(), qm.cpu().numpy(), cost.cpu().numpy()
        solved = [_solve_one(pm_np[s], qm_np[s], cost_np[s], plan=True)
                  for s in range(len(part))]
        at = part.cpu().numpy()
        rows, cols = pm_np > 0, qm_np > 0
        f = np.where(rows, np.stack([f for _, f, _, _ in solved]), 0.0)
        g = np.where(cols, np.stack([g for _, _, g, _ in solved]), 0.0)
        x0_np[at] = [value for value, _, _, _ in solved]
        f_np[at], g_np[at] = f, g
        # The plans' nonzero entries, as node ids (at most dk + dm - 1 per pair).
        moved = np.stack([plan for _, _, _, plan in solved])
        s_, k_, m_ = np.nonzero(moved > 0)
        plan_parts.append((at[s_], k_tab[ri].cpu().numpy()[s_, k_].astype(np.int32),
                           m_tab[rj].cpu().numpy()[s_, m_].astype(np.int32),
                           moved[s_, k_, m_]))
        # (f, g) may miss feasibility by rounding; the lower bound pays for that residual.
        excess = np.where(rows[:, :, None] & cols[:, None, :],
                          f[:, :, None] + g[:, None, :] - cost_np, -np.inf)
        slack_np[at] = np.maximum(excess.max(axis=(1, 2)), 0.0)
    if device.type != "cpu":
        x0, f_pad, g_pad, slack = (torch.from_numpy(t).to(device)
                                   for t in (x0_np, f_np, g_np, slack_np))
    # 16 bytes an entry (int32 node ids): at most twice the potentials' own memory.
    owner, k_node, m_node, mass = (
        torch.from_numpy(np.concatenate(column)).to(device) for column in zip(*plan_parts)
    ) if plan_parts else (torch.zeros(0, dtype=torch.long, device=device),) + (
        torch.zeros(0, dtype=torch.int32, device=device),) * 2 + (
        torch.zeros(0, dtype=torch.float64, device=device),)
    # Entries come pair by pair in increasing pair order (the chunks of ``rest``).
    start = torch.searchsorted(owner, torch.arange(pairs + 1, device=device))
    return _Shared(pair_of_edge, p_key, q_key, x0, f_pad, g_pad, slack, kind,
                   (start, k_node, m_node, mass))


def _single_atom_problems(tables: Distances, k_tab: torch.Tensor, p: torch.Tensor,
                          m_tab: torch.Tensor, q: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(X0, f, g)`` of shared problems ``OT(p, q; C)`` one of whose sides is a single atom
    (measures support first: the atom is slot 0), in closed form.

    With ``p`` the atom ``k`` (mass :math:`a`), the only plan sends every target's mass from
    ``k``: :math:`X_0 = \sum_m q'_m C(k, m)` with :math:`q' = q\, a / \sum q` (the solver's
    normalisation of the target masses), and :math:`f_k = 0`, :math:`g_m = C(k, m)` are optimal
    potentials (feasible with equality on every arc, and of value :math:`X_0`; every optimal
    pair is this one shifted by a constant, which the bounds' maximisation over ``t`` absorbs).
    With ``q`` the atom ``m``: :math:`X_0 = \sum_k p_k C(k, m)`, :math:`f_k = C(k, m)`,
    :math:`g_m = 0`. Their feasibility residual is exactly 0 (``f + g`` is ``C`` itself)."""
    p_on, q_on = p > 0, q > 0
    p_atom = p_on.sum(1) == 1
    # Row k = slot 0 of p against every m, or every k against slot 0 of q.
    to_m = tables.d_km[k_tab[:, :1].clamp(min=0), m_tab.clamp(min=0)]  # [B, dm]: C(k0, m)
    from_k = tables.d_km[k_tab.clamp(min=0), m_tab[:, :1].clamp(min=0)]  # [B, dk]: C(k, m0)
    q_scaled = q * (p.sum(1, keepdim=True) / q.sum(1, keepdim=True))
    x0 = torch.where(p_atom, _weighted_sum(q_scaled, to_m), _weighted_sum(p, from_k))
    zero = torch.zeros((), dtype=torch.float64, device=p.device)
    f = torch.where(p_atom[:, None] | ~p_on, zero, from_k)
    g = torch.where(p_atom[:, None] & q_on, to_m, zero)
    return x0, f, g


def _two_atom_problems(tables: Distances, k_tab: torch.Tensor, p: torch.Tensor,
                       m_tab: torch.Tensor, q: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(X0, f, g, slack)`` of shared problems ``OT(p, q; C)`` with no single-atom side and
    a side of exactly two atoms (measures support first: the atoms are slots 0 and 1), by a
    sort instead of the simplex.

    With ``p`` the two atoms :math:`k_1, k_2` (masses :math:`a_1, a_2`) and
    :math:`q' = q\, \sum p / \sum q` (the solver's normalisation of the target masses), every
    plan sends :math:`x_m \in [0, q'_m]` from :math:`k_1` and the rest from :math:`k_2`, with
    :math:`\sum_m x_m = a_1`: its cost is :math:`\sum_m q'_m C(k_2, m) + \sum_m x_m \delta_m`,
    :math:`\delta_m = C(k_1, m) - C(k_2, m)`, a fractional knapsack, minimised by filling
    :math:`x` in increasing :math:`\delta` until :math:`a_1` is reached at some
    :math:`m_s`. The potentials :math:`f_{k_1} = \delta_{m_s}`, :math:`f_{k_2} = 0`,
    :math:`g_m = \min(C(k_1, m) - \delta_{m_s}, C(k_2, m))` are feasible, tight on every arc
    the plan uses (:math:`\delta_m \le \delta_{m_s}` for the arcs from :math:`k_1`, :math:`\ge`
    for those from :math:`k_2`), so optimal, of value :math:`X_0`. With ``q`` the two atoms the
    roles swap (``g`` on the atoms, the sources filled in increasing
    :math:`C(k, m_1) - C(k, m_2)`). ``X0`` is the plan's cost, summed arc by arc (no
    cancellation); ``slack`` is the potentials' measured feasibility residual (rounding only),
    which the lower bound pays as it does for the simplex's potentials."""
    p_on, q_on = p > 0, q > 0
    q = q * (p.sum(1, keepdim=True) / q.sum(1, keepdim=True))  # the solver's normalisation
    k_tab, m_tab = k_tab.clamp(min=0), m_tab.clamp(min=0)
    x0, slack = torch.empty_like(p[:, 0]), torch.empty_like(p[:, 0])
    f, g = torch.zeros_like(p), torch.zeros_like(q)
    on_p = torch.nonzero(p_on.sum(1) == 2).squeeze(1)  # p is the two atoms
    if on_p.numel():
        cost = tables.d_km[k_tab[on_p, :2, None], m_tab[on_p, None, :]]  # [B, 2, dm]
        x0[on_p], f[on_p, :2], g[on_p], slack[on_p] = _knapsack(p[on_p, :2], q[on_p], cost)
    on_q = torch.nonzero(p_on.sum(1) != 2).squeeze(1)  # q is
    if on_q.numel():
        cost = tables.d_km[k_tab[on_q, None, :], m_tab[on_q, :2, None]]  # [B, 2, dk]
        x0[on_q], g[on_q, :2], f[on_q], slack[on_q] = _knapsack(q[on_q, :2], p[on_q], cost)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return x0, torch.where(p_on, f, zero), torch.where(q_on, g, zero), slack


def _knapsack(w: torch.Tensor, r: torch.Tensor, cost: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X0, u, v, slack)`` of transport problems from two atoms (masses ``w`` ``[B, 2]``) to
    the masses ``r`` ``[B, n]`` (0: padding) at costs ``cost`` ``[B, 2, n]``: the fractional
    knapsack of :func:`_two_atom_problems`, with the atoms' potentials ``u`` and the other
    side's ``v``."""
    on = r > 0
    # Padding slots read node 0, whose distance may be +inf: zeroed (inf * 0 would be NaN).
    c1, c2 = torch.where(on, cost[:, 0], 0.0), torch.where(on, cost[:, 1], 0.0)
    delta = c1 - c2
    order, from_1, split = _knapsack_fill(w, r, delta)
    r_s, c1_s, c2_s, d_s = (t.gather(1, order) for t in (r, c1, c2, delta))
    x0 = (from_1 * c1_s).sum(1) + ((r_s - from_1) * c2_s).sum(1)
    level = d_s.gather(1, split).squeeze(1)
    u = torch.stack([level, torch.zeros_like(level)], 1)
    v = torch.where(on, torch.minimum(c1 - level[:, None], c2), 0.0)
    excess = torch.where(on, torch.maximum(level[:, None] + v - c1, v - c2), -math.inf)
    return x0, u, v, excess.amax(1).clamp(min=0.0)


def _knapsack_fill(w: torch.Tensor, r: torch.Tensor, delta: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimal plan of :func:`_knapsack`: the slots in increasing ``delta`` (``order``,
    padding last), the mass each sorted slot takes from the first atom (``from_1``; the rest
    of ``r`` comes from the second) and the sorted slot where the first atom runs out
    (``split``, ``[B, 1]``)."""
    on = r > 0
    order = torch.argsort(torch.where(on, delta, math.inf), dim=1, stable=True)
    r_s = r.gather(1, order)
    cumulative = _prefix(r_s)  # [B, n + 1]: mass of the slots before each
    last = on.sum(1, keepdim=True) - 1
    split = torch.minimum((cumulative[:, 1:] < w[:, :1]).sum(1, keepdim=True), last)
    slot = torch.arange(r.shape[1], device=r.device)[None, :]
    from_1 = torch.where(slot < split, r_s,
                         torch.where(slot == split,
                                     (w[:, :1] - cumulative[:, :-1]).clamp(min=0.0), 0.0))
    return order, torch.minimum(from_1, r_s), split


def _factored_bounds(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                     mu: _Measure, nu: _Measure, shared: _Shared, alpha: float, block: int,
                     keys: tuple[_Keys | None, _Keys | None] | None = None,
                     direct: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Bounds ``lower <= X <= upper`` of :func:`bound_edges` (before ``1 - X / d``), factored by
    row and column keys.

    Edge ``i -> j`` reads ``p = p_i`` and ``q = q_j``. Its row terms depend only on the **row
    key** ``(p_i, j)``: :math:`A_k = D(k, j)`, the potentials ``f`` (the pair ``(p_i, q_j)`` is
    fixed by it), :math:`t_{row} = \min_k (A_k - f_k)`, :math:`p \cdot A` and

    .. math::

        F(t) = \sum_k p_k \min(f_k + t, A_k)
             = \sum_{c_k < t} p_k A_k + \sum_{c_k \ge t} p_k f_k + t \sum_{c_k \ge t} p_k,
        \qquad c_k = A_k - f_k,

    a concave piecewise linear function with breakpoints :math:`c_k`: with the :math:`c_k`
    sorted once per key, and prefix sums of :math:`p_k A_k` and suffix sums of :math:`p_k f_k`
    and :math:`p_k` (accumulated separately, so nothing is recovered by subtracting sums), it is
    a binary search and three reads. Its column terms depend only on the **column key**
    ``(i, q_j)`` and on ``d``: with :math:`D_m = D(i, m)` and :math:`e_m = g_m - D_m`,
    :math:`t_{col} = \max_m e_m + d` and, since
    :math:`g_m - t \le D_m - d \iff e_m \le t - d`,

    .. math::

        G(t) = \sum_m q_m \min(g_m - t, D_m - d)
             = \sum_{e_m \le t - d} q_m g_m - t \sum_{e_m \le t - d} q_m
             + \sum_{e_m > t - d} q_m D_m - d \sum_{e_m > t - d} q_m,

    again one binary search in the key's sorted :math:`e_m` and four reads, and
    :math:`q \cdot B = \sum_m q_m D_m - d \sum_m q_m`. So each edge costs
    :math:`O(\log d_k + \log d_m)` after :math:`O(d_k \log d_k)` per row key and
    :math:`O(d_m \log d_m)` per column key, and far fewer keys than edges exist (a dense layer
    shares ``p`` over the layer, a conv position's channels share theirs). The bounds are those
    of :func:`bound_edges`, term for term: the same three ``t``, the same plans, the same
    certificate; only the order of the float summation changes (each term and sum is rounded
    as in the per-edge sum, within a few ulps of the same magnitudes; tested against the
    per-edge evaluation to 1e-12 relative, and against ``ot.emd2``).

    A side at most ``direct`` support slots wide (default :data:`_DIRECT_WIDTH`) is instead
    evaluated edge by edge, as defined: :math:`F(t) = \sum_k p_k \min(f_k + t, A_k)` (or
    :math:`G(t)`) at the three ``t``, in :math:`O(d_k)` per edge, with no keys and no sort.
    Where a side is that narrow its keys are nearly one per edge (a dense layer's
    single-neighbour side: ``(p_i, j)`` is new for every edge), so the keyed tables would cost
    a sort of all the edges to save nothing.
    """
    device, dtype = d.device, d.dtype
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    d_kj, d_im = tables.d_kj, tables.d_im
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    inf = torch.tensor(math.inf, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    every = torch.arange(src.numel(), device=device)
    rows, cols = keys if keys is not None else (None, None)
    # A side at most `direct` wide is evaluated edge by edge (no keys, no sort).
    direct = _DIRECT_WIDTH if direct is None else direct
    row_direct, col_direct = dk <= direct, dm <= direct
    if not row_direct:
        (row_of_edge, n_rows, row_rep) = rows if rows is not None else \
            _groups(shared.p_key[src], dst)
    if not col_direct:
        (col_of_edge, n_cols, col_rep) = cols if cols is not None else \
            _groups(src, shared.q_key[dst])

    def row_terms(e: torch.Tensor):
        i, j = src[e], dst[e]
        pm = p_mass[i]
        valid = pm > 0
        a = torch.where(valid, d_kj[k_tab[i].clamp(min=0), j[:, None]], zero)
        f = shared.f[shared.pair[e]]
        return valid, pm, a, f, torch.where(valid, a - f, inf)

    def col_terms(e: torch.Tensor):
        i, j = src[e], dst[e]
        qm = q_mass[j]
        valid = qm > 0
        dist = torch.where(valid, _gather_rows(d_im, i, m_tab[j]), zero)
        g = shared.g[shared.pair[e]]
        return valid, qm, dist, g, torch.where(valid, g - dist, -inf)

    t = torch.empty((3, src.numel()), dtype=dtype, device=device)
    value = torch.empty((3, src.numel()), dtype=dtype, device=device)
    swap = torch.empty(src.numel(), dtype=dtype, device=device)
    # t_row: the largest t that clips no row, per row key (or per edge).
    if row_direct:
        for part in _chunks(every, block, 4 * dk):
            t[0, part] = row_terms(part)[4].amin(1)
    else:
        t_row = torch.empty(n_rows, dtype=dtype, device=device)
        for keys in _chunks(torch.arange(n_rows, device=device), block, 4 * dk):
            t_row[keys] = row_terms(row_rep[keys])[4].amin(1)
        t[0] = t_row[row_of_edge]
    # Columns: per edge the other two t and the column part of each value, and q.B.
    if col_direct:
        for part in _chunks(every, block, 8 * (dm + 1)):
            valid, qm, dist, g, brk = col_terms(part)
            de = d[part]
            t[1, part] = brk.amax(1) + de  # the smallest t that clips no column
            t[2, part] = 0.5 * (t[0, part] + t[1, part])
            b = dist - de[:, None]
            for s in range(3):
                value[s, part] = torch.where(
                    valid, qm * torch.minimum(g - t[s, part, None], b), zero).sum(1)
            swap[part] = _weighted_sum(qm, dist) - de * torch.where(valid, qm, zero).sum(1)
    else:
        for keys, edges in _key_chunks(col_of_edge, n_cols, block, 8 * (dm + 1)):
            valid, qm, dist, g, brk = col_terms(col_rep[keys])
            brk, order = brk.sort(1)
            qm = torch.where(valid, qm, zero).gather(1, order)
            prefix_g, prefix_q = _prefix(qm * g.gather(1, order)), _prefix(qm)
            suffix_d, suffix_q = _suffix(qm * dist.gather(1, order)), _suffix(qm)
            for part in _chunks(edges, block, 16):
                key, de = col_of_edge[part] - keys[0], d[part]
                t[1, part] = brk[key, -1] + de  # the smallest t that clips no column
                t[2, part] = 0.5 * (t[0, part] + t[1, part])
                for s in range(3):
                    ts = t[s, part]
                    # At t_col every column is clipped: no search.
                    at = _count_sorted(brk, key, ts - de, inclusive=True) if s != 1 else \
                        torch.full_like(key, brk.shape[1])
                    value[s, part] = (prefix_g[key, at] - ts * prefix_q[key, at]
                                      + (suffix_d[key, at] - de * suffix_q[key, at]))
                swap[part] = suffix_d[key, 0] - de * suffix_q[key, 0]
    # Rows: the row part of each value, and p.A.
    if row_direct:
        for part in _chunks(every, block, 8 * (dk + 1)):
            valid, pm, a, f, _ = row_terms(part)
            for s in range(3):
                value[s, part] += torch.where(
                    valid, pm * torch.minimum(f + t[s, part, None], a), zero).sum(1)
            swap[part] += _weighted_sum(pm, a)
    else:
        for keys, edges in _key_chunks(row_of_edge, n_rows, block, 8 * (dk + 1)):
            valid, pm, a, f, brk = row_terms(row_rep[keys])
            brk, order = brk.sort(1)
            pm = torch.where(valid, pm, zero).gather(1, order)
            prefix_a = _prefix(pm * a.gather(1, order))
            suffix_f, suffix_p = _suffix(pm * f.gather(1, order)), _suffix(pm)
            for part in _chunks(edges, block, 16):
                key = row_of_edge[part] - keys[0]
                for s in range(3):
                    ts = t[s, part]
                    # At t_row (the key's smallest breakpoint) no row is clipped: no search.
                    at = _count_sorted(brk, key, ts, inclusive=False) if s != 0 else \
                        torch.zeros_like(key)
                    value[s, part] += prefix_a[key, at] + (suffix_f[key, at]
                                                            + ts * suffix_p[key, at])
                swap[part] += prefix_a[key, -1]
    lower = value.amax(0) - shared.slack[shared.pair]
    # Plans: no swap (X0), and a share lam of every unit swapped (all of it for alpha >= 1/2).
    upper = shared.x0[shared.pair]
    lam = min(1.0, alpha / (1.0 - alpha))
    if lam > 0:
        upper = torch.minimum(upper, lam * swap + (1.0 - lam) * upper)
    return lower, upper


#: A side of :func:`_factored_bounds` at most this wide (support slots) is evaluated edge by
#: edge, as the per-edge definition reads, instead of by sorted per-key tables: grouping its
#: keys (a sort of all the edges) costs more than the few terms of each edge. Measured per
#: call, one thread, every width on the same problems (scratch script): vit_small's second
#: and third images, whose every layer has a side 1 or 2 wide with one key per edge, 47.3 s
#: keyed against 41.3 s (40.9-42.8 s at widths 8-128; 206 s all edge by edge);
#: efficientnet_b0's first two images 87.5 s against 84.9 s (its 2-wide sides 4.4 s against
#: 2.1 s; wider thresholds 81-87 s, within the run's noise).
_DIRECT_WIDTH = 2


def _dual_breakpoints(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                      mu: _Measure, nu: _Measure, shared: _Shared, edges: torch.Tensor,
                      block: int) -> torch.Tensor:
    r"""Per edge of ``edges``, the left side of :func:`bound_edges` maximised over every
    ``t``: :math:`\max_t F(t) + G(t) - s` (:func:`_factored_bounds`' ``F`` and ``G``).

    ``F + G`` is concave and piecewise linear with breakpoints :math:`c_k = A_k - f_k` and
    :math:`e_m + d = g_m - D(i, m) + d`. Its slope is :math:`\sum_k p_k` below every
    breakpoint and drops by :math:`p_k` at :math:`c_k` and by :math:`q_m` at
    :math:`e_m + d`, so with the breakpoints sorted and these drops summed in order, the
    first breakpoint at which the sum reaches :math:`\sum_k p_k` is a maximiser (the slope
    is positive before it and not after): a weighted median, one sort of
    :math:`d_k + d_m` values per edge. ``F + G`` is evaluated term by term at it and at its
    two neighbours in that order (so that a slope rounded to the wrong sign near 0 still
    finds the largest value). Every ``t`` gives a dual-feasible point, so this is a valid
    lower bound on ``X``, and at least the value at the three ``t`` of
    :func:`_factored_bounds`."""
    out = torch.empty(edges.numel(), dtype=torch.float64, device=d.device)
    dk, dm = mu.table.shape[1], nu.table.shape[1]
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    # About 16 float64 values per support entry alive at once (the three t's terms included).
    for chunk in _chunks(torch.arange(edges.numel(), device=d.device), block,
                         16 * (dk + dm + 1)):
        e = edges[chunk]
        i, j, de = src[e], dst[e], d[e][:, None]
        rows, cols = mu.mass[i] > 0, nu.mass[j] > 0
        pm = torch.where(rows, mu.mass[i], zero)
        qm = torch.where(cols, nu.mass[j], zero)
        a = torch.where(rows, tables.d_kj[mu.table[i].clamp(min=0), j[:, None]], zero)
        b = torch.where(cols, _gather_rows(tables.d_im, i, nu.table[j]), zero) - de
        f, g = shared.f[shared.pair[e]], shared.g[shared.pair[e]]
        c = torch.where(rows, a - f, math.inf)
        # Padding (no mass, no slope change) sits at a real breakpoint: every edge has a row.
        first = c.amin(1, keepdim=True)
        t = torch.cat([torch.where(rows, c, first), torch.where(cols, g - b, first)], 1)
        t, order = t.sort(1)
        drop = torch.cat([pm, qm], 1).gather(1, order).cumsum(1)
        best = (drop < pm.sum(1, keepdim=True)).sum(1, keepdim=True)
        near = (best + torch.arange(-1, 2, device=d.device)).clamp(0, t.shape[1] - 1)
        ts = t.gather(1, near)[:, :, None]  # [edges, 3, 1]
        value = ((pm[:, None] * torch.minimum(f[:, None] + ts, a[:, None])).sum(2)
                 + (qm[:, None] * torch.minimum(g[:, None] - ts, b[:, None])).sum(2))
        out[chunk] = value.amax(1)
    return out - shared.slack[shared.pair[edges]]


def _recost_plans(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                  mu: _Measure, nu: _Measure, shared: _Shared, edges: torch.Tensor,
                  block: int) -> torch.Tensor:
    r"""Per edge of ``edges``, :math:`R = \sum_{k,m} \pi_{km} \min(C_{km}, A_k + B_m)`:
    the optimal plan :math:`\pi` of the edge's shared problem, each unit sent directly or
    through the swap (``k -> j`` and ``i -> m``), whichever is cheaper for the edge.

    :math:`\pi` has the marginals ``p`` and ``q`` of the edge (``q`` normalised to
    :math:`\sum p`, as for ``X0``), so for :math:`\alpha \ge 1/2` it is a plan of the edge's
    problem :math:`X = OT(p, q; \min(C, A + B))` and :math:`X \le R`; for smaller alpha the
    atoms take a share :math:`\lambda` of every unit, and :math:`X \le \lambda R +
    (1 - \lambda) X_0` (method.md, "Curvature intervals"). :math:`R \le X_0` and
    :math:`R \le p \cdot A + q \cdot B` term by term, so this never loosens the
    bound of :func:`_factored_bounds`. The plans of the closed forms are recomputed here, the
    simplex's read from :attr:`_Shared.plan`; each edge costs :math:`O(d_k + d_m)`."""
    out = torch.empty(edges.numel(), dtype=torch.float64, device=d.device)
    kind = shared.kind[shared.pair[edges]]
    width = 2 * (mu.table.shape[1] + nu.table.shape[1])  # of any kind's padded plans
    for which in (SINGLE, TWO, SIMPLEX):
        part = torch.nonzero(kind == which).squeeze(1)
        for chunk in _chunks(part, block, 4 * width):
            e = edges[chunk]
            k, m, mass = _edge_plans(tables, src[e], dst[e], mu, nu, shared, e, which)
            i, j, de = src[e][:, None], dst[e][:, None], d[e][:, None]
            used = mass > 0
            k, m = torch.where(used, k, 0), torch.where(used, m, 0)
            cost = torch.minimum(tables.d_km[k, m], tables.d_kj[k, j] + tables.d_im[i, m] - de)
            out[chunk] = torch.where(used, mass * cost, 0.0).sum(1)
    return out


def _edge_plans(tables: Distances, i: torch.Tensor, j: torch.Tensor, mu: _Measure,
                nu: _Measure, shared: _Shared, edges: torch.Tensor, which: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimal plans of the shared problems of edges ``i -> j`` (``edges``: their
    indices, all of one :attr:`_Shared.kind`), padded per edge: node ids ``k`` and ``m`` and
    the mass moved (0: padding)."""
    k_tab, m_tab, p, q = mu.table[i], nu.table[j], mu.mass[i], nu.mass[j]
    q = q * (p.sum(1, keepdim=True) / q.sum(1, keepdim=True))  # the solver's normalisation
    p_on = p > 0
    if which == SIMPLEX:
        start, k_node, m_node, mass = shared.plan
        pair = shared.pair[edges]
        first, count = start[pair], start[pair + 1] - start[pair]
        slot = torch.arange(int(count.max()), device=i.device)[None, :]
        used = slot < count[:, None]
        at = torch.where(used, first[:, None] + slot, 0)
        return k_node[at].long(), m_node[at].long(), torch.where(used, mass[at], 0.0)
    if which == SINGLE:  # the atom's row (or column) carries everything
        p_atom = (p_on.sum(1) == 1)[:, None]
        width = max(p.shape[1], q.shape[1])
        k = torch.where(p_atom, _pad(k_tab[:, :1].expand_as(m_tab), width), _pad(k_tab, width))
        m = torch.where(p_atom, _pad(m_tab, width), _pad(m_tab[:, :1].expand_as(k_tab), width))
        mass = torch.where(p_atom, _pad(q, width), _pad(p, width))
        return k, m, mass
    # Two atoms: the fractional knapsack's fill (_knapsack_fill), on whichever side has them.
    on_p = (p_on.sum(1) == 2)[:, None]
    width = 2 * max(p.shape[1], q.shape[1])
    k = torch.zeros((i.numel(), width), dtype=torch.long, device=i.device)
    m = torch.zeros_like(k)
    mass = torch.zeros((i.numel(), width), dtype=torch.float64, device=i.device)
    for atoms_p in (True, False):
        rows = torch.nonzero(on_p.squeeze(1) == atoms_p).squeeze(1)
        if not rows.numel():
            continue
        if atoms_p:  # from p's atoms k1, k2 to every m
            atoms, other, w, r = k_tab[rows, :2], m_tab[rows], p[rows, :2], q[rows]
            cost = tables.d_km[atoms.clamp(min=0)[:, :, None], other.clamp(min=0)[:, None, :]]
        else:  # from every k to q's atoms m1, m2
            atoms, other, w, r = m_tab[rows, :2], k_tab[rows], q[rows, :2], p[rows]
            cost = tables.d_km[other.clamp(min=0)[:, None, :], atoms.clamp(min=0)[:, :, None]]
        on = r > 0
        c1, c2 = torch.where(on, cost[:, 0], 0.0), torch.where(on, cost[:, 1], 0.0)
        order, from_1, _ = _knapsack_fill(w, r, c1 - c2)
        r_s, other_s = r.gather(1, order), other.gather(1, order)
        n = r.shape[1]
        a_side = torch.cat([atoms[:, :1].expand(-1, n), atoms[:, 1:2].expand(-1, n)], 1)
        o_side = torch.cat([other_s, other_s], 1)
        moved = torch.cat([from_1, r_s - from_1], 1)
        k_rows, m_rows = (a_side, o_side) if atoms_p else (o_side, a_side)
        k[rows, :2 * n], m[rows, :2 * n], mass[rows, :2 * n] = k_rows, m_rows, moved
    return k, m, mass


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` padded with zeros to ``width`` columns."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _measure_keys(measure: _Measure) -> torch.Tensor:
    """Per node, a key equal for nodes with the same neighbour part (table and masses)."""
    return torch.unique(torch.cat([measure.table.to(torch.float64), measure.mass], 1), dim=0,
                        return_inverse=True)[1]


def _keyed(groups: _Keys, block: int, width: int, compute) -> torch.Tensor:
    """``compute(edges)`` (a value per edge, ``width`` entries of work each) evaluated once per
    group of ``groups`` (:func:`_groups`), on each group's first edge, and read back for every
    edge."""
    inverse, count, first = groups
    out = torch.empty(count, dtype=torch.float64, device=inverse.device)
    for chunk in _chunks(torch.arange(count, device=inverse.device), block, width):
        out[chunk] = compute(first[chunk])
    return out[inverse]


#: Edges grouped by a key (:func:`_groups`): per edge its group, the number of groups, and each
#: group's first edge.
_Keys = tuple[torch.Tensor, int, torch.Tensor]


def _groups(a: torch.Tensor, b: torch.Tensor) -> _Keys:
    """The edges grouped by the key ``(a[e], b[e])`` (non-negative integers, at least one
    edge): per edge its group (groups in the key's lexicographic order), the number of groups,
    and each group's first edge."""
    groups, of_edge = torch.unique(a * (int(b.max()) + 1) + b, return_inverse=True)
    count = groups.numel()
    first = torch.full((count,), of_edge.numel(), dtype=torch.long, device=of_edge.device)
    first.scatter_reduce_(0, of_edge, torch.arange(of_edge.numel(), device=of_edge.device),
                          reduce="amin")
    return of_edge, count, first


def _subgroups(groups: _Keys, keep: torch.Tensor) -> _Keys:
    """``groups`` (:func:`_groups` of keys ``(a, b)``) restricted to the edges ``keep`` (a mask,
    at least one edge): equal to ``_groups(a[keep], b[keep])``, without sorting again (the
    groups left keep their order)."""
    of_edge, count, _ = groups
    kept = of_edge[keep]
    used = torch.zeros(count, dtype=torch.bool, device=kept.device)
    used[kept] = True
    new_id = torch.cumsum(used, 0) - 1
    of_kept = new_id[kept]
    n = int(used.sum())
    first = torch.full((n,), kept.numel(), dtype=torch.long, device=kept.device)
    first.scatter_reduce_(0, of_kept, torch.arange(kept.numel(), device=kept.device),
                          reduce="amin")
    return of_kept, n, first


def _key_chunks(key_of_edge: torch.Tensor, count: int, block: int, width: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ranges of the ``count`` keys (``width`` entries each, ``block`` in all per
    range) with the edges of each range."""
    order = torch.argsort(key_of_edge, stable=True)
    ends = torch.cumsum(torch.bincount(key_of_edge, minlength=count), 0).tolist()
    out = []
    for keys in _chunks(torch.arange(count, device=key_of_edge.device), block, width):
        lo, hi = keys[0].item(), keys[-1].item()
        out.append((keys, order[(ends[lo - 1] if lo else 0):ends[hi]]))
    return out


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """``out[:, k] = sum(x[:, :k])`` (``[n, L + 1]``)."""
    return torch.nn.functional.pad(x.cumsum(1), (1, 0))


def _suffix(x: torch.Tensor) -> torch.Tensor:
    """``out[:, k] = sum(x[:, k:])`` (``[n, L + 1]``), summed from the end."""
    return torch.nn.functional.pad(x.flip(1).cumsum(1).flip(1), (0, 1))


def _count_sorted(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  inclusive: bool) -> torch.Tensor:
    """Per query, how many entries of the sorted row ``rows[key]`` are ``< value``
    (``<= value`` with ``inclusive``): a binary search on all queries at once, reading one
    entry per query and step instead of gathering whole rows. The count grows by halving
    steps while the entry it would take in still passes (a count past the row's end is
    clamped to it, where passing means every entry passes)."""
    width = rows.shape[1]
    if width == 0:
        return torch.zeros_like(key)
    flat = rows.reshape(-1)
    before = key * width - 1  # flat[before + c]: the c-th entry of the row (c >= 1)
    count = torch.zeros_like(key)
    step = 1 << (width.bit_length() - 1)
    while step:
        take = (count + step).clamp_(max=width)
        entry = flat[before + take]
        passes = (entry <= value) if inclusive else (entry < value)
        count = torch.where(passes, take, count)
        step >>= 1
    return count
