"""Curvature intervals (``neural_curvature(tolerance=...)``) and decision-exact pruning.

Intervals: on random networks every weight's certified bounds contain the slow reference's
value and are at most ``tolerance`` wide, at neuron and channel granularity; with
``tolerance=0`` they collapse onto the exact value. Decision-exact pruning: ``prune_model`` at a
coarse tolerance prunes exactly the entries it prunes with ``tolerance=0``, for both
granularities, both scopes, both orders and several amounts.

The bounds are checked against the reference with a slack of ``1e-9 (1 + |kappa|)`` (the
reference's own rounding), far below the tolerances tested (``>= 1e-2``), so a bound that is
too tight by a meaningful amount fails.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import (
    ConvSpec,
    HiddenSpec,
    LinearSpec,
    NetSpec,
    alphas,
    assert_kappa_equal,
    build,
    net_specs,
)
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from test_channels import RandomNet, _inputs, _perturb, _trace, random_nets

from curvprune import neural_curvature, prune_model
from curvprune.calibration import capture_activations, normalise_activity, scoring_mode
from curvprune.curvature import TOLERANCE, channel_edge_bounds
from curvprune.decision import straddling
from curvprune.graphs.channel import channel_distances
from curvprune.graphs.neuron import NeuronGraph, bound_example, chain_structure, score_example
from curvprune.reference import channel_reference_curvature, reference_curvature

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
tolerances = st.sampled_from([1e-2, 0.1, 0.5, 2.0])


def _slack(value: torch.Tensor) -> torch.Tensor:
    return 1e-9 * (1 + value.abs())


def assert_contains(lo: dict, hi: dict, point: dict, expected: dict, tolerance: float,
                    context: str = "") -> None:
    """``lo <= expected <= hi`` (up to rounding), ``lo <= point <= hi``, width <= tolerance,
    and ``+inf`` on both sides exactly where ``expected`` is ``+inf``."""
    assert set(lo) == set(expected) == set(hi) == set(point)
    for name, want in expected.items():
        a, b, k = lo[name].cpu(), hi[name].cpu(), point[name].cpu()
        want = want.cpu().to(torch.float64)
        inf = torch.isposinf(want)
        assert torch.equal(torch.isposinf(a), inf) and torch.equal(torch.isposinf(b), inf), \
            f"{context} {name}: +inf pattern"
        assert torch.equal(torch.isposinf(k), inf), f"{context} {name}: +inf pattern of kappa"
        f = ~inf
        a, b, k, want = a[f], b[f], k[f], want[f]
        assert not (torch.isnan(a).any() or torch.isnan(b).any()), f"{context} {name}: NaN"
        below = (a - want - _slack(want)).max().item() if want.numel() else 0.0
        above = (want - b - _slack(want)).max().item() if want.numel() else 0.0
        assert below <= 0, f"{context} {name}: lower bound above the exact value by {below:.3e}"
        assert above <= 0, f"{context} {name}: upper bound below the exact value by {above:.3e}"
        assert ((a <= k) & (k <= b)).all(), f"{context} {name}: kappa outside its interval"
        width = (b - a).max().item() if want.numel() else 0.0
        assert width <= tolerance * (1 + 1e-12) + 1e-15, \
            f"{context} {name}: width {width:.3e} > tolerance {tolerance:g}"


# --------------------------------------------------------------------------------------------
# Intervals contain the reference
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, **_SETTINGS)
@given(spec=net_specs(max_examples=3), alpha=alphas, tolerance=tolerances)
def test_neuron_intervals_contain_the_reference(spec, alpha, tolerance):
    model, x = build(spec)
    result = neural_curvature(model, x, alpha=alpha, tolerance=tolerance)
    note(f"engine: {result.engine}, width {result.max_width}")
    expected = reference_curvature(model, x, alpha=alpha)
    assert_contains(result.kappa_lo, result.kappa_hi, result.kappa, expected, tolerance,
                    f"tolerance={tolerance}")
    assert result.max_width <= tolerance * (1 + 1e-12) + 1e-15
    assert result.tolerance == tolerance


@settings(max_examples=100, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=4, min_layers=3, max_examples=2,
                      shifts=(0.0, 0.0, -0.3), activations=("relu", "tanh", "leaky_relu"),
                      zero_modes=("none", "none", "random", "rows", "cols")),
       alpha=alphas, tolerance=tolerances)
def test_deep_live_neuron_intervals_contain_the_reference(spec, alpha, tolerance):
    """Deep live chains: many edges with two neighbour measures, left open by the search."""
    model, x = build(spec)
    result = neural_curvature(model, x, alpha=alpha, tolerance=tolerance)
    expected = reference_curvature(model, x, alpha=alpha)
    assert_contains(result.kappa_lo, result.kappa_hi, result.kappa, expected, tolerance)


@settings(max_examples=40, **_SETTINGS)
@given(spec=net_specs(max_examples=2, min_layers=2), alpha=alphas, tolerance=tolerances)
def test_channel_intervals_contain_the_exact_result(spec, alpha, tolerance):
    """Channel granularity through ``neural_curvature``: every element's interval contains the
    ``tolerance=0`` result (equal to the channel reference: ``test_channels.py``)."""
    model, x = build(spec)
    exact = neural_curvature(model, x, alpha=alpha, granularity="channel", tolerance=0.0)
    result = neural_curvature(model, x, alpha=alpha, granularity="channel", tolerance=tolerance)
    assert exact.max_width == 0
    assert_contains(result.kappa_lo, result.kappa_hi, result.kappa, exact.kappa, tolerance)
    lo, hi = result.edge_kappa_lo, result.edge_kappa_hi
    layer = result.channel_graph.module >= 0
    assert (lo[layer] <= exact.edge_kappa[layer] + _slack(exact.edge_kappa[layer])).all()
    assert (exact.edge_kappa[layer] <= hi[layer] + _slack(exact.edge_kappa[layer])).all()


@settings(max_examples=40, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=4, min_layers=3, max_examples=2,
                      shifts=(0.0, 0.0, -0.3), activations=("relu", "tanh", "leaky_relu")),
       alpha=alphas, tolerance=st.sampled_from([1e-3, 1e-2, 0.1, 0.5]),
       reduction=st.sampled_from(["mean", "weighted", "min"]))
def test_channel_node_intervals_contain_the_exact_result(spec, alpha, tolerance, reduction):
    """``node_reduction``: the tolerance bounds each channel's curvature interval (the same
    reduction of its edges' bounds), which contains the exact channel curvature; every edge's
    interval still contains its exact value."""
    model, x = build(spec)
    exact = neural_curvature(model, x, alpha=alpha, granularity="channel", tolerance=0.0)
    result = neural_curvature(model, x, alpha=alpha, granularity="channel", tolerance=tolerance,
                              node_reduction=reduction)
    assert result.node_reduction == reduction
    layer = result.channel_graph.module >= 0
    want = exact.edge_kappa[layer]
    assert (result.edge_kappa_lo[layer] <= want + _slack(want)).all()
    assert (want <= result.edge_kappa_hi[layer] + _slack(want)).all()
    lo, hi = result.node_kappa_bounds(reduction)
    node = exact.node_kappa(reduction)
    has = ~torch.isnan(node)
    assert torch.equal(has, ~torch.isnan(lo)) and torch.equal(has, ~torch.isnan(hi))
    node, lo, hi = node[has], lo[has], hi[has]
    assert (lo <= node + _slack(node)).all() and (node <= hi + _slack(node)).all()
    assert (hi - lo <= tolerance * (1 + 1e-12) + 1e-15).all(), (hi - lo).max()
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    widest = float((hi - lo)[finite].max()) if finite.any() else 0.0
    assert result.max_node_width(reduction) == widest
    mid = result.node_kappa(reduction)[has]
    assert ((lo <= mid) & (mid <= hi)).all()


def test_node_mean_weights_and_bounds_by_hand():
    """Each edge's coefficient in its channels' means is 1 or its weight norm 1/d; the
    node bounds are those means of the edges' bounds, summed here node by node."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(),
                          nn.Linear(3, 2))
    x = torch.randn(3, 3)
    result = neural_curvature(model, x, granularity="channel", tolerance=0.1)
    graph = result.channel_graph
    assert torch.equal(graph.mean_weights(False), torch.ones(graph.src.numel(),
                                                             dtype=torch.float64))
    assert torch.equal(graph.mean_weights(True), 1.0 / graph.length.to(torch.float64))
    layer = torch.nonzero(graph.module >= 0).squeeze(1).tolist()
    for reduction in ("mean", "weighted", "min"):
        lo, hi = result.node_kappa_bounds(reduction)
        for v in range(graph.num_nodes):
            edges = [e for e in layer if v in (int(graph.src[e]), int(graph.dst[e]))]
            if not edges:
                assert torch.isnan(lo[v]) and torch.isnan(hi[v])
                continue
            for got, values in ((lo[v], result.edge_kappa_lo), (hi[v], result.edge_kappa_hi)):
                vals = torch.stack([values[e] for e in edges])
                if reduction == "min":
                    want = vals.min()
                else:
                    c = torch.stack([graph.mean_weights(reduction == "weighted")[e]
                                     for e in edges])
                    want = (c * vals).sum() / c.sum()
                assert torch.isclose(got, want, rtol=1e-12, atol=1e-15), (reduction, v)
        widths = [float(hi[v] - lo[v]) for v in range(graph.num_nodes) if not torch.isnan(lo[v])]
        assert result.max_node_width(reduction) == max(widths) > 0
    # By blocks of a few edges (sources, then targets), bit for bit the whole pass.
    for reduction in ("mean", "weighted", "min"):
        whole = result._reduce_to_nodes(result.edge_kappa, reduction)
        for block in (1, 5):
            parts = result._reduce_to_nodes(result.edge_kappa, reduction, block=block)
            assert torch.equal(parts.isnan(), whole.isnan())
            assert torch.equal(parts.nan_to_num(), whole.nan_to_num()), (reduction, block)
        assert torch.equal(graph.mean_weights(reduction == "weighted", slice(3, 9)),
                           graph.mean_weights(reduction == "weighted")[3:9])
    assert "largest channel width" not in result.summary()  # no tolerance on node means here
    means = neural_curvature(model, x, granularity="channel", tolerance=0.1,
                             node_reduction="mean")
    assert means.max_node_width("mean") <= 0.1 * (1 + 1e-12)
    assert f"largest channel width {means.max_node_width('mean'):.2g}" in means.summary()
    neuron = neural_curvature(model, x, granularity="neuron")
    with pytest.raises(ValueError, match="granularity='channel'"):
        neuron.node_kappa_bounds("mean")
    with pytest.raises(ValueError, match="granularity='channel'"):
        neuron.max_node_width("mean")


def test_node_reduction_is_checked():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="node_reduction must be one of"):
        neural_curvature(model, x, granularity="channel", node_reduction="median")
    with pytest.raises(ValueError, match="granularity='channel'"):
        neural_curvature(model, x, granularity="neuron", node_reduction="mean")


@settings(max_examples=30, **_SETTINGS)
@given(tolerance=tolerances, data=st.data())
def test_channel_edge_intervals_contain_the_reference(tolerance, data):
    """Random channel DAGs (residual adds, concatenation, depthwise, gates, windows): every
    layer edge's bounds contain the channel reference's value."""
    spec = dict(data.draw(random_nets()))
    zero, alpha = spec.pop("zero"), spec.pop("alpha")
    model = RandomNet(**spec).eval()
    _perturb(model, seed=spec["seed"], zero_fraction=zero)
    graph = _trace(model, _inputs((3, 4, 4), seed=spec["seed"]))
    upper, lower, _ = channel_edge_bounds(graph, channel_distances(graph), alpha,
                                          tolerance=tolerance)
    expected = channel_reference_curvature(graph, alpha)
    layer = graph.module >= 0
    assert torch.isinf(upper[~layer]).all() and torch.isinf(lower[~layer]).all()
    e, a, b = expected[layer], lower[layer], upper[layer]
    assert (a <= e + _slack(e)).all(), (a - e).max()
    assert (e <= b + _slack(e)).all(), (e - b).max()
    assert (b - a <= tolerance * (1 + 1e-12) + 1e-15).all()


def _graph_and_acts(model, x):
    layers, structures = chain_structure(model, x)
    modules = [layer.module for layer in layers]
    graph = NeuronGraph.build(structures, [m.weight.detach().flatten() for m in modules],
                              torch.device("cpu"))
    with scoring_mode(model):
        values, _, _ = capture_activations(model, modules, x)
    acts = [normalise_activity(v) for v in values]
    return graph, [[a[b] for a in acts] for b in range(x.shape[0])]


@settings(max_examples=60, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1,
                      shifts=(0.0, 0.0, -0.3)),
       alpha=alphas, cut_tol=st.sampled_from([1e-2, 1.0, 10.0]))
def test_edge_bounds_contain_the_uncut_value_after_a_large_cut(spec, alpha, cut_tol):
    """In interval mode the per-edge bounds are widened by the cut's proved error, so they
    contain the uncut exact value even when the cut is large enough to move kappa a lot
    (without the widening this fails)."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    exact, _ = score_example(graph, examples[0], alpha, certify_tol=0.0)
    bounds = bound_example(graph, examples[0], alpha, certify_tol=0.0, cut_tol=cut_tol,
                           settle=False)
    for (lo, hi, _), value in zip(bounds, exact):
        assert (lo <= value + _slack(value)).all(), (lo - value).max()
        assert (value <= hi + _slack(value)).all(), (value - hi).max()


# --------------------------------------------------------------------------------------------
# Tolerance 0, the default, refinement and the deprecated name
# --------------------------------------------------------------------------------------------


def _mlp(seed: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(),
                         nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).eval()


def test_tolerance_zero_is_exact_and_has_no_width():
    model, x = _mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(12))
    result = neural_curvature(model, x, alpha=0.3, tolerance=0.0)
    assert result.max_width == 0.0
    for name, k in result.kappa.items():
        assert torch.equal(result.kappa_lo[name], k) and torch.equal(result.kappa_hi[name], k)
        assert result.exact()[name].all()
    assert_kappa_equal(result.kappa, reference_curvature(model, x, alpha=0.3), atol=1e-9)
    # 1e-14 is exact in practice: within a few ulps of tolerance 0.
    tight = neural_curvature(model, x, alpha=0.3, tolerance=1e-14)
    assert tight.tolerance == 1e-14 and tight.max_width <= 1e-14
    assert_kappa_equal(tight.kappa, result.kappa, atol=1e-13)
    # The default is TOLERANCE (0.01): its intervals are at most that wide and hold the value.
    default = neural_curvature(model, x, alpha=0.3)
    assert default.tolerance == TOLERANCE == 1e-2 and default.max_width <= TOLERANCE
    assert_contains(default.kappa_lo, default.kappa_hi, default.kappa, result.kappa, TOLERANCE,
                    "default tolerance")


def test_refine_solves_chosen_weights_exactly():
    model, x = _mlp(), torch.randn(3, 5, generator=torch.Generator().manual_seed(12))
    exact = neural_curvature(model, x, alpha=0.9, tolerance=0.0)
    coarse = neural_curvature(model, x, alpha=0.9, tolerance=0.5)
    assert coarse.max_width > 0.01  # really coarse here
    name = "2.weight"
    chosen = torch.zeros_like(coarse.kappa[name], dtype=torch.bool)
    chosen[::2] = True
    inexact = (coarse.kappa_lo[name] < coarse.kappa_hi[name]) & chosen
    before = {n: v.clone() for n, v in coarse.kappa.items()}
    assert coarse.refine({name: chosen}) == int(inexact.sum()) > 0
    assert coarse.refined == int(inexact.sum())
    k = coarse.kappa[name]
    assert torch.allclose(k[chosen], exact.kappa[name][chosen], atol=1e-12, rtol=0)
    assert torch.equal(coarse.kappa_lo[name][chosen], k[chosen])
    assert torch.equal(coarse.kappa_hi[name][chosen], k[chosen])
    assert torch.equal(k[~chosen], before[name][~chosen])  # the rest is left alone
    for other in ("0.weight", "4.weight", "6.weight"):
        assert torch.equal(coarse.kappa[other], before[other])
    assert coarse.refine({name: chosen}) == 0  # already exact
    with pytest.raises(ValueError, match="not a scored weight"):
        coarse.refine({"nope.weight": chosen})
    with pytest.raises(ValueError, match="has shape"):
        coarse.refine({name: chosen[:1]})
    with pytest.raises(TypeError, match="bool tensor"):
        coarse.refine({name: chosen.float()})


def test_refine_at_channel_granularity():
    model, x = _mlp(3), torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    exact = neural_curvature(model, x, granularity="channel", tolerance=0.0)
    coarse = neural_curvature(model, x, granularity="channel", tolerance=0.5)
    every = {n: torch.ones_like(k, dtype=torch.bool) for n, k in coarse.kappa.items()}
    assert coarse.refine(every) > 0
    assert coarse.max_width == 0
    assert_kappa_equal(coarse.kappa, exact.kappa, atol=1e-12)


def test_pickled_result_keeps_its_bounds():
    import pickle

    model, x = _mlp(), torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    result = neural_curvature(model, x, tolerance=0.5)
    loaded = pickle.loads(pickle.dumps(result))
    for name in result.kappa:
        assert torch.equal(loaded.kappa_lo[name], result.kappa_lo[name])
        assert torch.equal(loaded.kappa_hi[name], result.kappa_hi[name])
    assert loaded.tolerance == 0.5 and loaded.max_width == result.max_width
    assert result.refiner is not None and loaded.refiner is None
    inexact = {n: lo < loaded.kappa_hi[n] for n, lo in loaded.kappa_lo.items()}
    with pytest.raises(ValueError, match="holds no engine to refine"):
        loaded.refine(inexact)


def test_certify_tol_is_a_deprecated_alias():
    model, x = _mlp(), torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    with pytest.warns(DeprecationWarning, match="certify_tol is deprecated"):
        old = neural_curvature(model, x, certify_tol=0.25)
    assert old.tolerance == 0.25
    new = neural_curvature(model, x, tolerance=0.25)
    assert_kappa_equal(old.kappa, new.kappa, atol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match="not both"):
            neural_curvature(model, x, certify_tol=0.1, tolerance=0.1)
        with pytest.raises(ValueError, match="certify_tol must be a finite number"):
            neural_curvature(model, x, certify_tol=-1.0)


def test_summary_reports_the_largest_width():
    model, x = _mlp(), torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    result = neural_curvature(model, x, tolerance=0.5)
    assert f"largest interval width {result.max_width:.2g}" in result.summary()
    assert "(tolerance 0.5)" in result.summary()


# --------------------------------------------------------------------------------------------
# Decision-exact pruning
# --------------------------------------------------------------------------------------------


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("_mask")}


def _prune(model, x, amounts, tolerance, **kwargs):
    """Prune a copy of ``model`` by each amount in turn (iterative pruning); the masks after
    each step and the reports."""
    model = copy.deepcopy(model)
    masks, reports = [], []
    for amount in amounts:
        reports.append(prune_model(model, x, amount, tolerance=tolerance, **kwargs))
        masks.append(_masks(model))
    return masks, reports


@settings(max_examples=40, **_SETTINGS)
@given(spec=net_specs(max_examples=2, min_layers=2), alpha=st.sampled_from([0.0, 0.5, 0.9]),
       granularity=st.sampled_from(["neuron", "channel"]),
       scope=st.sampled_from(["global", "layer"]),
       order=st.sampled_from(["positive_first", "negative_first"]),
       tolerance=st.sampled_from([0.05, 0.5, 2.0]))
# A kappa of exactly 0 on the cut path (a measure cut to a point mass) is -2.2e-16 on the exact
# path: it must not count as an exact constant (curvprune.decision).
@example(spec=NetSpec(
    in_shape=(2, 3, 3),
    layers=(ConvSpec(out_channels=4, kernel=(2, 2), stride=(2, 2), padding=(2, 1),
                     dilation=(2, 2), groups=1, bias=False),
            ConvSpec(out_channels=4, kernel=(2, 1), stride=(2, 1), padding="valid",
                     dilation=(1, 1), groups=4, bias=False),
            LinearSpec(out_features=4, bias=True), LinearSpec(out_features=8, bias=True),
            LinearSpec(out_features=2, bias=True)),
    hidden=(HiddenSpec(activation="relu", batchnorm=False),
            HiddenSpec(activation="tanh", batchnorm=False),
            HiddenSpec(activation="relu", batchnorm=True),
            HiddenSpec(activation="none", batchnorm=True),
            HiddenSpec(activation="relu", batchnorm=False)),
    zero=("random", "random", "random", "rows", "cols"), bias_shift=(0.0,) * 5,
    weight_style="quantized", input_style="normal", num_examples=1, seed=200, extra={}),
    alpha=0.0, granularity="neuron", scope="layer", order="positive_first", tolerance=2.0)
def test_decision_exact_pruning_equals_exact_pruning(spec, alpha, granularity, scope, order,
                                                     tolerance):
    """At several amounts the pruned masks are those of ``tolerance=0``, element for element,
    on a fresh model and on one already pruned (the second amount prunes on top of the
    first)."""
    model, x = build(spec)
    kwargs = dict(alpha=alpha, granularity=granularity, scope=scope, order=order)
    for amounts in ([0.2, 0.5], [0.5], [0.8, 0.5]):
        want, _ = _prune(model, x, amounts, 0.0, **kwargs)
        got, reports = _prune(model, x, amounts, tolerance, **kwargs)
        note(f"amounts {amounts}: refined {[r.refined for r in reports]}")
        for step, (w, g) in enumerate(zip(want, got)):
            assert set(w) == set(g)
            for name in w:
                assert torch.equal(w[name], g[name]), \
                    f"amounts {amounts} step {step} {name}: the masks differ"
        for report in reports:
            assert report.tolerance == tolerance
            # Certified: nothing straddles the boundary any more.
            assert report.refined >= 0 and report.refine_rounds <= report.refined


def test_decision_exact_pruning_refines_and_reports():
    """A coarse tolerance leaves intervals across the threshold; the report counts the weights
    solved exactly, and the masks are the exact ones."""
    model = _mlp(7)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(7))
    want, _ = _prune(model, x, [0.5], 0.0)
    got, reports = _prune(model, x, [0.5], 2.0)
    report = reports[0]
    assert report.refined > 0 and report.refine_rounds >= 1
    assert report.result.refined == report.refined
    assert "decision-exact" in report.summary()
    for name in want[0]:
        assert torch.equal(want[0][name], got[0][name])
    # After the refinement no interval straddles the boundary of the pruned set.
    result = report.result
    pruned = {n: (got[0][n.replace("weight", "weight_mask")] == 0)
              for n in result.kappa}
    groups = [{n: torch.ones_like(k, dtype=torch.bool) for n, k in result.kappa.items()}]
    assert not any(m.any() for m in straddling(result, "positive_first", pruned, groups).values())


@pytest.mark.parametrize("allocation", ["wanda", "magnitude"])
def test_decision_exact_pruning_with_an_allocation(allocation):
    model = _mlp(8)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(8))
    want, _ = _prune(model, x, [0.6], 0.0, allocation=allocation)
    got, _ = _prune(model, x, [0.6], 1.0, allocation=allocation)
    for name in want[0]:
        assert torch.equal(want[0][name], got[0][name])


def test_straddling_finds_overlaps_across_the_boundary():
    """Hand-made intervals: only inexact entries that can cross the boundary are returned."""
    from curvprune.result import CurvatureResult

    kappa = torch.tensor([0.9, 0.5, 0.45, 0.1, math.inf], dtype=torch.float64)
    lo = torch.tensor([0.8, 0.4, 0.45, 0.0, math.inf], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.6, 0.45, 0.2, math.inf], dtype=torch.float64)
    live = torch.tensor([True, True, True, True, False])
    result = CurvatureResult(kappa={"w": kappa}, live={"w": live}, modules={}, alpha=0.9,
                             granularity="neuron", num_examples=1, edges_per_example={"w": 4},
                             seconds=0.0, kappa_lo={"w": lo}, kappa_hi={"w": hi})
    group = [{"w": torch.ones(5, dtype=torch.bool)}]
    # "positive_first" prunes the zero weight, then 0.9, then 0.5: the boundary sits between 0.5
    # [0.4, 0.6] and the exact 0.45, so 0.5 straddles; 0.9 and 0.1 cannot cross.
    pruned = {"w": torch.tensor([True, True, False, False, True])}
    need = straddling(result, "positive_first", pruned, group)["w"]
    assert need.tolist() == [False, True, False, False, False]
    # Between 0.9 [0.8, 1] and 0.5 [0.4, 0.6] nothing can cross.
    pruned = {"w": torch.tensor([True, False, False, False, True])}
    assert not straddling(result, "positive_first", pruned, group)["w"].any()


def test_near_ties_of_scored_values_are_refined():
    """Two values found exactly by the scoring run, one ulp apart across the boundary: they
    may round differently in a tolerance=0 run, so with the refined entries given they both
    straddle (and not once refined)."""
    from curvprune.decision import ROUNDING
    from curvprune.result import CurvatureResult

    x = 0.3
    kappa = torch.tensor([x, math.nextafter(x, 1.0), 0.1], dtype=torch.float64)
    live = torch.ones(3, dtype=torch.bool)
    result = CurvatureResult(kappa={"w": kappa}, live={"w": live}, modules={}, alpha=0.9,
                             granularity="neuron", num_examples=1, edges_per_example={"w": 3},
                             seconds=0.0)
    group = [{"w": torch.ones(3, dtype=torch.bool)}]
    # "positive_first": the larger one goes first
    pruned = {"w": torch.tensor([False, True, False])}
    assert not straddling(result, "positive_first", pruned, group)["w"].any()
    none = {"w": torch.zeros(3, dtype=torch.bool)}
    assert (straddling(result, "positive_first", pruned, group, none)["w"].tolist()
            == [True, True, False])
    done = {"w": torch.tensor([True, True, False])}
    assert not straddling(result, "positive_first", pruned, group, done)["w"].any()
    assert ROUNDING * 0.3 > math.ulp(0.3)
    # The constant 1 (a dead edge) ties exactly on every path: not widened.
    ones = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
    result = CurvatureResult(kappa={"w": ones}, live={"w": live}, modules={}, alpha=0.9,
                             granularity="neuron", num_examples=1, edges_per_example={"w": 3},
                             seconds=0.0)
    assert not straddling(result, "positive_first", pruned, group, none)["w"].any()


@pytest.mark.parametrize("granularity", ["neuron", "channel"])
@pytest.mark.parametrize("tolerance", [0.0, 1e-2])
def test_scores_do_not_depend_on_the_thread_count(granularity, tolerance):
    """With several threads the groups of an example are bounded on a pool and the exact
    solves run on pool threads: every kappa, bound, live flag and count is bitwise the
    single-threaded one."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.ReLU(),
                          nn.Linear(7, 3)).eval()
    with torch.no_grad():
        model[2].weight[:2, :3] = 0.0  # zero weights and a dead channel
        model[2].bias[4] = -10.0
    x = torch.randn(4, 2, 6, 6)
    one = neural_curvature(model, x, granularity=granularity, tolerance=tolerance, threads=1)
    for threads in (2, 3):
        many = neural_curvature(model, x, granularity=granularity, tolerance=tolerance,
                                threads=threads)
        assert many.engine == one.engine
        for name in one.kappa:
            for field in ("kappa", "kappa_lo", "kappa_hi", "live"):
                assert torch.equal(getattr(many, field)[name], getattr(one, field)[name]), field


@pytest.mark.parametrize("tolerance", [0.0, 1e-2])
def test_later_examples_are_screened_and_stay_correct(tolerance):
    """From the second example on, edges whose swap-plan bound shows they cannot lower their
    weight's minimum (``EngineStats.screened``) are not bounded further; the intervals still
    contain the per-edge reference (``ot.emd2``), within the tolerance."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(6, 6)
    result = neural_curvature(model, x, alpha=0.9, tolerance=tolerance)
    assert result.engine["screened"] > 0
    expected = reference_curvature(model, x, alpha=0.9)
    assert_contains(result.kappa_lo, result.kappa_hi, result.kappa, expected, tolerance)
    # alpha below 1/2 has no swap plan: nothing is screened.
    assert neural_curvature(model, x, alpha=0.3, tolerance=tolerance).engine["screened"] == 0
