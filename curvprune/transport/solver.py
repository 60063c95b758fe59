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
    The target masses are scaled to the source's total (``b * sum(a) / sum(b)``: POT requires
    equal totals). Returns ``(cost, source potentials, target potentials)``, and with ``plan``
    the optimal plan too (``[len(a), len(b)]``, a basic solution: at most
    ``len(a) + len(b) - 1`` nonzero entries).

    POT's simplex reports "infeasible" when no cost is positive (its artificial arcs are then
    no dearer than the real ones); a constant shift ``s = min(C, 0)`` changes every plan's
    cost by the same ``s * sum(a)`` and the potentials by ``s``, so a problem with a negative
    cost is solved with ``C - s`` (the same plans) and its value and source potentials shifted
    back. The retries of :func:`_simplex` make sure no approximate value is returned.
    """
    b, shift, total = _scale_and_shift(a[None], b[None], cost[None])
    shift, total = float(shift[0]), float(total[0])
    value, f, g, *moved = _simplex(a, b[0], cost - shift if shift < 0 else cost, plan)
    return (value + shift * total, f + shift, g, *moved)


def _scale_and_shift(a: np.ndarray, b: np.ndarray, cost: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For problems ``[B, R]``, ``[B, S]``, ``[B, R, S]``: the target masses scaled to each
    source's total, each problem's shift ``min(C, 0)`` and each source's total (see
    :func:`_solve_one`). Row by row the same IEEE operations whatever ``B`` (a contiguous
    row's sum is the same pairwise sum), so a batch gets one problem's values bit for bit."""
    total = a.sum(1)
    return b * (total / b.sum(1))[:, None], cost.min(axis=(1, 2), initial=0.0), total


def _simplex(a: np.ndarray, b: np.ndarray, cost: np.ndarray, plan: bool) -> tuple:
    """POT's network simplex on a problem with equal totals and a positive cost somewhere (see
    :func:`_solve_one`), retried until it reports optimality.

    POT only *warns* when the simplex stops before optimality; here that never passes silently.
    With masses spanning hundreds of orders of magnitude (a measure can put 1e-199 on a far
    neighbour) the simplex can cycle on degenerate pivots and exhaust any iteration budget; the
    pivot sequence depends on the order of rows and columns, so the same problem is then solved
    transposed and with its rows reversed (the same linear program, hence the same optimum),
    and finally with a budget 100 times larger. If none of these reaches optimality a
    :class:`RuntimeError` is raised: no approximate value is ever returned.
    """
    emd_c = globals().get("emd_c") or __getattr__("emd_c")
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


def _solve_costs(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Optimal costs of problems ``[B, R]``, ``[B, S]``, ``[B, R, S]``: :func:`_solve_one`'s
    values, with its scaling and shift (:func:`_scale_and_shift`) computed for the whole batch
    at once (per problem, those reductions cost about a tenth of the solves on LeNet-5's exact
    problems)."""
    b, shift, total = _scale_and_shift(a, b, cost)
    values = np.array([_simplex(a[t], b[t], cost[t] - s if s < 0 else cost[t], False)[0]
                       for t, s in enumerate(shift.tolist())], dtype=np.float64)
    return values + shift * total


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
    count = len(a)
    if threads <= 1:
        done = _solve_costs(a, b, cost)
        return lambda: done
    # Every ``parts``-th problem to one thread: the caller sorts a batch by size, so contiguous
    # halves would give one thread the larger problems.
    parts = min(threads, count)
    futures = [_pool(threads).submit(_solve_costs, a[k::parts], b[k::parts], cost[k::parts])
               for k in range(parts)]

    def wait() -> np.ndarray:
        values = np.empty(count, dtype=np.float64)
        for k, future in enumerate(futures):
            values[k::parts] = future.result()
        return values

    return wait


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}


def _pool(threads: int, name: str = "ot") -> ThreadPoolExecutor:
    """A process-wide pool per use (``name``) and thread count (threads are reused across
    calls). Separate uses get separate pools, so that a job of one pool may wait on jobs of
    another without starving it."""
    if (name, threads) not in _POOLS:
        _POOLS[name, threads] = ThreadPoolExecutor(threads,
                                                   thread_name_prefix=f"curvprune-{name}")
    return _POOLS[name, threads]


