"""The exact-solve path's fast pieces equal the plain ones they replace: the cost blocks read
from a dense table by ``numpy.take`` (:func:`curvprune.transport.base._cross`), and the scoring
loop's kept solve sets, which build each (layer, example) edge problem once and solve the
edges the search holds open from their rows of the measures."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from curvprune import neural_curvature
from curvprune.graphs.base import EdgeProblem, SolveSet
from curvprune.graphs.neuron import NeuronGraph
from curvprune.reference import reference_curvature
from curvprune.transport import EngineOptions
from curvprune.transport.base import _cross


class _Indexed:
    """A table known only by its ``[rows, cols]`` indexing (like a windowed hop table)."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def __getitem__(self, key):
        return self.values[key]


@pytest.mark.parametrize("shape", [(7, 5), (40, 120), (1, 1)])
def test_cross_equals_the_two_index_gather(shape):
    g = torch.Generator().manual_seed(sum(shape))
    table = torch.rand(shape, dtype=torch.float64, generator=g)
    table[0, -1] = float("inf")  # unreachable pairs are read as they are
    rows = torch.randint(0, shape[0], (9, 4), generator=g)
    cols = torch.randint(0, shape[1], (9, 3), generator=g)
    expected = table[rows[:, :, None], cols[:, None, :]]
    for source in (table, _Indexed(table), table.t().contiguous().t()):  # dense, other, strided
        got = _cross(source, rows, cols)
        assert got.shape == (9, 4, 3)
        assert torch.equal(got, expected)
    assert _cross(table, rows[:0], cols[:0]).shape == (0, 4, 3)


def test_cross_reads_a_dense_hop_table_through_its_values():
    from curvprune.graphs.neuron import HopTable, _Layout

    values = torch.rand(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hop = HopTable(values, _Layout((10, 1, 1), (1, 1), None, None))
    assert hop.dense_values is values
    rows, cols = torch.tensor([[0, 5], [2, 2]]), torch.tensor([[9, 0, 3], [1, 1, 1]])
    assert torch.equal(_cross(hop, rows, cols), values[rows[:, :, None], cols[:, None, :]])


def _chain(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(),
                         nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _count_builds(monkeypatch) -> tuple[dict, set, list]:
    """Patches that count edge-problem builds per (group, example) and record the groups
    whose solve sets are solved."""
    built: dict[tuple[int, int], int] = {}
    solved_groups: set[int] = set()
    group_of: dict[int, int] = {}
    build, keep, solve = NeuronGraph.edge_problem, EdgeProblem.keep, SolveSet.solve
    examples: list = []

    def counting_build(self, group, activity, cut_tol):
        problem = build(self, group, activity, cut_tol)
        example = next(x for x, acts in enumerate(examples) if acts is activity)
        built[group, example] = built.get((group, example), 0) + 1
        group_of[id(problem)] = group
        return problem

    def recording_keep(self, edges):
        kept = keep(self, edges)
        group_of[id(kept)] = group_of.get(id(self), -1)
        return kept

    def recording_solve(self, *args, **kwargs):
        solved_groups.add(group_of[id(self)])
        return solve(self, *args, **kwargs)

    import curvprune.curvature as curvature

    search = curvature._search

    def capture(graph, activities, *args, **kwargs):
        examples[:] = activities
        return search(graph, activities, *args, **kwargs)

    monkeypatch.setattr(NeuronGraph, "edge_problem", counting_build)
    monkeypatch.setattr(EdgeProblem, "keep", recording_keep)
    monkeypatch.setattr(SolveSet, "solve", recording_solve)
    monkeypatch.setattr(curvature, "_search", capture)
    return built, solved_groups, examples


@pytest.mark.parametrize("cache", [1 << 29, 1, 0])
def test_each_edge_problem_is_built_once_and_solved_from_its_kept_edges(monkeypatch, cache):
    """Each (layer, example) edge problem is built once, for its bounds; the edges the search
    holds open on it are kept (a SolveSet) and solved from there in every round. A set that
    does not fit the cache is rebuilt once when the search reaches its layer, and kept for
    that layer's rounds (evicting later layers' sets) if it fits; with no cache at all, each
    round's solve builds its problem again. Kappa is the same, bitwise, in every case."""
    built, solved_groups, _ = _count_builds(monkeypatch)
    model = _chain(3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    options = EngineOptions(problem_cache_bytes=cache)
    result = neural_curvature(model, x, alpha=0.9, threads=1, tolerance=1e-14,
                              options=options)
    assert len(solved_groups) >= 2, solved_groups  # solves in more than one layer
    once = {(g, e): 1 for g in range(4) for e in range(4)}
    if cache == 1 << 29:
        assert built == once
    else:
        rebuilt = {k: n - 1 for k, n in built.items() if n > 1}
        assert set(built) == set(once) and rebuilt
        assert {g for g, _ in rebuilt} == solved_groups
    expected = reference_curvature(model, x, alpha=0.9)
    for name, ref in expected.items():
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(result.kappa[name]), finite)
        assert (result.kappa[name][finite] - ref[finite]).abs().max() <= 1e-9
    if cache != 1 << 29:
        monkeypatch.undo()
        whole = neural_curvature(model, x, alpha=0.9, threads=1, tolerance=1e-14)
        for name in whole.kappa:
            assert torch.equal(result.kappa[name], whole.kappa[name])


def _kept_set_sizes(monkeypatch, model, x) -> tuple[list, object]:
    """``neural_curvature`` on ``model`` (exact, one thread) with the bytes of each solve set
    offered to the cache, in order: ``([((group, example), nbytes), ...], result)``."""
    import curvprune.curvature as curvature

    sizes = []
    put = curvature._SolveCache.put

    def measuring_put(self, key, kept, **kwargs):
        sizes.append((key, kept.nbytes))
        return put(self, key, kept, **kwargs)

    monkeypatch.setattr(curvature._SolveCache, "put", measuring_put)
    result = neural_curvature(model, x, alpha=0.9, threads=1, tolerance=1e-14)
    monkeypatch.undo()
    return sizes, result


def test_a_small_cache_rebuilds_each_set_once(monkeypatch):
    """A budget that holds one layer's kept sets but not every layer's: the sets of later
    layers are evicted for the layer being resolved and rebuilt once each, never once per
    round."""
    model = _chain(3)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sizes, _ = _kept_set_sizes(monkeypatch, model, x)
    per_group: dict[int, int] = {}
    for (g, _), size in sizes:
        per_group[g] = per_group.get(g, 0) + size
    budget = max(per_group.values())
    assert budget < sum(per_group.values())  # not every layer fits
    built, solved_groups, _ = _count_builds(monkeypatch)
    neural_curvature(model, x, alpha=0.9, threads=1, tolerance=1e-14,
                     options=EngineOptions(problem_cache_bytes=budget))
    assert max(built.values()) <= 2 and len(solved_groups) >= 2


def test_the_bounding_pass_keeps_the_earliest_groups_sets(monkeypatch):
    """While the bounding pass fills the cache, a set of an earlier group displaces those of
    later groups (the search resolves the groups in order): with a budget that holds the first
    solved group's sets, they are all kept from the bounding pass and never rebuilt, even
    when later groups' sets of the earlier examples came first."""
    model = _chain(3)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sizes, whole = _kept_set_sizes(monkeypatch, model, x)
    first = min(g for (g, _), _ in sizes)
    budget = sum(size for (g, _), size in sizes if g == first)
    later_first = [key for key, _ in sizes if key[1] == 0 and key[0] > first]
    assert later_first  # later groups' sets of example 0 are offered before most of first's
    built, solved_groups, _ = _count_builds(monkeypatch)
    result = neural_curvature(model, x, alpha=0.9, threads=1, tolerance=1e-14,
                              options=EngineOptions(problem_cache_bytes=budget))
    assert first in solved_groups
    assert all(n == 1 for (g, _), n in built.items() if g == first), built
    assert max(built.values()) == 2  # a later group's set was rebuilt, once
    for name in whole.kappa:
        assert torch.equal(result.kappa[name], whole.kappa[name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_edges_solve_bitwise_as_the_whole_problem(seed):
    """SolveSet.solve (the measures' rows at the kept edges' ends only) equals the exact
    solve on the whole problem's measures, bitwise, for any subset of the kept edges; an edge
    that was not kept is refused."""
    from curvprune.transport import EngineStats, solve_edges

    model = _chain(seed)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    import curvprune.curvature as curvature

    got = {}

    def capture(graph, activities, *args, **kwargs):
        got.update(graph=graph, activities=activities)
        return search(graph, activities, *args, **kwargs)

    search = curvature._search
    curvature._search = capture
    try:
        neural_curvature(model, x, alpha=0.9, tolerance=1e-14)
    finally:
        curvature._search = search
    graph, activity = got["graph"], got["activities"][1]
    gen = torch.Generator().manual_seed(seed)
    options = EngineOptions()
    for group in (1, 2):  # layers with neighbour parts on both sides
        problem = graph.edge_problem(group, activity, 1e-3)
        general = torch.nonzero(~problem.dead & problem.mu.has[problem.src]
                                & problem.nu.has[problem.dst]).squeeze(1)
        assert general.numel() > 4
        kept = general[torch.randperm(general.numel(), generator=gen)[:general.numel() // 2]]
        asked = kept[torch.randperm(kept.numel(), generator=gen)[:max(1, kept.numel() // 2)]]
        whole = solve_edges(problem.src[asked], problem.dst[asked], problem.length[asked],
                            problem.mu, problem.nu, problem.distances, 0.9,
                            stats=EngineStats())
        subset = problem.keep(kept)
        assert subset.mu.mass.shape[0] < problem.mu.mass.shape[0]  # only the ends' rows
        # Kept as int32 neighbour ids (the same ids), read back as int64 by the kernels.
        assert subset.mu.table.dtype == subset.nu.table.dtype == torch.int32
        rows = torch.unique(problem.src[kept])
        assert torch.equal(subset.mu.table.long(), problem.mu.table[rows])
        lo, hi = subset.solve(asked, 0.9, stats=EngineStats(), options=options, threads=1)
        error = problem.error[asked]
        assert torch.equal(lo, whole - error) and torch.equal(hi, whole + error)
        lo2, hi2 = problem.solve(asked, 0.9, stats=EngineStats(), options=options, threads=1)
        assert torch.equal(lo2, lo) and torch.equal(hi2, hi)
        missing = general[~torch.isin(general, kept)][:1]
        with pytest.raises(ValueError, match="not kept"):
            subset.solve(torch.cat([asked, missing]), 0.9, stats=EngineStats(),
                         options=options, threads=1)
