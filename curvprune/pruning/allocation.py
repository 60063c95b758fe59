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
import torch.nn as nn

from ..result import ImportanceScores

__all__ = ["allocate_like"]


def allocate_like(order: Mapping, budget: Mapping) -> ImportanceScores:
    r"""Scores that prune each tensor in the order of ``order``, by the amounts of ``budget``.

    Args:
        order: importance scores (higher = keep) keyed by ``(module, "weight")``, e.g.
            ``neural_curvature(...).importance_scores("positive_first")``. Ties are broken by
            the flat (row-major) index, lower index pruned first.
        budget: importance scores with the same keys and shapes, e.g.
            :func:`curvprune.baselines.wanda_scores`; only their per-tensor distribution is used.

    Returns:
        :class:`~curvprune.result.ImportanceScores` with the same keys: :math:`s'_l[\pi_l(r)] =
        b_l^{(r)}` (module docstring), in ``budget``'s dtype and on its device.

    Raises:
        ValueError: the two mappings score different parameters, or a score has another shape
            or device than its parameter, or a NaN.
        TypeError: a key is not a ``(module, parameter name)`` pair, or a score is not a tensor.

    Example::

        result = neural_curvature(model, calibration)
        scores = allocate_like(result.importance_scores(), wanda_scores(model, calibration))
        prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                                  importance_scores=scores, amount=0.8)
    """
    order, budget = ImportanceScores(order), ImportanceScores(budget)
    if set(order) != set(budget):
        only_order = [order.names.get(k, order._label(k)) for k in order if k not in budget]
        only_budget = [budget.names.get(k, budget._label(k)) for k in budget if k not in order]
        raise ValueError(
            "order and budget must score the same parameters; only in order: "
            f"{only_order}, only in budget: {only_budget}."
        )
    out = {}
    for key in order:
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], nn.Module)
                and isinstance(getattr(key[0], str(key[1]), None), torch.Tensor)):
            raise TypeError(f"scores must be keyed by (module, parameter name), as "
                            f"torch.nn.utils.prune takes them; got the key {key!r}.")
        # .get checks each score against its parameter: a tensor of the parameter's shape and
        # device, without NaN; so the two scores of a key also have one shape
        s, b = order.get(key), budget.get(key)
        pi = torch.argsort(s.detach().reshape(-1), stable=True)
        sorted_budget = torch.sort(b.detach().reshape(-1), stable=True).values
        combined = torch.empty_like(sorted_budget)
        combined[pi] = sorted_budget
        out[key] = combined.view(b.shape)
    return ImportanceScores(out, names={**budget.names, **order.names})
