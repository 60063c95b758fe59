"""Pruning a model by its scores, one room per concern; this package re-exports the unstructured
method and the pruned-model life cycle.

- :mod:`curvprune.pruning.unstructured`: the :class:`CurvaturePruning` method and
  :func:`prune_model` (score, prune, report in one call);
- :mod:`curvprune.pruning.lifecycle`: a pruned model's hooks, :func:`make_permanent`,
  :func:`save_pruned`, :func:`load_pruned` and :func:`clone_pruned`;
- :mod:`curvprune.pruning.reports`: :class:`PruningReport` and :class:`LayerSparsity`;
- :mod:`curvprune.pruning.allocation` (per-layer amounts from another criterion),
  :mod:`curvprune.pruning.baselines` (the criteria curvature is compared with) and
  :mod:`curvprune.pruning.structured` (channel pruning through Torch-Pruning), imported by
  their module paths.
"""

from __future__ import annotations

from ..curvature import neural_curvature  # noqa: F401  (kept: curvprune.pruning.neural_curvature)
from .lifecycle import clone_pruned, load_pruned, make_permanent, pruning_hooks, save_pruned
from .reports import LayerSparsity, PruningReport
from .unstructured import CurvaturePruning, curvature_unstructured, prune_model

__all__ = [
    "CurvaturePruning",
    "curvature_unstructured",
    "prune_model",
    "PruningReport",
    "LayerSparsity",
    "pruning_hooks",
    "make_permanent",
    "save_pruned",
    "load_pruned",
    "clone_pruned",
]
