"""The neighbour measures (method.md section 2) and the neighbour tables behind them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import profile_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune.reference import _measure
from curvprune.transport import neighbour_measures, padded_neighbours
from curvprune.transport.measures import _shared_budget

_UNDERFLOW = 1.0 / math.sqrt(-math.log(np.finfo(np.float64).tiny))  # ~0.0376


def _table(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def test_padded_neighbours_groups_values_by_key():
    keys = torch.tensor([2, 0, 2, 3, 0, 2])
    values = torch.tensor([10, 11, 12, 13, 14, 15])
    table = padded_neighbours(keys, values, 5)
    assert table.shape == (5, 3)
    assert table[0].tolist() == [11, 14, -1]
    assert table[1].tolist() == [-1, -1, -1]
    assert table[2].tolist() == [10, 12, 15]  # stable: original order kept
    assert table[3].tolist() == [13, -1, -1]
    assert table[4].tolist() == [-1, -1, -1]


def test_padded_neighbours_empty():
    empty = torch.zeros(0, dtype=torch.long)
    table = padded_neighbours(empty, empty, 4)
    assert table.shape == (4, 0)
    mass, has = neighbour_measures(table, torch.rand(3, dtype=torch.float64))
    assert mass.shape == (4, 0) and not has.any()


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 20)), max_size=40))
def test_padded_neighbours_matches_python_grouping(pairs):
    keys = torch.tensor([k for k, _ in pairs], dtype=torch.long)
    values = torch.tensor([v for _, v in pairs], dtype=torch.long)
    table = padded_neighbours(keys, values, 7)
    for key in range(7):
        row = [v for v in table[key].tolist() if v >= 0]
        assert row == [v for k, v in pairs if k == key]


def test_proportional_measure():
    activity = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    mass, has = neighbour_measures(_table([[0, 1, 2, 3], [1, 2]]), activity)
    w = torch.exp(-1.0 / activity[1:] ** 2)
    assert has.tolist() == [True, True]
    assert mass[0, 0] == 0  # inactive neighbour: no mass
    torch.testing.assert_close(mass[0, 1:], w / w.sum(), rtol=1e-15, atol=0)
    torch.testing.assert_close(mass[1, :2], w[:2] / w[:2].sum(), rtol=1e-15, atol=0)


def test_point_mass_when_no_active_neighbour():
    activity = torch.tensor([0.0, 0.0, 0.7], dtype=torch.float64)
    mass, has = neighbour_measures(_table([[0, 1], [], [2]]), activity)
    assert has.tolist() == [False, False, True]
    assert (mass[:2] == 0).all()
    assert mass[2, 0] == 1


@pytest.mark.parametrize("small", [[0.01], [0.01, 0.02, 0.03], [0.036, 0.001], [1e-300, 0.02]])
def test_uniform_fallback_when_weights_underflow(small):
    """All active neighbours below ~0.0376: exp(-1/a^2) sums below the smallest normal float64,
    the neighbour mass is spread uniformly over the active neighbours."""
    activity = torch.tensor([0.0] + small, dtype=torch.float64)
    assert max(small) < _UNDERFLOW
    mass, has = neighbour_measures(_table([list(range(len(small) + 1))]), activity)
    assert has.item()
    assert mass[0, 0] == 0
    torch.testing.assert_close(mass[0, 1:], torch.full((len(small),), 1.0 / len(small),
                                                       dtype=torch.float64))


def test_no_fallback_just_above_underflow():
    """0.04 is small but exp(-625) is a normal float64: the measure stays proportional (the
    authors' float32 code would drop it; curvprune does not)."""
    activity = torch.tensor([0.04, 0.02], dtype=torch.float64)
    mass, _ = neighbour_measures(_table([[0, 1]]), activity)
    assert mass[0].tolist() == [1.0, 0.0]
    activity = torch.tensor([0.05, 0.06], dtype=torch.float64)
    mass, _ = neighbour_measures(_table([[0, 1]]), activity)
    w = torch.exp(-1.0 / activity ** 2)
    torch.testing.assert_close(mass[0], w / w.sum(), rtol=1e-12, atol=0)
    assert mass[0, 0] > 0


def _activities():
    tiny = st.floats(1e-4, 0.05)
    any_ = st.floats(0.0, 1.0)
    return st.lists(st.one_of(st.just(0.0), tiny, any_, st.just(1.0)), min_size=1, max_size=12)


@pytest.mark.filterwarnings("ignore:divide by zero")  # reference: a**2 underflows for a < 1e-154
@settings(max_examples=profile_examples(200))
@given(activity=_activities(), data=st.data())
def test_measures_match_reference_definition(activity, data):
    n_act = len(activity)
    rows = data.draw(st.lists(st.lists(st.integers(0, n_act - 1), max_size=6, unique=True),
                              min_size=1, max_size=5))
    act = torch.tensor(activity, dtype=torch.float64)
    mass, has = neighbour_measures(_table(rows), act)
    for v, row in enumerate(rows):
        nodes, masses = _measure(-1, row, np.array(activity), 0.0, False)
        expected = dict(zip(nodes[1:], masses[1:]))
        assert bool(has[v]) == bool(expected)
        got = {u: float(mass[v, s]) for s, u in enumerate(row) if mass[v, s] > 0}
        assert set(got) <= set(expected)
        for u, m in expected.items():
            assert got.get(u, 0.0) == pytest.approx(m, rel=1e-12, abs=1e-300)
        if expected:
            assert float(mass[v].sum()) == pytest.approx(1.0, rel=1e-12)
        else:
            assert (mass[v] == 0).all()


@settings(max_examples=profile_examples(200), deadline=None)
@given(data=st.data(), block=st.integers(1, 64))
def test_measures_and_cut_by_blocks_equal_the_whole(data, block):
    """node_measures and the cut of negligible masses work a block of rows at a time (about
    ``block`` entries); every row is computed on its own, so any block gives bitwise the
    measures of one block, with ties, underflowing weights, dead neighbours and padding."""
    from curvprune.transport.measures import _cut, _padded_slots, node_measures

    n = data.draw(st.integers(0, 12))
    n_other = data.draw(st.integers(1, 10))
    keys = torch.tensor(data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=40
                                           if n else 0)), dtype=torch.long)
    ids = torch.tensor(data.draw(st.lists(st.integers(0, n_other - 1), min_size=keys.numel(),
                                          max_size=keys.numel())), dtype=torch.long)
    activity = torch.tensor(data.draw(st.lists(st.one_of(st.just(0.0), st.just(0.5),
                                                          st.floats(1e-4, 0.05),
                                                          st.floats(0.0, 1.0)),
                                               min_size=n_other, max_size=n_other)),
                            dtype=torch.float64)
    length = torch.rand(keys.numel(), dtype=torch.float64, generator=torch.Generator()
                        .manual_seed(n))
    table = padded_neighbours(keys, ids, n)
    slot, _ = _padded_slots(keys, n)
    whole = node_measures(table, activity, length, slot=slot, block=1 << 20)
    parts = node_measures(table.int(), activity, length, slot=slot.int(), block=block)
    for field in ("table", "mass", "has", "reach"):
        assert torch.equal(getattr(parts, field), getattr(whole, field)), field
    budget = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)),
                          dtype=torch.float64)
    want, got = _cut(whole, budget, block=1 << 20), _cut(whole, budget, block=block)
    for field in ("table", "mass", "has", "reach", "cut"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    shared = _shared_budget(whole, budget, block=1 << 20)
    assert torch.equal(_shared_budget(whole, budget, block=block), shared)
    assert torch.equal(shared, shared_budget_oracle(whole, budget))


def shared_budget_oracle(measure, budget: torch.Tensor) -> torch.Tensor:
    """``_shared_budget`` node by node: the nodes with the first slot (neighbour and mass) of
    the first node ``r`` having it, and equal to ``r`` in every slot, take the smallest budget
    among them; every other node keeps its own."""
    n, width = measure.mass.shape
    if width == 0:
        return budget
    rows = [(measure.table[v].tolist(), measure.mass[v].tolist()) for v in range(n)]
    out = budget.clone()
    for v in range(n):
        head = (rows[v][0][0], rows[v][1][0])
        r = next(u for u in range(n) if (rows[u][0][0], rows[u][1][0]) == head)
        if rows[v] == rows[r]:
            out[v] = min(float(budget[u]) for u in range(n) if rows[u] == rows[r])
    return out


def test_equal_measures_share_the_smallest_budget():
    """Three nodes with the same neighbour part, a fourth with the same first slot but another
    mass further on, a fifth with another first slot: the three equal ones take the smallest
    of their budgets and are cut alike; the other two keep theirs."""
    from curvprune.transport.measures import _cut, _Measure

    table = torch.tensor([[0, 1, 2]] * 4 + [[1, 0, 2]])
    mass = torch.tensor([[0.9, 0.09, 0.01]] * 3 + [[0.9, 0.08, 0.02], [0.9, 0.09, 0.01]],
                        dtype=torch.float64)
    measure = _Measure(table, mass, torch.ones(5, dtype=torch.bool),
                       torch.ones(5, dtype=torch.float64))
    budget = torch.tensor([0.2, 0.005, 0.05, 0.001, 0.3], dtype=torch.float64)
    shared = _shared_budget(measure, budget)
    assert shared.tolist() == [0.005, 0.005, 0.005, 0.001, 0.3]
    cut = _cut(measure, shared)
    assert torch.equal(cut.mass[0], cut.mass[1]) and torch.equal(cut.mass[1], cut.mass[2])
    assert (cut.mass[:3] > 0).sum(1).tolist() == [3, 3, 3]  # 0.01 is over the shared budget
    assert (_cut(measure, budget).mass[:3] > 0).sum(1).tolist() == [1, 3, 2]  # alone: cut apart
