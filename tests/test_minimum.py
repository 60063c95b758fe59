"""Branch and bound for the per-weight minimum (``curvprune.transport.minimum``) and the
engine's bounds.

``neural_curvature`` solves only the edges that can be a weight's minimum, so the equality
tests of ``test_engine_equality.py`` check the minima. Here: the search itself on synthetic
values; the engine's bounds contain every edge's exact value; and ``score_example`` (every
edge exact) equals the reference edge by edge.
"""

from __future__ import annotations

import pytest
import torch
from conftest import alphas, assert_kappa_equal, build, net_specs, profile_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvprune.calibration import capture_activations, normalise_activity, scoring_mode
from curvprune.graphs.neuron import (
    NeuronGraph,
    bound_example,
    chain_structure,
    layer_problem,
    score_example,
    trace_chain,
)
from curvprune.reference import reference_curvature
from curvprune.transport import (
    EngineStats,
    MinimumSearch,
    NodeMeans,
    cut_measures,
    node_measures,
    score_edges,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def each(solve_one):
    """``MinimumSearch.resolve``'s ``solve`` (a round's jobs) from a function of one job."""
    return lambda group, jobs: [solve_one(group, x, edges) for x, edges in jobs]


@st.composite
def searches(draw):
    """Groups of edges over weights with exact values and bounds around them, some settled."""
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        num_weights = draw(st.integers(1, 6))
        num_edges = draw(st.integers(1, 12))
        examples = draw(st.integers(1, 4))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        widx = torch.randint(0, num_weights, (num_edges,), generator=gen)
        # Few distinct values, so that ties between edges and examples are common.
        value = torch.randint(-3, 4, (examples, num_edges), generator=gen).double() / 2
        below = torch.randint(0, 3, (examples, num_edges), generator=gen).double()
        above = torch.randint(0, 3, (examples, num_edges), generator=gen).double()
        groups.append((num_weights, widx, value, value - below, value + above))
    return groups


@settings(max_examples=profile_examples(300), **_SETTINGS)
@given(groups=searches())
def test_search_finds_every_exact_minimum(groups):
    search = MinimumSearch([g[1] for g in groups], [g[0] for g in groups])
    for k, (_, _, value, lo, hi) in enumerate(groups):
        for x in range(value.shape[0]):
            search.add(k, x, lo[x], hi[x])
    calls = []

    def solve(group, example, edges):
        assert edges.numel() and edges.unique().numel() == edges.numel()
        calls.append((group, example, edges.tolist()))
        return groups[group][2][example, edges]

    counts = []
    minima = search.resolve(each(solve), on_solved=counts.append)
    assert counts == sorted(set(counts)) and counts[-1:] == ([search.solved] if calls else [])
    for k, (num_weights, widx, value, lo, hi) in enumerate(groups):
        expected = torch.full((num_weights,), torch.inf, dtype=torch.float64)
        for x in range(value.shape[0]):
            expected.scatter_reduce_(0, widx, value[x], reduce="amin")
        assert torch.equal(minima[k], expected)
        # An edge is solved at most once, and only if its bounds were apart.
        solved = [(g, x, e) for g, x, edges in calls if g == k for e in edges]
        assert len(solved) == len(set(solved))
        assert all(lo[x, e] < hi[x, e] for _, x, e in solved)
    assert search.solved == sum(len(edges) for _, _, edges in calls) <= search.opened


def test_search_skips_edges_that_cannot_be_the_minimum():
    # One weight, three edges: a settled one at 0, and two open ones above and below it.
    widx = torch.zeros(3, dtype=torch.long)
    search = MinimumSearch([widx], [1])
    lo = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)
    hi = torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)
    search.add(0, 0, lo, hi)
    asked = []

    def solve(group, example, edges):
        asked.extend(edges.tolist())
        return torch.full((edges.numel(),), -0.5, dtype=torch.float64)

    assert search.resolve(each(solve))[0].item() == -0.5
    assert asked == [2]  # edge 1 (lo 0.5 >= 0) is never solved
    assert search.opened == 2 and search.solved == 1


def test_initial_upper_bounds_rule_out_edges():
    widx = torch.tensor([0, 1])
    search = MinimumSearch([widx], [2], initial=[torch.tensor([0.0, 5.0], dtype=torch.float64)])
    search.add(0, 0, torch.tensor([1.0, 1.0], dtype=torch.float64),
               torch.tensor([3.0, 3.0], dtype=torch.float64))
    asked = []
    minima = search.resolve(each(lambda g, x, e: asked.extend(e.tolist()) or torch.full(
        (e.numel(),), 2.0, dtype=torch.float64)))
    assert asked == [1]
    assert minima[0].tolist() == [0.0, 2.0]


@st.composite
def node_searches(draw):
    """Groups of edges (one slot each) between random nodes, with weights, exact values on a
    few examples and bounds around them (some wide), and a tolerance."""
    num_nodes = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        num_edges = draw(st.integers(1, 12))
        examples = draw(st.integers(1, 4))
        ends = torch.randint(0, num_nodes, (2, num_edges), generator=gen)
        weight = torch.randint(1, 4, (num_edges,), generator=gen).double()
        value = torch.randint(-3, 4, (examples, num_edges), generator=gen).double() / 2
        below = torch.randint(0, 4, (examples, num_edges), generator=gen).double() / 2
        above = torch.randint(0, 4, (examples, num_edges), generator=gen).double() / 2
        groups.append((ends, weight, value, value - below, value + above))
    total = torch.zeros(num_nodes, dtype=torch.float64)
    for ends, weight, *_ in groups:
        total.index_add_(0, ends[0], weight).index_add_(0, ends[1], weight)
    tolerance = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]))
    return groups, NodeMeans([g[0] for g in groups], [g[1] for g in groups], total), tolerance


@settings(max_examples=profile_examples(300), **_SETTINGS)
@given(case=node_searches())
def test_node_tolerance_bounds_every_node_mean(case):
    """With a tolerance on node means, every slot's interval still contains its exact minimum
    and every node's mean interval is at most the tolerance wide (single slots may be wider);
    an edge-example is solved at most once; with tolerance 0 the minima are exact."""
    groups, nodes, tolerance = case
    widx = [torch.arange(g[0].shape[1]) for g in groups]
    search = MinimumSearch(widx, [w.numel() for w in widx], tolerance=tolerance, nodes=nodes)
    plain = MinimumSearch(widx, [w.numel() for w in widx], tolerance=tolerance)
    for k, (_, _, value, lo, hi) in enumerate(groups):
        for x in range(value.shape[0]):
            search.add(k, x, lo[x], hi[x])
            plain.add(k, x, lo[x], hi[x])
    calls = []

    def solve(group, example, edges):
        calls.extend((group, example, e) for e in edges.tolist())
        return groups[group][2][example, edges]

    upper = search.resolve(each(solve))
    lower = search.lower()
    assert len(calls) == len(set(calls))
    spread = torch.zeros_like(nodes.total)
    for k, (ends, weight, value, _, _) in enumerate(groups):
        exact = value.min(0).values
        assert (lower[k] <= exact).all() and (exact <= upper[k]).all()
        if tolerance == 0:
            assert torch.equal(lower[k], exact) and torch.equal(upper[k], exact)
        width = weight * (upper[k] - lower[k])
        spread.index_add_(0, ends[0], width).index_add_(0, ends[1], width)
    has = nodes.total > 0
    mean = spread[has] / nodes.total[has]
    assert (mean <= tolerance * (1 + 1e-12) + 1e-15).all(), (mean.max(), tolerance)
    # Never more solves than certifying every slot on its own.
    plain.resolve(each(lambda g, x, e: groups[g][2][x, e]))
    assert search.solved <= plain.solved


@settings(max_examples=profile_examples(300), **_SETTINGS)
@given(case=node_searches(), on_nodes=st.booleans(), share=st.sampled_from([0.0, 0.5, 1.0]))
def test_tightening_before_the_solves_keeps_every_guarantee(case, on_nodes, share):
    """``resolve(tighten=...)``: held edge-examples get tighter bounds (here ``share`` of the
    way to the exact value) before any solve, each at most once and only while held (with a
    tolerance on node means, only with an end wider than the tolerance); the intervals still
    contain the exact minima, within the tolerance per slot (or per node mean), and no
    edge-example is solved twice. ``share=1`` tightens to the exact value: nothing is left to
    solve."""
    groups, nodes, tolerance = case
    widx = [torch.arange(g[0].shape[1]) for g in groups]
    search = MinimumSearch(widx, [w.numel() for w in widx], tolerance=tolerance,
                           nodes=nodes if on_nodes else None)
    for k, (_, _, value, lo, hi) in enumerate(groups):
        for x in range(value.shape[0]):
            search.add(k, x, lo[x], hi[x])
    held = {(k, x, int(e)) for k in range(len(groups)) for x in range(groups[k][2].shape[0])
            for e in search.held(k, x)}
    tightened, solved = [], []

    def tighten(group, jobs):
        for example, edges, ceiling in jobs:
            tightened.extend((group, example, e) for e in edges.tolist())
            value, lo, hi = (t[example, edges] for t in groups[group][2:])
            assert (lo < ceiling).all()  # held: below U_w - tolerance
            yield lo + share * (value - lo), hi - share * (hi - value)

    def solve(group, example, edges):
        solved.extend((group, example, e) for e in edges.tolist())
        return groups[group][2][example, edges]

    upper = search.resolve(each(solve), tighten=tighten)
    lower = search.lower()
    assert len(tightened) == len(set(tightened)) and set(tightened) <= held
    assert len(solved) == len(set(solved)) and set(solved) <= held
    if share == 1.0:
        assert not solved
    spread = torch.zeros_like(nodes.total)
    for k, (ends, weight, value, _, _) in enumerate(groups):
        exact = value.min(0).values
        assert (lower[k] <= exact).all() and (exact <= upper[k]).all()
        if not on_nodes:
            assert (upper[k] - lower[k] <= tolerance).all()
        width = weight * (upper[k] - lower[k])
        spread.index_add_(0, ends[0], width).index_add_(0, ends[1], width)
    has = nodes.total > 0
    assert (spread[has] / nodes.total[has] <= tolerance * (1 + 1e-12) + 1e-15).all()


def test_tightening_stops_once_the_wide_nodes_are_covered():
    """Under a tolerance on node means a node's widest edges are tightened until they cover
    its excess, not every held edge: here (the nodes of the test below) edge 0 alone, which
    then leaves every node within the tolerance, so edges 1 and 2 are neither tightened nor
    solved."""
    ends = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 2]])
    nodes = NodeMeans([ends], [torch.ones(4, dtype=torch.float64)],
                      torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64))
    search = MinimumSearch([torch.arange(4)], [4], tolerance=0.5, nodes=nodes)
    lo = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    hi = torch.tensor([2.0, 0.9, 0.8, 1.0], dtype=torch.float64)
    search.add(0, 0, lo, hi)
    asked = []

    def tighten(group, jobs):
        asked.extend(e for _, edges, _ in jobs for e in edges.tolist())
        return [(hi[edges], hi[edges]) for _, edges, _ in jobs]

    search.resolve(each(lambda g, x, e: pytest.fail("nothing is left to solve")),
                   tighten=tighten)
    # Node 1 (width 1.45) needs its widest edge 0 only; node 0 is then 0.425 wide.
    assert asked == [0]


def test_node_tolerance_solves_only_the_wide_node():
    """Two nodes joined to a hub: node 1 is wide and needs only its widest edge solved; node 2
    is narrow although its edge 2 alone is wider than the tolerance, so edge 2 is left."""
    ends = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 2]])
    weight = torch.ones(4, dtype=torch.float64)
    total = torch.tensor([4.0, 2.0, 2.0], dtype=torch.float64)
    nodes = NodeMeans([ends], [weight], total)
    search = MinimumSearch([torch.arange(4)], [4], tolerance=0.5, nodes=nodes)
    lo = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    hi = torch.tensor([2.0, 0.9, 0.8, 1.0], dtype=torch.float64)
    search.add(0, 0, lo, hi)
    asked = []

    def solve(group, example, edges):
        asked.extend(edges.tolist())
        return hi[edges]

    upper = search.resolve(each(solve))
    # Node 1 has width (2 + 0.9) / 2 = 1.45: its widest edge (0) alone brings it to 0.45;
    # node 2 has (0.8 + 0) / 2 = 0.4, and node 0 (2 + 0.9 + 0.8) / 4 = 0.925 -> 0.425.
    assert asked == [0]
    assert upper[0].tolist() == hi.tolist()
    assert search.lower()[0].tolist() == [2.0, 0.0, 0.0, 1.0]
    assert search.solved == 1 and search.opened == 3


def test_node_means_must_cover_every_slot():
    nodes = NodeMeans([torch.zeros(2, 3, dtype=torch.long)], [torch.ones(3)], torch.ones(1))
    with pytest.raises(ValueError, match="two ends of every slot"):
        MinimumSearch([torch.arange(4)], [4], nodes=nodes)


def _graph_and_acts(model, x):
    layers, structures = chain_structure(model, x)
    modules = [layer.module for layer in layers]
    graph = NeuronGraph.build(structures, [m.weight.detach().flatten() for m in modules],
                              torch.device("cpu"))
    with scoring_mode(model):
        values, _, _ = capture_activations(model, modules, x)
    acts = [normalise_activity(v) for v in values]
    return graph, [[a[b] for a in acts] for b in range(x.shape[0])]


@settings(max_examples=profile_examples(150), **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=2,
                      shifts=(0.0, 0.0, -0.3)),
       alpha=alphas)
def test_bounds_contain_every_exact_edge_value(spec, alpha):
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    for acts in examples:
        stats = EngineStats()
        exact, _ = score_example(graph, acts, alpha)
        for (lo, hi, _), value in zip(bound_example(graph, acts, alpha, stats=stats), exact):
            assert (lo <= hi).all()
            tol = 1e-9 * (1 + value.abs())
            assert (lo <= value + tol).all(), (lo - value).max()
            assert (value <= hi + tol).all(), (value - hi).max()
            settled = lo == hi
            assert ((lo - value).abs() <= tol)[settled].all()


@settings(max_examples=profile_examples(150), **_SETTINGS)
@given(spec=net_specs(conv=False, min_layers=3, max_examples=1,
                      activations=("relu", "tanh", "leaky_relu")),
       alpha=alphas)
def test_score_example_equals_the_reference_edge_by_edge(spec, alpha):
    """With linear layers and one example every weight is one edge, so the reference's
    per-weight values are per-edge values: ``score_example`` must match each of them (not
    only the minima)."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    kappa, _ = score_example(graph, examples[0], alpha)
    names = [layer.name for layer in trace_chain(model)]
    got = {}
    for k, (name, layer) in enumerate(zip(names, graph.layers)):
        weight = dict(model.named_parameters())[name]
        flat = torch.full((weight.numel(),), torch.inf, dtype=torch.float64)
        flat[layer.widx] = kappa[k]
        got[name] = flat.view(weight.shape)
    assert_kappa_equal(got, reference_curvature(model, x, alpha=alpha), atol=1e-6)


@settings(max_examples=profile_examples(100), **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1,
                      shifts=(0.0, 0.0, -0.3)),
       alpha=alphas, tol=st.sampled_from([1e-3, 1e-6, 1e-10]))
def test_cut_measures_move_each_edge_within_half_the_tolerance(spec, alpha, tol):
    """Cutting negligible masses (``engine.cut_measures``) keeps every edge's kappa within
    ``certify_tol / 2`` of the uncut value (``certify_tol=0`` cuts nothing and settles only
    equal bounds)."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    exact, _ = score_example(graph, examples[0], alpha, certify_tol=0.0)
    for l, value in enumerate(exact, start=1):
        layer = graph.layers[l - 1]
        dead, mu, nu, tables = layer_problem(graph, examples[0], l, certify_tol=tol)
        got = score_edges(layer.src, layer.dst, layer.length, dead, mu, nu, tables, alpha,
                          certify_tol=0.0)
        assert ((got - value).abs() <= tol / 2 + 1e-12 * (1 + value.abs())).all()


def test_cut_measures_drop_the_smallest_masses_within_budget():
    gen = torch.Generator().manual_seed(3)
    n, width = 40, 12
    table = torch.arange(width).repeat(n, 1)
    activity = torch.rand(width, generator=gen) ** 3  # weights over many orders of magnitude
    lengths = torch.rand(n, width, generator=gen, dtype=torch.float64) + 0.5
    mu = node_measures(table, activity.double(), lengths)
    src = torch.arange(n)
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    tol = 1e-3
    cut, _ = cut_measures(mu, None, src, torch.zeros(n, dtype=torch.long), d, tol)
    assert torch.equal(cut.reach, mu.reach) and torch.equal(cut.has, mu.has)
    assert cut.mass.shape[1] < mu.mass.shape[1]  # something was cut
    full = torch.zeros(n, width, dtype=torch.float64).scatter_(1, mu.table, mu.mass)
    kept = torch.zeros(n, width, dtype=torch.float64).scatter_(1, cut.table, cut.mass)
    assert torch.allclose(kept.sum(1), torch.ones(n, dtype=torch.float64))
    dropped = torch.where(kept == 0, full, 0.0)
    # Within budget: eps ((reach + 0) / d + 1) <= tol / 4, and only masses below every kept one.
    assert (dropped.sum(1) * (mu.reach / d + 1) <= tol / 4 * (1 + 1e-12)).all()
    smallest_kept = torch.where(kept > 0, full, torch.inf).amin(1)
    assert (dropped.amax(1) <= smallest_kept).all()
    # Kept masses are the originals rescaled.
    ratio = torch.where(kept > 0, kept / full, torch.nan)
    assert torch.allclose(torch.nanmean(ratio, 1)[:, None].expand_as(ratio)[kept > 0],
                          ratio[kept > 0])
    # No lengths, no cut.
    blind = node_measures(table, activity.double())
    assert cut_measures(blind, None, src, src * 0, d, tol)[0].mass.shape == blind.mass.shape
