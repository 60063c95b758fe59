r"""``CurvatureImportance``: channel curvature as a Torch-Pruning importance.

Structured pruning removes whole channels. Each channel is a node of the channel graph
(:mod:`curvprune.graphs.channel`), and its curvature combines the curvature of its incident
Conv2d/Linear edges (in and out):

.. math::

    \kappa(v) = \frac{1}{|E(v)|} \sum_{e \in E(v)} \kappa(e)
    \quad(\text{or } \min_{e \in E(v)} \kappa(e) \text{ with } \texttt{reduction="min"}),

or, with ``reduction="weighted"``, the mean weighted by each edge's weight norm
:math:`\lVert W_e \rVert_2 = 1/d(e)`,
:math:`\kappa(v) = \sum_{e \in E(v)} \lVert W_e \rVert \kappa(e)
/ \sum_{e \in E(v)} \lVert W_e \rVert`
(:meth:`CurvatureResult.node_kappa <curvprune.result.CurvatureResult.node_kappa>`),
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

Certified bounds. Scored at a tolerance, every channel edge's curvature is known up to an
interval (:attr:`CurvatureResult.edge_kappa_lo <curvprune.result.CurvatureResult.edge_kappa_lo>`
/ ``edge_kappa_hi``). :meth:`CurvatureImportance.score_bounds` turns edge intervals into bounds
on the group importance it returns: every step above (the mean, min or weighted mean over a
node's edges, the weights being fixed positive norms, :math:`2 - \kappa`, the float32 cast,
the mean over the nodes feeding an input channel,
Torch-Pruning's ``"mean"``, ``"sum"``, ``"max"``, ``"first"`` or ``"gate"`` group reduction) is
nondecreasing in each input (or nonincreasing, for :math:`2 - \kappa`), and a correctly rounded
floating-point operation is monotone in each operand, so the same operations, in the same order,
on the lower and the upper edge values bracket what they give on any values in between. A
normaliser ``"mean"``, ``"sum"`` or ``"max"`` divides by a statistic :math:`m` of the group that
is itself bracketed, :math:`m \in [m_{lo}, m_{hi}]`, and :math:`x / m` is monotone in :math:`x`
and (for :math:`m > 0`) in :math:`m`, so the four corner quotients bracket it. Other reductions
and normalisers (and :math:`m_{lo} \le 0`) get no bound (``-inf``, ``+inf``) unless the two
computations agree bit for bit (all their inputs exact). :func:`~curvprune.prune_channels` uses
the bounds to make its pruned set the exact one (:mod:`curvprune.pruning.channel_decision`).
"""

from __future__ import annotations

import copy
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
        reduction: how a channel combines its incident edges' curvature: ``"mean"`` (default),
            ``"min"``, or ``"weighted"`` (the mean weighted by each edge's weight norm).
        group_reduction: Torch-Pruning's reduction over the coupled layers of a group
            (``"mean"``, ``"sum"``, ``"max"``, ``"prod"``, ``"first"``...).
        normalizer: Torch-Pruning's normaliser of a group's scores (``"mean"``, ``"max"``,
            ``"sum"``, ``"standarization"``, ``None``...).
        device, progress, threads, memory_budget: passed unchanged to
            :func:`~curvprune.neural_curvature`.
        tolerance: the largest width of each channel's curvature interval :math:`\kappa(v)`
            (default 0.01): passed to :func:`~curvprune.neural_curvature` with
            ``node_reduction=reduction``, so the engine stops solving a channel's edges once
            the mean (or weighted mean) of their intervals is that narrow; single edges may be
            wider. ``0`` is exact.
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
        # {(id(root module), handler): (group, returned scores)} while a caller records.
        self._record: dict | None = None
        self._node_bounds: tuple | None = None  # score_bounds' node bounds, per edge bounds

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
                                      threads=self.threads, memory_budget=self.memory_budget,
                                      node_reduction=self.reduction)
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

    def _channel_importance(self, module: nn.Module, handler, idxs,
                            scores: torch.Tensor | None = None) -> torch.Tensor | None:
        k = self._layers.get(id(module))
        if k is None:
            return None
        graph = self.result.channel_graph
        scores = self._node_importance if scores is None else scores
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

    def _reduced(self, group, scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """The group importance before normalisation, from node importances ``scores``."""
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            value = self._channel_importance(dep.target.module, dep.handler, idxs, scores)
            if value is None or torch.isnan(value).any():
                continue
            group_imp.append(value)
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._reduce(group_imp, group_idxs)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        model = group._DG.model
        self._refresh(model)
        if self.fell_back:
            return super().__call__(group)
        reduced = self._reduced(group)
        if reduced is None:
            return None
        out = self._normalize(reduced, self.normalizer)
        if self._record is not None:
            self._record[(id(group[0].dep.target.module), group[0].dep.handler)] = (group, out)
        return out

    # ------------------------------------------------------------------------------------
    # Certified bounds (module docstring)

    def refresh_scores(self) -> None:
        """Recompute the channel importances from :attr:`result`, after it has changed in
        place (:meth:`CurvatureResult.refine <curvprune.result.CurvatureResult.refine>`)."""
        if self.result is not None and self._key is not None:
            self._use(self.result, self._key)
        self._node_bounds = None

    def _node_scores(self, edge_kappa: torch.Tensor) -> torch.Tensor:
        """Node importances :math:`2 - \\kappa(v)` (float32) from per-edge values, by the same
        operations as the importances of :attr:`result`."""
        shadow = copy.copy(self.result)
        shadow.edge_kappa = edge_kappa
        return (2.0 - shadow.node_kappa(self.reduction)).to(torch.float32)

    @torch.no_grad()
    def score_bounds(self, group, edge_lo: torch.Tensor, edge_hi: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        r"""Bounds ``(lo, hi)`` on the scores this importance returns for ``group`` when every
        channel edge's curvature lies in ``[edge_lo, edge_hi]`` (tensors over the edges of
        ``result.channel_graph``).

        For any edge values :math:`\kappa` with ``edge_lo <= kappa <= edge_hi``, the scores
        :meth:`__call__` computes from them (same operations, same order) lie within
        ``[lo, hi]`` element for element (proof: module docstring). Where ``lo == hi`` the
        score is known to the last bit. Entries without a bound (a reduction or normaliser
        that is not monotone, a group statistic whose lower bound is not positive) are
        ``-inf``/``+inf`` unless both computations agree. ``None`` where :meth:`__call__`
        returns ``None`` or after the magnitude fallback.
        """
        if self.fell_back or self.result is None:
            return None
        key = (id(edge_lo), id(edge_hi), self._key)
        if self._node_bounds is None or self._node_bounds[0] != key:
            # 2 - kappa is decreasing: the upper edge values give the lower scores.
            self._node_bounds = (key, self._node_scores(edge_hi), self._node_scores(edge_lo),
                                 (edge_lo, edge_hi))  # kept alive: their ids stay theirs
        _, node_lo, node_hi, _ = self._node_bounds
        lo = self._reduced(group, node_lo)
        hi = self._reduced(group, node_hi)
        if lo is None or hi is None:
            return None
        monotone = self.group_reduction in ("mean", "sum", "max", "first", "gate")
        if monotone and self.normalizer is None:
            return lo, hi
        if monotone and self.normalizer in ("mean", "sum", "max"):
            stat = {"mean": torch.mean, "sum": torch.sum, "max": torch.max}[self.normalizer]
            m_lo, m_hi = stat(lo), stat(hi)
            if bool(m_lo > 0):
                return (torch.minimum(lo / m_lo, lo / m_hi),
                        torch.maximum(hi / m_lo, hi / m_hi))
        a, b = self._normalize(lo, self.normalizer), self._normalize(hi, self.normalizer)
        if torch.equal(a, b):
            return a, b
        return torch.full_like(a, -math.inf), torch.full_like(b, math.inf)

    def group_nodes(self, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(root positions, channel nodes)]``: the channel-graph nodes whose importance
        enters each root position of ``group``'s scores (a position may appear in several
        pairs). Empty after the magnitude fallback."""
        if self.fell_back or self.result is None:
            return []
        graph = self.result.channel_graph
        out = []
        for i, (dep, idxs) in enumerate(group):
            k = self._layers.get(id(dep.target.module))
            root = group[i].root_idxs
            if k is None or any(r is None for r in root):
                continue
            idx = torch.as_tensor([int(j) for j in idxs], dtype=torch.long)
            pos = torch.as_tensor([int(r) for r in root], dtype=torch.long)
            if dep.handler in _OUT:
                out.append((pos, graph.module_outputs[k] + idx))
            elif dep.handler in _IN:
                nodes, channels = (t.cpu() for t in graph.module_inputs[k])
                hit = channels.unsqueeze(0) == idx.unsqueeze(1)  # [positions, pairs]
                p, q = torch.nonzero(hit, as_tuple=True)
                out.append((pos[p], nodes[q]))
        return out
