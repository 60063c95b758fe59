r"""Certified bounds on the curvature of many edges at once, without solving any edge's own
transport problem: dead edges, point masses, and the shared problems ``X0 = OT(p, q; C)`` with
their potentials (the certificate of :mod:`curvprune.transport`)."""

from __future__ import annotations

import math

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
    """
    stats = stats if stats is not None else EngineStats()
    kappa = torch.ones_like(d)
    stats.dead += int(dead.sum())
    mu_point = ~mu.has[src] if mu is not None else torch.ones_like(dead)
    nu_point = ~nu.has[dst] if nu is not None else torch.ones_like(dead)
    live = ~dead
    both = live & mu_point & nu_point
    kappa[both] = 0.0
    # mu = delta_i: kappa = 1 - sum_m q_m D(i, m) / d
    sel = torch.nonzero(live & mu_point & ~nu_point).squeeze(1)
    for chunk in _chunks(sel, block, nu.mass.shape[1] if nu is not None else 1):
        i, j = src[chunk], dst[chunk]
        cost = _gather_rows(tables.d_im, i, nu.table[j])
        kappa[chunk] = 1.0 - _weighted_sum(nu.mass[j], cost) / d[chunk]
    # nu = delta_j: kappa = 1 - sum_k p_k D(k, j) / d
    sel2 = torch.nonzero(live & ~mu_point & nu_point).squeeze(1)
    for chunk in _chunks(sel2, block, mu.mass.shape[1] if mu is not None else 1):
        i, j = src[chunk], dst[chunk]
        cost = tables.d_kj[mu.table[i].clamp(min=0), j[:, None]]
        kappa[chunk] = 1.0 - _weighted_sum(mu.mass[i], cost) / d[chunk]
    stats.point_mass += int(both.sum()) + sel.numel() + sel2.numel()
    upper = kappa.clone()
    general = torch.nonzero(live & ~mu_point & ~nu_point).squeeze(1)
    if general.numel():
        kappa[general], upper[general] = _shared_bounds(
            tables, src[general], dst[general], d[general], mu, nu, alpha, certify_tol, block,
            stats, settle)
    if not settle:
        if error is not None:
            kappa, upper = kappa - error, upper + error
        stats.certified += int((upper[general] - kappa[general] <= certify_tol).sum())
    return kappa, upper



def _shared_bounds(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                   mu: _Measure, nu: _Measure, alpha: float, certify_tol: float, block: int,
                   stats: EngineStats, settle: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of :func:`bound_edges` for edges with two neighbour parts.

    Solves ``X0 = OT(p, q; C)`` once per distinct ``(p, q)`` pair (bounded memory: the shared
    problems' cost blocks are built a chunk at a time).
    """
    device = d.device
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    d_kj, d_im, d_km = tables.d_kj, tables.d_im, tables.d_km
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    p_key = torch.unique(torch.cat([k_tab.to(torch.float64), p_mass], 1), dim=0,
                         return_inverse=True)[1]
    q_key = torch.unique(torch.cat([m_tab.to(torch.float64), q_mass], 1), dim=0,
                         return_inverse=True)[1]
    pair = p_key[src] * (int(q_key.max()) + 1) + q_key[dst]
    pairs, pair_of_edge = torch.unique(pair, return_inverse=True)
    first_edge = torch.full((pairs.numel(),), src.numel(), dtype=torch.long, device=device)
    first_edge.scatter_reduce_(0, pair_of_edge, torch.arange(src.numel(), device=device),
                               reduce="amin")
    rep_i, rep_j = src[first_edge], dst[first_edge]
    stats.shared_problems += pairs.numel()
    x0 = np.empty(pairs.numel())
    f_pad = np.zeros((pairs.numel(), dk))
    g_pad = np.zeros((pairs.numel(), dm))
    slack = np.empty(pairs.numel())
    for part in _chunks(torch.arange(pairs.numel(), device=device), block, dk * dm):
        ri, rj = rep_i[part], rep_j[part]
        pm, qm = p_mass[ri], q_mass[rj]
        support = (pm > 0)[:, :, None] & (qm > 0)[:, None, :]
        cost = torch.where(support, d_km[k_tab[ri].clamp(min=0)[:, :, None],
                                         m_tab[rj].clamp(min=0)[:, None, :]], 0.0)
        pm_np, qm_np, cost_np = pm.cpu().numpy(), qm.cpu().numpy(), cost.cpu().numpy()
        for s, t in enumerate(part.tolist()):
            x0[t], f, g = _solve_one(pm_np[s], qm_np[s], cost_np[s])
            rows, cols = pm_np[s] > 0, qm_np[s] > 0
            f_pad[t, rows], g_pad[t, cols] = f[rows], g[cols]
            # (f, g) may miss feasibility by rounding; the lower bound pays for that residual.
            slack[t] = max(0.0, float((f[rows, None] + g[None, cols]
                                       - cost_np[s][np.ix_(rows, cols)]).max()))
    x0_t, slack_t = torch.from_numpy(x0).to(device), torch.from_numpy(slack).to(device)
    f_t, g_t = torch.from_numpy(f_pad).to(device), torch.from_numpy(g_pad).to(device)
    lo, hi = torch.empty_like(d), torch.empty_like(d)
    lam = min(1.0, alpha / (1.0 - alpha))
    inf = torch.tensor(math.inf, dtype=d.dtype, device=device)
    zero = torch.zeros((), dtype=d.dtype, device=device)
    for chunk in _chunks(torch.arange(src.numel(), device=device), block, 4 * (dk + dm)):
        i, j, de, pe = src[chunk], dst[chunk], d[chunk], pair_of_edge[chunk]
        pm, qm = p_mass[i], q_mass[j]
        rows, cols = pm > 0, qm > 0
        a_k = d_kj[k_tab[i].clamp(min=0), j[:, None]]  # A(k) = D(k, j)
        b_m = _gather_rows(d_im, i, m_tab[j]) - de[:, None]  # B(m) = D(i, m) - d
        f, g = f_t[pe], g_t[pe]
        # Plans: no swap (X0), and a share lam of every unit swapped (all of it for alpha >= 1/2).
        upper = x0_t[pe]
        if lam > 0:
            swap = _weighted_sum(pm, a_k) + _weighted_sum(qm, b_m)
            upper = torch.minimum(upper, lam * swap + (1.0 - lam) * upper)
        t_row = torch.where(rows, a_k - f, inf).amin(1)  # largest t that clips no row
        t_col = torch.where(cols, g - b_m, -inf).amax(1)  # smallest t that clips no column
        lower = torch.full_like(de, -math.inf)
        for t in (t_row, t_col, 0.5 * (t_row + t_col)):
            value = (torch.where(rows, pm * torch.minimum(f + t[:, None], a_k), zero).sum(1)
                     + torch.where(cols, qm * torch.minimum(g - t[:, None], b_m), zero).sum(1))
            lower = torch.maximum(lower, value)
        lower = lower - slack_t[pe]
        lo[chunk] = 1.0 - upper / de
        hi[chunk] = 1.0 - lower / de
    if settle:
        settled = hi - lo <= certify_tol / 2
        hi[settled] = lo[settled]
        stats.certified += int(settled.sum())
    return lo, hi
