r"""The fast exact engine for neural curvature at neuron granularity.

It computes the same :math:`\kappa` as :mod:`curvprune.reference` on every edge, by exploiting
the structure of the problem instead of solving one linear program per edge:

* **Distances once.** Ground distances do not depend on the example: 2- and 3-hop shortest-path
  tables are min-plus products computed once per call (:mod:`curvprune.distance`).
* **Dead edges** (an end with activity 0) get :math:`\kappa = 1` with no transport at all.
* **Point masses.** If :math:`\mu_i = \delta_i` (input layer, or no active in-neighbour) then
  :math:`W_1 = \alpha d + (1-\alpha)\sum_m q_m D(i, m)` and
  :math:`\kappa = 1 - \sum_m q_m D(i, m) / d`; symmetrically for :math:`\nu_j = \delta_j`.
* **Shared problems with a dual certificate.** Write :math:`\mu_i = \alpha\delta_i +
  (1-\alpha)p` and :math:`\nu_j = \alpha\delta_j + (1-\alpha)q`. The plan that sends
  :math:`\alpha` along ``i -> j`` and transports ``p`` to ``q`` optimally under
  :math:`C(k, m)` costs :math:`\alpha d + (1-\alpha) X_0` with :math:`X_0 = OT(p, q; C)`, and
  :math:`X_0` depends on the edge only through ``(p, q)``, which many edges share (in a dense
  layer every node has the same neighbour measure). With optimal potentials ``(f, g)`` of
  :math:`X_0`, the plan is optimal for the edge's full problem whenever

  .. math::

      \max_{k} \big(f_k - D(k, j)\big) + \max_{m} \big(g_m - D(i, m) + d\big) \le 0,

  because then ``(f, g)`` extended by potentials for ``i`` and ``j`` is dual feasible for
  :math:`W_1(\mu_i, \nu_j)` (the swap ``k -> j``, ``i -> m`` never pays). The engine checks this
  certificate edge by edge; the residual of the check bounds the error, and edges whose residual
  exceeds ``certify_tol * d`` are solved exactly.
* **Full swaps** (:math:`\alpha \ge 1/2`). If :math:`D(k, j) + D(i, m) - d \le C(k, m)` on the
  supports, every unit of ``p`` is best routed through ``j`` and every unit of ``q`` from ``i``:
  :math:`\kappa = 1 - (\sum_k p_k D(k, j) + \sum_m q_m D(i, m) - d) / d`. With
  :math:`\alpha \ge 1/2` the atoms at ``i`` and ``j`` can absorb every such swap, so this is exact.
* **Exact fallback.** Every remaining edge is one exact network-simplex solve (POT's C++ solver,
  the one behind ``ot.emd2``) of the full problem.

The vectorised parts run on the device of the model (or ``device=``); the network-simplex
solves run on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from ot.lp.emd_wrap import check_result, emd_c

from .distance import length_matrix, min_plus
from .graph import LayerEdges
from .measures import neighbour_measures, padded_neighbours

__all__ = ["NeuronGraph", "EngineStats", "score_example"]

_MAX_ITER = 1_000_000


@dataclass
class EngineStats:
    """Counts of how the engine resolved each live (edge, example)."""

    dead: int = 0
    point_mass: int = 0
    certified: int = 0
    full_swap: int = 0
    solved: int = 0
    shared_problems: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Layer:
    src: torch.Tensor  # [E] node in layer l-1
    dst: torch.Tensor  # [E] node in layer l
    widx: torch.Tensor  # [E] flat weight index
    length: torch.Tensor  # [E] float64, 1/|w|


@dataclass
class NeuronGraph:
    """The example-independent part of the neural graph: edges, neighbours and distances.

    Node layers are ``0..n``; ``layers[l-1]`` holds the nonzero edges of parametrised layer
    ``l`` (between node layers ``l-1`` and ``l``). ``in_nbrs[L]`` (``L >= 1``) and
    ``out_nbrs[L]`` (``L < n``) are padded neighbour tables; ``hop2[L]`` is the ``L -> L+2``
    distance table and ``hop3[L]`` the ``L -> L+3`` one.
    """

    sizes: list[int]
    layers: list[_Layer]
    in_nbrs: list[torch.Tensor | None] = field(default_factory=list)
    out_nbrs: list[torch.Tensor | None] = field(default_factory=list)
    hop2: list[torch.Tensor] = field(default_factory=list)
    hop3: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def build(cls, structures: list[LayerEdges], weights: list[torch.Tensor],
              device: torch.device) -> NeuronGraph:
        """Build from each layer's structural edges and current (flattened) weight values."""
        sizes = [structures[0].n_in] + [s.n_out for s in structures]
        layers = []
        for s, w in zip(structures, weights):
            w = w.to(device=device, dtype=torch.float64)
            widx = s.widx.to(device)
            value = w[widx]
            keep = value != 0
            layers.append(_Layer(s.src.to(device)[keep], s.dst.to(device)[keep], widx[keep],
                                 1.0 / value[keep].abs()))
        n = len(layers)
        graph = cls(sizes, layers)
        graph.in_nbrs = [None] + [
            padded_neighbours(layers[L - 1].dst, layers[L - 1].src, sizes[L])
            for L in range(1, n + 1)
        ]
        graph.out_nbrs = [
            padded_neighbours(layers[L].src, layers[L].dst, sizes[L]) for L in range(n)
        ] + [None]
        # hop2[L]: L -> L+2 (through param layers L+1 and L+2); hop3[L]: L -> L+3.
        for L in range(n - 1):
            nxt = layers[L + 1]
            rest = length_matrix(nxt.src, nxt.dst, nxt.length, sizes[L + 1], sizes[L + 2])
            first = layers[L]
            graph.hop2.append(min_plus(first.src, first.dst, first.length, sizes[L], rest))
            del rest
        for L in range(n - 2):
            first = layers[L]
            graph.hop3.append(min_plus(first.src, first.dst, first.length, sizes[L],
                                       graph.hop2[L + 1]))
        return graph


def _gather_rows(table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
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


def _solve(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> tuple[float, np.ndarray,
                                                                     np.ndarray]:
    """Exact OT by POT's network simplex; returns (cost, source potentials, target potentials)."""
    b = b * (a.sum() / b.sum())
    _, value, f, g, code = emd_c(a, b, np.ascontiguousarray(cost), _MAX_ITER, 1)
    check_result(code)
    return float(value), f, g


def score_example(
    graph: NeuronGraph,
    acts: list[torch.Tensor],
    alpha: float,
    *,
    certify_tol: float = 1e-12,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Edge curvatures of one example, per parametrised layer.

    Returns ``(kappa, dead)``: float64 ``[E_l]`` curvatures and bool ``[E_l]`` dead-edge masks.

    Args:
        graph: the example-independent graph.
        acts: normalised activities of node layers ``0..n`` for this example.
        alpha: idleness in ``[0, 1)``.
        certify_tol: an edge is taken from its shared problem only when the certificate's
            residual (an upper bound on ``W1`` error) is at most ``certify_tol * d``.
        block: number of float64 entries per vectorised chunk (bounds memory).
    """
    stats = stats if stats is not None else EngineStats()
    n = len(graph.layers)
    out, out_dead = [], []
    measures_in: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    measures_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def m_in(L: int):
        if L not in measures_in:
            measures_in[L] = neighbour_measures(graph.in_nbrs[L], acts[L - 1])
        return measures_in[L]

    def m_out(L: int):
        if L not in measures_out:
            measures_out[L] = neighbour_measures(graph.out_nbrs[L], acts[L + 1])
        return measures_out[L]

    for l in range(1, n + 1):
        layer = graph.layers[l - 1]
        src, dst, d = layer.src, layer.dst, layer.length
        kappa = torch.ones_like(d)
        dead = torch.zeros_like(src, dtype=torch.bool)
        if l > 1:
            dead |= acts[l - 1][src] == 0
        if l < n:
            dead |= acts[l][dst] == 0
        stats.dead += int(dead.sum())
        if l > 1:
            p_mass, p_has = m_in(l - 1)
            mu_point = ~p_has[src]
        else:
            mu_point = torch.ones_like(dead)
        if l < n:
            q_mass, q_has = m_out(l)
            nu_point = ~q_has[dst]
        else:
            nu_point = torch.ones_like(dead)
        live = ~dead
        both = live & mu_point & nu_point
        kappa[both] = 0.0
        # mu = delta_i: kappa = 1 - sum_m q_m D(i, m) / d
        sel = torch.nonzero(live & mu_point & ~nu_point).squeeze(1)
        for chunk in _chunks(sel, block, graph.out_nbrs[l].shape[1] if l < n else 1):
            i, j = src[chunk], dst[chunk]
            cost = _gather_rows(graph.hop2[l - 1], i, graph.out_nbrs[l][j])
            kappa[chunk] = 1.0 - _weighted_sum(q_mass[j], cost) / d[chunk]
        # nu = delta_j: kappa = 1 - sum_k p_k D(k, j) / d
        sel2 = torch.nonzero(live & ~mu_point & nu_point).squeeze(1)
        for chunk in _chunks(sel2, block, graph.in_nbrs[l - 1].shape[1] if l > 1 else 1):
            i, j = src[chunk], dst[chunk]
            k_idx = graph.in_nbrs[l - 1][i]
            cost = graph.hop2[l - 2][k_idx.clamp(min=0), j[:, None]]
            kappa[chunk] = 1.0 - _weighted_sum(p_mass[i], cost) / d[chunk]
        stats.point_mass += int(both.sum()) + sel.numel() + sel2.numel()
        general = torch.nonzero(live & ~mu_point & ~nu_point).squeeze(1)
        if general.numel():
            kappa[general] = _general(graph, l, src[general], dst[general], d[general],
                                      p_mass, q_mass, alpha, certify_tol, block, stats)
        out.append(kappa)
        out_dead.append(dead)
        if on_layer is not None:
            on_layer(l)
    return out, out_dead


def _general(graph: NeuronGraph, l: int, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
             p_mass: torch.Tensor, q_mass: torch.Tensor, alpha: float, certify_tol: float,
             block: int, stats: EngineStats) -> torch.Tensor:
    """Edges whose two measures both have neighbour parts (see the module docstring)."""
    device = d.device
    k_tab, m_tab = graph.in_nbrs[l - 1], graph.out_nbrs[l]
    d_kj, d_im, d_km = graph.hop2[l - 2], graph.hop2[l - 1], graph.hop3[l - 2]
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    # Identify measures shared by several nodes (same support and masses).
    p_key = torch.unique(torch.cat([k_tab.to(torch.float64), p_mass], 1), dim=0,
                         return_inverse=True)[1]
    q_key = torch.unique(torch.cat([m_tab.to(torch.float64), q_mass], 1), dim=0,
                         return_inverse=True)[1]
    pair = p_key[src] * (int(q_key.max()) + 1) + q_key[dst]
    pairs, pair_of_edge = torch.unique(pair, return_inverse=True)
    first_edge = torch.full((pairs.numel(),), src.numel(), dtype=torch.long, device=device)
    first_edge.scatter_reduce_(0, pair_of_edge, torch.arange(src.numel(), device=device),
                               reduce="amin")
    rep_i, rep_j = src[first_edge].cpu(), dst[first_edge].cpu()
    stats.shared_problems += pairs.numel()
    # Solve X0 = OT(p, q; C) once per shared pair; keep its potentials slot-aligned.
    p_cpu, q_cpu = p_mass.cpu().numpy(), q_mass.cpu().numpy()
    k_cpu, m_cpu = k_tab.cpu().numpy(), m_tab.cpu().numpy()
    d_km_cpu = d_km.cpu().numpy()
    x0 = np.empty(pairs.numel())
    f_pad = np.full((pairs.numel(), dk), -np.inf)
    g_pad = np.full((pairs.numel(), dm), -np.inf)
    for t, (i, j) in enumerate(zip(rep_i.tolist(), rep_j.tolist())):
        ks, ms = np.nonzero(p_cpu[i] > 0)[0], np.nonzero(q_cpu[j] > 0)[0]
        cost = d_km_cpu[np.ix_(k_cpu[i, ks], m_cpu[j, ms])]
        value, f, g = _solve(p_cpu[i, ks], q_cpu[j, ms], cost)
        # Dual feasibility residual of (f, g) for X0 itself, folded into f.
        f = f - max(0.0, float((f[:, None] + g[None, :] - cost).max()))
        x0[t] = value
        f_pad[t, ks], g_pad[t, ms] = f, g
    x0_t = torch.from_numpy(x0).to(device)
    f_t, g_t = torch.from_numpy(f_pad).to(device), torch.from_numpy(g_pad).to(device)
    kappa = torch.empty_like(d)
    pending = []
    for chunk in _chunks(torch.arange(src.numel(), device=device), block, dk + dm):
        i, j, pe = src[chunk], dst[chunk], pair_of_edge[chunk]
        a_k = d_kj[k_tab[i].clamp(min=0), j[:, None]]  # D(k, j)
        b_m = _gather_rows(d_im, i, m_tab[j]) - d[chunk, None]  # D(i, m) - d
        residual = (f_t[pe] - a_k).amax(dim=1) + (g_t[pe] - b_m).amax(dim=1)
        ok = residual <= certify_tol * d[chunk]
        kappa[chunk[ok]] = 1.0 - x0_t[pe[ok]] / d[chunk[ok]]
        stats.certified += int(ok.sum())
        pending.append(chunk[~ok])
    pending = torch.cat(pending)
    if pending.numel() and alpha >= 0.5:
        swapped = []
        for chunk in _chunks(pending, block, dk * dm):
            i, j = src[chunk], dst[chunk]
            k_idx, m_idx = k_tab[i].clamp(min=0), m_tab[j].clamp(min=0)
            a_k = d_kj[k_idx, j[:, None]]
            b_m = _gather_rows(d_im, i, m_tab[j]) - d[chunk, None]
            c_km = d_km[k_idx[:, :, None], m_idx[:, None, :]]
            support = (p_mass[i] > 0)[:, :, None] & (q_mass[j] > 0)[:, None, :]
            gap = torch.where(support, a_k[:, :, None] + b_m[:, None, :] - c_km,
                              torch.full((), -float("inf"), dtype=d.dtype, device=device))
            ok = gap.flatten(1).amax(dim=1) <= 0
            sel = chunk[ok]
            x = _weighted_sum(p_mass[i[ok]], a_k[ok]) + _weighted_sum(q_mass[j[ok]], b_m[ok])
            kappa[sel] = 1.0 - x / d[sel]
            stats.full_swap += int(ok.sum())
            swapped.append(chunk[~ok])
        pending = torch.cat(swapped)
    if pending.numel():
        d_kj_cpu, d_im_cpu, d_cpu = d_kj.cpu().numpy(), d_im.cpu().numpy(), d.cpu().numpy()
        src_cpu, dst_cpu = src.cpu().numpy(), dst.cpu().numpy()
        values = np.empty(pending.numel())
        for t, e in enumerate(pending.cpu().tolist()):
            i, j, de = src_cpu[e], dst_cpu[e], d_cpu[e]
            ks, ms = np.nonzero(p_cpu[i] > 0)[0], np.nonzero(q_cpu[j] > 0)[0]
            kk, mm = k_cpu[i, ks], m_cpu[j, ms]
            cost = np.empty((len(kk) + 1, len(mm) + 1))
            cost[0, 0] = de
            cost[0, 1:] = d_im_cpu[i, mm]
            cost[1:, 0] = d_kj_cpu[kk, j]
            cost[1:, 1:] = d_km_cpu[np.ix_(kk, mm)]
            a = np.concatenate([[alpha], (1 - alpha) * p_cpu[i, ks]])
            b = np.concatenate([[alpha], (1 - alpha) * q_cpu[j, ms]])
            w1, _, _ = _solve(a, b, cost)
            values[t] = (1.0 - w1 / de) / (1.0 - alpha)
        kappa[pending] = torch.from_numpy(values).to(device)
        stats.solved += pending.numel()
    return kappa
