"""The engine's exact solver wrapper: equal to ``ot.emd2``, never silent if POT stops early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ot
import pytest

import curvprune.transport.solver as engine


def random_problem(rng, n, m, zeros=0):
    a, b = rng.random(n), rng.random(m)
    a[:zeros] = 0.0
    return a / a.sum(), b / b.sum(), rng.random((n, m)) * 5


def test_solve_one_equals_emd2_including_zero_mass_padding():
    rng = np.random.default_rng(0)
    for n, m, zeros in [(3, 4, 0), (12, 7, 3), (30, 50, 10)]:
        a, b, cost = random_problem(rng, n, m, zeros)
        value, f, g = engine._solve_one(a, b, cost)
        assert value == pytest.approx(ot.emd2(a, b, cost), abs=1e-12)
        rows, cols = a > 0, b > 0  # potentials are dual feasible on the support
        assert (f[rows, None] + g[None, cols] - cost[np.ix_(rows, cols)]).max() <= 1e-12


@pytest.mark.parametrize("offset", [-20.0, -5.0, -1.0])
def test_problems_with_negative_costs_are_solved(offset):
    """The engine's merged problems have negative costs (``D(i, m) - d``). POT reports a problem
    with no positive cost as infeasible (value 0); the wrapper shifts the costs instead."""
    rng = np.random.default_rng(7)
    for n, m, zeros in [(1, 5, 0), (2, 3, 0), (6, 4, 2)]:
        a, b, cost = random_problem(rng, n, m, zeros)
        cost = cost + offset
        value, f, g = engine._solve_one(a, b, cost)
        assert value == pytest.approx(ot.emd2(a, b, cost - offset) + offset, abs=1e-12)
        rows, cols = a > 0, b > 0
        assert (f[rows, None] + g[None, cols] - cost[np.ix_(rows, cols)]).max() <= 1e-12
        assert f[rows] @ a[rows] + g[cols] @ b[cols] == pytest.approx(value, abs=1e-12)
    # The failure it avoids: POT itself on a negative problem with zero-mass padding.
    a, b, cost = np.array([0.5, 0.5]), np.array([0.0, 0.5, 0.5]), -np.arange(1.0, 7.0).reshape(2, 3)
    with pytest.warns(UserWarning, match="infeasible"):
        assert ot.emd2(a, b, cost) == 0
    assert engine._solve_one(a, b, cost)[0] == pytest.approx(-4.0, abs=1e-12)  # any plan


def test_solve_batch_matches_one_by_one_with_threads():
    """A batch's scaling and shift are computed for all its problems at once, and its problems
    split over the threads (every ``threads``-th to one): the values are ``_solve_one``'s,
    bit for bit, in order (costs all positive, some negative, all negative; zero-mass
    padding; batches not a multiple of the thread count, and smaller than it)."""
    rng = np.random.default_rng(1)
    problems = [random_problem(rng, 6, 9, zeros=k % 3) for k in range(11)]
    problems = [(a, b * rng.uniform(0.5, 2.0), cost + (0.0, -2.0, -9.0)[k % 3])
                for k, (a, b, cost) in enumerate(problems)]
    a = np.stack([p[0] for p in problems])
    b = np.stack([p[1] for p in problems])
    cost = np.stack([p[2] for p in problems])
    expected = [engine._solve_one(*p)[0] for p in problems]
    for value, (a_, b_, cost_) in zip(expected, problems):  # POT on the shifted problem
        shift = min(cost_.min(), 0.0)
        assert value == pytest.approx(ot.emd2(a_, b_ * (a_.sum() / b_.sum()), cost_ - shift)
                                      + shift * a_.sum(), abs=1e-12)
    for threads in (1, 2, 3, 20):
        for count in (11, 2, 1, 0):
            assert np.array_equal(
                engine._solve_batch(a[:count], b[:count], cost[:count], threads),
                expected[:count])


@pytest.mark.parametrize("fails", [1, 2, 3])
def test_a_stopped_solver_is_retried_reordered_then_with_a_larger_budget(monkeypatch, fails):
    calls = []
    real = engine.emd_c

    def flaky(a, b, cost, budget, threads):
        calls.append((budget, a.shape[0]))
        out = real(a, b, cost, budget, threads)
        return (*out[:4], 3 if len(calls) <= fails else out[4])  # 3: MAX_ITER_REACHED

    monkeypatch.setattr(engine, "emd_c", flaky)
    rng = np.random.default_rng(2)
    a, b, cost = random_problem(rng, 5, 7, zeros=1)
    value, f, g = engine._solve_one(a, b, cost)
    budgets = [engine._MAX_ITER] * 3 + [100 * engine._MAX_ITER]
    assert [c[0] for c in calls] == budgets[:fails + 1]
    assert calls[1][1] == 7 if fails >= 1 else True  # the second attempt is the transpose
    assert value == pytest.approx(ot.emd2(a, b, cost), abs=1e-12)
    # the potentials are mapped back to the original rows and columns: dual feasible, and
    # complementary slackness gives the optimum
    rows, cols = a > 0, b > 0
    assert (f[rows, None] + g[None, cols] - cost[np.ix_(rows, cols)]).max() <= 1e-12
    assert f[rows] @ a[rows] + g[cols] @ b[cols] == pytest.approx(value, abs=1e-12)


def test_a_cycling_problem_with_tiny_masses_is_solved_exactly():
    """A problem from a trained MLP (masses down to 1e-199) on which POT 0.9.7's simplex cycles
    in its given row order until any budget runs out (found by benchmarks/unstructured.py)."""
    data = np.load(Path(__file__).parent / "data" / "cycling_ot.npz")
    a, b, cost = data["a"], data["b"], data["cost"]
    value, f, g = engine._solve_one(a, b, cost)
    rows, cols = a > 0, b > 0  # the same problem without its zero rows and columns
    expected = ot.emd2(a[rows], b[cols] * (a.sum() / b.sum()), cost[np.ix_(rows, cols)])
    assert value == pytest.approx(expected, abs=1e-12)
    # dual feasible up to rounding: potentials are sums along tree paths of costs up to ~22,
    # so their rounding error scales with the costs (measured 1.2e-12 here)
    residual = (f[rows, None] + g[None, cols] - cost[np.ix_(rows, cols)]).max()
    assert residual <= 1e-13 * np.abs(cost).max() * rows.sum()


def test_a_solver_that_never_reaches_optimality_raises(monkeypatch):
    real = engine.emd_c
    monkeypatch.setattr(engine, "emd_c",
                        lambda *args: (*real(*args)[:4], 3))
    a, b, cost = random_problem(np.random.default_rng(3), 4, 6)
    with pytest.raises(RuntimeError, match="stopped before optimality"):
        engine._solve_one(a, b, cost)
