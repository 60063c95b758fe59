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

import torch

__all__ = ["padded_neighbours", "neighbour_measures"]

_TINY = torch.finfo(torch.float64).tiny


def padded_neighbours(keys: torch.Tensor, values: torch.Tensor, n: int,
                      fill: float = -1) -> torch.Tensor:
    """Group ``values`` by ``keys`` into an ``[n, max_degree]`` table padded with ``fill``.

    Values keep their order within a key, so tables of two value arrays over the same keys
    line up slot by slot (neighbours and the lengths of the edges to them)."""
    if keys.numel() == 0:
        return torch.full((n, 0), fill, dtype=values.dtype, device=keys.device)
    order = torch.argsort(keys, stable=True)
    k, v = keys[order], values[order]
    counts = torch.bincount(k, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(k.numel(), device=k.device) - starts[k]
    table = torch.full((n, int(counts.max())), fill, dtype=values.dtype, device=keys.device)
    table[k, position] = v
    return table


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
    valid = neighbours >= 0
    a = torch.where(valid, activity[neighbours.clamp(min=0)], torch.zeros((), dtype=activity.dtype,
                                                                          device=activity.device))
    active = a > 0
    weight = torch.where(active, torch.exp(-1.0 / torch.where(active, a, 1.0) ** 2), 0.0)
    total = weight.sum(dim=1, keepdim=True)
    count = active.sum(dim=1, keepdim=True)
    uniform = active.to(activity.dtype) / count.clamp(min=1).to(activity.dtype)
    proportional = weight / torch.where(total >= _TINY, total, 1.0)
    mass = torch.where(total >= _TINY, proportional, uniform)
    return mass, count.squeeze(1) > 0
