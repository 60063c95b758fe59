"""The exact-solve path's fast pieces equal the plain ones they replace: the cost blocks read
from a dense table by ``numpy.take`` (:func:`curvprune.transport.base._cross`), and the scoring
loop's problem cache, which builds each (layer, example) edge problem once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from curvprune import neural_curvature
from curvprune.graphs.base import EdgeProblem
from curvprune.graphs.neuron import NeuronGraph
from curvprune.reference import reference_curvature
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


def test_each_edge_problem_is_built_once_and_solved_from_the_cache(monkeypatch):
    """The minimum search resolves the layers in order; their problems stay cached until then
    (they used to be dropped, and rebuilt, as soon as an earlier layer was solved)."""
    built: dict[tuple[int, int], int] = {}
    solved_groups: set[int] = set()
    key_of: dict[int, int] = {}
    build, solve = NeuronGraph.edge_problem, EdgeProblem.solve

    def counting_build(self, group, activity, cut_tol):
        problem = build(self, group, activity, cut_tol)
        example = next(x for x, acts in enumerate(examples) if acts is activity)
        built[group, example] = built.get((group, example), 0) + 1
        key_of[id(problem)] = group
        return problem

    def recording_solve(self, *args, **kwargs):
        solved_groups.add(key_of[id(self)])
        return solve(self, *args, **kwargs)

    import curvprune.curvature as curvature

    examples: list = []
    search = curvature._search

    def capture(graph, activities, *args, **kwargs):
        examples[:] = activities
        return search(graph, activities, *args, **kwargs)

    monkeypatch.setattr(NeuronGraph, "edge_problem", counting_build)
    monkeypatch.setattr(EdgeProblem, "solve", recording_solve)
    monkeypatch.setattr(curvature, "_search", capture)
    model = _chain(3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = neural_curvature(model, x, alpha=0.9, threads=1, tolerance=1e-14)
    assert len(solved_groups) >= 2, solved_groups  # solves in more than one layer
    assert built == {(g, e): 1 for g in range(4) for e in range(4)}
    expected = reference_curvature(model, x, alpha=0.9)
    for name, ref in expected.items():
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(result.kappa[name]), finite)
        assert (result.kappa[name][finite] - ref[finite]).abs().max() <= 1e-9
