r"""Named unstructured criteria: the paper's curvature ranking and curvature times Wanda.

``prune_model(..., criterion=...)`` (and ``curvprune prune --criterion``) picks one:

* ``"curvature"`` (the default, the paper's criterion): zero weights, then dead weights, then
  live weights from the most positive :math:`\kappa` down
  (:meth:`curvprune.result.CurvatureResult.importance_scores`).
* ``"curvature_wanda"``: keep the weights with the largest

  .. math::

      s(w_{ij}) = (2 - \kappa_{ij}) \, |w_{ij}| \, \lVert X_j \rVert_2 ,

  where :math:`|w_{ij}| \lVert X_j \rVert_2` is Wanda's score (Sun et al., 2023; the input
  feature's L2 norm over the calibration set, :func:`curvprune.baselines.wanda_scores`) and
  :math:`\kappa_{ij}` is the paper's value of the weight (:meth:`CurvatureResult.rank_values
  <curvprune.result.CurvatureResult.rank_values>`: the minimum curvature over positions and
  examples, 2 for a weight with no live edge).

Why this form. Wanda's :math:`|w_{ij}| \lVert X_j \rVert_2` is the size of the signal the weight
carries (the first-order change of its output unit when the weight goes); curvature says how
well the network can route around the edge: with :math:`d = 1/|w|` and :math:`\alpha \ge 1/2`,
:math:`\kappa = 1 - X/d` where :math:`X` is the transport cost between the two neighbourhoods
(``docs/method.md``), so :math:`2 - \kappa = 1 + X |w| > 0` on every live edge (:math:`X > -d`)
grows with how far apart the neighbourhoods are relative to the edge (a bottleneck: negative
curvature) and shrinks where a short detour exists (positive curvature). The factor is the
simplest map of :math:`\kappa` that is positive and decreasing on every live value and 0 at the
dead value 2, so dead weights go first without a separate rule, as in the paper; it is the
``2 - kappa`` of :class:`~curvprune.structured.CurvatureImportance`. The product ranks by
:math:`\log |w| + \log \lVert X_j \rVert + \log(2 - \kappa)`: equal weights, no tuned exponent.
Measured in ``docs/benchmarks.md`` ("The quality study").

Ties (dead and zero weights all score 0) go to the smaller :math:`|w|`, then to position, as in
the paper's ranking; the scores returned are the ranks (float64, distinct, higher = keep).

Decision-exact pruning (:mod:`curvprune.decision`) carries over: :math:`s` is decreasing in
:math:`\kappa` (the Wanda factor is non-negative), so a certified interval
:math:`[lo, hi] \ni \kappa` gives :math:`[(2 - hi) b, (2 - lo) b] \ni s`, and the weights whose
score interval straddles the pruning boundary are solved exactly until none does
(:func:`decide_combined_exactly`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..decision import kappa_bounds, refine_until_exact
from ..result import CurvatureResult, ImportanceScores

__all__ = ["CRITERIA", "curvature_wanda_values", "curvature_wanda_scores",
           "decide_combined_exactly"]

#: The names ``prune_model(criterion=...)`` accepts.
CRITERIA = ("curvature", "curvature_wanda")


def _wanda_by_name(model: nn.Module, calibration: Any, result: CurvatureResult
                   ) -> dict[str, torch.Tensor]:
    from .baselines import wanda_scores

    names = list(result.kappa)
    scores = wanda_scores(model, calibration, [result.modules[n] for n in names])
    return {n: scores[(result.modules[n], "weight")].detach().to(torch.float64)
            .to(result.kappa[n].device) for n in names}


def curvature_wanda_values(result: CurvatureResult, wanda: Mapping[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    r""":math:`(2 - \kappa) \, b` per weight (float64), with :math:`\kappa` the rank value of
    ``result`` (2 for a dead weight) and ``b`` Wanda's score by parameter name; 0 for a zero
    weight."""
    values = result.rank_values()
    return {n: torch.where(torch.isinf(v), torch.zeros_like(v),
                           (2.0 - v) * wanda[n].to(v.device, torch.float64))
            for n, v in values.items()}


def _ranks(result: CurvatureResult, values: Mapping[str, torch.Tensor]) -> ImportanceScores:
    """Ranks of ``values`` (smallest = 0, pruned first; ties as
    :meth:`CurvatureResult.rank_by <curvprune.result.CurvatureResult.rank_by>` breaks them) as
    float64 scores keyed by ``(module, "weight")``."""
    ranks = result.rank_by(dict(values))
    return ImportanceScores(
        {(result.modules[n], "weight"): r.to(torch.float64) for n, r in ranks.items()},
        names={(result.modules[n], "weight"): n for n in ranks})


def curvature_wanda_ranks(result: CurvatureResult, wanda: Mapping[str, torch.Tensor]
                          ) -> ImportanceScores:
    """The scores of :func:`curvature_wanda_scores` from a result and Wanda's scores by name."""
    return _ranks(result, curvature_wanda_values(result, wanda))


def curvature_wanda_scores(model: nn.Module, calibration: Any,
                           result: CurvatureResult | None = None, **curvature_kwargs: Any
                           ) -> ImportanceScores:
    r"""Importance scores of the ``"curvature_wanda"`` criterion (module docstring):
    :math:`(2 - \kappa)\,|w|\,\lVert X_j \rVert_2`, as ranks (higher = keep) for
    :func:`torch.nn.utils.prune.global_unstructured` with :class:`~curvprune.CurvaturePruning`.

    Args:
        model: the model (left exactly as found).
        calibration: the calibration set, for Wanda's input norms (and for the curvature when
            ``result`` is not given).
        result: curvature of ``model`` computed before (bound to it by parameter name); when
            ``None``, ``neural_curvature(model, calibration, **curvature_kwargs)`` is run.
        curvature_kwargs: passed to :func:`~curvprune.curvature.neural_curvature` (only
            without ``result``).

    Raises:
        ValueError: ``curvature_kwargs`` together with ``result``, or a result that does not
            bind to ``model``.
    """
    from ..curvature import neural_curvature

    if result is None:
        result = neural_curvature(model, calibration, **curvature_kwargs)
    elif curvature_kwargs:
        raise ValueError(
            f"curvature options {sorted(curvature_kwargs)} are for scoring, and result= was "
            "scored already; drop them or drop result=."
        )
    if not isinstance(result, CurvatureResult):
        raise TypeError(f"result must be a CurvatureResult (from neural_curvature), not "
                        f"{type(result).__name__}.")
    result = result.bind(model)
    return curvature_wanda_ranks(result, _wanda_by_name(model, calibration, result))


def _key_bounds(result: CurvatureResult, wanda: Mapping[str, torch.Tensor],
                refined: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor,
                                                                       torch.Tensor]]:
    """Bounds ``(a, b)`` on each weight's exact score (smaller = pruned first); ``a == b``
    where it is exact. The curvature bounds are :func:`curvprune.decision.kappa_bounds`
    (live values not solved by :meth:`CurvatureResult.refine` widened by
    :data:`curvprune.decision.ROUNDING`); the score :math:`(2 - \\kappa) s` with
    :math:`s \\ge 0` is decreasing in :math:`\\kappa`, so its bounds are the images of theirs."""
    out = {}
    for name, (v_lo, v_hi, zero) in kappa_bounds(result, dict(refined)).items():
        base = wanda[name].to(v_lo.device, torch.float64)
        a, b = (2.0 - v_hi) * base, (2.0 - v_lo) * base
        nil = torch.zeros_like(a)
        out[name] = (torch.where(zero, nil, a), torch.where(zero, nil, b))
    return out


def decide_combined_exactly(
    result: CurvatureResult, wanda: Mapping[str, torch.Tensor],
    decide: Callable[[CurvatureResult], tuple[dict[str, torch.Tensor],
                                              list[dict[str, torch.Tensor]]]],
) -> tuple[dict[str, torch.Tensor], int, int]:
    """:func:`curvprune.decision.decide_exactly` for ``"curvature_wanda"``: refine ``result``
    until no weight's score interval straddles the boundary of ``decide``'s pruned set.

    Returns ``(pruned, refined, rounds)``.
    """
    return refine_until_exact(result, lambda res, done: _key_bounds(res, wanda, done),
                              decide)
