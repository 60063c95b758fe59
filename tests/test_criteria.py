"""The named criterion ``"curvature_wanda"``: (2 - kappa) |w| ||X_j||, checked against a brute-force
computation (plain Python sorting, input norms from hooks), through ``prune_model`` (global,
per layer, with an allocation, reused results, decision-exact at a coarse tolerance), its bad
input and the CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_pruning import tiny  # the same small conv + FC net

import curvprune
from curvprune import neural_curvature, prune_model
from curvprune.pruning.criteria import CRITERIA, curvature_wanda_scores

NAMES = ["0.weight", "3.weight", "5.weight"]




def inputs(seed: int = 1, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))


def input_norms(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every weight's input feature over the batch, by brute force: the layer's
    input from a hook, unfolded patch by patch for the conv."""
    seen = {}
    hooks = [model[i].register_forward_hook(
        lambda m, args, out, i=i: seen.__setitem__(i, args[0].detach().double()))
        for i in (0, 3, 5)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    norms = {}
    patches = F.unfold(seen[0], kernel_size=3, stride=2)  # (n, 9, positions)
    norms["0.weight"] = patches.pow(2).sum((0, 2)).sqrt().view(1, 1, 3, 3).expand(3, 1, 3, 3)
    for i in (3, 5):
        norms[f"{i}.weight"] = seen[i].pow(2).sum(0).sqrt().expand_as(model[i].weight)
    return norms


def brute_force_order(result: curvprune.CurvatureResult, model: nn.Module, x: torch.Tensor,
                      names: list[str] | None = None) -> list[tuple[str, int]]:
    """Entries from pruned first to kept last: score (2 - value) |w| ||X_j|| ascending (value 2
    for dead weights; 0 for zero weights), ties by smaller |w|, then layer, then index."""
    norms = input_norms(model, x)
    keys = []
    for layer, name in enumerate(NAMES):
        if names is not None and name not in names:
            continue
        kappa = result.kappa[name].flatten().tolist()
        live = result.live[name].flatten().tolist()
        module = model.get_submodule(name.rpartition(".")[0])
        w = module.weight.detach().double().flatten().abs().tolist()
        norm = norms[name].flatten().tolist()
        for i, (k, alive) in enumerate(zip(kappa, live)):
            score = 0.0 if math.isinf(k) else (2.0 - (k if alive else 2.0)) * w[i] * norm[i]
            keys.append((score, w[i], layer, i, name))
    keys.sort()
    return [(k[4], k[3]) for k in keys]


def pruned_set(model: nn.Module, names: list[str] = NAMES) -> set[tuple[str, int]]:
    out = set()
    buffers = dict(model.named_buffers())
    for name in names:
        if name + "_mask" not in buffers:  # an excluded weight: never pruned
            continue
        mask = buffers[name + "_mask"].flatten()
        out |= {(name, i) for i in torch.nonzero(mask == 0).flatten().tolist()}
    return out


@pytest.fixture(scope="module")
def scored():
    model, x = tiny(), inputs()
    return model, x, neural_curvature(model, x, tolerance=0.0)


def test_scores_follow_the_brute_force_order(scored):
    model, x, result = scored
    before = copy.deepcopy(model.state_dict())
    scores = curvature_wanda_scores(model, x, result)
    for name, tensor in model.state_dict().items():  # scoring leaves the model unchanged
        assert torch.equal(tensor, before[name])
    order = brute_force_order(result, model, x)
    modules = {n: model.get_submodule(n.rpartition(".")[0]) for n in NAMES}
    by_rank = sorted((float(scores[(modules[n], "weight")].flatten()[i]), n, i)
                     for n in NAMES for i in range(modules[n].weight.numel()))
    assert [(n, i) for _, n, i in by_rank] == order
    # the ranks are 0..N-1, distinct
    assert [r for r, _, _ in by_rank] == [float(k) for k in range(len(order))]
    # dead weights (score 0) come first and there are some: the rule is exercised
    dead = [(n, i) for n in NAMES for i in
            torch.nonzero(~result.live[n].flatten()).flatten().tolist()]
    assert dead and set(order[:len(dead)]) == set(dead)


def test_scores_without_a_result_score_the_model(scored):
    model, x, result = scored
    fresh = curvature_wanda_scores(model, x, tolerance=0.0)
    again = curvature_wanda_scores(model, x, result)
    for key, value in again.items():
        assert torch.equal(fresh[key], value)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_model_prunes_the_lowest_scores(scored, scope):
    model, x, result = scored
    fresh = copy.deepcopy(model)
    report = prune_model(fresh, x, 0.6, scope=scope, criterion="curvature_wanda", tolerance=0.0)
    if scope == "global":
        order = brute_force_order(result, model, x)
        assert pruned_set(fresh) == set(order[:round(0.6 * len(order))])
    else:
        for name in NAMES:
            order = brute_force_order(result, model, x, [name])
            assert pruned_set(fresh, [name]) == set(order[:round(0.6 * len(order))]), name
    assert report.pruned == len(pruned_set(fresh))
    # it is another ranking than the paper's
    paper = copy.deepcopy(model)
    prune_model(paper, x, 0.6, scope=scope, tolerance=0.0)
    assert pruned_set(paper) != pruned_set(fresh)


def test_prune_model_with_a_result_and_an_exclusion(scored):
    model, x, result = scored
    now, later = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(now, x, 0.5, criterion="curvature_wanda", exclude="0", tolerance=0.0)
    prune_model(later, x, 0.5, criterion="curvature_wanda", exclude="0", result=result)
    assert pruned_set(now) == pruned_set(later)
    order = [e for e in brute_force_order(result, model, x) if e[0] != "0.weight"]
    assert pruned_set(now) == set(order[:round(0.5 * len(order))])


@pytest.mark.parametrize("kwargs", [{}, {"scope": "layer"}, {"allocation": "magnitude"}])
def test_decision_exact_at_a_coarse_tolerance(kwargs):
    """Masks at tolerance 2.0 (wide intervals, refined where they straddle) equal those of
    tolerance 0, also when pruning on top of a pruned model."""
    model, x = tiny(3), inputs(4, n=4)
    masks = {}
    for tolerance in (0.0, 2.0):
        m = copy.deepcopy(model)
        reports = [prune_model(m, x, a, criterion="curvature_wanda", tolerance=tolerance,
                               **kwargs) for a in (0.4, 0.5)]
        masks[tolerance] = {n: b.clone() for n, b in m.named_buffers()}
        if tolerance > 0:
            refined = sum(r.refined for r in reports)
    assert masks[0.0].keys() == masks[2.0].keys()
    for name in masks[0.0]:
        assert torch.equal(masks[0.0][name], masks[2.0][name]), name
    assert refined > 0  # the intervals did straddle: the refinement is what made them equal


def test_criteria_names():
    assert CRITERIA == ("curvature", "curvature_wanda")
    assert curvprune.curvature_wanda_scores is curvature_wanda_scores


@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "wanda"}, "criterion must be .curvature. or .curvature_wanda."),
    ({"criterion": "curvature_wanda", "order": "negative_first"},
     "has no order='negative_first'"),
])
def test_bad_criterion_is_a_clear_error(kwargs, message):
    model, x = tiny(), inputs()
    with pytest.raises(ValueError, match=message):
        prune_model(model, x, 0.5, **kwargs)
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())


def test_result_without_calibration_is_a_clear_error(scored):
    model, _, result = scored
    with pytest.raises(ValueError, match="curvature_wanda.*needs calibration"):
        prune_model(copy.deepcopy(model), None, 0.5, criterion="curvature_wanda", result=result)
    with pytest.raises(ValueError, match="scored already"):
        curvature_wanda_scores(model, inputs(), result, alpha=0.5)
