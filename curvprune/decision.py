r"""Decision-exact pruning: the pruned set that exact curvature gives, from curvature intervals.

A pruning call keeps the first :math:`n` entries of a ranking within each *group* of candidate
entries (one group over every target weight for ``scope="global"``, one per weight for
``scope="layer"`` or an allocation budget). With :math:`\kappa` known only up to certified
intervals :math:`[lo_w, hi_w]` (:attr:`CurvatureResult.kappa_lo
<curvprune.result.CurvatureResult.kappa_lo>`), every weight has an interval of sort keys
:math:`[a_w, b_w]` (pruned first = smaller key: :math:`-\kappa` for order
``"positive_first"``, :math:`\kappa` for ``"negative_first"``; zero weights :math:`-\infty`
and dead weights :math:`\mp 2`, both exact). Let :math:`P` be the entries the midpoints prune
in a group and :math:`K` the candidates they keep. The decision is the exact one if no pair
:math:`i \in P, j \in K` can swap, i.e. :math:`a_j > b_i` for every pair where one of the two
is not exact (two exact entries are ordered by their exact values and the usual tie-breaks, as
in an exact run).
With :math:`B = \max_P b` and :math:`A = \min_K a`, a pair that can swap has an inexact
:math:`i \in P` with :math:`b_i \ge A` or an inexact :math:`j \in K` with :math:`a_j \le B`:
those are the *straddling* entries. :func:`decide_exactly` solves them exactly
(:meth:`CurvatureResult.refine <curvprune.result.CurvatureResult.refine>`), decides again and
repeats until none is left; every round makes at least one more entry exact, so it ends, and
then the pruned set is the one that exact curvature (``tolerance=0``) gives.

Values the scoring run found exactly (``kappa_lo == kappa_hi``) were computed along another
path than a ``tolerance=0`` run (tables shaped by the measures' cut) and may differ from it in
the last few ulps; so that near-ties between them are broken as that run breaks them, they count
as exact only after :meth:`~curvprune.result.CurvatureResult.refine` (before, their keys are
widened by :data:`ROUNDING`, 64 ulps relative), except the constant 1 that the engine assigns
to dead edges on every path. (A 0 is no such constant: two point masses give exactly 0, but the
mass cut can make a point mass of a measure that an exact run keeps whole, and its solve then
gives a rounded value such as ``-2.2e-16``; found by the hypothesis test below.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import check_order
from .result import CurvatureResult

__all__ = ["sort_key_bounds", "straddling", "decide_exactly"]

#: ``decide(result) -> (pruned, groups)``: per weight name, the bool mask of the entries the
#: result's midpoints prune, and the groups of candidate entries (each ``{name: bool mask}``).
Decide = Callable[[CurvatureResult], tuple[dict[str, torch.Tensor],
                                           list[dict[str, torch.Tensor]]]]


#: Relative margin for values the scoring run computed exactly (``kappa_lo == kappa_hi``) but
#: along another path than a ``tolerance=0`` run (cut-shaped tables): they may differ from it by
#: a few ulps, so two of them closer than this are refined too (64 ulps).
ROUNDING = 64 * 2.0 ** -52


def sort_key_bounds(result: CurvatureResult, order: str,
                    refined: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weight, bounds ``(a, b)`` on its sort key under exact curvature (smaller key =
    pruned first; see the module docstring). ``a == b`` where the key is exact.

    With ``refined`` (the entries solved by :meth:`CurvatureResult.refine
    <curvprune.result.CurvatureResult.refine>`), every other live entry is widened by
    :data:`ROUNDING` (relative), so that only zero, dead and refined entries, and the constant
    1 (a dead edge), count as exact."""
    order = check_order(order)
    out = {}
    for name, lo in result.kappa_lo.items():
        hi, live = result.kappa_hi[name], result.live[name]
        two = torch.full_like(lo, 2.0)
        zero = torch.isinf(result.kappa[name])
        value_lo = torch.where(live, lo, two)
        value_hi = torch.where(live, hi, two)
        if order == "positive_first":
            a, b = -value_hi, -value_lo
        else:
            a, b = value_lo, value_hi
        if refined is not None:
            # 1 (a dead edge) is a constant on every path: exact. 0 is not (module docstring).
            constant = (lo == hi) & (lo == 1)
            loose = live & ~zero & ~constant & ~refined[name].to(lo.device)
            pad = ROUNDING * torch.maximum(torch.maximum(a.abs(), b.abs()),
                                           torch.ones_like(a))
            a, b = torch.where(loose, a - pad, a), torch.where(loose, b + pad, b)
        first = torch.full_like(lo, -torch.inf)
        out[name] = (torch.where(zero, first, a), torch.where(zero, first, b))
    return out


def straddling(result: CurvatureResult, order: str, pruned: dict[str, torch.Tensor],
               groups: list[dict[str, torch.Tensor]],
               refined: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The inexact entries whose interval lets exact curvature move them across the pruning
    boundary of their group (module docstring); empty masks when the decision is exact.
    ``refined``: as for :func:`sort_key_bounds`."""
    order = check_order(order)
    keys = sort_key_bounds(result, order, refined)
    out = {name: torch.zeros_like(k[0], dtype=torch.bool) for name, k in keys.items()}
    for group in groups:
        last_pruned = -torch.inf  # B = max over P of b
        first_kept = torch.inf  # A = min over K of a
        for name, candidates in group.items():
            a, b = keys[name]
            p = candidates & pruned[name]
            k = candidates & ~pruned[name]
            if p.any():
                last_pruned = max(last_pruned, float(b[p].max()))
            if k.any():
                first_kept = min(first_kept, float(a[k].min()))
        for name, candidates in group.items():
            a, b = keys[name]
            inexact = a < b
            p = candidates & pruned[name]
            k = candidates & ~pruned[name]
            out[name] |= inexact & ((p & (b >= first_kept)) | (k & (a <= last_pruned)))
    return out


def decide_exactly(result: CurvatureResult, order: str, decide: Decide
                   ) -> tuple[dict[str, torch.Tensor], int, int]:
    """Refine ``result`` until the decision of ``decide`` is the exact one.

    Returns ``(pruned, refined, rounds)``: the certified pruned masks, the number of weights
    solved exactly and the number of refinement rounds.
    """
    order = check_order(order)
    done = {n: torch.zeros_like(k, dtype=torch.bool) for n, k in result.kappa.items()}
    refined = rounds = 0
    while True:
        pruned, groups = decide(result)
        need = straddling(result, order, pruned, groups, done)
        need = {n: m & ~done[n] for n, m in need.items() if (m & ~done[n]).any()}
        if not need:
            return pruned, refined, rounds
        # Refined entries are exact (a == b), so every round solves new entries: it ends.
        refined += result.refine(need, force=True)
        for n, m in need.items():
            done[n] |= m
        rounds += 1
