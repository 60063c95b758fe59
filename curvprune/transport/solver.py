"""The one adapter to POT: exact optimal transport by its network simplex, with retries that
never return an approximate value, and a thread pool for batches of problems.

This is the only module of curvprune that imports POT (lazily: POT imports networkx and
scikit-learn, so it is loaded by the first transport problem, not by ``import curvprune``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__: list[str] = []  # private to the kernels


# POT (which imports networkx and scikit-learn) is loaded by the first transport problem, not by
# ``import curvprune``; ``emd_c`` is its network simplex.


def __getattr__(name: str) -> object:
    if name == "emd_c":
        from ot.lp.emd_wrap import emd_c

        globals()["emd_c"] = emd_c
        return emd_c
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MAX_ITER = 1_000_000
_OPTIMAL = 1  # POT's result code for an optimal solution


def _solve_one(a: np.ndarray, b: np.ndarray, cost: np.ndarray, *, plan: bool = False
               ) -> tuple:
    """Exact OT by POT's network simplex (the solver behind ``ot.emd2``).

    Zero-mass rows and columns are dropped by the solver itself, so padded problems are fine.
    Returns ``(cost, source potentials, target potentials)``, and with ``plan`` the optimal
    plan too (``[len(a), len(b)]``, a basic solution: at most ``len(a) + len(b) - 1``
    nonzero entries).

    POT only *warns* when the simplex stops before optimality; here that never passes silently.
    With masses spanning hundreds of orders of magnitude (a measure can put 1e-199 on a far
    neighbour) the simplex can cycle on degenerate pivots and exhaust any iteration budget; the
    pivot sequence depends on the order of rows and columns, so the same problem is then solved
    transposed and with its rows reversed (the same linear program, hence the same optimum),
    and finally with a budget 100 times larger. If none of these reaches optimality a
    :class:`RuntimeError` is raised: no approximate value is ever returned.
    """
    emd_c = globals().get("emd_c") or __getattr__("emd_c")
    b = b * (a.sum() / b.sum())
    # POT's simplex reports "infeasible" when no cost is positive (its artificial arcs are then
    # no dearer than the real ones); a constant shift changes every plan's cost by the same
    # ``shift * sum(a)`` and the potentials by ``shift``, so such problems are solved shifted.
    shift = float(cost.min()) if cost.size else 0.0
    if shift < 0:  # the same plans
        value, f, g, *moved = _solve_one(a, b, cost - shift, plan=plan)
        return (value + shift * float(a.sum()), f + shift, g, *moved)
    code = None
    for attempt, budget in enumerate((_MAX_ITER, _MAX_ITER, _MAX_ITER, 100 * _MAX_ITER)):
        if attempt == 1:  # transposed: W(a, b; C) = W(b, a; C^T), potentials swap
            moved, value, g, f, code = emd_c(b, a, np.ascontiguousarray(cost.T), budget, 1)
            moved = moved.T
        elif attempt == 2:  # rows in reverse order
            moved, value, f, g, code = emd_c(a[::-1].copy(), b,
                                             np.ascontiguousarray(cost[::-1]), budget, 1)
            f, moved = f[::-1], moved[::-1]
        else:
            moved, value, f, g, code = emd_c(a, b, cost, budget, 1)
        if code == _OPTIMAL:
            return (float(value), f, g, moved) if plan else (float(value), f, g)
    raise RuntimeError(
        f"the exact transport solver stopped before optimality (POT result code {code}) on a "
        f"{int((a > 0).sum())}x{int((b > 0).sum())} problem, in three row/column orders and "
        f"with {100 * _MAX_ITER} iterations; no approximate value is returned. Please report "
        "this with the model."
    )


def _solve_batch(a: np.ndarray, b: np.ndarray, cost: np.ndarray, threads: int) -> np.ndarray:
    """Optimal costs of a batch of padded problems ``[B, R]``, ``[B, S]``, ``[B, R, S]``."""
    return _submit_batch(a, b, cost, threads)()


def _submit_batch(a: np.ndarray, b: np.ndarray, cost: np.ndarray,
                  threads: int) -> Callable[[], np.ndarray]:
    """Start solving a batch of padded problems; return a function that waits for the costs.

    POT's solver releases the GIL, so with ``threads > 1`` the problems are split over that many
    pool threads and the caller can prepare the next batch meanwhile; with ``threads == 1``
    they are solved here, before returning.
    """
    def run(lo: int, hi: int) -> np.ndarray:
        return np.array([_solve_one(a[t], b[t], cost[t])[0] for t in range(lo, hi)],
                        dtype=np.float64)

    count = len(a)
    if threads <= 1:
        done = run(0, count)
        return lambda: done
    bounds = np.linspace(0, count, min(threads, count) + 1).astype(int)
    futures = [_pool(threads).submit(run, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return lambda: np.concatenate([f.result() for f in futures])


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}


def _pool(threads: int, name: str = "ot") -> ThreadPoolExecutor:
    """A process-wide pool per use (``name``) and thread count (threads are reused across
    calls). Separate uses get separate pools, so that a job of one pool may wait on jobs of
    another without starving it."""
    if (name, threads) not in _POOLS:
        _POOLS[name, threads] = ThreadPoolExecutor(threads,
                                                   thread_name_prefix=f"curvprune-{name}")
    return _POOLS[name, threads]


