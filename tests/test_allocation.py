"""allocate_like: the order of one criterion within each layer, the per-layer amounts of another."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from conftest import profile_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune import CurvaturePruning, allocate_like, make_permanent, neural_curvature
from curvprune.baselines import magnitude_scores, random_scores, wanda_scores
from curvprune.result import ImportanceScores


def lenet_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5),
    ).eval()


def pruned_masks(model: nn.Module, scores, amount: float) -> dict[str, torch.Tensor]:
    """Prune a fresh copy of ``model``'s weights globally by ``scores``; the masks by name."""
    prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                              importance_scores=scores, amount=amount)
    names = {id(m): n for n, m in model.named_modules()}
    masks = {names[id(m)]: m.weight_mask.clone() for m, _ in scores}
    make_permanent(model)
    return masks


def first_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """The mask that removes the ``k`` lowest entries of ``score`` (ties: lower index first)."""
    mask = torch.ones(score.numel(), dtype=score.dtype)
    mask[torch.argsort(score.reshape(-1), stable=True)[:k]] = 0
    return mask.view(score.shape)


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.8, 0.9, 0.97])
def test_per_layer_counts_follow_budget_and_order_follows_order(amount):
    model = lenet_like()
    calibration = torch.rand(6, 1, 13, 13)
    curvature = neural_curvature(model, calibration).importance_scores("positive_first")
    budget = wanda_scores(model, calibration)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    budget_masks = pruned_masks(model, budget, amount)
    model.load_state_dict(state)
    combined = allocate_like(curvature, budget)
    masks = pruned_masks(model, combined, amount)
    for (module, _), order in curvature.items():
        name = combined.names[(module, "weight")].rsplit(".", 1)[0]
        removed = int((masks[name] == 0).sum())
        assert removed == int((budget_masks[name] == 0).sum()), name
        # within the layer the removed weights are the first `removed` of curvature's order
        assert torch.equal(masks[name], first_k(order, removed).to(masks[name].dtype)), name


@settings(max_examples=profile_examples(40), deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_combined_scores_are_a_per_tensor_permutation_of_the_budget(sizes, seed, ties):
    g = torch.Generator().manual_seed(seed)
    keys = [(nn.Linear(1, n), "bias") for n in sizes]  # a parameter of shape [n] per key
    order = {k: torch.rand(n, generator=g) for k, n in zip(keys, sizes)}
    if ties:
        order = {k: (v * 3).floor() for k, v in order.items()}
    budget = {k: torch.randn(n, generator=g, dtype=torch.float64) for k, n in zip(keys, sizes)}
    combined = allocate_like(order, budget)
    for k in keys:
        # same multiset as the budget: the same number fall under any global threshold
        assert torch.equal(combined[k].sort().values, budget[k].sort().values)
        # and ranked like the order: order[a] < order[b] implies combined[a] <= combined[b]
        o, c = order[k], combined[k]
        lower = o[:, None] < o[None, :]
        assert bool((c[:, None] <= c[None, :])[lower].all())
        # order ties broken by index, lower index pruned first
        tied = (o[:, None] == o[None, :]) & (torch.arange(len(o))[:, None] < torch.arange(len(o)))
        assert bool((c[:, None] <= c[None, :])[tied].all())


def test_same_scores_for_order_and_budget_give_them_back():
    model = lenet_like()
    scores = random_scores(model, seed=3)
    combined = allocate_like(scores, scores)
    assert isinstance(combined, ImportanceScores)
    for key, value in scores.items():
        assert torch.equal(combined[key], value)
    assert set(combined.names.values()) == set(scores.names.values())


def test_bad_input_is_named():
    model = lenet_like()
    mag = magnitude_scores(model)
    first = next(iter(mag))
    missing = ImportanceScores({k: v for k, v in mag.items() if k != first}, names=mag.names)
    with pytest.raises(ValueError, match="only in budget: \\['0.weight'\\]"):
        allocate_like(missing, mag)
    wrong = mag.copy()
    wrong[first] = torch.zeros(3)
    with pytest.raises(ValueError, match="'0.weight' has shape \\(3,\\)"):
        allocate_like(wrong, mag)
    wrong[first] = torch.full_like(mag[first], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        allocate_like(mag, wrong)
    wrong[first] = [1.0]
    with pytest.raises(TypeError, match="must be a tensor, not list"):
        allocate_like(wrong, mag)
    wrong = {("0", "weight"): torch.zeros(3)}
    with pytest.raises(TypeError, match="keyed by \\(module, parameter name\\)"):
        allocate_like(wrong, wrong)
