r"""Layer allocation: rank weights within each layer by one criterion, across layers by another.

A global ranking does two things at once: it decides how much of each layer goes (the
*allocation*) and which weights of a layer go first (the *order*). On LeNet-5 curvature's order
within a layer is good but its allocation is not: it prunes the small early layers about as hard
as magnitude does, where Wanda's input-norm factor protects them (``docs/benchmarks.md``,
"Layer allocation"). :func:`allocate_like` combines the two: the order of one score set with the
per-layer amounts of another.

For every scored tensor :math:`l` with :math:`n_l` entries, let :math:`\pi_l` be the stable
ascending order of the ``order`` scores :math:`s_l` (the entry pruned first is
:math:`\pi_l(1)`) and :math:`b_l^{(1)} \le \dots \le b_l^{(n_l)}` the sorted ``budget`` scores of
the same tensor. The result is

.. math::

    s'_l[\pi_l(r)] = b_l^{(r)}, \qquad r = 1, \dots, n_l .

Each tensor keeps the multiset of its budget scores, so a global threshold on :math:`s'`
(:func:`torch.nn.utils.prune.global_unstructured` at any amount) removes from every tensor as many
entries as the same threshold on the budget scores would, and within the tensor it removes them in
the order of :math:`s`. (Where budget scores tie across tensors, PyTorch's top-k picks among the
tied entries, exactly as it would for the budget scores themselves.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .result import ImportanceScores

__all__ = ["allocate_like"]


def allocate_like(order: Mapping, budget: Mapping) -> ImportanceScores:
    r"""Scores that prune each tensor in the order of ``order``, by the amounts of ``budget``.

    Args:
        order: importance scores (higher = keep) keyed by ``(module, "weight")``, e.g.
            ``neural_curvature(...).importance_scores("pos")``. Ties are broken by the flat
            (row-major) index, lower index pruned first.
        budget: importance scores with the same keys and shapes, e.g.
            :func:`curvprune.baselines.wanda_scores`; only their per-tensor distribution is used.

    Returns:
        :class:`~curvprune.result.ImportanceScores` with the same keys: :math:`s'_l[\pi_l(r)] =
        b_l^{(r)}` (module docstring), in ``budget``'s dtype and on its device.

    Raises:
        ValueError: the keys or the shapes of the two mappings differ, or a score is NaN.
        TypeError: a score is not a tensor.

    Example::

        result = neural_curvature(model, calibration)
        scores = allocate_like(result.importance_scores(), wanda_scores(model, calibration))
        prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                                  importance_scores=scores, amount=0.8)
    """
    if set(order) != set(budget):
        only_order = [_name(order, k) for k in order if k not in budget]
        only_budget = [_name(budget, k) for k in budget if k not in order]
        raise ValueError(
            "order and budget must score the same parameters; only in order: "
            f"{only_order}, only in budget: {only_budget}."
        )
    out, names = {}, {}
    for key in order:
        s, b = order[key], budget[key]
        for what, t in (("order", s), ("budget", b)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"the {what} score of {_name(order, key)!r} must be a tensor, "
                                f"not {type(t).__name__}.")
            if torch.isnan(t).any():
                raise ValueError(f"the {what} score of {_name(order, key)!r} has NaN entries.")
        if s.shape != b.shape:
            raise ValueError(
                f"the order score of {_name(order, key)!r} has shape {tuple(s.shape)} but the "
                f"budget score has shape {tuple(b.shape)}; score the same model with both."
            )
        pi = torch.argsort(s.detach().reshape(-1).to(b.device), stable=True)
        sorted_budget = torch.sort(b.detach().reshape(-1), stable=True).values
        combined = torch.empty_like(sorted_budget)
        combined[pi] = sorted_budget
        out[key] = combined.view(b.shape)
        names[key] = _name(order, key, fallback=_name(budget, key))
    return ImportanceScores(out, names=names)


def _name(scores: Mapping, key, fallback: str | None = None) -> str:
    """The qualified parameter name an :class:`ImportanceScores` knows for ``key``."""
    if isinstance(scores, ImportanceScores) and key in scores.names:
        return scores.names[key]
    return fallback if fallback is not None else repr(key)
