"""Tests of curvprune.pruning: the torch.nn.utils.prune integration and the pruned-model life cycle.

Modelled on PyTorch's own pruning tests (test/nn/test_pruning.py: mask shapes and dtypes, exact
counts, composition with earlier masks, remove, state_dict), plus the curvature-specific part:
the pruned set is checked against a ranking rebuilt here, independently, from ``result.kappa``,
``result.live`` and ``|w|`` following the rules in ``curvprune/result.py``'s module docstring.

All models are a tiny conv/linear chain on 7x7 inputs that scores in a fraction of a second.
"""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn as nn
from conftest import profile_examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune

import curvprune
from curvprune import (
    CurvaturePruning,
    ImportanceScores,
    clone_pruned,
    curvature_unstructured,
    load_pruned,
    make_permanent,
    neural_curvature,
    prune_model,
    save_pruned,
)

NAMES = ["0.weight", "3.weight", "5.weight"]


def tiny(seed: int = 0, zero: str | None = None) -> nn.Sequential:
    """conv 1->3 k3 s2 (7x7 -> 3x3), FC 27-6-4, ReLU between; 213 weights."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(27, 6), nn.ReLU(), nn.Linear(6, 4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        if zero == "some":  # a few exact zeros in the hidden FC layer
            model[3].weight.view(-1)[::7] = 0
        elif zero == "all":  # a whole layer of zeros
            model[5].weight.zero_()
    return model


def inputs(seed: int = 1, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: model.get_submodule(n.rpartition(".")[0]) for n in NAMES}


def remap(result: curvprune.CurvatureResult, model: nn.Module,
          order: str = "positive_first") -> ImportanceScores:
    """The scores of ``result`` keyed by the same-named modules of another ``model``."""
    mods = weight_modules(model)
    ranks = result.importance_scores(order)
    return ImportanceScores(
        {(mods[n], "weight"): ranks[(result.modules[n], "weight")].clone() for n in NAMES},
        names={(mods[n], "weight"): n for n in NAMES},
    )


def expected_order(result: curvprune.CurvatureResult, order: str,
                   names: list[str] | None = None) -> list[tuple[str, int]]:
    """The curvature pruning order rebuilt from kappa/live/|w| with plain Python sorting.

    result.py: value = +inf (zero weight), 2 (dead), kappa (live). "positive_first": zero first,
    then the highest value first; "negative_first": zero first, then the lowest value first; ties
    by smaller |w|, then layer order, then flat index.
    """
    names = names or list(result.kappa)
    keys = []
    for layer, name in enumerate(result.kappa):
        if name not in names:
            continue
        kappa = result.kappa[name].flatten().tolist()
        live = result.live[name].flatten().tolist()
        w = result.modules[name].weight.detach().flatten().abs().double().tolist()
        for i, (k, alive) in enumerate(zip(kappa, live)):
            if math.isinf(k):
                primary = (0, 0.0)
            else:
                value = k if alive else 2.0
                primary = (1, -value if order == "positive_first" else value)
            keys.append((primary, w[i], layer, i, name))
    keys.sort()
    return [(key[4], key[3]) for key in keys]


def pruned_set(model: nn.Module, names: list[str] = NAMES) -> set[tuple[str, int]]:
    mods = weight_modules(model)
    out = set()
    for n in names:
        mask = getattr(mods[n], "weight_mask", None)
        if mask is not None:
            out |= {(n, int(i)) for i in torch.nonzero(mask.flatten() == 0).flatten()}
    return out


@pytest.fixture(scope="module")
def scored() -> tuple[nn.Module, torch.Tensor, curvprune.CurvatureResult]:
    """One scoring of the tiny model; tests must not prune this model (use ``remap``)."""
    model, x = tiny(), inputs()
    return model, x, neural_curvature(model, x)


@pytest.fixture
def fresh(scored) -> nn.Module:
    """An unpruned copy of the scored model."""
    model = tiny()
    model.load_state_dict(scored[0].state_dict())
    return model


# ---------------------------------------------------------------------------------------------
# Importance scores
# ---------------------------------------------------------------------------------------------


def test_importance_scores_are_a_checked_rank_dict(scored):
    model, _, result = scored
    scores = result.importance_scores()
    assert isinstance(scores, ImportanceScores) and isinstance(scores, dict)
    assert list(scores) == [(model[0], "weight"), (model[3], "weight"), (model[5], "weight")]
    flat = torch.cat([s.flatten() for s in scores.values()])
    assert flat.dtype == torch.float64
    assert torch.equal(flat.sort().values, torch.arange(flat.numel(), dtype=torch.float64))
    for (module, _), s in scores.items():
        assert s.shape == module.weight.shape and s.device == module.weight.device
    assert scores.get((model[3], "weight")) is scores[(model[3], "weight")]
    assert isinstance(scores.copy(), ImportanceScores)
    assert isinstance(scores | {}, ImportanceScores)
    assert "3.weight" in repr(scores)


def test_missing_score_raises_instead_of_using_weights(scored):
    model, _, result = scored
    scores = result.importance_scores()
    with pytest.raises(ValueError, match=r"no importance score for parameter 'bias' of Linear"):
        scores.get((model[3], "bias"), model[3].bias)
    with pytest.raises(KeyError, match="no importance score"):
        scores[(nn.Linear(2, 2), "weight")]
    m = tiny()
    m.load_state_dict(model.state_dict())
    full = remap(result, m)
    partial = ImportanceScores({k: v for k, v in full.items() if k[0] is not m[5]},
                               names=full.names)
    with pytest.raises(ValueError, match=r"parameter '5.weight'; the scores cover \['0.weight', "
                                         r"'3.weight'\]"):
        prune.global_unstructured(
            [(m[0], "weight"), (m[5], "weight")], pruning_method=CurvaturePruning,
            importance_scores=partial, amount=0.5,
        )
    assert not prune.is_pruned(m)
    # a plain dict comprehension loses the check: PyTorch would silently use the weights
    assert type({k: v for k, v in full.items()}) is dict


def test_missing_score_in_global_unstructured_names_the_parameter(scored, fresh):
    _, _, result = scored
    scores = remap(result, fresh)
    del scores[(fresh[5], "weight")]
    params = [(fresh[0], "weight"), (fresh[3], "weight"), (fresh[5], "weight")]
    with pytest.raises(ValueError, match=r"parameter '5.weight'"):
        prune.global_unstructured(params, pruning_method=CurvaturePruning,
                                  importance_scores=scores, amount=0.5)
    assert not prune.is_pruned(fresh)
    anonymous = ImportanceScores(dict(scores))  # no names: the module is described
    with pytest.raises(ValueError, match=r"parameter 'weight' of Linear\(in_features=6, "
                                         r"out_features=4, bias=True\)"):
        prune.global_unstructured(params, pruning_method=CurvaturePruning,
                                  importance_scores=anonymous, amount=0.5)
    assert not prune.is_pruned(fresh)


def test_apply_requires_scores(fresh):
    with pytest.raises(ValueError, match="importance_scores is required"):
        CurvaturePruning.apply(fresh[3], "weight", amount=0.5, importance_scores=None)
    with pytest.raises(ValueError, match="no importance score for parameter 'weight' of Linear"):
        curvature_unstructured(fresh[3], "weight", 0.5, {})
    with pytest.raises(TypeError, match="tensor or a"):
        curvature_unstructured(fresh[3], "weight", 0.5, [1, 2, 3])
    with pytest.raises(ValueError, match="has no tensor named 'kernel'"):
        curvature_unstructured(fresh[3], "kernel", 0.5, torch.zeros(6, 27))
    assert not prune.is_pruned(fresh)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(27, 6, dtype=torch.float64), r"has shape \(27, 6\) but the parameter has "
                                                  r"shape \(6, 27\)"),
        (torch.zeros(6, 27, device="meta"), "is on meta but the parameter is on cpu"),
        (torch.full((6, 27), math.nan), "contains NaN"),
    ],
)
def test_bad_scores_raise_value_error(fresh, bad, message):
    with pytest.raises(ValueError, match=message):
        CurvaturePruning.apply(fresh[3], "weight", amount=0.5, importance_scores=bad)
    scores = ImportanceScores({(fresh[3], "weight"): bad})
    with pytest.raises(ValueError, match=message):
        prune.global_unstructured([(fresh[3], "weight")], pruning_method=CurvaturePruning,
                                  importance_scores=scores, amount=0.5)
    assert not prune.is_pruned(fresh)
    assert "weight" in fresh[3]._parameters


# ---------------------------------------------------------------------------------------------
# The pruned set is the curvature ranking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["positive_first", "negative_first"])
@pytest.mark.parametrize("amount", [0.3, 0.5, 7, 0.9])
def test_global_unstructured_prunes_the_curvature_ranking(scored, fresh, order, amount):
    _, _, result = scored
    params = [(fresh[0], "weight"), (fresh[3], "weight"), (fresh[5], "weight")]
    prune.global_unstructured(params, pruning_method=CurvaturePruning,
                              importance_scores=remap(result, fresh, order), amount=amount)
    ranking = expected_order(result, order)
    n = amount if isinstance(amount, int) else round(amount * len(ranking))
    assert pruned_set(fresh) == set(ranking[:n])
    for module in weight_modules(fresh).values():
        assert module.weight_mask.dtype == module.weight_orig.dtype == torch.float32


@pytest.mark.parametrize("order", ["positive_first", "negative_first"])
def test_per_layer_apply_prunes_each_layer_by_its_ranking(scored, fresh, order):
    _, _, result = scored
    scores = remap(result, fresh, order)
    mods = weight_modules(fresh)
    for name in NAMES:
        CurvaturePruning.apply(mods[name], "weight", amount=0.4, importance_scores=scores)
    for name in NAMES:
        ranking = expected_order(result, order, [name])
        n = round(0.4 * len(ranking))
        assert pruned_set(fresh, [name]) == set(ranking[:n]), name


def test_functional_form_matches_apply_and_returns_module(scored, fresh):
    _, _, result = scored
    other = tiny()
    other.load_state_dict(fresh.state_dict())
    out = curvature_unstructured(fresh[3], "weight", 11, remap(result, fresh))
    assert out is fresh[3]
    CurvaturePruning.apply(other[3], "weight", 11,
                           importance_scores=remap(result, other)[(other[3], "weight")])
    assert torch.equal(fresh[3].weight_mask, other[3].weight_mask)
    assert int((fresh[3].weight_mask == 0).sum()) == 11


def test_order_neg_prunes_lowest_kappa_first(scored, fresh):
    _, _, result = scored
    prune_set = expected_order(result, "negative_first")[:20]
    values = [float(result.kappa[n].flatten()[i]) for n, i in prune_set]
    finite = [v for v in values if not math.isinf(v)]
    assert finite == sorted(finite) and finite[0] < 0
    prune.global_unstructured(list(remap(result, fresh, "negative_first")),
                              pruning_method=CurvaturePruning,
                              importance_scores=remap(result, fresh, "negative_first"), amount=20)
    assert pruned_set(fresh) == set(prune_set)


@settings(max_examples=profile_examples(30), deadline=None)
@given(amount=st.one_of(st.floats(0.0, 1.0), st.integers(0, 213)),
       order=st.sampled_from(["positive_first", "negative_first"]),
       layers=st.sets(st.sampled_from(NAMES), min_size=1))
def test_global_pruning_property(scored, amount, order, layers):
    _, _, result = scored
    model = tiny()
    model.load_state_dict(scored[0].state_dict())
    names = [n for n in NAMES if n in layers]
    mods = weight_modules(model)
    ranking = expected_order(result, order, names)
    if isinstance(amount, int) and amount > len(ranking):
        return
    prune.global_unstructured([(mods[n], "weight") for n in names],
                              pruning_method=CurvaturePruning,
                              importance_scores=remap(result, model, order), amount=amount)
    n = amount if isinstance(amount, int) else round(amount * len(ranking))
    assert pruned_set(model, names) == set(ranking[:n])


# ---------------------------------------------------------------------------------------------
# PyTorch's pruning contract: masks, counts, composition, remove, state_dict
# ---------------------------------------------------------------------------------------------


def test_reparametrisation_masks_shapes_and_dtypes(scored, fresh):
    _, x, result = scored
    original = fresh[3].weight.detach().clone()
    curvature_unstructured(fresh[3], "weight", 0.5, remap(result, fresh))
    module = fresh[3]
    assert prune.is_pruned(fresh)
    assert "weight" not in module._parameters
    assert isinstance(module.weight_orig, nn.Parameter)
    assert torch.equal(module.weight_orig, original)
    assert module.weight_mask.shape == original.shape
    assert module.weight_mask.dtype == original.dtype
    assert set(module.weight_mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(module.weight, original * module.weight_mask)
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, CurvaturePruning)]
    assert len(hooks) == 1 and hooks[0]._tensor_name == "weight"
    # the forward pass uses the masked weight
    assert torch.allclose(fresh[3](torch.ones(1, 27)),
                          (original * module.weight_mask).sum(1) + module.bias)


@pytest.mark.parametrize("amount, expected", [(0, 0), (0.0, 0), (1, 1), (0.25, 40), (1.0, 162),
                                               (162, 162), (0.5, 81)])
def test_exact_counts(scored, fresh, amount, expected):
    _, _, result = scored
    curvature_unstructured(fresh[3], "weight", amount, remap(result, fresh))
    assert int((fresh[3].weight_mask == 0).sum()) == expected
    assert prune.is_pruned(fresh)  # amount 0 still reparametrises, as in PyTorch
    if expected == 162:
        assert torch.count_nonzero(fresh[3].weight) == 0


def test_composition_with_previous_curvature_mask(scored, fresh):
    _, _, result = scored
    scores = remap(result, fresh)
    curvature_unstructured(fresh[3], "weight", 0.3, scores)
    first = fresh[3].weight_mask.clone()
    curvature_unstructured(fresh[3], "weight", 0.5, scores)
    second = fresh[3].weight_mask
    hook = [h for h in fresh[3]._forward_pre_hooks.values()
            if isinstance(h, prune.BasePruningMethod)]
    assert len(hook) == 1 and isinstance(hook[0], prune.PruningContainer)
    assert [type(m) for m in hook[0]] == [CurvaturePruning, CurvaturePruning]
    assert second.dtype == fresh[3].weight_orig.dtype
    assert bool(((first == 0) <= (second == 0)).all())  # old zeros stay
    remaining = int(first.sum())
    assert int((second == 0).sum()) == int((first == 0).sum()) + round(0.5 * remaining)
    # two steps on one static ranking prune exactly the first n of the ranking
    ranking = expected_order(result, "positive_first", ["3.weight"])
    assert pruned_set(fresh, ["3.weight"]) == set(ranking[:int((second == 0).sum())])


def test_composition_with_another_pytorch_method(scored, fresh):
    _, _, result = scored
    prune.random_unstructured(fresh[3], "weight", amount=0.5)
    before = fresh[3].weight_mask.clone()
    curvature_unstructured(fresh[3], "weight", 10, remap(result, fresh))
    after = fresh[3].weight_mask
    assert bool(((before == 0) <= (after == 0)).all())
    newly = (before != 0) & (after == 0)
    assert int(newly.sum()) == 10
    # the 10 new ones are the lowest-ranked of the entries the random mask left
    ranking = [i for n, i in expected_order(result, "positive_first", ["3.weight"])
               if before.flatten()[i] != 0]
    assert set(torch.nonzero(newly.flatten()).flatten().tolist()) == set(ranking[:10])


def test_int_amount_larger_than_remaining_uses_pytorchs_message(scored, fresh):
    _, _, result = scored
    scores = remap(result, fresh)
    curvature_unstructured(fresh[5], "weight", 20, scores)
    with pytest.raises(ValueError, match=r"amount=5 should be smaller than the number of "
                                         r"parameters to prune=4"):
        curvature_unstructured(fresh[5], "weight", 5, scores)
    assert int((fresh[5].weight_mask == 0).sum()) == 20  # rolled back to the previous state


def test_remove_and_make_permanent(scored, fresh):
    _, x, result = scored
    scores = remap(result, fresh)
    prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                              importance_scores=scores, amount=0.5)
    curvature_unstructured(fresh[3], "weight", 0.2, scores)  # a container on one layer
    masks = {n: weight_modules(fresh)[n].weight_mask.clone() for n in NAMES}
    out = fresh(x)
    prune.remove(fresh[0], "weight")
    assert "weight" in fresh[0]._parameters and not hasattr(fresh[0], "weight_mask")
    assert torch.equal(fresh[0].weight == 0, masks["0.weight"] == 0)
    assert make_permanent(fresh) is fresh
    assert not prune.is_pruned(fresh)
    for n, module in weight_modules(fresh).items():
        assert isinstance(module.weight, nn.Parameter)
        assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
        assert bool((module.weight[masks[n] == 0] == 0).all())
    assert torch.equal(fresh(x), out)
    assert set(fresh.state_dict()) == set(tiny().state_dict())


def test_state_dict_has_pytorch_layout(scored, fresh):
    _, _, result = scored
    curvature_unstructured(fresh[3], "weight", 0.5, remap(result, fresh))
    keys = set(fresh.state_dict())
    assert {"3.weight_orig", "3.weight_mask"} <= keys and "3.weight" not in keys
    plain = tiny(seed=5)
    with pytest.raises(RuntimeError, match="weight_orig"):
        plain.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize("via", ["file", "buffer", "mapping"])
def test_save_and_load_round_trip(scored, fresh, tmp_path, via):
    _, x, result = scored
    scores = remap(result, fresh)
    prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                              importance_scores=scores, amount=0.6)
    curvature_unstructured(fresh[5], "weight", 3, scores)
    target = tiny(seed=7)  # other values everywhere
    if via == "file":
        path = tmp_path / "pruned.pt"
        save_pruned(fresh, path)
        assert load_pruned(target, path) is target
    elif via == "buffer":
        buffer = io.BytesIO()
        save_pruned(fresh, buffer)
        buffer.seek(0)
        load_pruned(target, buffer)
    else:
        load_pruned(target, fresh.state_dict())
    for name, module in weight_modules(target).items():
        source = weight_modules(fresh)[name]
        assert torch.equal(module.weight_mask, source.weight_mask)
        assert torch.equal(module.weight_orig, source.weight_orig)
        assert torch.equal(module.weight, source.weight)  # fresh right away, before a forward
    assert prune.is_pruned(target)
    assert torch.equal(target(x), fresh(x))
    assert set(target.state_dict()) == set(fresh.state_dict())
    # further pruning composes on the loaded masks
    curvature_unstructured(target[3], "weight", 5, remap(result, target))
    assert int((target[3].weight_mask == 0).sum()) == int((fresh[3].weight_mask == 0).sum()) + 5


def test_documented_manual_load_recipe(scored, fresh, tmp_path):
    """The by-hand recipe of docs/pruning.md."""
    _, x, result = scored
    curvature_unstructured(fresh[3], "weight", 0.5, remap(result, fresh))
    torch.save(fresh.state_dict(), tmp_path / "pruned.pt")
    target = tiny(seed=4)
    state = torch.load(tmp_path / "pruned.pt", weights_only=True)
    for key in state:
        if key.endswith("_mask"):
            module_name, _, tensor = key[: -len("_mask")].rpartition(".")
            prune.identity(target.get_submodule(module_name), tensor)
    target.load_state_dict(state)
    assert torch.equal(target(x), fresh(x))


def test_load_into_pruned_model_overwrites_masks(scored, fresh):
    _, x, result = scored
    curvature_unstructured(fresh[3], "weight", 0.5, remap(result, fresh))
    target = tiny(seed=3)
    prune.random_unstructured(target[3], "weight", amount=0.1)
    load_pruned(target, fresh.state_dict())
    assert torch.equal(target[3].weight_mask, fresh[3].weight_mask)
    assert torch.equal(target(x), fresh(x))


def test_load_errors_roll_back(scored, fresh):
    _, _, result = scored
    curvature_unstructured(fresh[3], "weight", 0.5, remap(result, fresh))
    state = fresh.state_dict()
    bad = dict(state)
    bad["3.weight_orig"] = torch.zeros(5, 5)
    target = tiny(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"(?s)nothing was loaded.*mismatch for 3.weight_orig"):
        load_pruned(target, bad)
    assert not prune.is_pruned(target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \['3.bias'\]"):
        load_pruned(target, {k: v for k, v in state.items() if k != "3.bias"})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \['extra'\]"):
        load_pruned(target, {**state, "extra": torch.zeros(1)})
    assert not prune.is_pruned(target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    load_pruned(target, {k: v for k, v in state.items() if k != "3.bias"}, strict=False)
    assert torch.equal(target[3].bias, before["3.bias"])
    assert torch.equal(target[3].weight_mask, fresh[3].weight_mask)
    target = tiny(seed=2)
    no_orig = {k: v for k, v in state.items() if k != "3.weight_orig"}
    with pytest.raises(ValueError, match="no '3.weight_orig'"):
        load_pruned(target, no_orig)
    with pytest.raises(ValueError, match="pruned in the model but not in the state dict"):
        load_pruned(fresh, tiny().state_dict())


def test_deepcopy_fails_but_clone_pruned_works(scored, fresh):
    _, x, result = scored
    scores = remap(result, fresh)
    prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                              importance_scores=scores, amount=0.5)
    curvature_unstructured(fresh[3], "weight", 0.2, scores)
    fresh(x).sum().backward()  # weight is a non-leaf tensor of the autograd graph
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(fresh)
    clone = clone_pruned(fresh)
    assert torch.equal(clone(x), fresh(x))
    for name, module in weight_modules(clone).items():
        source = weight_modules(fresh)[name]
        assert torch.equal(module.weight_mask, source.weight_mask)
        assert module.weight_mask.data_ptr() != source.weight_mask.data_ptr()
        assert torch.equal(module.weight, source.weight)
    # independent: pruning the clone further leaves the original alone
    mask = fresh[3].weight_mask.clone()
    prune.l1_unstructured(clone[3], "weight", amount=3)
    assert torch.equal(fresh[3].weight_mask, mask)
    assert isinstance(fresh[3].weight, torch.Tensor) and fresh[3].weight.grad_fn is not None
    # an unpruned model clones too
    assert torch.equal(clone_pruned(tiny())(x), tiny()(x))


# ---------------------------------------------------------------------------------------------
# Rescoring a pruned model
# ---------------------------------------------------------------------------------------------


def test_rescoring_sees_pruned_weights_as_absent_edges(scored, fresh):
    _, x, result = scored
    scores = remap(result, fresh)
    prune.global_unstructured(list(scores), pruning_method=CurvaturePruning,
                              importance_scores=scores, amount=0.4)
    again = neural_curvature(fresh, x)
    mods = weight_modules(fresh)
    assert list(again.modules) == NAMES and again.modules["3.weight"] is fresh[3]
    total_pruned = 0
    for name in NAMES:
        pruned = mods[name].weight_mask == 0
        total_pruned += int(pruned.sum())
        assert torch.equal(torch.isinf(again.kappa[name]), pruned)
        assert not again.live[name][pruned].any()
    # the pruned weights rank first in both orders
    for order in ("positive_first", "negative_first"):
        ranks = again.pruning_order(order)
        first = {(n, int(i)) for n in NAMES
                 for i in torch.nonzero(ranks[n].flatten() < total_pruned).flatten()}
        assert first == pruned_set(fresh)
    # and the model was left as it was found
    assert all(isinstance(m.weight_mask, torch.Tensor) for m in mods.values())


def test_prune_model_iterative(scored, fresh):
    _, x, _ = scored
    first = prune_model(fresh, x, 0.3)
    mask1 = {n: m.weight_mask.clone() for n, m in weight_modules(fresh).items()}
    assert first.newly_pruned == round(0.3 * 213) == first.pruned
    second = prune_model(fresh, x, 0.5)
    remaining = 213 - first.pruned
    assert second.newly_pruned == round(0.5 * remaining)
    assert second.pruned == first.pruned + second.newly_pruned
    for name, module in weight_modules(fresh).items():
        assert bool(((mask1[name] == 0) <= (module.weight_mask == 0)).all())
        assert torch.equal(torch.isinf(second.result.kappa[name]), mask1[name] == 0)
    # the second step pruned the lowest-ranked of the rescored, still unpruned weights
    ranking = [key for key in expected_order(second.result, "positive_first")
               if key not in {(n, int(i)) for n in NAMES
                              for i in torch.nonzero(mask1[n].flatten() == 0).flatten()}]
    newly = pruned_set(fresh) - {(n, int(i)) for n in NAMES
                                 for i in torch.nonzero(mask1[n].flatten() == 0).flatten()}
    assert newly == set(ranking[:second.newly_pruned])


# ---------------------------------------------------------------------------------------------
# prune_model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["positive_first", "negative_first"])
def test_prune_model_global_matches_ranking(scored, fresh, order):
    _, x, result = scored
    report = prune_model(fresh, x, 0.5, order=order)
    ranking = expected_order(report.result, order)
    assert pruned_set(fresh) == set(ranking[:round(0.5 * 213)])
    assert pruned_set(fresh) == set(expected_order(result, order)[:round(0.5 * 213)])
    assert report.scope == "global" and report.order == order and report.amount == 0.5
    assert list(report.layers) == NAMES
    for name, layer in report.layers.items():
        mask = weight_modules(fresh)[name].weight_mask
        assert layer.pruned == int((mask == 0).sum()) and layer.total == mask.numel()
        assert report.sparsity[name] == layer.pruned / layer.total
    assert report.overall_sparsity == round(0.5 * 213) / 213
    assert report.excluded == []
    assert "3.weight" in report.summary() and "PruningReport" in repr(report)


@pytest.mark.parametrize("old, new", [("pos", "positive_first"), ("neg", "negative_first")])
def test_old_order_spellings_rank_and_prune_identically_with_a_warning(scored, old, new):
    from curvprune.baselines import magnitude
    from curvprune.decision import sort_key_bounds

    model, _, result = scored
    warns = pytest.warns(DeprecationWarning, match=f"order='{old}' is deprecated; use "
                                                   f"order='{new}'")
    with warns:
        old_ranks = result.pruning_order(old)
    assert old_ranks.keys() == result.pruning_order(new).keys()
    assert all(torch.equal(old_ranks[n], result.pruning_order(new)[n]) for n in old_ranks)
    with warns:
        old_scores = result.importance_scores(old)
    new_scores = result.importance_scores(new)
    assert all(torch.equal(old_scores[k], new_scores[k]) for k in new_scores)
    with warns:
        assert torch.equal(magnitude(model[3].weight, old), magnitude(model[3].weight, new))
    with warns:
        old_keys = sort_key_bounds(result, old)
    for name, (a, b) in sort_key_bounds(result, new).items():
        assert torch.equal(old_keys[name][0], a) and torch.equal(old_keys[name][1], b)
    pruned = {}
    for spelling in (old, new):
        copy_ = tiny()
        copy_.load_state_dict(model.state_dict())
        if spelling == old:
            with warns:
                report = prune_model(copy_, None, 0.4, order=old, result=result.bind(copy_))
        else:
            report = prune_model(copy_, None, 0.4, order=new, result=result.bind(copy_))
        assert report.order == new  # the report names the new spelling
        pruned[spelling] = pruned_set(copy_)
    assert pruned[old] == pruned[new] and len(pruned[new]) == round(0.4 * 213)


@pytest.mark.parametrize("allocation", ["wanda", "magnitude"])
def test_prune_model_allocation(scored, fresh, allocation):
    from curvprune.baselines import magnitude_scores, wanda_scores

    _, x, _ = scored
    mods = weight_modules(fresh)
    budget = (wanda_scores(fresh, x) if allocation == "wanda" else magnitude_scores(fresh))
    report = prune_model(fresh, x, 0.6, allocation=allocation, exclude="0")
    # each non-excluded layer loses what a global ranking by the budget over them removes ...
    targets = [n for n in NAMES if n != "0.weight"]
    flat = torch.cat([budget[(mods[n], "weight")].flatten() for n in targets])
    cut = torch.sort(flat).values[round(0.6 * flat.numel()) - 1]
    for name in targets:
        expected = int((budget[(mods[name], "weight")] <= cut).sum())
        assert report.layers[name].pruned == expected, name
        # ... chosen by curvature within the layer
        ranking = expected_order(report.result, "positive_first", [name])
        assert pruned_set(fresh, [name]) == set(ranking[:expected])
    assert report.layers["0.weight"].pruned == 0
    assert report.pruned == round(0.6 * flat.numel())


def test_prune_model_layer_scope(scored, fresh):
    _, x, _ = scored
    report = prune_model(fresh, x, 0.5, scope="layer", order="negative_first")
    for name in NAMES:
        ranking = expected_order(report.result, "negative_first", [name])
        n = round(0.5 * len(ranking))
        assert pruned_set(fresh, [name]) == set(ranking[:n])
        assert report.layers[name].pruned == n


@pytest.mark.parametrize("exclude", ["5.weight", "5", "fresh[5]", ["5", "0.weight"]])
def test_prune_model_exclude(scored, fresh, exclude):
    _, x, _ = scored
    if exclude == "fresh[5]":
        exclude = fresh[5]
    report = prune_model(fresh, x, 10, exclude=exclude)
    assert not hasattr(fresh[5], "weight_mask")
    assert "5.weight" in report.excluded and report.layers["5.weight"].pruned == 0
    targets = [n for n in NAMES if n not in report.excluded]
    assert pruned_set(fresh) == set(expected_order(report.result, "positive_first", targets)[:10])
    assert report.pruned == 10


def test_prune_model_exclude_a_container():
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4)),
                          nn.ReLU(), nn.Linear(4, 3))
    report = prune_model(model, torch.randn(2, 5), 0.5, exclude="0")
    assert report.excluded == ["0.0.weight", "0.2.weight"]
    assert not prune.is_pruned(model[0]) and prune.is_pruned(model[2])


@pytest.mark.parametrize(
    "exclude, error, message",
    [
        ("9", ValueError, r"'9' is neither a module nor a parameter"),
        ("3.kernel", ValueError, r"'3.kernel' is neither a module nor a parameter"),
        ("3.bias", ValueError, r"'3.bias' matches no scored weight"),
        ("1", ValueError, r"'1' matches no scored weight"),
        (nn.Linear(2, 2), ValueError, r"is not a submodule of the model"),
        (["0", "3", "5"], ValueError, r"every scored weight is excluded"),
        ([3], TypeError, r"exclude entries must be"),
    ],
)
def test_prune_model_bad_exclude(fresh, exclude, error, message):
    with pytest.raises(error, match=message):
        prune_model(fresh, inputs(), 0.5, exclude=exclude)
    assert not prune.is_pruned(fresh)


def test_already_zero_weights_go_first():
    model, x = tiny(zero="some"), inputs()
    zeros = {("3.weight", i) for i in range(0, 162, 7)}
    for order in ("positive_first", "negative_first"):
        m = tiny(zero="some")
        report = prune_model(m, x, len(zeros), order=order)
        assert pruned_set(m) == zeros
        assert report.result.layer_summaries()[1].zero == len(zeros)
    # a layer that is entirely zero is pruned first, then the ranking goes on
    m = tiny(zero="all")
    report = prune_model(m, x, 30)
    assert int((m[5].weight_mask == 0).sum()) == 24
    assert pruned_set(m) == set(expected_order(report.result, "positive_first")[:30])
    assert model is not m


@pytest.mark.parametrize("amount", [0, 0.0, 1.0, 213])
def test_prune_model_extreme_amounts(fresh, amount):
    x = inputs()
    report = prune_model(fresh, x, amount)
    expected = 0 if amount in (0, 0.0) else 213
    assert report.pruned == expected == report.newly_pruned
    assert prune.is_pruned(fresh)
    if expected == 213:
        assert all(torch.count_nonzero(m.weight) == 0 for m in weight_modules(fresh).values())
        again = prune_model(fresh, x, 0.5)  # nothing left: a no-op, not an error
        assert again.newly_pruned == 0 and again.overall_sparsity == 1.0


def _pytorch_error(amount) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as info:
        prune.L1Unstructured(amount)
    return info.value


@pytest.mark.parametrize("amount", [-1, 1.5, -0.1, "0.5", None, 2.0])
def test_amount_validation_uses_pytorch_messages(fresh, amount):
    with pytest.raises((TypeError, ValueError)) as reference:
        prune.L1Unstructured(amount)
    kind, message = type(reference.value), re.escape(str(reference.value))
    with pytest.raises(kind, match=message):
        CurvaturePruning(amount)
    with pytest.raises(kind, match=message):
        curvature_unstructured(fresh[3], "weight", amount, torch.zeros(6, 27))
    with pytest.raises(kind, match=message):
        prune.global_unstructured([(fresh[3], "weight")], pruning_method=CurvaturePruning,
                                  importance_scores={(fresh[3], "weight"): torch.zeros(6, 27)},
                                  amount=amount)
    with pytest.raises(kind, match=message):
        prune_model(fresh, inputs(), amount)
    assert not prune.is_pruned(fresh)


def test_nan_amount_is_refused_in_pytorchs_words(fresh):
    # PyTorch's own check lets NaN through (every comparison is False) and fails later in
    # round(); CurvaturePruning refuses it up front with the message of an out-of-range float.
    message = r"amount=nan should either be a float in the range \[0, 1\] or a non-negative"
    with pytest.raises(ValueError, match=message):
        CurvaturePruning(math.nan)
    with pytest.raises(ValueError, match=message):
        prune_model(fresh, inputs(), math.nan)
    assert not prune.is_pruned(fresh)


def test_int_amount_too_large_is_refused_before_pruning(fresh):
    with pytest.raises(ValueError) as reference:
        prune.l1_unstructured(nn.Linear(6, 4), "weight", amount=25)
    with pytest.raises(ValueError, match=re.escape(str(reference.value))):
        prune_model(fresh, inputs(), 25, scope="layer")  # 5.weight has 24 entries
    assert not prune.is_pruned(fresh)  # no layer was pruned before the error
    with pytest.raises(ValueError, match="parameters to prune=213"):
        prune_model(fresh, inputs(), 214)
    assert not prune.is_pruned(fresh)


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "model"}, "scope must be"), ({"order": "up"}, "order must be"),
    ({"allocation": "snip"}, "allocation must be one of"),
    ({"allocation": "wanda", "scope": "layer"}, "Use scope='global'"),
])
def test_prune_model_bad_options(fresh, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_model(fresh, inputs(), 0.5, **kwargs)


def test_prune_model_parameters_on_several_devices(fresh):
    fresh[5] = nn.Linear(6, 4, device="meta")
    with pytest.raises(ValueError, match=r"several devices \(\['cpu', 'meta'\]\)"):
        prune_model(fresh, inputs(), 0.5)
    assert not prune.is_pruned(fresh)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@cuda
def test_cuda_prune_run_save_load(tmp_path):
    model, x = tiny().cuda(), inputs().cuda()
    cpu_model = tiny()
    cpu_report = prune_model(cpu_model, x.cpu(), 0.5)
    report = prune_model(model, x, 0.5)
    assert report.pruned == cpu_report.pruned
    for module in weight_modules(model).values():
        assert module.weight_mask.device.type == "cuda"
        assert module.weight.device.type == "cuda"
    out = model(x)
    assert out.device.type == "cuda"
    clone = clone_pruned(model)
    assert torch.equal(clone(x), out)
    save_pruned(model, tmp_path / "m.pt")
    on_cpu = load_pruned(tiny(seed=9), tmp_path / "m.pt")
    assert torch.allclose(on_cpu(x.cpu()), out.cpu(), atol=1e-5)
    moved = clone_pruned(on_cpu).cuda()
    assert torch.allclose(moved(x), out, atol=1e-5)
    make_permanent(model)
    assert torch.allclose(model(x), out)


@cuda
def test_cuda_scores_on_the_wrong_device_raise():
    model = tiny().cuda()
    with pytest.raises(ValueError, match="is on cpu but the parameter is on cuda"):
        curvature_unstructured(model[3], "weight", 0.5, torch.zeros(6, 27))
