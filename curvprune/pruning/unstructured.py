r"""Unstructured pruning by curvature: the :mod:`torch.nn.utils.prune` method and ``prune_model``.

:class:`CurvaturePruning` is a :class:`~torch.nn.utils.prune.BasePruningMethod`, so curvature
pruning uses PyTorch's own reparametrisation (``weight_orig``, ``weight_mask`` and a forward
pre-hook that sets ``weight = weight_orig * weight_mask``) and composes with any other pruning
method, ``prune.remove`` and ``prune.is_pruned``.

The method prunes the entries with the **lowest importance scores**. With the scores of
:meth:`CurvatureResult.importance_scores() <curvprune.result.CurvatureResult.importance_scores>`
(the global rank :math:`r(w)` of each weight, ``0`` = pruned first), pruning :math:`n` entries
of a set :math:`S` of not-yet-pruned weights zeroes

.. math::

    P_n(S) = \{\, w \in S : |\{ v \in S : r(v) < r(w) \}| < n \,\},

the first :math:`n` weights of :math:`S` in the curvature order: for order ``"positive_first"``
weights that are already zero, then dead weights (every edge has an inactive end), then live weights
from the most positive :math:`\kappa` down, ties broken by smaller :math:`|w|`, then position.
``amount`` follows PyTorch: a float :math:`f \in [0, 1]` prunes :math:`n = \operatorname{round}
(f \cdot |S|)` entries, an int prunes exactly that many.

:func:`prune_model` does the whole job in one call (score, prune, report);
:mod:`curvprune.pruning.lifecycle` covers the rest of a pruned model's life (see
``docs/pruning.md``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import prune
from torch.nn.utils.prune import (
    _compute_nparams_toprune,
    _validate_pruning_amount,
    _validate_pruning_amount_init,
)

from .._checks import (
    ALLOCATIONS,
    ORDERS,
    SCOPES,
    check_choice,
    check_module,
    check_order,
    check_score,
    describe_module,
    missing_score_message,
)
from ..calibration import check_model, prepare_calibration
from ..curvature import check_tolerance, neural_curvature
from ..decision import decide_exactly
from ..errors import UntraceableModel
from ..result import CurvatureResult, ImportanceScores
from .allocation import allocate_like
from .baselines import magnitude, magnitude_scores, prunable_modules, wanda_scores
from .criteria import CRITERIA, curvature_wanda_ranks, decide_combined_exactly
from .lifecycle import mask_of, refresh_weights, unpruned_count
from .reports import LayerSparsity, PruningReport

__all__ = ["CurvaturePruning", "curvature_unstructured", "prune_model"]


Scores = torch.Tensor | Mapping[tuple[nn.Module, str], torch.Tensor]
ExcludeSpec = str | nn.Module | Iterable[str | nn.Module] | None


def _validate_amount(amount: Any) -> None:
    """PyTorch's check of ``amount``, plus NaN, which PyTorch lets through (in its words)."""
    _validate_pruning_amount_init(amount)
    if not isinstance(amount, numbers.Integral) and math.isnan(float(amount)):
        raise ValueError(
            f"amount={amount} should either be a float in the range [0, 1] or a non-negative "
            "integer"
        )


class CurvaturePruning(prune.BasePruningMethod):
    r"""Prune the (not yet pruned) entries with the lowest importance scores.

    Use it with :func:`torch.nn.utils.prune.global_unstructured` and the scores of
    :meth:`CurvatureResult.importance_scores()
    <curvprune.result.CurvatureResult.importance_scores>`::

        scores = curvprune.neural_curvature(model, batch).importance_scores()
        prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                                  importance_scores=scores, amount=0.5)

    or on one tensor with :meth:`apply` / :func:`curvature_unstructured`.

    Unlike :class:`~torch.nn.utils.prune.L1Unstructured` the scores are used as they are (no
    absolute value: they are ranks, higher = keep). Of the entries still unpruned, the ``n``
    with the lowest scores are pruned, ties broken by flattened position (a stable sort), so
    the mask does not depend on the device. Scores are required: they never default to the
    weight values.

    Args:
        amount: a float in ``[0, 1]`` (fraction of the entries not yet pruned, rounded) or a
            non-negative int (number of entries); checked with PyTorch's own messages.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: int | float) -> None:
        _validate_amount(amount)
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """Zero ``default_mask`` at the ``n`` lowest entries of the scores ``t``.

        Args:
            t: importance scores of the entries still unpruned (any shape).
            default_mask: the mask so far, same shape as ``t``.

        Raises:
            ValueError: an int amount larger than ``t.numel()`` (PyTorch's message), or NaN
                scores.
        """
        tensor_size = t.nelement()
        nparams_toprune = _compute_nparams_toprune(self.amount, tensor_size)
        _validate_pruning_amount(nparams_toprune, tensor_size)
        if t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError("importance scores contain NaN; they cannot rank the weights.")
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if nparams_toprune != 0:
            lowest = torch.argsort(t.reshape(-1), stable=True)[:nparams_toprune]
            mask.view(-1)[lowest.to(mask.device)] = 0
        return mask

    @classmethod
    def apply(  # type: ignore[override]
        cls,
        module: nn.Module,
        name: str,
        amount: int | float,
        importance_scores: Scores,
    ) -> prune.BasePruningMethod:
        """Prune ``module.<name>`` by its curvature scores, composing with an existing mask.

        Adds (or extends) PyTorch's pruning reparametrisation: ``<name>_orig`` (parameter),
        ``<name>_mask`` (buffer) and a forward pre-hook; a second call on the same tensor
        composes the masks through a :class:`~torch.nn.utils.prune.PruningContainer`.

        Args:
            module: the module owning the tensor.
            name: the tensor's name in ``module`` (``"weight"``).
            amount: float fraction of the entries not yet pruned, or int count.
            importance_scores: a tensor of the tensor's shape and device (higher = keep), or a
                mapping such as :meth:`CurvatureResult.importance_scores()
                <curvprune.result.CurvatureResult.importance_scores>` holding
                ``(module, name)``.

        Returns:
            The pruning method now registered on the module (this method or a container).

        Raises:
            ValueError: missing scores, a score of another shape or device, NaN scores, or a
                bad ``amount`` (PyTorch's messages).
            TypeError: a non-number ``amount`` or scores that are not a tensor or mapping.
        """
        _validate_amount(amount)
        scores = _scores_for(module, name, importance_scores)
        method = super().apply(module, name, amount=amount, importance_scores=scores)
        # Composing through a PruningContainer casts the mask to the scores' dtype (float64);
        # keep it in the parameter's dtype, as a first pruning does.
        orig = getattr(module, name + "_orig")
        mask = getattr(module, name + "_mask")
        if mask.dtype != orig.dtype:
            module._buffers[name + "_mask"] = mask.to(orig.dtype)
            setattr(module, name, method.apply_mask(module))
        return method


def curvature_unstructured(
    module: nn.Module, name: str, amount: int | float, importance_scores: Scores
) -> nn.Module:
    """Prune ``module.<name>`` in place by curvature scores, like ``prune.l1_unstructured``.

    The functional form of :meth:`CurvaturePruning.apply`: the ``amount`` lowest-scoring
    entries not yet pruned are masked (see :class:`CurvaturePruning`).

    Returns:
        ``module``, modified in place.
    """
    CurvaturePruning.apply(module, name, amount=amount, importance_scores=importance_scores)
    return module


def _scores_for(module: nn.Module, name: str, importance_scores: Any) -> torch.Tensor:
    check_module(module, "module")
    target = getattr(module, name, None)
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{describe_module(module)} has no tensor named {name!r} to prune.")
    label = f"{name!r} of {describe_module(module)}"
    if importance_scores is None:
        raise ValueError(
            f"importance_scores is required to prune {label} by curvature (it never falls "
            "back to the weight values); pass CurvatureResult.importance_scores()."
        )
    if isinstance(importance_scores, torch.Tensor):
        score = importance_scores
    elif isinstance(importance_scores, Mapping):
        if isinstance(importance_scores, ImportanceScores):
            return importance_scores.get((module, name))
        if (module, name) not in importance_scores:
            raise ValueError(missing_score_message(label))
        score = importance_scores[(module, name)]
    else:
        raise TypeError(
            "importance_scores must be a tensor or a {(module, name): tensor} mapping, not "
            f"{type(importance_scores).__name__}."
        )
    check_score(score, target, label)
    return score


def _resolve_exclude(model: nn.Module, exclude: ExcludeSpec) -> list[tuple[Any, set[str]]]:
    """Turn ``exclude`` into ``(entry, candidate weight names)`` before scoring.

    A module (object or name) stands for every ``<module>.weight`` inside it; a parameter name
    stands for itself. Unknown names raise here, before the expensive scoring.
    """
    if exclude is None:
        return []
    entries = [exclude] if isinstance(exclude, (str, nn.Module)) else list(exclude)
    named = dict(model.named_modules())
    by_id = {id(m): n for n, m in named.items()}
    resolved = []
    for entry in entries:
        if isinstance(entry, nn.Module):
            if id(entry) not in by_id:
                raise ValueError(
                    f"exclude: {describe_module(entry)} is not a submodule of the model."
                )
            prefix = by_id[id(entry)]
        elif isinstance(entry, str):
            if entry in named:
                prefix = entry
            else:
                owner, _, attr = entry.rpartition(".")
                if owner in named and isinstance(getattr(named[owner], attr, None),
                                                 torch.Tensor):
                    resolved.append((entry, {entry}))
                    continue
                modules = [n for n in named if n]
                raise ValueError(
                    f"exclude: {entry!r} is neither a module nor a parameter of the model; "
                    f"modules are {modules[:20]}{' ...' if len(modules) > 20 else ''}."
                )
        else:
            raise TypeError(
                "exclude entries must be parameter names, module names or modules, not "
                f"{type(entry).__name__}."
            )
        names = {f"{n}.weight" if n else "weight" for n in named
                 if prefix == "" or n == prefix or n.startswith(prefix + ".")}
        resolved.append((entry, names))
    return resolved


def prune_model(
    model: nn.Module,
    calibration: Any,
    amount: int | float,
    *,
    scope: str = "global",
    order: str = "positive_first",
    exclude: ExcludeSpec = None,
    alpha: float = 0.9,
    granularity: str = "neuron",
    device: str | torch.device | None = None,
    progress: bool = False,
    allocation: str = "curvature",
    result: CurvatureResult | None = None,
    threads: int | None = None,
    memory_budget: int | None = None,
    tolerance: float | None = None,
    criterion: str = "curvature",
) -> PruningReport:
    r"""Score ``model`` by neural curvature and prune its weights in place, in one call.

    Runs :func:`~curvprune.curvature.neural_curvature` on ``calibration`` (or takes the scores
    of ``result``, computed before) and masks weights with :class:`CurvaturePruning` through
    :mod:`torch.nn.utils.prune`:

    * ``scope="global"``: one ranking across all scored weights not excluded
      (:func:`~torch.nn.utils.prune.global_unstructured`); a float ``amount`` prunes
      :math:`\operatorname{round}(f \cdot N)` of the :math:`N` entries not yet pruned.
    * ``scope="layer"``: every weight pruned by ``amount`` on its own.

    Calling it again on the pruned model is iterative pruning: the model is rescored with the
    pruned weights as absent edges (they rank first and are already masked), ``amount`` applies
    to the entries still unpruned, and the new masks compose with the old ones. Biases and
    normalisation layers are never pruned.

    Score once, prune many: ``prune_model(model, None, amount, result=r)`` with
    ``r = neural_curvature(model, calibration)`` does not score; ``r`` is bound to ``model``
    by parameter name (:meth:`CurvatureResult.bind
    <curvprune.result.CurvatureResult.bind>`), so ``model`` can be a clone or a reloaded copy
    of the scored model, and the masks are exactly those of ``prune_model(model, calibration,
    amount)`` on an unpruned copy. Reusing ``r`` on a model pruned since does not rescore: the
    ranking stays that of the scored model (pruning 0.3 then 0.5 of the rest removes the first
    65 % of that ranking).

    An int ``amount`` is a count, as in PyTorch; when it is at most 100 and prunes under 1 % of
    the weights it may be a percentage (``amount=50`` for ``0.5``), and a ``UserWarning`` says so.

    Args:
        model: a model :func:`~curvprune.curvature.neural_curvature` accepts, pruned or not.
        calibration: the calibration set (tensor, ``(inputs, targets)`` or iterable of them).
        amount: float fraction in ``[0, 1]`` of the entries not yet pruned, or int count.
        scope: ``"global"`` or ``"layer"``.
        order: what is pruned first: ``"positive_first"`` (the highest curvature, the paper's
            method) or ``"negative_first"`` (the lowest, the paper's control). Zero weights go
            first in both. The old ``"pos"``/``"neg"`` still work, with a
            ``DeprecationWarning``.
        exclude: weights to leave unpruned: parameter names (``"5.weight"``), module names
            (``"5"``, or a container such as ``"classifier"``) or module objects, alone or in
            an iterable. They are still scored (they are part of the graph).
        alpha, granularity, device, progress, threads, memory_budget: passed
            unchanged to :func:`~curvprune.curvature.neural_curvature` (unused with ``result``).
        allocation: with ``scope="global"``, how much of each weight goes. ``"curvature"``
            (default, the paper): one global ranking of kappa decides. ``"wanda"`` or
            ``"magnitude"``: each weight loses as many entries as a global ranking by that
            criterion (:func:`~curvprune.baselines.wanda_scores` on ``calibration``, or
            :math:`|w|`) would remove, and curvature chooses which ones within it
            (:func:`~curvprune.allocation.allocate_like`). On LeNet-5 ``"wanda"`` kept 75.6 %
            accuracy at 80 % sparsity against 68.1 % for ``"curvature"`` (docs/benchmarks.md).
            The re-allocated scores are returned as ``report.scores``.
        result: a :class:`~curvprune.result.CurvatureResult` of this architecture (any
            granularity) to prune by instead of scoring: pass ``calibration=None``. With
            ``allocation="wanda"`` the calibration is still needed, for Wanda's input norms,
            and is only used for them.
        tolerance: the curvature tolerance (see :func:`~curvprune.curvature.neural_curvature`;
            default 0.01; not with ``result``, which was scored already). The pruning is
            **decision-exact** at any tolerance: the weights are scored with certified
            intervals, and those whose interval straddles the pruning boundary are solved
            exactly until none does, so the pruned set is exactly the one ``tolerance=0``
            scores give (:mod:`curvprune.decision`); a ``result`` is refined the same way. A
            larger tolerance makes the scoring cheaper and the refinement (``report.refined``)
            larger.
        criterion: what ranks the weights (:mod:`curvprune.pruning.criteria`).
            ``"curvature"`` (default): the paper's ranking by kappa alone. ``"curvature_wanda"``:
            keep the largest :math:`(2 - \kappa)\,|w_{ij}|\,\lVert X_j \rVert_2` (curvature
            times Wanda's score, the input norms taken on ``calibration``; dead weights score 0
            and go first); only with the default ``order``. In the study of
            docs/benchmarks.md (no fine-tuning, 3 seeds) it kept more accuracy than the paper's
            ranking and than magnitude, LAMP, global Wanda and SNIP at 70, 80 and 90 % on
            LeNet-5 and two MLPs (LeNet-5 at 80 %: 82.4 % against 78.9 % for LAMP), and was
            level with global Wanda on a held-out CNN (0.1 points behind at 70 %). With
            ``result=`` it needs ``calibration`` too, for the input norms.

    Returns:
        A :class:`PruningReport` with the per-weight and overall sparsity, the
        :class:`~curvprune.result.CurvatureResult` (bound to ``model``) and the scores used.

    Raises:
        ValueError: a bad ``scope``/``order``/``amount`` (PyTorch's messages for ``amount``), an
            ``exclude`` entry that names nothing or matches no scored weight, nothing left to
            prune, parameters on several devices, a model on the ``meta`` device, both or
            neither of ``calibration`` and ``result``, a ``result`` that does not bind to
            ``model`` (the first mismatching parameter is named), or anything
            :func:`~curvprune.curvature.neural_curvature` rejects.
        TypeError: wrong argument types.
    """
    check_module(model)
    check_choice(scope, "scope", SCOPES)
    order = check_order(order)
    check_choice(criterion, "criterion", CRITERIA)
    if criterion != "curvature" and order != ORDERS[0]:
        raise ValueError(
            f"criterion={criterion!r} keeps the highest (2 - kappa) |w| ||x|| and has no "
            f"order={order!r}; use order={ORDERS[0]!r} (or criterion='curvature')."
        )
    check_choice(allocation, "allocation", ALLOCATIONS)
    if allocation != "curvature" and scope != "global":
        raise ValueError(
            f"allocation={allocation!r} sets how much of each layer a global ranking removes; "
            "with scope='layer' every layer loses the same fraction. Use scope='global'."
        )
    _validate_amount(amount)
    if tolerance is not None:
        tolerance = check_tolerance(tolerance)
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters and buffers are on several devices "
            f"({sorted(map(str, devices))}); curvature pruning ranks all weights together, so "
            "move the model to one device first (model.to(device))."
        )
    check_model(model)
    _check_sources(calibration, result, allocation, criterion)
    if result is not None and tolerance is not None:
        raise ValueError(
            f"tolerance sets how precisely the model is scored, and result= was scored already "
            f"(with tolerance={result.tolerance:g}); drop tolerance= (the pruning is still "
            "decision-exact: straddling weights are refined)."
        )
    exclusions = _resolve_exclude(model, exclude)
    refresh_weights(model)

    fallback = None
    if calibration is not None:
        calibration = prepare_calibration(model, calibration)
    try:
        if result is not None:
            result = result.bind(model)
        else:
            result = neural_curvature(model, calibration, alpha=alpha, granularity=granularity,
                                      device=device, progress=progress, threads=threads,
                                      memory_budget=memory_budget, tolerance=tolerance)
        scored, modules = list(result.kappa), result.modules
    except UntraceableModel as exc:
        fallback = f"{'wanda' if criterion == 'curvature_wanda' else 'magnitude'}: {exc}"
        warnings.warn(
            f"prune_model: {type(model).__name__} cannot be traced at channel level ({exc}); "
            "its Conv2d/Linear weights are ranked by "
            f"{'Wanda |w| ||x||' if criterion == 'curvature_wanda' else 'magnitude |w|'} "
            "instead.", stacklevel=2)
        result = None
        modules = prunable_modules(model)
        scored = list(modules)
    excluded: set[str] = set()
    for entry, names in exclusions:
        hit = names & set(scored)
        if not hit:
            label = entry if isinstance(entry, str) else describe_module(entry)
            raise ValueError(
                f"exclude: {label!r} matches no scored weight; the scored weights are "
                f"{scored}."
            )
        excluded |= hit
    targets = [n for n in scored if n not in excluded]
    if not targets:
        raise ValueError(f"every scored weight is excluded ({scored}); nothing to prune.")

    before = {n: unpruned_count(modules[n], "weight") for n in targets}
    if isinstance(amount, numbers.Integral):
        if scope == "global":
            _validate_pruning_amount(amount, sum(before.values()))
        else:
            for n in targets:  # check every layer before touching any
                _validate_pruning_amount(amount, before[n])
        _warn_count_amount(amount, list(before.values()), scope)

    wanda = None
    if criterion == "curvature_wanda" and result is not None:
        scored_modules = [modules[n] for n in scored]
        by_module = wanda_scores(model, calibration, scored_modules)
        wanda = {n: by_module[(modules[n], "weight")].detach().to(torch.float64) for n in scored}
    budget = None
    if allocation != "curvature":
        scored_modules = [modules[n] for n in scored]
        budget = (wanda_scores(model, calibration, scored_modules) if allocation == "wanda"
                  else magnitude_scores(model, scored_modules))
    refined = rounds = 0
    if result is not None and wanda is not None:
        if result.max_width > 0:
            def decide_combined(res: CurvatureResult):
                return _decide(curvature_wanda_ranks(res, wanda), budget, modules, targets,
                               scope, amount)

            _, refined, rounds = decide_combined_exactly(result, wanda, decide_combined)
        scores = curvature_wanda_ranks(result, wanda)
    elif result is not None:
        if result.max_width > 0:
            def decide(res: CurvatureResult):
                return _decide(res.importance_scores(order), budget, modules, targets, scope,
                               amount)

            _, refined, rounds = decide_exactly(result, order, decide)
        scores = result.importance_scores(order)
    elif criterion == "curvature_wanda":  # untraceable: Wanda's score alone
        scores = wanda_scores(model, calibration, [modules[n] for n in scored])
    else:
        scores = ImportanceScores({(modules[n], "weight"): _magnitude_score(modules[n], order)
                                   for n in scored},
                                  names={(modules[n], "weight"): n for n in scored})
    if budget is not None:
        scores = allocate_like(scores, budget)
    params = [(modules[n], "weight") for n in targets]
    if scope == "global":
        prune.global_unstructured(params, pruning_method=CurvaturePruning,
                                  importance_scores=scores, amount=amount)
    else:
        for module, name in params:
            CurvaturePruning.apply(module, name, amount=amount, importance_scores=scores)

    layers = {}
    for n in scored:
        module = modules[n]
        total = module.weight.numel()
        layers[n] = LayerSparsity(n, total - unpruned_count(module, "weight"), total, n in excluded)
    newly = sum(before[n] - unpruned_count(modules[n], "weight") for n in targets)
    return PruningReport(layers=layers, newly_pruned=newly, amount=amount, scope=scope,
                         order=order, result=result, fallback=fallback, scores=scores,
                         tolerance=None if result is None else result.tolerance,
                         refined=refined, refine_rounds=rounds)


def _check_sources(calibration: Any, result: Any, allocation: str, criterion: str) -> None:
    """Exactly one source of scores: ``calibration`` (scored now) or ``result`` (scored
    before); ``allocation="wanda"`` and ``criterion="curvature_wanda"`` need the calibration
    for Wanda's input norms either way."""
    if result is None:
        if calibration is None:
            raise ValueError(
                "calibration is None: pass calibration data to score the model, or "
                "result=neural_curvature(model, calibration) to prune by scores computed before."
            )
        return
    if not isinstance(result, CurvatureResult):
        raise TypeError(
            f"result must be a CurvatureResult (from neural_curvature), not "
            f"{type(result).__name__}."
        )
    needs = ("allocation='wanda'" if allocation == "wanda" else
             "criterion='curvature_wanda'" if criterion == "curvature_wanda" else None)
    if needs is not None and calibration is None:
        raise ValueError(
            f"{needs} needs calibration data for Wanda's input norms, also with result=; "
            "pass both."
        )
    if calibration is not None and needs is None:
        raise ValueError(
            "pass calibration (to score the model now) or result= (scores computed before), "
            "not both: prune_model(model, None, amount, result=result)."
        )


def _warn_count_amount(amount: Any, remaining: list[int], scope: str) -> None:
    """Warn when an int ``amount`` (a count, as in PyTorch) looks like a percentage: at most
    100 and pruning under 1 % of the entries still unpruned."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Integral):
        return
    total = sum(remaining)
    pruned = int(amount) * (1 if scope == "global" else len(remaining))
    if 0 < amount <= 100 and pruned < 0.01 * total:
        warnings.warn(
            f"amount={amount} is an int, which PyTorch reads as a count: it prunes {pruned} of "
            f"{total} weights ({100 * pruned / total:.2g} %); for {amount} % pass "
            f"amount={amount / 100:g}.", UserWarning, stacklevel=3)


def _decide(scores: ImportanceScores, budget: Any, modules: dict[str, nn.Module],
            targets: list[str], scope: str, amount: int | float
            ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """What :func:`prune_model` would prune with ``scores``, without touching the model:
    ``(pruned, groups)`` for :func:`~curvprune.decision.decide_exactly` (the same selection as
    :class:`CurvaturePruning` through ``torch.nn.utils.prune``: the ``n`` lowest scores among
    the entries not yet pruned, per group)."""
    if budget is not None:
        scores = allocate_like(scores, budget)
    values = {n: scores.get((modules[n], "weight")) for n in targets}
    candidates = {}
    for n in targets:
        mask = mask_of(modules[n], "weight")
        candidates[n] = (torch.ones_like(values[n], dtype=torch.bool) if mask is None
                         else (mask == 1).to(values[n].device))
    if scope == "global":
        sets = [targets]
    else:
        sets = [[n] for n in targets]
    pruned = {}
    for names in sets:
        flat = torch.cat([values[n].reshape(-1) for n in names])
        cand = torch.cat([candidates[n].reshape(-1) for n in names])
        sub = flat[cand]
        mask = CurvaturePruning(amount).compute_mask(sub, torch.ones_like(sub))
        chosen = torch.zeros_like(cand)
        chosen[cand] = mask == 0
        start = 0
        for n in names:
            size = values[n].numel()
            pruned[n] = chosen[start:start + size].view(values[n].shape)
            start += size
    # Within one ranking (global, curvature allocation) one group; with a budget, each weight's
    # count is fixed by the budget and curvature only chooses within the weight.
    if scope == "global" and budget is None:
        groups = [dict(candidates)]
    else:
        groups = [{n: candidates[n]} for n in targets]
    return pruned, groups


def _magnitude_score(module: nn.Module, order: str) -> torch.Tensor:
    """The fallback ranking (:func:`curvprune.baselines.magnitude`) in float64."""
    return magnitude(module.weight, order).to(torch.float64)
