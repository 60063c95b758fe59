r"""Exact curvatures of edges: full swaps in closed form, the rest by network simplex
(:mod:`curvprune.transport.solver`)."""

from __future__ import annotations

import math

import torch

from .base import CERTIFY_TOL, Distances, EngineStats, _chunks, _cross
from .bounds import bound_edges
from .measures import _Measure
from .solver import _solve_batch, _submit_batch

__all__ = ["solve_edges", "score_edges"]

def solve_edges(src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor, mu: _Measure,
                nu: _Measure, tables: Distances, alpha: float, *, block: int = 1 << 22,
                stats: EngineStats | None = None, threads: int = 1,
                src_row: torch.Tensor | None = None, dst_row: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Exact curvatures of live edges whose two measures both have neighbour parts (see the
    module docstring: full swaps in closed form, the rest by network simplex).

    ``src_row`` / ``dst_row``: the row of ``mu`` / ``nu`` of each edge's source / target when
    the measures hold some nodes' rows only (default: the node ids ``src`` / ``dst``, which
    always index the distance tables); the values are the same, bitwise, when the rows are."""
    stats = stats if stats is not None else EngineStats()
    device = d.device
    src_row = src if src_row is None else src_row
    dst_row = dst if dst_row is None else dst_row
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    d_kj, d_im, d_km = tables.d_kj, tables.d_im, tables.d_km
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    kappa = torch.empty_like(d)
    zero = torch.zeros((), dtype=d.dtype, device=device)
    p_count, q_count = (p_mass > 0).sum(1), (q_mass > 0).sum(1)
    # Similar support sizes in one chunk, so each chunk is cut to its own widths.
    pending = torch.argsort(p_count[src_row] * (dm + 1) + q_count[dst_row])
    in_flight: list[tuple] = []
    for chunk in _chunks(pending, block, 4 * (dk + 1) * (dm + 1)):
        i, j, de = src[chunk], dst[chunk], d[chunk]
        ri, rj = src_row[chunk], dst_row[chunk]
        r, c = int(p_count[ri].max()), int(q_count[rj].max())
        k_idx, m_idx = k_tab[ri, :r].clamp(min=0), m_tab[rj, :c].clamp(min=0)
        pm, qm = p_mass[ri, :r], q_mass[rj, :c]
        rows, cols = pm > 0, qm > 0
        a_k = torch.where(rows, d_kj[k_idx, j[:, None]], zero)  # D(k, j)
        d_i_m = torch.where(cols, d_im[i[:, None], m_idx], zero)  # D(i, m)
        if alpha >= 0.5:
            # X = OT(p, q; min(C, A + B)); rows (columns) that take the swap on every support
            # cell differ only by a constant and are merged into one row (column), exactly.
            b_m = torch.where(cols, d_i_m - de[:, None], zero)
            cells = _cross(d_km, k_idx, m_idx)  # C(k, m)
            # A(k) + B(m) on the support, -inf off it (A and B are finite distances there), so
            # that no mask of the support is needed: off it no cell keeps C and the smaller of
            # C and A + B is -inf, set to 0 below.
            swap = (torch.where(rows, a_k, -math.inf)[:, :, None]
                    + torch.where(cols, b_m, -math.inf)[:, None, :])
            # A support cell keeps C where C < A + B (the margin C - (A + B) is negative exactly
            # then, in IEEE arithmetic); a row (column) is a hub when none of its cells does.
            keeps = torch.lt(cells, swap).view(torch.uint8)
            hub_row = (keeps.amax(2) == 0) & rows
            hub_col = (keeps.amax(1) == 0) & cols
            x = (torch.where(hub_row, pm * a_k, zero).sum(1)
                 + torch.where(hub_col, qm * b_m, zero).sum(1))
            need = torch.nonzero(~(hub_row | ~rows).all(1)).squeeze(1)
            stats.full_swap += chunk.numel() - need.numel()
            if need.numel():
                # Each cell exactly C or A + B, whichever is smaller (no re-association, which
                # would cost precision when d is small against A and B); off-support cells carry
                # no mass and get zero. Written straight into the problems' cost blocks when
                # every problem of the chunk needs the solver (the usual case).
                every = need.numel() == chunk.numel()
                cost = torch.empty((need.numel(), r + 1, c + 1), dtype=d.dtype, device=device)
                block_ = cost[:, :r, :c]
                if every:
                    torch.minimum(cells, swap, out=block_)
                else:
                    block_.copy_(torch.minimum(cells, swap, out=cells)[need])
                torch.nan_to_num_(block_, nan=math.nan, posinf=math.inf, neginf=0.0)
                cost[:, r, :c] = b_m if every else b_m[need]
                cost[:, :r, c] = a_k if every else a_k[need]
                cost[:, r, c] = 0.0
                del cells, swap, keeps
                hr, pn = (hub_row, pm) if every else (hub_row[need], pm[need])
                hc, qn = (hub_col, qm) if every else (hub_col[need], qm[need])
                row_mass = torch.cat([torch.where(hr, zero, pn),
                                      torch.where(hr, pn, zero).sum(1, keepdim=True)], 1)
                col_mass = torch.cat([torch.where(hc, zero, qn),
                                      torch.where(hc, qn, zero).sum(1, keepdim=True)], 1)
                wait = _submit_batch(row_mass.cpu().numpy(), col_mass.cpu().numpy(),
                                     cost.cpu().numpy(), threads)
                in_flight.append((chunk, x, need, de, wait))
                stats.solved += need.numel()
                if len(in_flight) > 1:  # at most two chunks' problems held in memory
                    _finish(in_flight.pop(0), kappa)
            else:
                kappa[chunk] = 1.0 - x / de
        else:
            # alpha < 1/2: the atoms limit the swaps; solve the full problem.
            support = rows[:, :, None] & cols[:, None, :]
            cost = torch.empty((chunk.numel(), r + 1, c + 1), dtype=d.dtype, device=device)
            cost[:, 0, 0] = de
            cost[:, 0, 1:] = d_i_m
            cost[:, 1:, 0] = a_k
            cost[:, 1:, 1:] = torch.where(support, d_km[k_idx[:, :, None], m_idx[:, None, :]],
                                          zero)
            atom = torch.full((chunk.numel(), 1), alpha, dtype=d.dtype, device=device)
            w1 = _solve_batch(torch.cat([atom, (1 - alpha) * pm], 1).cpu().numpy(),
                              torch.cat([atom, (1 - alpha) * qm], 1).cpu().numpy(),
                              cost.cpu().numpy(), threads)
            kappa[chunk] = (1.0 - torch.from_numpy(w1).to(device) / de) / (1.0 - alpha)
            stats.solved += chunk.numel()
    for item in in_flight:
        _finish(item, kappa)
    return kappa


def _finish(item: tuple, kappa: torch.Tensor) -> None:
    """Wait for a chunk's merged problems and write ``kappa = 1 - X / d`` for the chunk."""
    chunk, x, need, de, wait = item
    x[need] += torch.from_numpy(wait()).to(x.device)
    kappa[chunk] = 1.0 - x / de


def score_edges(
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
    threads: int = 1,
) -> torch.Tensor:
    """Exact curvatures ``[E]`` (float64) of edges ``src -> dst`` of distance ``d`` on one
    example: :func:`bound_edges`, then :func:`solve_edges` where the bounds differ."""
    lo, hi = bound_edges(src, dst, d, dead, mu, nu, tables, alpha, certify_tol=certify_tol,
                         block=block, stats=stats)
    open_ = torch.nonzero(lo < hi).squeeze(1)
    if open_.numel():
        lo[open_] = solve_edges(src[open_], dst[open_], d[open_], mu, nu, tables, alpha,
                                block=block, stats=stats, threads=threads)
    return lo

