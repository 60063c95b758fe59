r"""The neighbourhood measures :math:`\mu_i` and :math:`\nu_j` of the neural graph.

For a node ``v`` with neighbours ``N(v)`` (in-neighbours for :math:`\mu`, out-neighbours for
:math:`\nu`), the neighbour part of its measure is

.. math::

    p_v(u) = \frac{w(a_u)}{\sum_{u' \in A(v)} w(a_{u'})}, \qquad
    w(a) = \exp(-1 / a^2), \quad u \in A(v) = \{u \in N(v) : a_u > 0\},

and the full measure puts mass :math:`\alpha` on ``v`` and :math:`(1-\alpha) p_v` on ``A(v)``.
If the weights underflow to a sum below the smallest normal float64 (all active neighbours have
activity below about 0.037), the neighbour mass is spread uniformly over ``A(v)``; if ``A(v)``
is empty the measure is the point mass :math:`\delta_v`. Everything is computed in float64 (the
authors' float32 code drops neighbours with activity below about 0.1; curvprune does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["padded_neighbours", "neighbour_measures", "node_measures", "cut_measures",
           "cut_error"]

_TINY = torch.finfo(torch.float64).tiny


def padded_neighbours(keys: torch.Tensor, values: torch.Tensor, n: int,
                      fill: float = -1) -> torch.Tensor:
    """Group ``values`` by ``keys`` into an ``[n, max_degree]`` table padded with ``fill``.

    Values keep their order within a key, so tables of two value arrays over the same keys
    line up slot by slot (neighbours and the lengths of the edges to them)."""
    if keys.numel() == 0:
        return torch.full((n, 0), fill, dtype=values.dtype, device=keys.device)
    slot, width = _padded_slots(keys, n)
    table = torch.full((n, width), fill, dtype=values.dtype, device=keys.device)
    table.view(-1)[slot] = values
    return table


def _padded_slots(keys: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Where :func:`padded_neighbours` puts each value grouped by ``keys``: ``slot[e] =
    keys[e] * width + position`` in the flattened ``[n, width]`` table, and ``width`` (the
    largest count of a key; 0 without keys)."""
    if keys.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=keys.device), 0
    order = torch.argsort(keys, stable=True)
    k = keys[order]
    counts = torch.bincount(k, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    slot = torch.empty_like(k)
    slot[order] = k * width + torch.arange(k.numel(), device=k.device) - starts[k]
    return slot, width


def neighbour_measures(
    neighbours: torch.Tensor, activity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Neighbour parts :math:`p_v` of the measures of all nodes of one layer, on one example.

    Args:
        neighbours: ``[n, D]`` neighbour table (``-1`` pads), from :func:`padded_neighbours`.
        activity: ``[n_neighbour_layer]`` normalised activities of the neighbours' layer.

    Returns:
        ``(mass, has_support)``: ``mass[v, s]`` is :math:`p_v` of neighbour slot ``s`` (0 for
        padding and inactive neighbours; each row with support sums to 1), and ``has_support[v]``
        says whether ``v`` has an active neighbour (else its measure is :math:`\delta_v`).
    """
    # The weight of a neighbour is its own: computed once per node of its layer, then read
    # slot by slot (the same floats as slot by slot, with one exponential per node).
    on = activity > 0
    node_weight = torch.where(on, torch.exp(-1.0 / torch.where(on, activity, 1.0) ** 2), 0.0)
    valid = neighbours >= 0
    index = neighbours.clamp(min=0).reshape(-1)  # index_select: several times faster than [index]
    active = valid & on.index_select(0, index).view(neighbours.shape)
    weight = torch.where(valid, node_weight.index_select(0, index).view(neighbours.shape), 0.0)
    # Summed left to right (a running sum), so trailing padding never changes the rounding: a
    # table cut to fewer slots gives bitwise the same masses (a vectorised sum's order
    # depends on the row's width and on the CPU's vector width).
    total = weight.cumsum(dim=1)[:, -1:] if weight.shape[1] else weight.sum(dim=1, keepdim=True)
    count = active.sum(dim=1, keepdim=True)
    uniform = active.to(activity.dtype) / count.clamp(min=1).to(activity.dtype)
    proportional = weight / torch.where(total >= _TINY, total, 1.0)
    mass = torch.where(total >= _TINY, proportional, uniform)
    return mass, count.squeeze(1) > 0


@dataclass
class _Measure:
    """Neighbour parts of the measures of one node layer on one example, support first.

    ``table[v, s]`` is the neighbour in slot ``s`` of node ``v`` and ``mass[v, s]`` its mass
    (0 past the support); ``has[v]`` says whether ``v`` has any support (else a point mass).
    ``reach[v]`` bounds the distance between ``v`` and every node of its (uncut) support;
    ``cut[v]`` says whether :func:`cut_measures` dropped mass from ``v``'s measure (``None``:
    nothing was cut anywhere).
    """

    table: torch.Tensor
    mass: torch.Tensor
    has: torch.Tensor
    reach: torch.Tensor
    cut: torch.Tensor | None = None


def node_measures(table: torch.Tensor, activity: torch.Tensor,
                  lengths: torch.Tensor | None = None, *,
                  slot: torch.Tensor | None = None, block: int = 1 << 20) -> _Measure:
    """Measures of a layer with each node's support moved to the front and empty slots cut.

    ``lengths`` (the edge lengths to the neighbours) give ``reach``, the longest edge to a
    neighbour with mass; without them ``reach`` is ``+inf`` (and :func:`cut_measures` cuts
    nothing). ``lengths`` is a table lined up with ``table`` slot by slot (padding 0), or,
    with ``slot``, one length per edge and where the edge sits in the flattened ``table``
    (:func:`_padded_slots`), which saves a padded table of the lengths: the same ``reach``,
    bitwise (a maximum, exact in any order; padding and massless slots count 0 in both).
    ``table`` and ``slot`` may be int32 (a compact graph's); the measure's table is int64.

    The work runs on about ``block`` table entries at a time (rows of nodes; edges for the
    reach), so its temporaries stay small beside the table: every row's values are computed
    from that row alone, the same floats in any chunking."""
    n, width = table.shape
    rows = max(1, block // max(width, 1))
    if n <= rows:
        mass, has = neighbour_measures(table, activity)
    else:
        first, first_has = neighbour_measures(table[:rows], activity)
        mass = torch.empty((n, width), dtype=first.dtype, device=first.device)
        has = torch.empty(n, dtype=torch.bool, device=first.device)
        mass[:rows], has[:rows] = first, first_has
        for r in range(rows, n, rows):
            mass[r:r + rows], has[r:r + rows] = neighbour_measures(table[r:r + rows], activity)
    if lengths is None:
        reach = torch.full_like(has, math.inf, dtype=mass.dtype)
    elif slot is not None:
        reach = torch.zeros(has.shape, dtype=mass.dtype, device=mass.device)
        if slot.numel() and width:
            flat = mass.view(-1)
            for e in range(0, slot.numel(), block):
                part = slot[e:e + block]
                kept = torch.where(flat.index_select(0, part) > 0, lengths[e:e + block], 0.0)
                node = torch.div(part, width, rounding_mode="floor").long()
                reach.scatter_reduce_(0, node, kept, reduce="amax")
    elif width:
        reach = torch.cat([torch.where(mass[r:r + rows] > 0, lengths[r:r + rows], 0.0).amax(1)
                           for r in range(0, n, rows)]) if n else mass.new_zeros(0)
    else:
        reach = torch.zeros_like(has, dtype=mass.dtype)
    return _support_first(table, mass, has, reach, block=block)


def _support_first(table: torch.Tensor, mass: torch.Tensor, has: torch.Tensor,
                   reach: torch.Tensor, cut: torch.Tensor | None = None, *,
                   block: int = 1 << 20) -> _Measure:
    """Each row's slots with mass first, in their order (a stable sort), cut to the widest
    support; ``block`` entries at a time (rows: each row sorted on its own)."""
    n, slots = mass.shape
    width = int((mass > 0).sum(dim=1).max()) if mass.numel() else 0
    rows = max(1, block // max(slots, 1))
    out_table = torch.empty((n, width), dtype=torch.long, device=table.device)
    out_mass = torch.empty((n, width), dtype=mass.dtype, device=mass.device)
    for r in range(0, n, rows):
        part = mass[r:r + rows]
        order = torch.argsort((part <= 0).to(torch.int8), dim=1, stable=True)[:, :width]
        out_table[r:r + rows] = table[r:r + rows].gather(1, order)
        out_mass[r:r + rows] = part.gather(1, order)
    return _Measure(out_table, out_mass, has, reach, cut)


def cut_measures(mu: _Measure | None, nu: _Measure | None, src: torch.Tensor,
                 dst: torch.Tensor, d: torch.Tensor, tol: float
                 ) -> tuple[_Measure | None, _Measure | None]:
    r"""Drop the negligible masses of the measures of edges ``src -> dst`` (distance ``d``),
    moving every edge's curvature by at most ``tol / 2``.

    Neighbour weights :math:`\exp(-1/a^2)` span hundreds of orders of magnitude, so most of a
    support often carries less mass than the rounding of the rest. Cutting mass
    :math:`\epsilon_p` from ``p`` and :math:`\epsilon_q` from ``q`` (the rest rescaled to 1)
    changes :math:`\kappa` by at most :math:`(\epsilon_p + \epsilon_q) M / d`, where ``M``
    bounds every ground cost of the edge's problem: optimal potentials can be taken
    c-concave, so they vary by at most ``M`` over a side, and the change of the masses sums to
    zero on each side. With :math:`M \le L_p + d + L_q` (the path ``k -> i -> j -> m``;
    ``L`` the nodes' ``reach``), each node's cut is chosen from its shortest edge in ``d`` and
    the longest reach of the other side so that every edge stays within ``tol / 2``. The
    smallest masses are cut first; the largest always stays.

    Nodes whose neighbour parts are equal (table and masses: in a dense layer every node's
    are) are cut with the smallest of their budgets (:func:`_shared_budget`), so they stay
    equal after the cut and their edges still share one transport problem
    (:func:`~curvprune.transport.bound_edges` solves one per distinct pair of measures;
    cut apart by their own budgets, a full-width ``convnext_tiny`` layer's 768 edges needed
    314 of them instead of 1). Each node then loses at most its own budget, so the bound
    above holds unchanged.
    """
    if tol <= 0 or src.numel() == 0:
        return mu, nu
    if mu is not None:
        other = float(nu.reach.max()) if nu is not None and nu.reach.numel() else 0.0
        mu = _cut(mu, _shared_budget(mu, _cut_budget(mu, src, d, other, tol)))
    if nu is not None:
        other = float(mu.reach.max()) if mu is not None and mu.reach.numel() else 0.0
        nu = _cut(nu, _shared_budget(nu, _cut_budget(nu, dst, d, other, tol)))
    return mu, nu


def _cut_budget(measure: _Measure, nodes: torch.Tensor, d: torch.Tensor, other: float,
                tol: float) -> torch.Tensor:
    """Mass each node may lose: ``eps ((reach + other) / d_min + 1) <= tol / 4``."""
    d_min = torch.full_like(measure.reach, math.inf).scatter_reduce_(0, nodes, d, reduce="amin")
    budget = (tol / 4) / ((measure.reach + other) / d_min + 1.0)
    return torch.nan_to_num(budget, nan=0.0)


def _shared_budget(measure: _Measure, budget: torch.Tensor, *, block: int = 1 << 20
                   ) -> torch.Tensor:
    """``budget`` lowered, for every node, to the smallest budget among the nodes whose
    neighbour part (table row and masses) equals its own, so that :func:`_cut` cuts equal
    parts alike.

    Equal parts are found without sorting rows: nodes are first grouped by their first slot
    (neighbour and mass), then each node of a group of several is compared with the group's
    first node, about ``block`` entries at a time. A node that differs from it keeps its own
    budget even if it equals another node of the group: only sharing is lost, never the
    bound (each node's budget can only go down)."""
    n, width = measure.mass.shape
    if n < 2 or width == 0:
        return budget
    head = torch.stack([measure.table[:, 0].to(torch.float64), measure.mass[:, 0]], 1)
    _, group, count = torch.unique(head, dim=0, return_inverse=True, return_counts=True)
    several = torch.nonzero(count[group] > 1).squeeze(1)
    if several.numel() == 0:
        return budget
    first = torch.full((count.numel(),), n, dtype=torch.long, device=budget.device)
    first.scatter_reduce_(0, group, torch.arange(n, device=budget.device), reduce="amin")
    owner = torch.arange(n, device=budget.device)  # the node whose budget this one takes
    for part in several.split(max(1, block // width)):
        rep = first[group[part]]
        equal = (measure.table[part] == measure.table[rep]).all(1) & (
            measure.mass[part] == measure.mass[rep]).all(1)
        owner[part] = torch.where(equal, rep, part)
    lowest = torch.full_like(budget, math.inf).scatter_reduce_(0, owner, budget, reduce="amin")
    return lowest[owner]


def _cut(measure: _Measure, budget: torch.Tensor, *, block: int = 1 << 20) -> _Measure:
    """Zero each node's smallest masses while their sum stays within its budget; rescale.
    About ``block`` entries (a block of rows) at a time: each row is cut on its own."""
    mass = measure.mass
    n, width = mass.shape
    if width == 0:
        return measure
    rows = max(1, block // width)
    cut = torch.empty((n, width), dtype=torch.bool, device=mass.device)
    position = torch.arange(width, device=mass.device)[None, :]
    for r in range(0, n, rows):
        part = mass[r:r + rows]
        ascending, order = torch.sort(torch.where(part > 0, part, math.inf), dim=1)
        finite = torch.isfinite(ascending)
        dropped = torch.cumsum(torch.where(finite, ascending, 0.0), dim=1)
        cut_sorted = finite & (dropped <= budget[r:r + rows, None])
        # The largest mass always stays (a budget of 1 or more would otherwise empty it).
        cut_sorted &= position != finite.sum(1, keepdim=True) - 1
        cut[r:r + rows] = torch.zeros_like(cut_sorted).scatter_(1, order, cut_sorted)
    if not cut.any():
        return measure
    kept = torch.empty_like(mass)
    for r in range(0, n, rows):
        part = torch.where(cut[r:r + rows], 0.0, mass[r:r + rows])
        total = part.sum(1, keepdim=True)
        kept[r:r + rows] = torch.where(total > 0, part / torch.where(total > 0, total, 1.0), 0.0)
    return _support_first(measure.table, kept, measure.has, measure.reach, cut.any(1),
                          block=block)


def cut_error(mu: _Measure | None, nu: _Measure | None, src: torch.Tensor, dst: torch.Tensor,
              dead: torch.Tensor, cut_tol: float) -> torch.Tensor:
    """Per edge, a bound on how far :func:`cut_measures` (run with ``cut_tol``) moved kappa:
    ``cut_tol / 2`` for a live edge one of whose measures lost mass, else 0 (float64 ``[E]``).
    """
    touched = torch.zeros_like(dead)
    if mu is not None and mu.cut is not None:
        touched |= mu.cut[src] & mu.has[src]
    if nu is not None and nu.cut is not None:
        touched |= nu.cut[dst] & nu.has[dst]
    touched &= ~dead
    return touched.to(torch.float64) * (cut_tol / 2)

