"""The engine's exact solver wrapper: equal to ``ot.emd2``, never silent if POT stops early."""

from __future__ import annotations

import numpy as np
import ot
import pytest

import curvprune.engine as engine


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


def test_solve_batch_matches_one_by_one_with_threads():
    rng = np.random.default_rng(1)
    problems = [random_problem(rng, 6, 9, 2) for _ in range(11)]
    a = np.stack([p[0] for p in problems])
    b = np.stack([p[1] for p in problems])
    cost = np.stack([p[2] for p in problems])
    expected = [engine._solve_one(*p)[0] for p in problems]
    for threads in (1, 2, 3):
        assert np.array_equal(engine._solve_batch(a, b, cost, threads), expected)


def test_a_stopped_solver_is_retried_with_a_larger_budget(monkeypatch):
    calls = []
    real = engine.emd_c

    def flaky(a, b, cost, budget, threads):
        calls.append(budget)
        out = real(a, b, cost, budget, threads)
        return (*out[:4], 3 if len(calls) == 1 else out[4])  # 3: MAX_ITER_REACHED

    monkeypatch.setattr(engine, "emd_c", flaky)
    a, b, cost = random_problem(np.random.default_rng(2), 5, 5)
    value, _, _ = engine._solve_one(a, b, cost)
    assert calls == [engine._MAX_ITER, 100 * engine._MAX_ITER]
    assert value == pytest.approx(ot.emd2(a, b, cost), abs=1e-12)


def test_a_solver_that_never_reaches_optimality_raises(monkeypatch):
    real = engine.emd_c
    monkeypatch.setattr(engine, "emd_c",
                        lambda *args: (*real(*args)[:4], 3))
    a, b, cost = random_problem(np.random.default_rng(3), 4, 6)
    with pytest.raises(RuntimeError, match="stopped before optimality"):
        engine._solve_one(a, b, cost)
