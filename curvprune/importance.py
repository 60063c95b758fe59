r"""``CurvatureImportance``: channel curvature as a Torch-Pruning importance.

Structured pruning removes whole channels. Each channel is a node of the channel graph
(:mod:`curvprune.graphs.channel`), and its curvature combines the curvature of its incident
Conv2d/Linear edges (in and out):

.. math::

    \kappa(v) = \frac{1}{|E(v)|} \sum_{e \in E(v)} \kappa(e)
    \quad(\text{or } \min_{e \in E(v)} \kappa(e) \text{ with } \texttt{reduction="min"}),

where :math:`\kappa(e)` is the edge's minimum over the calibration examples (dead edges count 1).
Negative curvature marks a bottleneck, so a channel's importance is :math:`2 - \kappa(v)`:
positive (live curvature is below 2, see ``docs/method.md``), larger for more negative
curvature, 1 for a channel whose edges are all dead. Torch-Pruning prunes the least important
channels of each group first.

A Torch-Pruning group couples channels of several layers (a conv's output channels, the next
layer's input channels, a residual stream's producers and readers). Each coupled layer gives
the importance of its own channel node (the output node for ``prune_out_channels``; the node(s)
feeding the input channel for ``prune_in_channels``); they are combined with the group reduction
and normaliser of Torch-Pruning's own :class:`~torch_pruning.importance.GroupMagnitudeImportance`
(``group_reduction="mean"``, ``normalizer="mean"`` by default).

Curvature is computed on the calibration data given to the constructor, once per state of the
model: the first group of a ``pruner.step()`` triggers it, and any change of the parameters
(pruned shapes, new values) triggers it again, so every step of an iterative schedule sees the
current model.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch_pruning as tp

from ._checks import REDUCTIONS, check_alpha, check_channel_result, check_choice
from .calibration import check_model
from .curvature import TOLERANCE, check_tolerance, neural_curvature
from .errors import UntraceableModel
from .result import CurvatureResult

__all__ = ["CurvatureImportance"]

_OUT = {tp.prune_conv_out_channels, tp.prune_linear_out_channels}
_IN = {tp.prune_conv_in_channels, tp.prune_linear_in_channels}


class CurvatureImportance(tp.importance.GroupMagnitudeImportance):
    r"""Channel importance from neural curvature, for Torch-Pruning pruners.

    Args:
        calibration: a tensor batch, an ``(inputs, targets)`` pair or an iterable of batches (a
            ``DataLoader``), as for :func:`~curvprune.neural_curvature`.
        alpha: idleness of the measures (``kappa`` does not depend on it for
            :math:`\alpha \ge 1/2`).
        reduction: how a channel combines its incident edges' curvature: ``"mean"`` or ``"min"``.
        group_reduction: Torch-Pruning's reduction over the coupled layers of a group
            (``"mean"``, ``"sum"``, ``"max"``, ``"prod"``, ``"first"``...).
        normalizer: Torch-Pruning's normaliser of a group's scores (``"mean"``, ``"max"``,
            ``"sum"``, ``"standarization"``, ``None``...).
        device, progress, threads, memory_budget, tolerance: passed unchanged to
            :func:`~curvprune.neural_curvature`.
        fallback: ``"magnitude"`` (default): a model the channel tracer cannot follow is scored
            by the group L2 magnitude (Torch-Pruning's ``GroupMagnitudeImportance(p=2)``) and a
            warning names it and the functions that stopped the tracer; ``"error"`` raises
            :class:`~curvprune.errors.UntraceableModel` instead.
        result: a channel-granularity :class:`~curvprune.CurvatureResult` computed before, to
            use instead of scoring (pass ``calibration=None``): it is bound to the pruned model
            by parameter name (:meth:`~curvprune.CurvatureResult.bind`), so it may come from a
            copy of it. It scores one state of the model: a model pruned since (the second
            step of an iterative schedule) is refused with a ``ValueError``, as there is no
            calibration to rescore it.

    Example::

        imp = curvprune.CurvatureImportance(calibration_images)
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp,
                                      pruning_ratio=0.3, ignored_layers=[model.fc])
        pruner.step()

    Attributes:
        result: the last :class:`~curvprune.CurvatureResult` (``None`` before the first call or
            after a fallback).
        fell_back: whether the last scoring used the magnitude fallback.
    """

    def __init__(self, calibration, *, alpha: float = 0.9, reduction: str = "mean",
                 group_reduction: str = "mean", normalizer: str | None = "mean",
                 device=None, threads: int | None = None, memory_budget: int | None = None,
                 fallback: str = "magnitude", progress: bool = False,
                 tolerance: float = TOLERANCE, result: CurvatureResult | None = None):
        super().__init__(p=2, group_reduction=group_reduction, normalizer=normalizer)
        check_choice(reduction, "reduction", REDUCTIONS)
        if fallback not in ("magnitude", "error"):
            raise ValueError(f"fallback must be 'magnitude' or 'error', not {fallback!r}.")
        if result is not None:
            check_channel_result(result)
            if calibration is not None:
                raise ValueError("pass calibration (to score the model) or result= (scores "
                                 "computed before), not both.")
        elif calibration is None:
            raise ValueError("CurvatureImportance needs calibration data (a tensor or a "
                             "DataLoader), or result= a channel CurvatureResult.")
        self.calibration = calibration
        self.precomputed = result
        self.progress = progress
        self.tolerance = check_tolerance(tolerance)  # refused here too
        self.alpha = check_alpha(alpha)  # refused here, not at the first pruner.step()
        self.reduction = reduction
        self.device = device
        self.threads = threads
        self.memory_budget = memory_budget
        self.fallback = fallback
        self.result = None
        self.fell_back = False
        self._key = None
        self._node_importance: torch.Tensor | None = None
        self._layers: dict[int, int] = {}

    # ------------------------------------------------------------------------------------

    @staticmethod
    def _state(model: nn.Module) -> tuple:
        return tuple((name, tuple(p.shape), p._version, p.data_ptr())
                     for name, p in model.named_parameters())

    def _refresh(self, model: nn.Module) -> None:
        key = (id(model), self._state(model))
        if key == self._key:
            return
        if self.precomputed is not None:
            if self._key is not None and self._key[0] == key[0]:
                raise ValueError(
                    "CurvatureImportance(result=...) scores one state of the model, and the "
                    "model has changed since (an earlier pruning step); pass calibration data "
                    "to rescore every step (iterative_steps > 1)."
                )
            check_model(model)
            self._use(self.precomputed.bind(model), key)
            return
        try:
            result = neural_curvature(model, self.calibration, alpha=self.alpha,
                                      granularity="channel", device=self.device,
                                      progress=self.progress, tolerance=self.tolerance,
                                      threads=self.threads, memory_budget=self.memory_budget)
        except UntraceableModel as exc:
            if self.fallback == "error":
                raise
            warnings.warn(
                f"CurvatureImportance: {type(model).__name__} cannot be traced at channel level "
                f"({exc}); its channels are ranked by group L2 magnitude instead.",
                stacklevel=3,
            )
            self.result, self.fell_back, self._node_importance = None, True, None
            self._key = key
            return
        self._use(result, key)

    def _use(self, result: CurvatureResult, key: tuple) -> None:
        """Take the channel importances of ``result`` for the model state ``key``."""
        graph = result.channel_graph
        node_kappa = result.node_kappa(self.reduction)
        self._node_importance = (2.0 - node_kappa).to(torch.float32)
        self._layers = {id(module): k for k, (_, module) in enumerate(graph.modules)}
        self.result, self.fell_back = result, False
        self._key = key

    def _channel_importance(self, module: nn.Module, handler, idxs) -> torch.Tensor | None:
        k = self._layers.get(id(module))
        if k is None:
            return None
        graph = self.result.channel_graph
        scores = self._node_importance
        idx = torch.as_tensor(idxs, dtype=torch.long, device=scores.device)
        if handler in _OUT:
            return scores[graph.module_outputs[k] + idx]
        if handler in _IN:
            nodes, channels = graph.module_inputs[k]
            width = module.weight.shape[1] * getattr(module, "groups", 1)  # Conv1d/2d groups
            total = torch.zeros(width, dtype=torch.float32, device=scores.device)
            count = torch.zeros(width, dtype=torch.float32, device=scores.device)
            value = scores[nodes]
            ok = ~torch.isnan(value)
            total.index_add_(0, channels[ok], value[ok])
            count.index_add_(0, channels[ok], torch.ones_like(value[ok]))
            per_channel = torch.where(count > 0, total / count.clamp(min=1), math.nan)
            return per_channel[idx]
        return None

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        model = group._DG.model
        self._refresh(model)
        if self.fell_back:
            return super().__call__(group)
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            value = self._channel_importance(dep.target.module, dep.handler, idxs)
            if value is None or torch.isnan(value).any():
                continue
            group_imp.append(value)
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        reduced = self._reduce(group_imp, group_idxs)
        return self._normalize(reduced, self.normalizer)
