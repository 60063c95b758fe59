r"""The criteria users compare curvature with, as importance scores for ``torch.nn.utils.prune``.

Each function returns :class:`~curvprune.result.ImportanceScores` keyed by ``(module, "weight")``
for every ``Linear`` and ``Conv2d`` of the model (or the modules given), higher = keep, like
``CurvatureResult.importance_scores()``, so the same pruning call takes any of them:

* :func:`magnitude_scores`: :math:`|w|` (global magnitude pruning).
* :func:`random_scores`: i.i.d. uniform scores from a seeded generator.
* :func:`lamp_scores`: LAMP, the layer-adaptive magnitude score (Lee et al., 2021,
  "Layer-adaptive Sparsity for the Magnitude-based Pruning"): within each weight tensor sorted
  by magnitude, :math:`w_u^2 / \sum_{v \ge u} w_v^2`; ranked globally it sets each layer's
  sparsity by itself.
* :func:`wanda_scores`: :math:`|W_{ij}| \, \lVert X_j \rVert_2`, the weight times the L2 norm of
  its input feature over the calibration set (Sun et al., 2023, "A Simple and Effective Pruning
  Approach for Large Language Models"). For a conv, the input feature of ``W[o, i, kh, kw]`` is
  the unfolded patch element ``(i, kh, kw)`` over all positions. Wanda compares weights within
  each output row: :func:`prune_per_row` prunes each row by the same fraction to follow it;
  ``torch.nn.utils.prune.global_unstructured`` with these scores ranks all weights together.
* :func:`snip_scores`: :math:`|w \cdot \partial L / \partial w|` on the calibration batch (Lee et
  al., 2019, "SNIP"), with cross-entropy on the batch's targets, or on the model's own
  predictions when the calibration set has no targets.

Scoring runs in eval mode and leaves the model as it was found (parameters, ``.grad``, flags).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_order
from ..calibration import (
    is_single_pair,
    iter_calibration_inputs,
    model_device,
    prepare_calibration,
    scoring_mode,
)
from ..graphs.neuron import conv_padding
from ..result import ImportanceScores

__all__ = ["prunable_modules", "magnitude", "magnitude_scores", "random_scores", "lamp_scores",
           "wanda_scores", "snip_scores", "prune_per_row"]


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified weight name: module}`` for every Linear and Conv2d of ``model``."""
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def _targets(model: nn.Module, modules: Iterable[nn.Module] | None) -> dict[str, nn.Module]:
    found = prunable_modules(model)
    if modules is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to score.")
        return found
    wanted = list(modules)
    by_id = {id(m): n for n, m in found.items()}
    missing = [type(m).__name__ for m in wanted if id(m) not in by_id]
    if missing:
        raise ValueError(f"modules {missing} are not Linear/Conv2d layers of the model.")
    return {by_id[id(m)]: m for m in wanted}


def _wrap(scores: dict[str, torch.Tensor], targets: dict[str, nn.Module]) -> ImportanceScores:
    return ImportanceScores({(targets[n], "weight"): s for n, s in scores.items()},
                            names={(targets[n], "weight"): n for n in scores})


def magnitude(weight: torch.Tensor, order: str = "positive_first") -> torch.Tensor:
    """The magnitude score of each entry of ``weight`` (a detached copy, same dtype), as the
    fallback of a curvature ``order``: :math:`|w|` for ``"positive_first"`` (the paper's order;
    smallest pruned first), :math:`-|w|` for ``"negative_first"`` (the control) with zero weights
    at :math:`-\\infty` (largest pruned first, zeros still first)."""
    order = check_order(order)
    scores = weight.detach().abs()
    if order == "positive_first":
        return scores.clone()
    return torch.where(scores == 0, -math.inf, -scores)


def magnitude_scores(model: nn.Module, modules: Iterable[nn.Module] | None = None
                     ) -> ImportanceScores:
    """Global magnitude: the score of each weight is :math:`|w|` (pruned weights score 0)."""
    targets = _targets(model, modules)
    return _wrap({n: magnitude(m.weight) for n, m in targets.items()}, targets)


def random_scores(model: nn.Module, modules: Iterable[nn.Module] | None = None, *,
                  seed: int = 0) -> ImportanceScores:
    """Uniform random scores from ``torch.Generator().manual_seed(seed)`` (CPU, then moved)."""
    targets = _targets(model, modules)
    generator = torch.Generator().manual_seed(seed)
    return _wrap({n: torch.rand(m.weight.shape, generator=generator, dtype=torch.float64)
                  .to(m.weight.device) for n, m in targets.items()}, targets)


def _lamp_tensor(weight: torch.Tensor) -> torch.Tensor:
    r"""LAMP scores of one weight tensor (float64, same shape; see :func:`lamp_scores`)."""
    w2 = weight.detach().to(torch.float64).reshape(-1).pow(2)
    order = torch.argsort(w2, stable=True)  # ascending magnitude, ties by flat index
    ordered = w2[order]
    tail = ordered.flip(0).cumsum(0).flip(0)  # tail[k] = sum of ordered[k:]
    ratio = torch.where(tail > 0, ordered / tail.clamp(min=torch.finfo(torch.float64).tiny),
                        torch.zeros((), dtype=torch.float64, device=w2.device))
    scores = torch.empty_like(w2)
    scores[order] = ratio
    return scores.view(weight.shape)


def lamp_scores(model: nn.Module, modules: Iterable[nn.Module] | None = None
                ) -> ImportanceScores:
    r"""LAMP (Lee et al., 2021): a layer-adaptive magnitude score, to be ranked globally.

    Within each weight tensor (one Linear or Conv2d, flattened) the weights are sorted by
    magnitude ascending, :math:`|w_1| \le |w_2| \le \dots \le |w_n|`, and the score of the
    :math:`u`-th is

    .. math:: \mathrm{LAMP}(u) = \frac{w_u^2}{\sum_{v \ge u} w_v^2},

    the weight's share of the squared magnitude of the weights at least as large. The largest
    weight of each tensor scores exactly 1 (when it is nonzero) and every other at most 1/2
    (its sum includes the largest), so pruning globally by LAMP while keeping at least as many
    weights as there are layers keeps the largest weight of every layer. The score grows with
    the magnitude within a tensor, so LAMP changes only how many weights each layer loses,
    not which.

    Ties: equal magnitudes are ordered by flattened index (a stable sort), so of two equal
    weights the one with the lower index counts as the smaller and gets the lower score (the
    sum of the other includes only itself and larger ones). A weight whose tail sum is zero
    (a zero weight with only zeros at or above it in the order, i.e. an all-zero tensor) scores
    0. Pruned weights (``torch.nn.utils.prune`` masks) are read as the masked ``weight``, so
    they are zeros and score 0. Computed in float64.
    """
    targets = _targets(model, modules)
    return _wrap({n: _lamp_tensor(m.weight).to(m.weight.device)
                  for n, m in targets.items()}, targets)


def _feature_sq_norms(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over examples and positions of the squared input feature of each weight column."""
    x = x.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).pow(2).sum(0)
    (top, bottom), (left, right) = conv_padding(module)
    x = F.pad(x, (left, right, top, bottom))
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation,
                       stride=module.stride)  # [N, C*kh*kw, L]
    return patches.pow(2).sum(dim=(0, 2))


def wanda_scores(model: nn.Module, calibration, modules: Iterable[nn.Module] | None = None
                 ) -> ImportanceScores:
    r"""Wanda: :math:`S_{ij} = |W_{ij}| \cdot \lVert X_j \rVert_2` over the calibration set.

    ``calibration`` takes the forms :func:`~curvprune.neural_curvature` takes, with the same
    checks (:func:`~curvprune.calibration.prepare_calibration`: single examples stacked, a
    ``meta`` model and channels-last images refused).
    """
    targets = _targets(model, modules)
    calibration = prepare_calibration(model, calibration)
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_m: nn.Module, args: tuple) -> None:
            sq = _feature_sq_norms(module, args[0])
            sums[name] = sums[name] + sq if name in sums else sq

        return hook

    try:
        for name, module in targets.items():
            handles.append(module.register_forward_pre_hook(make_hook(name, module)))
        with scoring_mode(model):
            device = model_device(model)
            for inputs in iter_calibration_inputs(calibration, model):
                model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for name, module in targets.items():
        if name not in sums:
            raise ValueError(f"'{name}' did not run on the calibration inputs.")
        norms = sums[name].sqrt()
        weight = module.weight.detach().abs().to(torch.float64)
        if isinstance(module, nn.Conv2d):
            c_in, kh, kw = module.in_channels, *module.kernel_size
            cg = c_in // module.groups
            per_out = norms.view(module.groups, cg, kh, kw).repeat_interleave(
                module.out_channels // module.groups, dim=0)
            scores[name] = weight * per_out.to(weight.device)
        else:
            scores[name] = weight * norms.to(weight.device)[None, :]
    return _wrap(scores, targets)


def snip_scores(model: nn.Module, calibration, modules: Iterable[nn.Module] | None = None
                ) -> ImportanceScores:
    r"""SNIP: :math:`|w \cdot \partial L/\partial w|` summed over calibration batches.

    ``L`` is the cross-entropy of the model's outputs against the batch targets (batches given
    as ``(inputs, targets)``), or against the model's own argmax predictions otherwise. Gradients
    are taken with :func:`torch.autograd.grad`, so no ``.grad`` is written; parameters whose
    ``requires_grad`` is off are scored all the same and left as they were.
    """
    targets = _targets(model, modules)
    params = {}
    for name, module in targets.items():
        params[name] = module.weight_orig if hasattr(module, "weight_orig") else module.weight
    flags = {name: p.requires_grad for name, p in params.items()}
    device = model_device(model)
    totals = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with scoring_mode(model), torch.enable_grad():
            for batch in _batches_with_targets(calibration):
                inputs, labels = batch
                out = model(inputs.to(device))
                if labels is None:
                    labels = out.detach().argmax(dim=1)
                loss = F.cross_entropy(out, labels.to(out.device))
                grads = torch.autograd.grad(loss, list(params.values()))
                for (name, p), g in zip(params.items(), grads):
                    totals[name] += (p.detach() * g).to(torch.float64)
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return _wrap({n: t.abs() for n, t in totals.items()}, targets)


def _batches_with_targets(calibration):
    """Yield ``(inputs, targets or None)``, validating inputs like the curvature scorer."""
    if is_single_pair(calibration) or isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    for batch in calibration:
        labels = None
        if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1],
                                                                                torch.Tensor):
            labels = batch[1]
        inputs = next(iter(iter_calibration_inputs([batch])))
        yield inputs, labels


def prune_per_row(module: nn.Module, scores: torch.Tensor, amount: float) -> None:
    """Prune the lowest-scoring ``amount`` of each output row of ``module.weight`` (Wanda's
    comparison group), through ``torch.nn.utils.prune.custom_from_mask``.
    """
    import torch.nn.utils.prune as prune

    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1], got {amount}.")
    rows = scores.reshape(scores.shape[0], -1)
    k = int(round(amount * rows.shape[1]))
    mask = torch.ones_like(rows, dtype=torch.bool)
    if k:
        order = torch.argsort(rows, dim=1, stable=True)[:, :k]
        mask.scatter_(1, order, False)
    prune.custom_from_mask(module, "weight", mask.view(scores.shape).to(module.weight.dtype))
