r"""The slow reference: neural curvature transcribed directly from its definition.

One exact optimal-transport problem (``ot.emd2``) per live edge per calibration example, with
ground distances from Dijkstra's algorithm (``scipy.sparse.csgraph``) on the whole directed
neural graph and measures built node by node with NumPy. It shares no code with the fast engine
beyond the tracing of the model and the recording of activities, which is what makes it the
oracle of the tests and the peer of the speed benchmarks. It is meant for small networks.

For an edge ``i -> j`` of length :math:`d = 1/|w_{ij}|` on one example:

.. math::

    \kappa(i, j) = \frac{1}{1 - \alpha} \left(1 - \frac{W_1(\mu_i, \nu_j)}{d(i, j)}\right),

with :math:`\kappa = 1` when ``i`` (not an input) or ``j`` (not an output) has activity 0.
"""

from __future__ import annotations

import time

import numpy as np
import ot
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.nn as nn

from .calibration import (
    capture_activations,
    iter_calibration_inputs,
    normalise_activity,
    scoring_mode,
)
from .graphs.neuron import chain_structure, layer_edges, trace_chain

__all__ = ["reference_curvature", "channel_reference_curvature"]

_TINY = np.finfo(np.float64).tiny


def _measure(center: int, neighbours: list[int], activity: np.ndarray, alpha: float,
             boundary: bool) -> tuple[list[int], list[float]]:
    """Support and masses of mu_i (or nu_j), exactly as method.md section 2 states."""
    if boundary:
        return [center], [1.0]
    active = [u for u in neighbours if activity[u] > 0]
    if not active:
        return [center], [1.0]
    with np.errstate(divide="ignore", over="ignore"):  # a**2 may underflow: weight 0
        weights = np.array([np.exp(-1.0 / activity[u] ** 2) for u in active])
    total = weights.sum()
    if total < _TINY:
        share = np.full(len(active), 1.0 / len(active))
    else:
        share = weights / total
    return [center] + active, [alpha] + list((1.0 - alpha) * share)


def _exact_w1(mu: np.ndarray, nu: np.ndarray, cost: np.ndarray) -> float:
    """``ot.emd2``, refusing a result that POT flags as not optimal (it only warns)."""
    value, log = ot.emd2(mu, nu, cost, numItermax=100_000_000, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"ot.emd2 did not reach optimality: {log['warning']}")
    return float(value)


def reference_curvature(
    model: nn.Module,
    calibration,
    *,
    alpha: float = 0.9,
    edges: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-weight neural curvature by the definition: min over positions and examples.

    Args:
        model: a chain of Conv2d/Linear layers with elementwise modules between them.
        calibration: a tensor batch, an ``(inputs, targets)`` pair or an iterable of batches.
        alpha: idleness in ``[0, 1)``.
        edges: optional ``{weight name: edge indices}`` restricting the work to a sample of each
            layer's structural edges (for timing); the other weights are left at ``+inf``.

    Returns:
        ``{weight name: kappa}``, each tensor the weight's shape (float64, CPU); weights with no
        (computed) edge are ``+inf``.
    """
    layers = trace_chain(model)
    modules = [layer.module for layer in layers]
    examples: list[list[np.ndarray]] = []
    shapes = None
    with scoring_mode(model):
        for inputs in iter_calibration_inputs(calibration):
            values, in_shapes, out_shapes = capture_activations(model, modules, inputs)
            shapes = (in_shapes, out_shapes)
            acts = [normalise_activity(v).cpu().numpy() for v in values]
            for b in range(acts[0].shape[0]):
                examples.append([a[b] for a in acts])
    in_shapes, out_shapes = shapes
    n = len(layers)
    weights = [m.weight.detach().to(torch.float64).cpu().flatten().numpy() for m in modules]
    structure = [layer_edges(m, in_shapes[k], out_shapes[k]) for k, m in enumerate(modules)]
    sizes = [structure[0].n_in] + [s.n_out for s in structure]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    # Edge lists (nonzero weights only) and neighbour lists.
    edge_lists = []
    for k, s in enumerate(structure):
        src, dst, widx = s.src.numpy(), s.dst.numpy(), s.widx.numpy()
        w = weights[k][widx]
        keep = w != 0
        edge_lists.append((src[keep], dst[keep], widx[keep], 1.0 / np.abs(w[keep])))
    in_nbrs = [None] + [[[] for _ in range(sizes[L])] for L in range(1, n + 1)]
    out_nbrs = [[[] for _ in range(sizes[L])] for L in range(n)] + [None]
    for k, (src, dst, _, _) in enumerate(edge_lists):
        for u, v in zip(src.tolist(), dst.tolist()):
            in_nbrs[k + 1][v].append(u)
            out_nbrs[k][u].append(v)
    # All-pairs directed shortest paths on the whole neural graph.
    rows = np.concatenate([src + offsets[k] for k, (src, _, _, _) in enumerate(edge_lists)])
    cols = np.concatenate([dst + offsets[k + 1] for k, (_, dst, _, _) in enumerate(edge_lists)])
    vals = np.concatenate([length for (_, _, _, length) in edge_lists])
    graph = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(offsets[-1], offsets[-1]))
    chosen = []
    for k, (src, _, _, _) in enumerate(edge_lists):
        if edges is None:
            chosen.append(np.arange(len(src)))
        else:
            chosen.append(np.asarray(edges.get(layers[k].name, []), dtype=np.int64))
    # Sources of every transport problem: i and its in-neighbours, for the chosen edges.
    sources = set()
    for k, (src, _, _, _) in enumerate(edge_lists):
        for i in set(src[chosen[k]].tolist()):
            sources.add(offsets[k] + i)
            if k > 0:
                sources.update(offsets[k - 1] + u for u in in_nbrs[k][i])
    sources = np.array(sorted(sources), dtype=np.int64)
    row_of = {int(g): r for r, g in enumerate(sources)}
    dist = scipy.sparse.csgraph.shortest_path(graph, method="D", directed=True, indices=sources)

    kappa = [np.full(w.shape, np.inf) for w in weights]
    for acts in examples:
        for k, (src, dst, widx, length) in enumerate(edge_lists):
            l = k + 1  # param layer l joins node layers l-1 and l
            for e in chosen[k]:
                i, j, d = int(src[e]), int(dst[e]), float(length[e])
                if (l - 1 > 0 and acts[l - 1][i] == 0) or (l < n and acts[l][j] == 0):
                    value = 1.0
                else:
                    mu_nodes, mu = _measure(i, in_nbrs[l - 1][i] if l > 1 else [],
                                            acts[l - 2] if l > 1 else None, alpha, l == 1)
                    nu_nodes, nu = _measure(j, out_nbrs[l][j] if l < n else [],
                                            acts[l + 1] if l < n else None, alpha, l == n)
                    mu_layers = [l - 1] + [l - 2] * (len(mu_nodes) - 1)
                    nu_layers = [l] + [l + 1] * (len(nu_nodes) - 1)
                    mu_global = [offsets[L] + u for L, u in zip(mu_layers, mu_nodes)]
                    nu_global = [offsets[L] + v for L, v in zip(nu_layers, nu_nodes)]
                    cost = dist[np.ix_([row_of[int(g)] for g in mu_global], nu_global)]
                    w1 = _exact_w1(np.array(mu), np.array(nu), cost)
                    value = (1.0 - w1 / d) / (1.0 - alpha)
                flat = kappa[k].reshape(-1)
                flat[widx[e]] = min(flat[widx[e]], value)
    return {
        layer.name: torch.from_numpy(kappa[k].reshape(layer.module.weight.shape))
        for k, layer in enumerate(layers)
    }


def time_reference_per_edge(model: nn.Module, calibration, *, alpha: float = 0.9,
                            sample: int = 200, seed: int = 0) -> tuple[float, int]:
    """Seconds per (edge, example) of the reference, measured on a random sample of edges.

    Returns ``(seconds_per_edge_example, edges_per_example)`` so that a caller can extrapolate
    the reference's time on a network too large for it to finish.
    """
    inputs = next(iter(iter_calibration_inputs(calibration)))
    layers, structures = chain_structure(model, inputs)
    rng = np.random.default_rng(seed)
    counts = [s.src.numel() for s in structures]
    total = sum(counts)
    chosen = {}
    for k, layer in enumerate(layers):
        share = max(1, round(sample * counts[k] / total))
        chosen[layer.name] = rng.choice(counts[k], size=min(share, counts[k]), replace=False)
    start = time.perf_counter()
    reference_curvature(model, inputs[:1], alpha=alpha, edges=chosen)
    elapsed = time.perf_counter() - start
    return elapsed / sum(len(c) for c in chosen.values()), total


def channel_reference_curvature(graph, alpha: float = 0.9) -> torch.Tensor:
    """Per-edge curvature of a traced channel graph, by the definition (for tests).

    ``graph`` is a :class:`~curvprune.graphs.channel.ChannelGraph` (the tracing is shared with the
    engine; everything after it is not): distances by Floyd-Warshall on the whole graph, the
    measures node by node, one ``ot.emd2`` per live layer edge per example, and
    :math:`\\kappa = (1 - W_1 / D(i, j)) / (1 - \\alpha)`. Returns ``[num_edges]`` float64: the
    minimum over the graph's examples for layer edges, ``+inf`` for merge edges.
    """
    n = graph.num_nodes
    src, dst = graph.src.cpu().numpy(), graph.dst.cpu().numpy()
    length, module = graph.length.cpu().numpy(), graph.module.cpu().numpy()
    adjacency = scipy.sparse.csr_matrix((length, (src, dst)), shape=(n, n))
    dist = scipy.sparse.csgraph.floyd_warshall(adjacency, directed=True)
    in_nbrs = [[] for _ in range(n)]
    out_nbrs = [[] for _ in range(n)]
    for u, v in zip(src.tolist(), dst.tolist()):
        in_nbrs[v].append(u)
        out_nbrs[u].append(v)
    inputs, outputs = graph.inputs.cpu().numpy(), graph.outputs.cpu().numpy()
    kappa = np.full(len(src), np.inf)
    for acts in graph.activity.cpu().numpy():
        for e in np.nonzero(module >= 0)[0]:
            i, j = int(src[e]), int(dst[e])
            if (not inputs[i] and acts[i] == 0) or (not outputs[j] and acts[j] == 0):
                value = 1.0
            else:
                mu_nodes, mu = _measure(i, in_nbrs[i], acts, alpha, bool(inputs[i]))
                nu_nodes, nu = _measure(j, out_nbrs[j], acts, alpha, bool(outputs[j]))
                w1 = _exact_w1(np.array(mu), np.array(nu), dist[np.ix_(mu_nodes, nu_nodes)])
                value = (1.0 - w1 / dist[i, j]) / (1.0 - alpha)
            kappa[e] = min(kappa[e], value)
    return torch.from_numpy(kappa)
