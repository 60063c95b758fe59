"""Properties of ``neural_curvature``'s result that need no reference: shapes, +inf on zero
weights, ``live`` flags, bounds, ranking and summaries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import build, net_specs, profile_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvprune import CurvatureResult, neural_curvature
from curvprune.calibration import capture_activations, normalise_activity, scoring_mode
from curvprune.graphs.neuron import layer_edges, trace_chain

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _structure(model: nn.Module, x: torch.Tensor):
    """Activities per node layer (``[batch, nodes]``) and each layer's structural edges."""
    modules = [layer.module for layer in trace_chain(model)]
    with scoring_mode(model):
        values, in_shapes, out_shapes = capture_activations(model, modules, x)
    acts = [normalise_activity(v) for v in values]
    edges = [layer_edges(m, in_shapes[k], out_shapes[k]) for k, m in enumerate(modules)]
    return modules, acts, edges


@settings(max_examples=profile_examples(40), **_SETTINGS)
@given(spec=net_specs(max_examples=3), alpha=st.sampled_from([0.0, 0.5, 0.9]))
def test_shapes_infinities_and_live_flags(spec, alpha):
    model, x = build(spec)
    result = neural_curvature(model, x, alpha=alpha)
    modules, acts, edges = _structure(model, x)
    n = len(modules)
    names = [layer.name for layer in trace_chain(model)]
    assert list(result.kappa) == names and list(result.live) == names
    assert result.num_examples == x.shape[0]
    assert result.alpha == alpha and result.granularity == "neuron"
    for k, (name, module) in enumerate(zip(names, modules)):
        kappa, live, weight = result.kappa[name], result.live[name], module.weight.detach()
        assert kappa.shape == weight.shape and live.shape == weight.shape
        assert kappa.dtype == torch.float64 and live.dtype == torch.bool
        assert not torch.isnan(kappa).any() and not torch.isneginf(kappa).any()
        assert result.modules[name] is module
        e = edges[k]
        nonzero = weight.flatten()[e.widx] != 0
        src, dst, widx = e.src[nonzero], e.dst[nonzero], e.widx[nonzero]
        assert result.edges_per_example[name] == widx.numel()
        has_edge = torch.zeros(weight.numel(), dtype=torch.bool)
        has_edge[widx] = True
        # +inf exactly on weights with no edge: every zero weight, and nonzero weights that
        # touch no position.
        assert torch.equal(torch.isposinf(kappa).flatten(), ~has_edge)
        assert torch.isposinf(kappa[weight == 0]).all()
        # live: some edge has both ends alive on some example (input and output never die).
        l = k + 1
        dead = torch.zeros(x.shape[0], widx.numel(), dtype=torch.bool)
        if l > 1:
            dead |= acts[l - 1][:, src] == 0
        if l < n:
            dead |= acts[l][:, dst] == 0
        expected_live = torch.zeros(weight.numel(), dtype=torch.bool)
        expected_live[widx[(~dead).any(dim=0)]] = True
        assert torch.equal(live.flatten(), expected_live), name
        # A weight with edges but no live edge has kappa exactly 1 (dead edges count 1).
        assert (kappa[~live & ~torch.isposinf(kappa)] == 1).all()
        # Live curvature lies below 2 (result.py's ranking relies on it).
        assert (kappa[live] < 2).all()
        if alpha < 0.5:
            assert (kappa[live] <= 1 / (1 - alpha) + 1e-12).all()


@settings(max_examples=profile_examples(30), **_SETTINGS)
@given(spec=net_specs(max_examples=2), order=st.sampled_from(["positive_first", "negative_first"]))
def test_importance_scores_are_a_permutation_in_rank_order(spec, order):
    model, x = build(spec)
    result = neural_curvature(model, x)
    scores = result.importance_scores(order)
    ranks = result.pruning_order(order)
    values = result.rank_values()
    assert len(scores) == len(result.kappa)
    for name, module in result.modules.items():
        score = scores[(module, "weight")]
        assert score.shape == module.weight.shape and score.dtype == torch.float64
        assert torch.equal(score, ranks[name].to(torch.float64))
        assert not score.requires_grad
    flat_rank = torch.cat([ranks[n].flatten() for n in result.kappa])
    total = flat_rank.numel()
    assert torch.equal(torch.sort(flat_rank).values, torch.arange(total))
    # Walking the ranks: zero weights first, then by value (positive_first: high first,
    # negative_first: low first), ties by smaller |w|.
    flat_value = torch.cat([values[n].flatten() for n in result.kappa])
    flat_w = torch.cat([m.weight.detach().abs().flatten().double()
                        for m in result.modules.values()])
    order_idx = torch.argsort(flat_rank)
    v, w = flat_value[order_idx], flat_w[order_idx]
    zero = torch.isposinf(v)
    if zero.any():
        assert zero[: int(zero.sum())].all(), "zero weights must come first"
    live_v, live_w = v[~zero], w[~zero]
    step = live_v[1:] - live_v[:-1]
    if order == "positive_first":
        assert (step <= 0).all()
    else:
        assert (step >= 0).all()
    ties = step == 0
    assert (live_w[1:][ties] >= live_w[:-1][ties]).all()


def test_rank_values_and_summaries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[2].bias.fill_(-10)  # layer 2 dead: its edges are dead
    x = torch.randn(3, 4)
    result = neural_curvature(model, x)
    values = result.rank_values()
    for name, kappa in result.kappa.items():
        live = result.live[name]
        assert torch.isposinf(values[name][torch.isposinf(kappa)]).all()
        assert (values[name][~live & ~torch.isposinf(kappa)] == 2).all()
        assert torch.equal(values[name][live], kappa[live])
    assert not result.live["2.weight"].any() and not result.live["4.weight"].any()
    rows = result.layer_summaries()
    assert [r.name for r in rows] == list(result.kappa)
    for r in rows:
        kappa = result.kappa[r.name]
        assert r.weights == kappa.numel() == r.zero + r.dead + r.live
        assert r.zero == int(torch.isposinf(kappa).sum())
        assert r.live == int(result.live[r.name].sum())
        if r.live:
            assert r.kappa_min == pytest.approx(float(kappa[result.live[r.name]].min()))
        else:
            assert math.isnan(r.kappa_min)
    assert rows[0].zero == 4
    text = result.summary()
    for name in result.kappa:
        assert name in text
    assert "CurvatureResult" in repr(result)
    with pytest.raises(ValueError, match="order"):
        result.pruning_order("random")


def test_rank_by_orders_keys_then_magnitude_then_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    result = neural_curvature(model, torch.randn(3, 4))
    # pruning_order is rank_by with key -kappa (zeros first): the same ranks.
    keys = {n: torch.where(torch.isinf(v), torch.full_like(v, -math.inf), -v)
            for n, v in result.rank_values().items()}
    ranks = result.rank_by(keys)
    for name, r in result.pruning_order().items():
        assert torch.equal(ranks[name], r)
    # Equal keys: the smaller |w| first, then layer order and flattened index (brute force).
    flat = [(0.0, float(model[int(n[0])].weight.detach().abs().reshape(-1)[i]), j, i)
            for j, n in enumerate(result.kappa) for i in range(result.kappa[n].numel())]
    expected = {item: rank for rank, item in enumerate(sorted(flat))}
    tied = result.rank_by({n: torch.zeros_like(k) for n, k in result.kappa.items()})
    for (_, _, j, i), rank in expected.items():
        assert int(tied[list(result.kappa)[j]].reshape(-1)[i]) == rank
    assert result.rank_by({}) == {}
    with pytest.raises(ValueError, match="not a weight this result scores"):
        result.rank_by({"9.weight": torch.zeros(3)})


def test_result_tensors_do_not_require_grad():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    result = neural_curvature(model, torch.randn(2, 4))
    assert isinstance(result, CurvatureResult)
    for tensors in (result.kappa, result.live, result.rank_values(), result.pruning_order()):
        for t in tensors.values():
            assert not t.requires_grad and t.grad_fn is None
    for t in result.importance_scores().values():
        assert not t.requires_grad and t.grad_fn is None


def test_progress_bar_does_not_change_kappa(capsys):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    x = torch.randn(3, 4)
    plain = neural_curvature(model, x)
    shown = neural_curvature(model, x, progress=True)
    for name in plain.kappa:
        assert torch.equal(plain.kappa[name], shown.kappa[name])
        assert torch.equal(plain.live[name], shown.live[name])
