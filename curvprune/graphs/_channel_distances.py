r"""Shortest-path distances of a DAG on given node pairs, by min-plus products in topological
order (the fast path of :func:`curvprune.channels.needed_distances`).

**The value computed.** For a source ``a`` and a node ``v``, :math:`D(a, v)` is the minimum
over the paths from ``a`` to ``v`` of the path's length summed left to right in float64:
:math:`(\ldots((l_1 + l_2) + l_3) \ldots) + l_r`. This is exactly what Dijkstra's algorithm
(:func:`scipy.sparse.csgraph.dijkstra`, which :func:`~curvprune.channels.channel_distances`
runs) returns when every length is positive: a settled node's tentative distance is the
rounded sum of its predecessor's distance and one edge, and rounded addition of a fixed length
is monotone, so the minimum over paths is one number whatever the order of the work.

**The recurrence.** Node ids are a topological order (every edge ``u -> v`` has ``u < v``), so

.. math::
    D(a, a) = 0, \qquad D(a, v) = \min_{u \to v} \operatorname{fl}(D(a, u) + l(u, v)),

evaluated in increasing ``v``, gives the same number: ``fl(x + l)`` is non-decreasing in ``x``,
so :math:`\min_u \operatorname{fl}(\min_P s(P) + l) = \min_u \min_P \operatorname{fl}(s(P) + l)`
over the paths ``P`` to ``u`` (induction on ``v``). Every ``fl(x + l)`` is one IEEE
addition of the same two operands Dijkstra adds, and ``min`` is exact: the result is bitwise
the all-pairs value, whatever order or grouping the minima are taken in (tested on every needed
pair against the all-pairs Dijkstra in ``tests/test_channels.py``).

**Vectorised.** The nodes are split into *levels*: maximal runs of consecutive ids with no edge
inside a run (a layer's outputs, a merge's nodes), so a level depends only on earlier ones.
Sources are taken in blocks (sources times window width at most ``block`` float64 entries, as
the Dijkstra path); for a block ``S`` with window ``[a_0, M]`` (``M`` its largest needed target)
the dense table ``D[S, a_0..M]`` is filled level by level: for level ``V`` with in-neighbours
``P`` (inside the window), :math:`D[S, V] = \min(D[S, V], D[S, P] \otimes L[P, V])`, a min-plus
product, taken

* densely (``D[S, P]`` against the ``[P, V]`` length matrix, ``+inf`` where no edge) when the
  finite entries of ``D[S, P]`` are dense: ``R x P x V`` add-and-min operations;
* or, when they are sparse (a source reaches one channel of a merge: a level right after the
  source), by expanding each finite ``D[s, u]`` over ``u``'s out-edges into ``V`` and taking
  the minimum per ``(s, v)`` with ``scatter_reduce(..., "amin")``,

whichever costs fewer operations. Only rows that still have a needed target at or after the
level are computed, and only columns ``u`` that some row reaches. The work is that of the
Dijkstra runs without their heap, in torch operations on the graph's device.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import torch

from ._min_plus import min_plus

# A scattered (expanded) operation costs about this many dense add-and-min operations.
_SPARSE_COST = 8
# Elements of one temporary expansion at a time.
_CHUNK = 1 << 22


def levels(adjacency: scipy.sparse.csr_matrix) -> np.ndarray:
    """Boundaries ``[0 = b_0 < b_1 < ... < b_L = n]`` of maximal runs of consecutive node ids
    with no edge inside a run (the graph must be in topological order: ``u < v`` on every
    edge). A new run starts at ``v`` when an in-neighbour of ``v`` is in the current run."""
    n = adjacency.shape[0]
    coo = adjacency.tocoo()
    last_pred = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_pred, coo.col.astype(np.int64), coo.row.astype(np.int64))
    bounds = [0]
    start = 0
    for v in np.nonzero(last_pred >= 0)[0].tolist():
        if last_pred[v] >= start:
            start = v
            bounds.append(v)
    bounds.append(n)
    return np.unique(np.asarray(bounds, dtype=np.int64))


class _Levels:
    """The in-edges of each level on the device, sorted by source then target, with per-level
    offsets (``src``, ``dst``, ``length``)."""

    def __init__(self, adjacency: scipy.sparse.csr_matrix, bounds: np.ndarray,
                 device: torch.device) -> None:
        coo = adjacency.tocoo()
        src = coo.row.astype(np.int64)
        dst = coo.col.astype(np.int64)
        level = np.searchsorted(bounds, dst, side="right") - 1
        order = np.lexsort((dst, src, level))  # by level, then source, then target
        self.src = torch.from_numpy(src[order]).to(device)
        self.dst = torch.from_numpy(dst[order]).to(device)
        self.length = torch.from_numpy(coo.data[order].astype(np.float64)).to(device)
        self.offsets = np.searchsorted(level[order], np.arange(len(bounds)), side="left")
        self.bounds = torch.from_numpy(bounds).to(device)

    def groups(self, k: int, first: int, top: int):
        """In-edges of level ``k`` with source at or after ``first`` and target at or before
        ``top``, split by the level of their source: ``(src, dst, length)`` per group."""
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        src, dst, length = self.src[lo:hi], self.dst[lo:hi], self.length[lo:hi]
        if dst.numel() and int(dst.max()) > top:  # the window ends inside the level
            inside = dst <= top
            src, dst, length = src[inside], dst[inside], length[inside]
        cuts = torch.searchsorted(src, self.bounds).tolist()
        start = torch.searchsorted(src, torch.tensor([first], device=src.device)).item()
        cuts = sorted({c for c in cuts if c > start} | {start, src.numel()})
        return [(src[a:b], dst[a:b], length[a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _span(index: torch.Tensor) -> tuple[int, int, bool]:
    """``(lo, hi, full)``: the range ``lo..hi`` (inclusive) of a sorted index tensor, and
    whether the index is the whole range."""
    lo, hi = int(index[0]), int(index[-1])
    return lo, hi, hi - lo + 1 == index.numel()


def _read(table: torch.Tensor, rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A copy of ``table[rows, lo:hi + 1]`` (rows sorted)."""
    r0, r1, full = _span(rows)
    if full:
        return table[r0:r1 + 1, lo:hi + 1].clone()
    return table[:, lo:hi + 1].index_select(0, rows)


def _write(table: torch.Tensor, rows: torch.Tensor, lo: int, value: torch.Tensor) -> None:
    """``table[rows, lo:lo + value.shape[1]] = value`` (rows sorted)."""
    r0, r1, full = _span(rows)
    columns = table[:, lo:lo + value.shape[1]]
    if full:
        columns[r0:r1 + 1] = value
    else:
        columns.index_copy_(0, rows, value)


def _relax(table: torch.Tensor, first: int, rows: torch.Tensor, src: torch.Tensor,
           dst: torch.Tensor, length: torch.Tensor) -> None:
    """``table[rows, t] = min(itself, min over edges u -> t of table[rows, u] + l)`` for the
    given edges (``table`` holds the columns ``first..``; ``rows`` and ``src`` sorted)."""
    device = table.device
    preds, degree = torch.unique_consecutive(src, return_counts=True)
    targets, slot = torch.unique(dst, return_inverse=True)
    width = targets.numel()
    p0, p1, p_full = _span(preds - first)
    sub = _read(table, rows, p0, p1)
    if not p_full:
        sub = sub.index_select(1, preds - first - p0)  # [R, P]
    finite = torch.isfinite(sub)
    count = finite.sum(1)
    reached = finite.any(0)
    # Per row: the dense product costs (reached preds) x (targets) add-and-min operations;
    # expanding its finite entries over their out-edges costs _SPARSE_COST per edge.
    dense_cost = int(reached.sum()) * width
    sparse_cost = _SPARSE_COST * (finite.to(torch.float64) @ degree.to(torch.float64))
    sparse = (count > 0) & (sparse_cost < dense_cost)
    dense = (count > 0) & ~sparse
    new = torch.full((rows.numel(), width), math.inf, dtype=table.dtype, device=device)
    if bool(dense.any()):
        keep_r = torch.nonzero(dense).squeeze(1)
        a = sub.index_select(0, keep_r)
        keep_p = torch.nonzero(torch.isfinite(a).any(0)).squeeze(1)
        position = torch.full((preds.numel(),), -1, dtype=torch.long, device=device)
        position[keep_p] = torch.arange(keep_p.numel(), device=device)
        pos = position[torch.repeat_interleave(torch.arange(preds.numel(), device=device),
                                               degree, output_size=src.numel())]
        on = pos >= 0
        lengths = torch.full((keep_p.numel(), width), math.inf, dtype=table.dtype,
                             device=device)
        lengths[pos[on], slot[on]] = length[on]
        new.index_copy_(0, keep_r, min_plus(a.index_select(1, keep_p), lengths[None])[0])
    if bool(sparse.any()):
        # Expand each finite (row, pred) of the sparse rows over pred's edges.
        starts = torch.cumsum(degree, 0) - degree
        r_idx, p_idx = torch.nonzero(finite & sparse.unsqueeze(1), as_tuple=True)
        deg = degree[p_idx]
        ends = torch.cumsum(deg, 0)
        best = new.view(-1)
        flat_sub = sub.reshape(-1)
        e = 0
        while e < r_idx.numel():
            base = int(ends[e - 1]) if e else 0
            f = int(torch.searchsorted(ends, torch.tensor([base + _CHUNK], device=device),
                                       right=True))
            f = max(f, e + 1)
            size = int(ends[f - 1]) - base
            entry = torch.repeat_interleave(torch.arange(e, f, device=device), deg[e:f],
                                            output_size=size)
            edge = (starts[p_idx[entry]] + torch.arange(size, device=device)
                    - (ends[entry] - deg[entry] - base))
            value = flat_sub[r_idx[entry] * preds.numel() + p_idx[entry]] + length[edge]
            best.scatter_reduce_(0, r_idx[entry] * width + slot[edge], value, "amin")
            e = f
    t0, t1, t_full = _span(targets - first)
    if t_full:
        _write(table, rows, t0, torch.minimum(_read(table, rows, t0, t1), new))
    else:
        block = _read(table, rows, t0, t1)
        cols = targets - first - t0
        block[:, cols] = torch.minimum(block[:, cols], new)
        _write(table, rows, t0, block)


def needed_pair_distances(adjacency: scipy.sparse.csr_matrix, needed,
                          *, block: int, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted keys ``a * n + b`` and float64 distances ``D(a, b)`` of every nonzero of
    ``needed`` (a sorted csr matrix, or anything with its ``indptr``, ``indices`` and ``nnz``:
    the data is not read), for the graph ``adjacency`` (csr, lengths positive, every edge
    ``u -> v`` with ``u < v``): bitwise the all-pairs Dijkstra values (module docstring)."""
    n = adjacency.shape[0]
    bounds = levels(adjacency)
    edges = _Levels(adjacency, bounds, device)
    indptr, indices = needed.indptr, needed.indices
    sources = np.nonzero(np.diff(indptr))[0]
    last = indices[indptr[sources + 1] - 1].astype(np.int64)
    # The keys row by row, a block of rows at a time (no [nnz] temporaries beyond the result).
    keys = torch.empty(needed.nnz, dtype=torch.long, device=device)
    r = 0
    while r < n:
        s = min(n, int(np.searchsorted(indptr, indptr[r] + _CHUNK, side="right")) - 1)
        s = max(s, r + 1)
        lo, hi = int(indptr[r]), int(indptr[s])
        row = np.repeat(np.arange(r, s, dtype=np.int64), np.diff(indptr[r:s + 1]))
        keys[lo:hi] = torch.from_numpy(row * n + indices[lo:hi]).to(device)
        r = s
    values = torch.empty(needed.nnz, dtype=torch.float64, device=device)
    p = 0
    while p < sources.size:
        first, top, q = int(sources[p]), int(last[p]), p + 1
        while q < sources.size and (q + 1 - p) * (max(top, last[q]) - first + 1) <= block:
            top = max(top, int(last[q]))
            q += 1
        chunk = sources[p:q]
        width = top - first + 1
        table = torch.full((chunk.size, width), math.inf, dtype=torch.float64, device=device)
        table.view(-1)[torch.from_numpy(np.arange(chunk.size) * width + chunk - first)
                       .to(device)] = 0.0
        row_last = torch.from_numpy(last[p:q]).to(device)
        k = int(np.searchsorted(bounds, first, side="right"))  # the level after first's
        while k < len(bounds) - 1 and bounds[k] <= top:
            rows = torch.nonzero(row_last >= int(bounds[k])).squeeze(1)
            if rows.numel():
                for src, dst, length in edges.groups(k, first, top):
                    _relax(table, first, rows, src, dst, length)
            k += 1
        # The needed targets of the chunk's rows (rows between its sources need none).
        lo, hi = int(indptr[chunk[0]]), int(indptr[chunk[-1] + 1])
        row = np.repeat(np.arange(chunk[0], chunk[-1] + 1, dtype=np.int64),
                        np.diff(indptr[chunk[0]:chunk[-1] + 2]))
        local = np.searchsorted(chunk, row)  # each row's position among the chunk's sources
        cells = torch.from_numpy(local * width + indices[lo:hi] - first).to(device)
        values[lo:hi] = table.view(-1)[cells]
        p = q
    return keys, values
