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
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Bounds ``lo <= kappa <= hi`` (float64 ``[E]``) on the curvatures of edges ``src -> dst``
    of distance ``d`` on one example; ``lo == hi`` where the value is settled.

    With ``settle=False`` (interval mode, used by :func:`curvprune.neural_curvature`) no edge
    is collapsed onto one of its bounds: ``lo`` and ``hi`` are widened by ``error`` (a bound
    per edge on how far the measures' cut moved kappa, :func:`cut_error`), so that they
    bracket the curvature of the uncut measures, and edges whose widened bounds are at most
    ``certify_tol`` apart are counted as certified.

    ``dead`` edges get 1 and point-mass sides their closed forms; ``mu``/``nu`` are the
    neighbour measures of the sources' and the targets' node sets (``None``: every node of that
    side is a point mass). For the other edges, with :math:`X = (W_1 - \alpha d)/(1 - \alpha)`
    so that :math:`\kappa = 1 - X / d`, the shared problem :math:`X_0 = OT(p, q; C)` and its
    optimal potentials ``(f, g)`` give

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
    The evaluation is factored by row and column keys (:func:`_factored_bounds`).

    **Screening** (``ceiling``, a value per edge; interval mode only). When
    :math:`\alpha \ge 1/2` the swap plan alone gives :math:`X \le p \cdot A + q \cdot B`,
    i.e. :math:`\kappa \ge 1 - (p \cdot A + q \cdot B)/d`, in :math:`O(d_k + d_m)` per
    row and column key and without any shared problem. An edge whose this lower bound (less
    ``error``) is at least its ``ceiling`` gets it as ``lo`` and ``hi = +inf`` (unknown), and
    its shared problem is never built. The minimum search passes ``U_w - tolerance`` (the
    best upper bound of the edge's weight over the earlier examples, less the tolerance) as
    the ceiling: such an edge cannot move its weight's interval
    (:mod:`curvprune.transport.minimum`), so it needs no tighter bound. Counted as
    ``screened``.
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
    # Per node, a key equal for equal neighbour parts: computed once, for the sides in use.
    p_key = _measure_keys(mu) if sel2.numel() or general.numel() else None
    q_key = _measure_keys(nu) if sel.numel() or general.numel() else None
    # mu = delta_i: kappa = 1 - sum_m q_m D(i, m) / d; the sum depends on (i, q_j) only.
    if sel.numel():
        i, j = src[sel], dst[sel]
        kappa[sel] = 1.0 - _col_sums(tables, i, j, nu, _groups(i, q_key[j]), block) / d[sel]
    # nu = delta_j: kappa = 1 - sum_k p_k D(k, j) / d; the sum depends on (p_i, j) only.
    if sel2.numel():
        i, j = src[sel2], dst[sel2]
        kappa[sel2] = 1.0 - _row_sums(tables, i, j, mu, _groups(p_key[i], j), block) / d[sel2]
    stats.point_mass += int(both.sum()) + sel.numel() + sel2.numel()
    upper = kappa.clone()
    keys = None  # the general edges' row and column keys, when the screen has them
    if general.numel() and ceiling is not None and not settle and alpha >= 0.5:
        i, j = src[general], dst[general]
        rows, cols = _groups(p_key[i], j), _groups(i, q_key[j])
        low = _swap_lower(tables, i, j, d[general], mu, nu, rows, cols, block)
        out = (low - error[general] if error is not None else low) >= ceiling[general]
        screened = general[out]
        kappa[screened], upper[screened] = low[out], math.inf  # widened by error below
        stats.screened += screened.numel()
        general = general[~out]
        if general.numel():
            keys = _subgroups(rows, ~out), _subgroups(cols, ~out)
    if general.numel():
        kappa[general], upper[general] = _shared_bounds(
            tables, src[general], dst[general], d[general], mu, nu, p_key, q_key, alpha,
            certify_tol, block, stats, settle, keys)
    if not settle:
        if error is not None:
            kappa, upper = kappa - error, upper + error
        stats.certified += int((upper[general] - kappa[general] <= certify_tol).sum())
    return kappa, upper


def _swap_lower(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                mu: _Measure, nu: _Measure, rows: _Keys, cols: _Keys, block: int
                ) -> torch.Tensor:
    r""":math:`1 - (p \cdot A + q \cdot B) / d`, the lower bound on kappa of the swap plan
    (every unit of ``p`` to ``j``, ``i`` to every unit of ``q``; a plan when
    :math:`\alpha \ge 1/2`), for edges with two neighbour parts. :math:`p \cdot A` depends
    on the row key ``(p_i, j)`` and :math:`\sum_m q_m D(i, m)` on the column key
    ``(i, q_j)`` (``rows`` and ``cols``, :func:`_groups`): each is summed once per key."""
    p_a = _row_sums(tables, src, dst, mu, rows, block)
    q_d = _col_sums(tables, src, dst, nu, cols, block)
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


def _shared_bounds(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                   mu: _Measure, nu: _Measure, p_key: torch.Tensor, q_key: torch.Tensor,
                   alpha: float, certify_tol: float, block: int, stats: EngineStats,
                   settle: bool = True, keys: tuple[_Keys, _Keys] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(lo, hi)`` of :func:`bound_edges` for edges with two neighbour parts.

    Solves ``X0 = OT(p, q; C)`` once per distinct ``(p, q)`` pair (:func:`_shared_problems`),
    then evaluates every edge's bounds by :func:`_factored_bounds`, in
    :math:`O(\log d_k + \log d_m)` per edge (``keys``: the edges' row and column keys, if
    already grouped).
    """
    shared = _shared_problems(tables, src, dst, mu, nu, p_key, q_key, block, stats)
    lower, upper = _factored_bounds(tables, src, dst, d, mu, nu, shared, alpha, block, keys)
    lo, hi = 1.0 - upper / d, 1.0 - lower / d
    if settle:
        settled = hi - lo <= certify_tol / 2
        hi[settled] = lo[settled]
        stats.certified += int(settled.sum())
    return lo, hi


@dataclass
class _Shared:
    """The shared problems of an edge set: per edge its pair (``pair``, into the other fields),
    ``p_key`` / ``q_key`` per node (equal keys: equal neighbour parts, table and masses), and
    per pair ``X0``, the optimal potentials ``f`` / ``g`` (0 past the supports) and their
    feasibility residual ``slack``."""

    pair: torch.Tensor
    p_key: torch.Tensor
    q_key: torch.Tensor
    x0: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    slack: torch.Tensor


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
    x0_np, f_np, g_np, slack_np = (t.cpu().numpy() for t in (x0, f_pad, g_pad, slack))
    for part in _chunks(rest, block, dk * dm):
        ri, rj = rep_i[part], rep_j[part]
        pm, qm = p_mass[ri], q_mass[rj]
        support = (pm > 0)[:, :, None] & (qm > 0)[:, None, :]
        cost = torch.where(support, tables.d_km[k_tab[ri].clamp(min=0)[:, :, None],
                                                m_tab[rj].clamp(min=0)[:, None, :]], 0.0)
        pm_np, qm_np, cost_np = pm.cpu().numpy(), qm.cpu().numpy(), cost.cpu().numpy()
        solved = [_solve_one(pm_np[s], qm_np[s], cost_np[s]) for s in range(len(part))]
        at = part.cpu().numpy()
        rows, cols = pm_np > 0, qm_np > 0
        f = np.where(rows, np.stack([f for _, f, _ in solved]), 0.0)
        g = np.where(cols, np.stack([g for _, _, g in solved]), 0.0)
        x0_np[at] = [value for value, _, _ in solved]
        f_np[at], g_np[at] = f, g
        # (f, g) may miss feasibility by rounding; the lower bound pays for that residual.
        excess = np.where(rows[:, :, None] & cols[:, None, :],
                          f[:, :, None] + g[:, None, :] - cost_np, -np.inf)
        slack_np[at] = np.maximum(excess.max(axis=(1, 2)), 0.0)
    if device.type != "cpu":
        x0, f_pad, g_pad, slack = (torch.from_numpy(t).to(device)
                                   for t in (x0_np, f_np, g_np, slack_np))
    return _Shared(pair_of_edge, p_key, q_key, x0, f_pad, g_pad, slack)


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
    order = torch.argsort(torch.where(on, delta, math.inf), dim=1, stable=True)
    r_s, c1_s, c2_s, d_s = (t.gather(1, order) for t in (r, c1, c2, delta))
    cumulative = _prefix(r_s)  # [B, n + 1]: mass of the slots before each
    last = on.sum(1, keepdim=True) - 1
    split = torch.minimum((cumulative[:, 1:] < w[:, :1]).sum(1, keepdim=True), last)
    slot = torch.arange(r.shape[1], device=r.device)[None, :]
    from_1 = torch.where(slot < split, r_s,
                         torch.where(slot == split,
                                     (w[:, :1] - cumulative[:, :-1]).clamp(min=0.0), 0.0))
    from_1 = torch.minimum(from_1, r_s)
    x0 = (from_1 * c1_s).sum(1) + ((r_s - from_1) * c2_s).sum(1)
    level = d_s.gather(1, split).squeeze(1)
    u = torch.stack([level, torch.zeros_like(level)], 1)
    v = torch.where(on, torch.minimum(c1 - level[:, None], c2), 0.0)
    excess = torch.where(on, torch.maximum(level[:, None] + v - c1, v - c2), -math.inf)
    return x0, u, v, excess.amax(1).clamp(min=0.0)


def _factored_bounds(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                     mu: _Measure, nu: _Measure, shared: _Shared, alpha: float, block: int,
                     keys: tuple[_Keys, _Keys] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
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
    """
    device, dtype = d.device, d.dtype
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    d_kj, d_im = tables.d_kj, tables.d_im
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    inf = torch.tensor(math.inf, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    if keys is None:
        keys = _groups(shared.p_key[src], dst), _groups(src, shared.q_key[dst])
    (row_of_edge, n_rows, row_rep), (col_of_edge, n_cols, col_rep) = keys

    def row_terms(keys: torch.Tensor):
        e = row_rep[keys]
        i, j = src[e], dst[e]
        pm = p_mass[i]
        valid = pm > 0
        a = torch.where(valid, d_kj[k_tab[i].clamp(min=0), j[:, None]], zero)
        f = shared.f[shared.pair[e]]
        return valid, pm, a, f, torch.where(valid, a - f, inf)

    def col_terms(keys: torch.Tensor):
        e = col_rep[keys]
        i, j = src[e], dst[e]
        qm = q_mass[j]
        valid = qm > 0
        dist = torch.where(valid, _gather_rows(d_im, i, m_tab[j]), zero)
        g = shared.g[shared.pair[e]]
        return valid, qm, dist, g, torch.where(valid, g - dist, -inf)

    # t_row per row key: the largest t that clips no row.
    t_row = torch.empty(n_rows, dtype=dtype, device=device)
    for keys in _chunks(torch.arange(n_rows, device=device), block, 4 * dk):
        t_row[keys] = row_terms(keys)[4].amin(1)
    # Columns: per edge the three t and the column part of each value, and q.B.
    t = torch.empty((3, src.numel()), dtype=dtype, device=device)
    value = torch.empty((3, src.numel()), dtype=dtype, device=device)
    swap = torch.empty(src.numel(), dtype=dtype, device=device)
    for keys, edges in _key_chunks(col_of_edge, n_cols, block, 8 * (dm + 1)):
        valid, qm, dist, g, brk = col_terms(keys)
        brk, order = brk.sort(1)
        qm = torch.where(valid, qm, zero).gather(1, order)
        prefix_g, prefix_q = _prefix(qm * g.gather(1, order)), _prefix(qm)
        suffix_d, suffix_q = _suffix(qm * dist.gather(1, order)), _suffix(qm)
        for part in _chunks(edges, block, 16):
            key, de = col_of_edge[part] - keys[0], d[part]
            t[0, part] = t_row[row_of_edge[part]]
            t[1, part] = brk[key, -1] + de  # the smallest t that clips no column
            t[2, part] = 0.5 * (t[0, part] + t[1, part])
            for s in range(3):
                ts = t[s, part]
                at = _count_sorted(brk, key, ts - de, inclusive=True)
                value[s, part] = (prefix_g[key, at] - ts * prefix_q[key, at]
                                  + (suffix_d[key, at] - de * suffix_q[key, at]))
            swap[part] = suffix_d[key, 0] - de * suffix_q[key, 0]
    # Rows: the row part of each value, and p.A.
    for keys, edges in _key_chunks(row_of_edge, n_rows, block, 8 * (dk + 1)):
        valid, pm, a, f, brk = row_terms(keys)
        brk, order = brk.sort(1)
        pm = torch.where(valid, pm, zero).gather(1, order)
        prefix_a = _prefix(pm * a.gather(1, order))
        suffix_f, suffix_p = _suffix(pm * f.gather(1, order)), _suffix(pm)
        for part in _chunks(edges, block, 16):
            key = row_of_edge[part] - keys[0]
            for s in range(3):
                ts = t[s, part]
                at = _count_sorted(brk, key, ts, inclusive=False)
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
    entry per query and step instead of gathering whole rows."""
    width = rows.shape[1]
    flat = rows.reshape(-1)
    base = key * width
    lo = torch.zeros_like(key)
    hi = torch.full_like(key, width)
    for _ in range(width.bit_length()):
        mid = (lo + hi) // 2
        entry = flat[base + mid.clamp(max=width - 1)]
        below = (entry <= value) if inclusive else (entry < value)
        active = lo < hi
        lo = torch.where(active & below, mid + 1, lo)
        hi = torch.where(active & ~below, mid, hi)
    return lo
