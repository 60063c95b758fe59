"""The factored edge bounds (``curvprune.transport.bounds._factored_bounds``): on random networks
they equal the straightforward per-edge evaluation of the same bounds (the engine's previous
implementation, kept here as the oracle: every edge gathers its ``A_k`` and ``B_m`` and evaluates
the clipped dual at its three ``t``) to 1e-12 relative, on neuron graphs (dense and conv) and on
channel graphs (random DAGs and zoo models); and the bounds bracket the exact per-edge value.

The oracle and the engine share the shared problems (``X0``, potentials, slack) of
``_shared_problems``, so the comparison isolates the factoring, the only part that changed."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from conftest import alphas, build, net_specs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_channels import RandomNet, _inputs, _perturb, _trace, random_nets
from test_intervals import _graph_and_acts

from curvprune.graphs.channel import ChannelProblems, channel_distances
from curvprune.graphs.neuron import score_example
from curvprune.transport import cut_error, cut_measures
from curvprune.transport.base import EngineOptions, EngineStats, _gather_rows, _weighted_sum
from curvprune.transport.bounds import (
    SIMPLEX,
    SINGLE,
    TWO,
    _by_gathering,
    _by_product,
    _col_sums,
    _count_sorted,
    _dual_breakpoints,
    _edge_plans,
    _factored_bounds,
    _gathered_sums,
    _groups,
    _measure_keys,
    _product_sums,
    _row_sums,
    _shared_problems,
    _subgroups,
    bound_edges,
)

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def per_edge_bounds(problem, general, shared, alpha):
    """``(lower, upper)`` on ``X`` of the ``general`` edges, edge by edge (the oracle)."""
    src, dst, de = problem.src[general], problem.dst[general], problem.length[general]
    mu, nu, tables = problem.mu, problem.nu, problem.distances
    pm, qm = mu.mass[src], nu.mass[dst]
    rows, cols = pm > 0, qm > 0
    a_k = tables.d_kj[mu.table[src].clamp(min=0), dst[:, None]]
    b_m = _gather_rows(tables.d_im, src, nu.table[dst]) - de[:, None]
    f, g = shared.f[shared.pair], shared.g[shared.pair]
    upper = shared.x0[shared.pair]
    lam = min(1.0, alpha / (1.0 - alpha))
    if lam > 0:
        swap = _weighted_sum(pm, a_k) + _weighted_sum(qm, b_m)
        upper = torch.minimum(upper, lam * swap + (1.0 - lam) * upper)
    t_row = torch.where(rows, a_k - f, math.inf).amin(1)
    t_col = torch.where(cols, g - b_m, -math.inf).amax(1)
    lower = torch.full_like(de, -math.inf)
    for t in (t_row, t_col, 0.5 * (t_row + t_col)):
        value = (torch.where(rows, pm * torch.minimum(f + t[:, None], a_k), 0.0).sum(1)
                 + torch.where(cols, qm * torch.minimum(g - t[:, None], b_m), 0.0).sum(1))
        lower = torch.maximum(lower, value)
    return lower - shared.slack[shared.pair], upper


def general_edges(problem) -> torch.Tensor:
    """The live edges with two neighbour parts (the ones the shared problems bound)."""
    if problem.mu is None or problem.nu is None:
        return torch.zeros(0, dtype=torch.long)
    keep = ~problem.dead & problem.mu.has[problem.src] & problem.nu.has[problem.dst]
    return torch.nonzero(keep).squeeze(1)


def check_against_per_edge(problem, alpha, blocks=(1 << 22, 7)) -> int:
    """The factored bounds equal the oracle's to 1e-12 relative (at any chunk size, each side
    keyed or evaluated edge by edge)."""
    general = general_edges(problem)
    if general.numel() == 0:
        return 0
    src, dst, de = problem.src[general], problem.dst[general], problem.length[general]
    shared = _shared_problems(problem.distances, src, dst, problem.mu, problem.nu,
                              _measure_keys(problem.mu), _measure_keys(problem.nu), 1 << 22,
                              EngineStats())
    want_lo, want_hi = per_edge_bounds(problem, general, shared, alpha)
    # Each side keyed (direct=0), the engine's choice (None), each side edge by edge.
    for block, direct in itertools.product(blocks, (0, None, 1 << 30)):
        lower, upper = _factored_bounds(problem.distances, src, dst, de, problem.mu, problem.nu,
                                        shared, alpha, block, direct=direct)
        scale = 1e-12 * (want_lo.abs() + want_hi.abs() + de)
        assert ((lower - want_lo).abs() <= scale).all(), (lower - want_lo).abs().max()
        assert ((upper - want_hi).abs() <= scale).all(), (upper - want_hi).abs().max()
    return general.numel()


def neuron_problems(model, x, cut_tol=0.0):
    graph, examples = _graph_and_acts(model, x)
    for acts in examples:
        for g in range(graph.num_groups):
            yield graph.edge_problem(g, acts, cut_tol)


@settings(max_examples=40, **_SETTINGS)
@given(spec=net_specs(max_examples=2, min_layers=3), alpha=alphas,
       cut_tol=st.sampled_from([0.0, 1e-2]))
def test_neuron_bounds_equal_per_edge(spec, alpha, cut_tol):
    model, x = build(spec)
    for problem in neuron_problems(model, x, cut_tol):
        check_against_per_edge(problem, alpha)


@settings(max_examples=30, **_SETTINGS)
@given(spec=net_specs(conv=True, max_convs=3, max_linears=2, min_layers=3, max_examples=2),
       alpha=alphas)
def test_conv_neuron_bounds_equal_per_edge(spec, alpha):
    model, x = build(spec)
    for problem in neuron_problems(model, x):
        check_against_per_edge(problem, alpha)


def test_conv_bounds_share_keys():
    """A conv layer with many channels: far fewer row and column keys than edges, and the
    bounds still equal the per-edge ones (the case the factoring is for)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3), torch.nn.ReLU()).eval()
    x = torch.rand(1, 2, 9, 9)
    counted = sum(check_against_per_edge(p, 0.5) for p in neuron_problems(model, x))
    assert counted > 1000


@settings(max_examples=25, **_SETTINGS)
@given(data=st.data())
def test_channel_bounds_equal_per_edge(data):
    spec = dict(data.draw(random_nets()))
    zero, alpha = spec.pop("zero"), spec.pop("alpha")
    model = RandomNet(**spec).eval()
    _perturb(model, seed=spec["seed"], zero_fraction=zero)
    graph = _trace(model, _inputs((3, 4, 4), seed=spec["seed"]))
    problems = ChannelProblems(graph, channel_distances(graph))
    for activity in graph.activity:
        for g in range(problems.num_groups):  # one group per layer
            check_against_per_edge(problems.edge_problem(g, activity, 0.0), alpha)


@pytest.mark.parametrize("name", ["timm/efficientnet_b0", "torchvision/shufflenet_v2",
                                  "timm/deit_tiny_distilled_patch16_224"])
def test_zoo_channel_bounds_equal_per_edge(name):
    from curvprune import zoo

    torch.manual_seed(0)
    model = zoo.create(name).eval()
    graph = _trace(model, zoo.example_input(name, batch=1))
    problems = ChannelProblems(graph, channel_distances(graph))
    assert sum(check_against_per_edge(problems.edge_problem(g, graph.activity[0], 0.0), 0.9,
                                      blocks=(1 << 22,))
               for g in range(problems.num_groups)) > 0


@settings(max_examples=30, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
       alpha=alphas)
def test_bounds_bracket_the_exact_value(spec, alpha):
    """``lo <= kappa <= hi`` on every edge against the exact per-edge value (network simplex, equal
    to ``ot.emd2``: tests/test_engine_equality.py), with no settling."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    exact, _ = score_example(graph, examples[0], alpha, certify_tol=0.0)
    for g, value in enumerate(exact):
        p = graph.edge_problem(g, examples[0], 0.0)
        lo, hi = bound_edges(p.src, p.dst, p.length, p.dead, p.mu, p.nu, p.distances, alpha,
                             certify_tol=0.0, settle=False)
        slack = 1e-9 * (1 + value.abs())
        assert (lo <= value + slack).all(), (lo - value).max()
        assert (value <= hi + slack).all(), (value - hi).max()


@settings(max_examples=30, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
       alpha=alphas, cut_tol=st.sampled_from([0.0, 1e-2]))
def test_screened_edges_keep_a_lower_bound_and_the_others_are_unchanged(spec, alpha, cut_tol):
    """Screening (``ceiling``): an edge whose swap-plan bound reaches its ceiling gets that
    bound as ``lo`` (at most the exact value, and at least the ceiling) and ``hi = +inf``;
    every other edge's bounds are bitwise those without a ceiling; below alpha 1/2 (no swap
    plan) nothing is screened. The exception: an open edge whose lower bound reaches its
    ceiling is not tightened edge by edge (:func:`test_edges_at_their_ceiling_are_not_tightened`),
    so its bounds may be looser than without a ceiling, still around the exact value."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    exact, _ = score_example(graph, examples[0], alpha, certify_tol=0.0)
    for g, value in enumerate(exact):
        p = graph.edge_problem(g, examples[0], cut_tol)
        options = EngineOptions()
        plain = p.bounds(alpha, cut_tol, stats=EngineStats(), options=options)
        for ceiling in (torch.full_like(value, -math.inf), value.clone(),
                        torch.full_like(value, math.inf)):
            stats = EngineStats()
            lo, hi = p.bounds(alpha, cut_tol, stats=stats, options=options, ceiling=ceiling)
            out = torch.isposinf(hi) & ~torch.isposinf(plain[1])
            assert stats.screened == int(out.sum())
            if alpha < 0.5 or torch.isposinf(ceiling).all():
                assert stats.screened == 0
            elif torch.isneginf(ceiling).all():  # every edge with two neighbour parts
                assert stats.screened == general_edges(p).numel()
            slack = 1e-9 * (1 + value.abs())
            looser = ~out & ((lo != plain[0]) | (hi != plain[1]))
            assert (lo[looser] >= ceiling[looser] - 1e-12 * (1 + ceiling[looser].abs())).all()
            assert (lo[looser] <= plain[0][looser]).all() and (hi[looser] >= plain[1][looser]).all()
            assert (lo[looser] <= value[looser] + slack[looser]).all()
            assert (hi[looser] >= value[looser] - slack[looser]).all()
            assert (lo[out] <= value[out] + slack[out]).all(), (lo - value)[out].max()
            assert (lo[out] >= ceiling[out]).all()



@settings(max_examples=30, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
       alpha=alphas, tolerance=st.sampled_from([1e-3, 1e-2, 0.1]), pick=st.randoms())
def test_solve_set_bounds_equal_the_problems(spec, alpha, tolerance, pick):
    """:meth:`SolveSet.bounds` (the kept measure rows only, the tables read through the rows'
    renaming; what the search uses to tighten the edges it picks under a tolerance on node
    means) gives the bounds of the whole problem's :meth:`EdgeProblem.bounds` on the same
    edges, to rounding, and they bracket the exact curvature; ``tighten=False`` gives bounds
    no tighter. A renaming that read the wrong node fails this."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    exact, _ = score_example(graph, examples[0], alpha, certify_tol=0.0)
    options = EngineOptions()
    for g, value in enumerate(exact):
        p = graph.edge_problem(g, examples[0], tolerance / 2)
        general = general_edges(p)
        if not general.numel():
            continue
        keep = torch.tensor(sorted(pick.sample(general.tolist(),
                                               max(1, general.numel() // 2))))
        lo, hi = p.keep(keep).bounds(keep, alpha, tolerance, stats=EngineStats(),
                                     options=options)
        want_lo, want_hi = p.take(keep).bounds(alpha, tolerance, stats=EngineStats(),
                                               options=options)
        loose_lo, loose_hi = p.take(keep).bounds(alpha, tolerance, stats=EngineStats(),
                                                 options=options, tighten=False)
        close = lambda a, b: ((a - b).abs() <= 1e-12 * (1 + b.abs())).all()  # noqa: E731
        assert close(lo, want_lo) and close(hi, want_hi)
        assert (want_lo >= loose_lo).all() and (want_hi <= loose_hi).all()
        v, slack = value[keep], 1e-9 * (1 + value[keep].abs())
        assert (lo <= v + slack).all() and (v <= hi + slack).all()


@pytest.mark.parametrize("seed", range(6))
def test_single_and_two_atom_shared_problems_equal_the_simplex(seed):
    """Shared problems one of whose sides is a single atom are solved in closed form
    (``_single_atom_problems``): their ``X0`` equals POT's network simplex
    (``solver._solve_one``, itself equal to ``ot.emd2``) to 1e-12 relative, their potentials
    are feasible with a residual of exactly 0 and reach ``X0``. Those with a side of two atoms
    (and none of one) are solved by a sort (``_two_atom_problems``): the same ``X0``, and
    potentials that reach it, feasible up to their recorded residual (rounding: at most 1e-14
    here). The pairs with wider sides still go to the simplex, with its potentials."""
    from curvprune.transport import Distances
    from curvprune.transport.measures import _Measure
    from curvprune.transport.solver import _solve_one

    g = torch.Generator().manual_seed(seed)
    nodes, width = 12, 4
    cost = torch.rand(nodes, nodes, generator=g, dtype=torch.float64) * 3 + 0.1
    cost[0, 1] = 0.0  # a zero ground distance too
    tables = Distances(None, None, cost)

    def measure(rows: int) -> _Measure:
        count = torch.randint(1, width + 1, (rows,), generator=g)
        count[: rows // 3] = 1  # a third of the nodes: one neighbour, a third: two
        count[rows // 3: 2 * rows // 3] = 2
        count[2 * rows // 3:] = count[2 * rows // 3:].clamp(min=3)  # and wider ones
        table = torch.stack([torch.randperm(nodes, generator=g)[:width] for _ in range(rows)])
        on = torch.arange(width)[None, :] < count[:, None]
        mass = torch.where(on, torch.rand(rows, width, generator=g, dtype=torch.float64)
                           + 1e-3, 0.0)
        mass[torch.arange(rows) == rows - 1, 1:] = 0.0
        mass = mass / mass.sum(1, keepdim=True)
        return _Measure(torch.where(on, table, -1), mass, torch.ones(rows, dtype=torch.bool),
                        torch.ones(rows, dtype=torch.float64))

    mu, nu = measure(12), measure(10)
    src, dst = torch.cartesian_prod(torch.arange(12), torch.arange(10)).T
    stats = EngineStats()
    shared = _shared_problems(tables, src, dst, mu, nu, _measure_keys(mu), _measure_keys(nu),
                              1 << 10, stats)
    checked = [0, 0, 0]
    for e in range(src.numel()):
        pair = int(shared.pair[e])
        i, j = int(src[e]), int(dst[e])
        p, q = mu.mass[i], nu.mass[j]
        k, m = mu.table[i].clamp(min=0), nu.table[j].clamp(min=0)
        block = cost[k[:, None], m[None, :]]
        want = _solve_one(p.numpy(), q.numpy(), torch.where((p[:, None] > 0) & (q[None, :] > 0),
                                                            block, 0.0).numpy())[0]
        assert float(shared.x0[pair]) == pytest.approx(want, rel=1e-12, abs=1e-15)
        f, gg = shared.f[pair], shared.g[pair]
        on = (p[:, None] > 0) & (q[None, :] > 0)
        atoms = sorted((int((p > 0).sum()), int((q > 0).sum())))
        kind = 1 if atoms[0] == 1 else 2 if atoms[0] == 2 else 0
        if kind:
            slack = float(shared.slack[pair])
            assert slack == 0.0 if kind == 1 else 0.0 <= slack <= 1e-14
            assert bool(((f[:, None] + gg[None, :] - block)[on] <= slack).all())
            assert float((p * f).sum() + (q * gg).sum()) == pytest.approx(want, rel=1e-12,
                                                                           abs=1e-15)
        checked[kind] += 1
    assert min(checked) > 0, checked


def random_problems(spec, data, cut_tol: float) -> list:
    """Every group's edge problem, on one example, of a random neuron graph (``spec``) and of a
    random channel graph (drawn from ``data``; zero weights and dead units), measures cut at
    ``cut_tol``."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    problems = [graph.edge_problem(g, examples[0], cut_tol) for g in range(graph.num_groups)]
    net = dict(data.draw(random_nets()))
    net.pop("zero"), net.pop("alpha")
    channels = RandomNet(**net).eval()
    _perturb(channels, seed=net["seed"], zero_fraction=0.3)
    traced = _trace(channels, _inputs((3, 4, 4), seed=net["seed"]))
    chan = ChannelProblems(traced, channel_distances(traced))
    return problems + [chan.edge_problem(g, traced.activity[0], cut_tol)
                       for g in range(chan.num_groups)]


def test_the_cut_never_splits_a_shared_problem():
    """Nodes whose neighbour parts are equal before the cut are cut alike (``cut_measures``
    gives them the smallest of their budgets), so that the edges' shared problems are not
    split by it: on random neuron and channel graphs, equal measures before the cut are equal
    after it, each node still loses no more mass than its own budget, and the bounds solve no
    more shared problems with the cut than without it. Some of the equal measures must have
    had different budgets of their own (else nothing here is tested)."""
    from curvprune.transport.measures import _cut_budget

    spread = []

    @settings(max_examples=20, **_SETTINGS)
    @given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
           cut_tol=st.sampled_from([1e-3, 1e-1]), data=st.data())
    def check(spec, cut_tol, data):
        for p in random_problems(spec, data, 0.0):
            mu, nu = cut_measures(p.mu, p.nu, p.src, p.dst, p.length, cut_tol)
            for before, after, nodes, other in ((p.mu, mu, p.src, p.nu), (p.nu, nu, p.dst, p.mu)):
                if before is None or not before.mass.shape[1]:
                    continue
                key = _measure_keys(before)
                first = torch.full((int(key.max()) + 1,), key.numel()).scatter_reduce_(
                    0, key, torch.arange(key.numel()), reduce="amin")
                cut_key = _measure_keys(after)
                assert torch.equal(cut_key, cut_key[first[key]])  # equal before: equal after
                reach = float(other.reach.max()) if other is not None and other.reach.numel() \
                    else 0.0
                own = _cut_budget(before, nodes, p.length, reach, cut_tol)
                ids = int(before.table.max()) + 1  # by neighbour id (padding: mass 0)
                full, rest = (torch.zeros(len(m.mass), ids, dtype=m.mass.dtype).scatter_add_(
                    1, m.table.clamp(min=0), m.mass) for m in (before, after))
                assert ((torch.where(rest == 0, full, 0.0).sum(1)) <= own * (1 + 1e-12)).all()
                low = torch.full_like(own, math.inf).scatter_reduce_(0, key, own, reduce="amin")
                spread.append(int(((own > low[key]) & (own < math.inf)).sum()))
            counts = []
            for problem in (p, replace(p, mu=mu, nu=nu,
                                       error=cut_error(mu, nu, p.src, p.dst, p.dead, cut_tol))):
                stats = EngineStats()
                problem.bounds(0.5, cut_tol, stats=stats, options=EngineOptions(), tighten=False)
                counts.append(stats.shared_problems)
            assert counts[1] <= counts[0]

    check()
    assert sum(spread) > 0


def check_product_sums(problem, unreachable: float, rng: torch.Generator) -> int:
    """The screen's swap-plan sums by one matrix product over the layer equal the keyed sums
    to rounding, and gathered for every pair (in chunks of a few rows, or all at once) equal
    them bit for bit, on every general edge of ``problem``, with a fraction ``unreachable``
    of the distances made infinite; returns the number of edges checked."""
    general = general_edges(problem)
    tables = problem.distances
    if not general.numel() or not all(isinstance(t, torch.Tensor) and t.dim() == 2
                                      for t in (tables.d_kj, tables.d_im)):
        return 0
    src, dst = problem.src[general], problem.dst[general]
    mu, nu = problem.mu, problem.nu
    d_kj, d_im = (torch.where(torch.rand(t.shape, generator=rng, dtype=t.dtype) < unreachable,
                              math.inf, t) for t in (tables.d_kj, tables.d_im))
    tables = type(tables)(d_kj, d_im, tables.d_km)
    rows = _groups(_measure_keys(mu)[src], dst)
    cols = _groups(src, _measure_keys(nu)[dst])
    for keyed, product, gathered in (
            (_row_sums(tables, src, dst, mu, rows, 1 << 22),
             _product_sums(mu, d_kj, rows_first=True)[src, dst],
             _gathered_sums(mu, d_kj, 7, rows_first=True)[src, dst]),
            (_col_sums(tables, src, dst, nu, cols, 1 << 22),
             _product_sums(nu, d_im, rows_first=False)[dst, src],
             _gathered_sums(nu, d_im, 1 << 22, rows_first=False)[dst, src])):
        assert torch.equal(torch.isinf(keyed), torch.isinf(product))
        assert not torch.isnan(product).any()
        finite = torch.isfinite(keyed)
        assert torch.allclose(product[finite], keyed[finite], rtol=1e-12, atol=1e-15)
        assert torch.equal(gathered, keyed)  # bit for bit, infinities included
    return general.numel()


@settings(max_examples=30, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
       unreachable=st.sampled_from([0.0, 0.3]), data=st.data())
def test_swap_sums_by_product_equal_the_keyed_sums(spec, unreachable, data):
    """The swap-plan sums of the screen, ``p.A`` and ``sum_m q_m D(i, m)``, computed for the
    whole layer by one matrix product (``_product_sums``, used where it is cheaper:
    ``_by_product``) equal the keyed sums per edge to rounding, and gathered for every pair
    (``_gathered_sums``, used for narrow sides: ``_by_gathering``) equal them bit for bit,
    on the neuron graph's dense tables and the channel graph's (random networks with zero
    weights and dead units); an infinite distance with mass on it gives ``inf`` in both, and
    no product gives NaN."""
    rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    for problem in random_problems(spec, data, 0.0):
        check_product_sums(problem, unreachable, rng)


def test_the_screen_sums_dense_layers_by_product():
    """``_by_product`` picks the matrix product for a dense layer with wide supports, and the
    keyed sums for a table that is not a dense tensor or a product over the ``block``; on
    that layer the two agree, with and without unreachable pairs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 6, 1)).eval()
    graph = _trace(model, _inputs((3, 4, 4), seed=0))
    problems = ChannelProblems(graph, channel_distances(graph))
    problem = problems.edge_problem(1, graph.activity[0], 0.0)  # the middle conv
    edges = general_edges(problem).numel()
    assert edges > 0
    assert _by_product(problem.mu, problem.distances.d_kj, edges, 1 << 22)
    assert _by_product(problem.nu, problem.distances.d_im, edges, 1 << 22)
    assert not _by_product(problem.mu, problem.distances.d_kj, edges, 1)
    assert not _by_product(problem.mu, object(), edges, 1 << 22)
    rng = torch.Generator().manual_seed(0)
    assert check_product_sums(problem, 0.0, rng) == edges
    assert check_product_sums(problem, 0.3, rng) == edges


def test_by_gathering_picks_narrow_sides_of_dense_tables():
    """``_by_gathering`` picks the gathered sums for a measure at most 1/64 as wide as the
    support set, a dense table, pairs at most twice the edges that read them and within the
    block; any one condition broken gives the keyed (or product) sums."""
    from curvprune.transport.measures import _Measure

    def measure(nodes: int, width: int) -> _Measure:
        return _Measure(table=torch.zeros((nodes, width), dtype=torch.long),
                        mass=torch.ones((nodes, width), dtype=torch.float64),
                        has=torch.ones(nodes, dtype=torch.bool),
                        reach=torch.ones(nodes, dtype=torch.float64))

    rows = torch.zeros((128, 10), dtype=torch.float64)  # d_kj: 128 support nodes, 10 targets
    cols = torch.zeros((10, 128), dtype=torch.float64)  # d_im: 10 sources, 128 support nodes
    for table, rows_first in ((rows, True), (cols, False)):
        assert _by_gathering(measure(6, 2), table, 30, 1 << 22, rows_first=rows_first)
        assert not _by_gathering(measure(6, 3), table, 30, 1 << 22, rows_first=rows_first)
        assert not _by_gathering(measure(6, 2), table, 29, 1 << 22, rows_first=rows_first)
        assert not _by_gathering(measure(6, 2), table, 30, 59, rows_first=rows_first)
        assert not _by_gathering(measure(6, 2), object(), 30, 1 << 22, rows_first=rows_first)
        assert not _by_gathering(None, table, 30, 1 << 22, rows_first=rows_first)
    # The support set is the table's other axis: summing against the 10-wide one is no gather.
    assert not _by_gathering(measure(6, 1), rows.T, 30, 1 << 22, rows_first=True)


def test_gathered_sums_leave_every_bound_unchanged():
    """The point-mass closed forms and the screen read a narrow side's sums gathered for every
    pair of the layer (``_gathered_sums``) where they would sum per key: every bound, the
    screened edges and the counts are bit for bit the same as with every side summed per key
    (the matrix product switched off in both), with and without a ceiling, on random neuron
    and channel graphs. The gathered sums must really be used in some of these runs."""
    import curvprune.transport.bounds as bounds_module

    used = []
    real = bounds_module._gathered_sums

    def spy(*a, **k):
        used.append(1)
        return real(*a, **k)

    @settings(max_examples=25, **_SETTINGS)
    @given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
           alpha=st.sampled_from([0.5, 0.9]), cut_tol=st.sampled_from([0.0, 1e-2]),
           data=st.data())
    def check(spec, alpha, cut_tol, data):
        problems = random_problems(spec, data, cut_tol)
        shift = data.draw(st.sampled_from([-0.05, 0.0, 0.05]))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bounds_module, "_PRODUCT_RATIO", 0)
            mp.setattr(bounds_module, "_gathered_sums", spy)
            for p in problems:
                plain = p.bounds(alpha, cut_tol, stats=EngineStats(), options=EngineOptions(),
                                 tighten=False)
                for ceiling in (None, plain[0] + shift):
                    runs = []
                    for ratio in (0, 1 << 30):  # every narrow-enough side gathered / never
                        mp.setattr(bounds_module, "_GATHER_RATIO", ratio)
                        stats = EngineStats()
                        lo, hi = p.bounds(alpha, cut_tol, stats=stats, options=EngineOptions(),
                                          ceiling=ceiling, tighten=False)
                        runs.append((lo, hi, stats.as_dict()))
                    (lo1, hi1, s1), (lo2, hi2, s2) = runs
                    assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2) and s1 == s2

    check()
    assert used


def test_the_gathered_sums_are_used_on_a_dense_layer_with_narrow_measures(monkeypatch):
    """A dense channel layer fed by a depthwise one (every source's in-measure is one atom,
    over a 128-channel layer) gathers its row sums with the default ratio, and its bounds,
    with every edge screened against a ceiling of ``-inf``, are bit for bit those of the keyed
    sums (the matrix product switched off)."""
    import curvprune.transport.bounds as bounds_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 128, 1),
                                torch.nn.Conv2d(128, 128, 1, groups=128),
                                torch.nn.Conv2d(128, 4, 1), torch.nn.Conv2d(4, 4, 1)).eval()
    graph = _trace(model, _inputs((3, 4, 4), seed=0))
    p = ChannelProblems(graph, channel_distances(graph)).edge_problem(2, graph.activity[0], 0.0)
    monkeypatch.setattr(bounds_module, "_PRODUCT_RATIO", 0)
    used = []
    real = bounds_module._gathered_sums
    monkeypatch.setattr(bounds_module, "_gathered_sums",
                        lambda *a, **k: used.append(k["rows_first"]) or real(*a, **k))
    ceiling = torch.full_like(p.length, -math.inf)
    runs = []
    for ratio in (bounds_module._GATHER_RATIO, 1 << 30):
        monkeypatch.setattr(bounds_module, "_GATHER_RATIO", ratio)
        stats = EngineStats()
        runs.append(p.bounds(0.9, 1e-2, stats=stats, options=EngineOptions(), ceiling=ceiling,
                             tighten=False) + (stats.as_dict(),))
    assert used == [True]  # the first run's row sums only
    assert runs[0][2]["screened"] == general_edges(p).numel() > 0
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]


@settings(max_examples=60, **_SETTINGS)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.booleans()), min_size=1,
                max_size=40))
def test_subgroups_equal_grouping_the_kept_edges_again(edges):
    """The screen groups every general edge by its row and column keys once; the edges left
    open reuse those groups (``_subgroups``), which must be exactly what grouping them anew
    gives: the same group per edge, count and first edge."""
    a = torch.tensor([e[0] for e in edges])
    b = torch.tensor([e[1] for e in edges])
    keep = torch.tensor([e[2] for e in edges])
    if not keep.any():
        keep[len(edges) // 2] = True
    of_edge, count, first = _subgroups(_groups(a, b), keep)
    want_of_edge, want_count, want_first = _groups(a[keep], b[keep])
    assert count == want_count
    assert torch.equal(of_edge, want_of_edge)
    assert torch.equal(first, want_first)


def _shared_of(problem):
    general = general_edges(problem)
    src, dst = problem.src[general], problem.dst[general]
    if not general.numel():
        return general, src, dst, None
    shared = _shared_problems(problem.distances, src, dst, problem.mu, problem.nu,
                              _measure_keys(problem.mu), _measure_keys(problem.nu), 1 << 22,
                              EngineStats())
    return general, src, dst, shared


def check_plans(problem) -> set[int]:
    """Every edge's shared plan (:func:`_edge_plans`, each kind) is a coupling of its two
    measures (``q`` normalised to the mass of ``p``) whose cost is ``X0``: an optimal plan of
    the shared problem. Returns the kinds seen."""
    general, src, dst, shared = _shared_of(problem)
    if not general.numel():
        return set()
    mu, nu, tables = problem.mu, problem.nu, problem.distances
    n = 1 + int(max(mu.table.max(), nu.table.max()))
    kinds = set()
    for which in (SINGLE, TWO, SIMPLEX):
        edges = torch.nonzero(shared.kind[shared.pair] == which).squeeze(1)
        if not edges.numel():
            continue
        kinds.add(which)
        k, m, mass = _edge_plans(tables, src[edges], dst[edges], mu, nu, shared, edges, which)
        assert (mass >= 0).all()
        for row, e in enumerate(edges.tolist()):
            i, j = int(src[e]), int(dst[e])
            p_on, q_on = mu.mass[i] > 0, nu.mass[j] > 0
            p, q = mu.mass[i][p_on], nu.mass[j][q_on]
            q = q * (p.sum() / q.sum())
            used = mass[row] > 0
            rows = torch.zeros(n, dtype=torch.float64).index_add_(0, k[row][used],
                                                                  mass[row][used])
            cols = torch.zeros(n, dtype=torch.float64).index_add_(0, m[row][used],
                                                                  mass[row][used])
            want_rows = torch.zeros(n, dtype=torch.float64).index_add_(0, mu.table[i][p_on], p)
            want_cols = torch.zeros(n, dtype=torch.float64).index_add_(0, nu.table[j][q_on], q)
            assert torch.allclose(rows, want_rows, rtol=1e-9, atol=1e-12), (which, e)
            assert torch.allclose(cols, want_cols, rtol=1e-9, atol=1e-12), (which, e)
            cost = (mass[row][used] * tables.d_km[k[row][used], m[row][used]]).sum()
            x0 = shared.x0[shared.pair[e]]
            assert abs(float(cost - x0)) <= 1e-9 * (1 + abs(float(x0))), (which, e, cost, x0)
    return kinds


@settings(max_examples=30, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
       cut_tol=st.sampled_from([0.0, 1e-2]))
def test_shared_plans_are_optimal_couplings(spec, cut_tol):
    model, x = build(spec)
    for problem in neuron_problems(model, x, cut_tol):
        check_plans(problem)


def test_shared_plans_of_every_kind():
    """A conv net and a zoo model's channel graph have pairs of all three kinds; each kind's
    plans are optimal couplings (:func:`check_plans`)."""
    from curvprune import zoo

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3), torch.nn.ReLU()).eval()
    kinds = set()
    for problem in neuron_problems(model, torch.rand(1, 2, 9, 9)):
        kinds |= check_plans(problem)
    name = "torchvision/shufflenet_v2"
    zoo_model = zoo.create(name).eval()
    graph = _trace(zoo_model, zoo.example_input(name, batch=1))
    problems = ChannelProblems(graph, channel_distances(graph))
    for g in range(problems.num_groups):
        kinds |= check_plans(problems.edge_problem(g, graph.activity[0], 0.0))
    assert kinds == {SINGLE, TWO, SIMPLEX}



def conv_shared_bounds(alpha):
    """Per layer problem of a seeded three-conv net (one example) with edges of two neighbour
    parts: ``(problem, general edges, lo, hi)``, the bounds on kappa of
    :func:`per_edge_bounds` (no edge-by-edge tightening)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3), torch.nn.ReLU()).eval()
    for problem in neuron_problems(model, torch.rand(1, 2, 9, 9)):
        general, _, _, shared = _shared_of(problem)
        if general.numel():
            lower, upper = per_edge_bounds(problem, general, shared, alpha)
            de = problem.length[general]
            yield problem, general, 1.0 - upper / de, 1.0 - lower / de

@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_open_edges_get_tighter_bounds(alpha):
    """The re-costed plans and the dual at every breakpoint never loosen an edge's bounds
    (those of :func:`per_edge_bounds` without them) and tighten both sides on some open
    edges (the breakpoints only at a tolerance of 1e-9 or more). Without the re-cost no ``lo``
    rises, without the breakpoints no ``hi`` falls: this fails."""
    raised = lowered = 0
    for problem, general, old_lo, old_hi in conv_shared_bounds(alpha):
        scale = 1e-12 * (1 + old_lo.abs())
        for tol in (0.0, 1e-3):  # the breakpoints only from a tolerance of 1e-9 on
            lo, hi = bound_edges(problem.src, problem.dst, problem.length, problem.dead,
                                 problem.mu, problem.nu, problem.distances, alpha,
                                 certify_tol=tol, settle=False)
            assert (lo[general] >= old_lo - scale).all()
            assert (hi[general] <= old_hi + 1e-12 * (1 + old_hi.abs())).all()
            if tol == 0.0:
                assert ((hi[general] - old_hi).abs() <= 1e-12 * (1 + old_hi.abs())).all()
                raised += int((lo[general] > old_lo + 1e-9).sum())
            else:
                lowered += int((hi[general] < old_hi - 1e-9).sum())
    assert raised > 0 and lowered > 0



@pytest.mark.parametrize("alpha", [0.3, 0.9])
def test_edges_at_their_ceiling_are_not_tightened(alpha):
    """An open edge whose shared-problem lower bound on kappa reaches its ``ceiling`` keeps
    those bounds (it cannot move its weight's interval, so tightening it buys nothing); every
    other edge not screened gets the re-costed ``lo`` it gets with no ceiling, and the same
    ``hi`` too unless that ``lo`` reaches the ceiling (then the breakpoints are skipped and
    ``hi`` is the shared one). Some edges of each kind must occur, and some skipped ones must
    be edges that tightening changes, so a ceiling that is ignored fails this."""
    kept = tightened = changed = 0
    for problem, general, old_lo, old_hi in conv_shared_bounds(alpha):
        args = (problem.src, problem.dst, problem.length, problem.dead, problem.mu,
                problem.nu, problem.distances, alpha)
        full_lo, full_hi = bound_edges(*args, certify_tol=1e-3, settle=False)
        ceiling = torch.full_like(problem.length, math.inf)
        ceiling[general] = old_lo.median()
        lo, hi = bound_edges(*args, certify_tol=1e-3, settle=False, ceiling=ceiling)
        lo, hi, full_lo, full_hi = lo[general], hi[general], full_lo[general], full_hi[general]
        screened = torch.isinf(hi)
        # Edges within rounding of the ceiling may go either way: they are not checked.
        margin = 1e-9 * (1 + ceiling[general].abs())
        at = (old_lo >= ceiling[general] + margin) & ~screened
        below = (old_lo < ceiling[general] - margin) & ~screened
        close = lambda a, b: ((a - b).abs() <= 1e-12 * (1 + b.abs())).all()  # noqa: E731
        assert close(lo[at], old_lo[at]) and close(hi[at], old_hi[at])
        reached = below & (lo >= ceiling[general])
        assert torch.equal(lo[below], full_lo[below]) and close(hi[reached], old_hi[reached])
        assert torch.equal(hi[below & ~reached], full_hi[below & ~reached])
        kept, tightened = kept + int(at.sum()), tightened + int(below.sum())
        changed += int(((full_lo[at] - old_lo[at]).abs() > 1e-9).sum()
                       + ((full_hi[at] - old_hi[at]).abs() > 1e-9).sum())
    assert kept > 0 and tightened > 0 and changed > 0


def dual_at_every_breakpoint(problem, general, shared):
    """The oracle of :func:`_dual_breakpoints`: per edge, ``F(t) + G(t) - s`` summed term by
    term at each of its breakpoints, the largest."""
    mu, nu, tables = problem.mu, problem.nu, problem.distances
    out = []
    for e in range(general.numel()):
        i, j, de = int(problem.src[general[e]]), int(problem.dst[general[e]]), \
            float(problem.length[general[e]])
        rows, cols = mu.mass[i] > 0, nu.mass[j] > 0
        p, q = mu.mass[i][rows], nu.mass[j][cols]
        a = tables.d_kj[mu.table[i][rows], torch.tensor(j)]
        b = tables.d_im[torch.tensor(i), nu.table[j][cols]] - de
        f = shared.f[shared.pair[e]][rows]
        g = shared.g[shared.pair[e]][cols]
        ts = torch.cat([a - f, g - b])
        values = [(p * torch.minimum(f + t, a)).sum() + (q * torch.minimum(g - t, b)).sum()
                  for t in ts]
        out.append(max(float(v) for v in values) - float(shared.slack[shared.pair[e]]))
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=25, **_SETTINGS)
@given(spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=1),
       alpha=alphas, cut_tol=st.sampled_from([0.0, 1e-2]))
def test_dual_at_every_breakpoint_equals_the_oracle(spec, alpha, cut_tol):
    """:func:`_dual_breakpoints` equals the term-by-term maximum over the breakpoints (1e-12
    relative), is at least the three-point bound, and stays below the exact value."""
    model, x = build(spec)
    graph, examples = _graph_and_acts(model, x)
    exact, _ = score_example(graph, examples[0], alpha, certify_tol=0.0)
    for g, value in enumerate(exact):
        problem = graph.edge_problem(g, examples[0], cut_tol)
        general, src, dst, shared = _shared_of(problem)
        if not general.numel():
            continue
        de = problem.length[general]
        got = _dual_breakpoints(problem.distances, src, dst, de, problem.mu, problem.nu,
                                shared, torch.arange(general.numel()), 7)
        want = dual_at_every_breakpoint(problem, general, shared)
        scale = 1e-12 * (want.abs() + de + 1)
        assert ((got - want).abs() <= scale).all(), (got - want).abs().max()
        three, _ = per_edge_bounds(problem, general, shared, alpha)
        assert (got >= three - scale).all()
        if cut_tol == 0.0:  # the bound of the exact (uncut) problem
            hi = 1.0 - got / de
            assert (value[general] <= hi + 1e-9 * (1 + hi.abs())).all()


@settings(max_examples=60, **_SETTINGS)
@given(width=st.integers(0, 70), rows=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       inclusive=st.booleans())
def test_count_sorted_equals_searchsorted(width, rows, seed, inclusive):
    """The factored bounds' binary search counts what ``torch.searchsorted`` counts on each
    query's own row (``side="right"`` for ``<=``), with ties, infinities and queries past
    either end."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(-3, 4, (rows, width), generator=gen).to(torch.float64)
    table[torch.rand(rows, width, generator=gen) < 0.1] = -math.inf
    table[torch.rand(rows, width, generator=gen) < 0.1] = math.inf
    table = table.sort(1).values
    key = torch.randint(0, rows, (200,), generator=gen)
    value = torch.randint(-5, 6, (200,), generator=gen).to(torch.float64)
    value[:3] = torch.tensor([-math.inf, math.inf, 0.5], dtype=torch.float64)
    want = torch.searchsorted(table[key], value[:, None], right=inclusive).squeeze(1)
    assert torch.equal(_count_sorted(table, key, value, inclusive=inclusive), want)
