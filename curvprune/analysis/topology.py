r"""Topology of sparse networks: connectivity masks, NNSTD and relational-graph measures.

* **NNSTD** (Liu et al., ECML-PKDD 2020): :func:`nnstd` and :func:`nnstd_masks` compare the
  connectivity of two sparse networks of one architecture, layer by layer, up to a relabelling of
  the hidden neurons.
* **Relational-graph measures** (You et al., ICML 2020): :func:`relational_measures` (and
  :func:`relational_measures_masks`) give the average clustering coefficient :math:`C` and the
  average shortest-path length :math:`L` of the relational graph (:func:`relational_graph`:
  a layer's input and output channels grouped into one set of nodes) each layer of a pruned
  model defines, and of their union, beside the dense graphs'; any model with Linear/Conv2d
  layers. :func:`graph_measures` computes both for any undirected graph.

NNSTD reads a network as a chain of ``Linear``/``Conv2d`` weights
(:func:`~curvprune.graphs.neuron.trace_chain`); the relational measures read every
``Linear``/``Conv2d`` weight on its own. Connectivity is the set of non-zero weights
(:func:`connectivity_masks`), which respects ``torch.nn.utils.prune`` masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components, shortest_path

from ..graphs.neuron import trace_chain

__all__ = [
    "connectivity_masks",
    "NNSTDResult",
    "nnstd",
    "nnstd_masks",
    "GraphMeasures",
    "RelationalMeasures",
    "RelationalResult",
    "graph_measures",
    "relational_graph",
    "relational_measures",
    "relational_measures_masks",
]

_CONV_MODES = ("channel", "kernel")
# Preference for keeping neuron i <-> i among (nearly) tied assignments; see _match.
_TIE_BREAK = 1e-9
MaskLike = torch.Tensor | np.ndarray


# --------------------------------------------------------------------------------------------
# The chain of connectivity masks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MaskLayer:
    """One weight of the chain as a 0/1 mask of the weight's shape.

    ``mask`` is ``[out, in / groups]`` (linear) or ``[out, in / groups, kh, kw]`` (conv).
    """

    name: str
    mask: np.ndarray
    groups: int
    kind: str  # "linear" or "conv"

    @property
    def n_out(self) -> int:
        return self.mask.shape[0]

    @property
    def n_in(self) -> int:
        return self.mask.shape[1] * self.groups

    def full(self) -> np.ndarray:
        """The mask over all input units: ``[out, in, *kernel]`` (groups expanded, zeros outside
        a unit's group), so that input unit ``i`` is row ``i`` for every output unit."""
        if self.groups == 1:
            return self.mask
        out, in_g = self.mask.shape[:2]
        out_g = out // self.groups
        full = np.zeros((out, in_g * self.groups, *self.mask.shape[2:]), dtype=bool)
        for g in range(self.groups):
            full[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] = \
                self.mask[g * out_g:(g + 1) * out_g]
        return full

    def unit_matrix(self) -> np.ndarray:
        """``[out, in]`` bool: output unit ``o`` is connected to input unit ``i`` (a conv pair of
        channels is connected if any kernel weight between them is non-zero)."""
        full = self.full()
        return full.reshape(full.shape[0], full.shape[1], -1).any(axis=2)


def _nonzero(module: nn.Module) -> torch.Tensor:
    """Where the effective weight of ``module`` is non-zero.

    For a module under a ``torch.nn.utils.prune`` reparametrisation this is
    ``(weight_orig != 0) & (weight_mask != 0)``, i.e. ``weight != 0`` as the next forward pass
    will see it (``module.weight`` itself is only refreshed by that forward pass).
    """
    orig = getattr(module, "weight_orig", None)
    mask = getattr(module, "weight_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
        return (orig.detach() != 0) & (mask.detach() != 0)
    return module.weight.detach() != 0


def connectivity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{weight name: bool tensor of the weight's shape}``: the non-zero weights of every
    ``Linear``/``Conv2d`` layer of the chain, in chain order (on the CPU).

    Pruning masks are respected: a weight is present iff ``weight_orig * weight_mask`` (or
    ``weight`` for an unpruned module) is non-zero.

    Raises:
        ValueError: ``model`` is not a chain :func:`~curvprune.graphs.neuron.trace_chain` accepts.
    """
    return {layer.name: _nonzero(layer.module).cpu() for layer in trace_chain(model)}


def _layers_from_model(model: nn.Module) -> list[_MaskLayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, not {type(model).__name__}.")
    layers = []
    for layer in trace_chain(model):
        module = layer.module
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        groups = module.groups if kind == "conv" else 1
        layers.append(_MaskLayer(layer.name, _nonzero(module).cpu().numpy(), groups, kind))
    return layers


def _layers_from_masks(masks: Mapping[str, MaskLike],
                       groups: Mapping[str, int] | None = None) -> list[_MaskLayer]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping {{name: tensor}}, not {type(masks).__name__}.")
    groups = dict(groups or {})
    unknown = set(groups) - set(masks)
    if unknown:
        raise ValueError(f"groups names weights that are not in the masks: {sorted(unknown)}.")
    layers = []
    for name, mask in masks.items():
        if isinstance(mask, torch.Tensor):
            array = (mask.detach() != 0).cpu().numpy()
        else:
            array = np.asarray(mask) != 0
        if array.ndim not in (2, 4):
            raise ValueError(
                f"mask {name!r} has shape {tuple(array.shape)}; expected a Linear weight's "
                "[out, in] or a Conv2d weight's [out, in / groups, kh, kw]."
            )
        g = groups.get(name, 1)
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or array.shape[0] % g:
            raise ValueError(
                f"groups[{name!r}] = {g!r} must be a positive integer dividing the "
                f"{array.shape[0]} output units."
            )
        if array.ndim == 2 and g != 1:
            raise ValueError(f"groups[{name!r}] = {g}: only a conv mask (4-D) can be grouped.")
        layers.append(_MaskLayer(str(name), array, g, "conv" if array.ndim == 4 else "linear"))
    if not layers:
        raise ValueError("no masks given.")
    return layers


def _check_same_architecture(a: list[_MaskLayer], b: list[_MaskLayer]) -> None:
    for k in range(max(len(a), len(b))):
        if k >= len(a) or k >= len(b):
            extra = (b if k >= len(a) else a)[k]
            raise ValueError(
                f"the networks differ in depth ({len(a)} vs {len(b)} weights): layer "
                f"{extra.name!r} has no counterpart."
            )
        la, lb = a[k], b[k]
        if la.name != lb.name:
            raise ValueError(
                f"layer {k} is {la.name!r} in the first network and {lb.name!r} in the second."
            )
        if la.kind != lb.kind:
            raise ValueError(f"layer {la.name!r} is a {la.kind} in one network and a "
                             f"{lb.kind} in the other.")
        if la.mask.shape != lb.mask.shape:
            raise ValueError(
                f"layer {la.name!r} has shape {tuple(la.mask.shape)} in the first network and "
                f"{tuple(lb.mask.shape)} in the second."
            )
        if la.groups != lb.groups:
            raise ValueError(
                f"layer {la.name!r} has groups={la.groups} in the first network and "
                f"groups={lb.groups} in the second."
            )


# --------------------------------------------------------------------------------------------
# NNSTD
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NNSTDResult:
    """Neural Network Sparse Topology Distance between networks ``a`` and ``b``.

    Attributes:
        distances: ``{weight name: layer distance in [0, 1]}``, in chain order.
        mean: the mean of the layer distances (NaN if there are none).
        conv_mode: ``"channel"`` or ``"kernel"``: how a conv output channel's input set was read.
        matchings: ``{weight name: int array}``: ``matchings[name][i]`` is the output unit of
            ``b`` matched to output unit ``i`` of ``a`` in that layer.
        carried: ``{weight name: bool}``: whether the previous layer's matching was applied to
            this layer's inputs (always ``False`` for the first layer, whose inputs are the data).
        notes: ``{weight name: text}`` for every layer after the first whose inputs could not be
            matched to the previous layer's outputs (the matching was not carried).
    """

    distances: dict[str, float]
    mean: float
    conv_mode: str
    matchings: dict[str, np.ndarray] = field(repr=False)
    carried: dict[str, bool] = field(repr=False)
    notes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text table of the layer distances."""
        lines = [f"NNSTD ({self.conv_mode} mode): mean {self.mean:.4f}",
                 f"{'weight':<28}{'distance':>10}  carried"]
        for name, d in self.distances.items():
            note = f"  ({self.notes[name]})" if name in self.notes else ""
            lines.append(f"{name:<28}{d:>10.4f}  {'yes' if self.carried[name] else 'no'}{note}")
        return "\n".join(lines)


def nnstd(model_a: nn.Module, model_b: nn.Module, *, conv_mode: str = "channel",
          carry: bool = True) -> NNSTDResult:
    r"""Neural Network Sparse Topology Distance (Liu et al. 2020) between two pruned networks.

    Both models must have the same architecture (same chain of weight names and shapes). Each
    layer is read as a 0/1 matrix :math:`M \in \{0,1\}^{n_{in} \times n_{out}}`,
    :math:`M_{ij} = 1` iff the effective weight from input unit :math:`i` to output unit
    :math:`j` is non-zero (:func:`connectivity_masks`). Output unit :math:`j` is described by its
    input set :math:`S_j = \{i : M_{ij} = 1\}`, and two input sets by the normalised edit distance

    .. math::

        \delta(A, B) = \begin{cases} 0 & A = B = \emptyset \\
        \dfrac{|A \setminus B| + |B \setminus A|}{|A \cup B|} & \text{otherwise}\end{cases}

    (which is 1 when :math:`A` and :math:`B` are disjoint). The layer distance is

    .. math::

        D = \frac{1}{n_{out}} \min_{\sigma} \sum_{j} \delta(S^a_j, S^b_{\sigma(j)}),

    the optimal assignment :math:`\sigma` of ``a``'s output units to ``b``'s (Hungarian,
    :func:`scipy.optimize.linear_sum_assignment`); :math:`D \in [0, 1]`. With ``carry``, the
    matching of layer :math:`k` is carried to layer :math:`k+1`: the input rows of ``b``'s layer
    :math:`k+1` are permuted by :math:`\sigma` (row :math:`i` of the permuted matrix is row
    :math:`\sigma(i)` of ``b``'s), so hidden units are compared under the best correspondence.

    Conv layers: an output channel is a unit; its input set is, with ``conv_mode="channel"``,
    the in-channels with any non-zero kernel weight, and with ``conv_mode="kernel"`` the
    ``(in-channel, kh, kw)`` positions with a non-zero weight. Grouped convs are read over all
    in-channels (a channel outside the unit's group is never in its set). A conv that feeds a
    ``Linear`` through ``Flatten`` carries its channel matching to the ``C*H*W`` features:
    channel :math:`c` owns features :math:`cHW, \dots, (c+1)HW - 1` (``Flatten`` is
    channel-major), so feature :math:`cHW + p` of ``a`` is compared with feature
    :math:`\sigma(c)HW + p` of ``b``, with :math:`HW` = in-features / channels. Where the sizes
    do not allow that (in-features not a multiple of the channels, or any other mismatch) the
    matching is not carried and :attr:`NNSTDResult.notes` says so.

    Ties. The assignment minimises the cost plus :math:`10^{-9}` per unit not matched to its own
    index: among the optimal assignments it keeps the most units :math:`i \leftrightarrow i`
    (the solver alone picks any), and the reported layer distance is within :math:`10^{-9}` of
    the exact optimum. So identical networks are at distance 0 even when units share an input
    set. Because later layers depend on which optimal matching
    is carried, the pair is put in a canonical order (by the bytes of their masks) before the
    layer-by-layer pass, which makes ``nnstd(a, b)`` equal ``nnstd(b, a)`` exactly, with inverse
    matchings.

    Args:
        model_a, model_b: chains :func:`~curvprune.graphs.neuron.trace_chain` accepts (pruned
            or not).
        conv_mode: ``"channel"`` or ``"kernel"`` (see above).
        carry: carry each layer's matching to the next layer's inputs (Liu et al.'s method);
            ``False`` compares every layer on its own.

    Raises:
        ValueError: different architectures (the message names the layer), an unknown
            ``conv_mode``, or a model that is not a chain.
    """
    return _nnstd(_layers_from_model(model_a), _layers_from_model(model_b), conv_mode, carry)


def nnstd_masks(masks_a: Mapping[str, MaskLike], masks_b: Mapping[str, MaskLike], *,
                conv_mode: str = "channel", groups: Mapping[str, int] | None = None,
                carry: bool = True) -> NNSTDResult:
    """:func:`nnstd` of two connectivity masks ``{weight name: tensor}`` without the models.

    Each mask has its weight's shape (``[out, in]`` for a Linear, ``[out, in / groups, kh, kw]``
    for a Conv2d) and marks the present weights (non-zero entries; ``bool`` or numeric); the
    mapping's order is the chain order (``masks_b`` must list the same names in the same order).
    :func:`connectivity_masks` builds one from a model; ``{n: m.weight_mask}`` of a pruned
    model works too. ``groups`` gives the ``groups`` of grouped convs (default 1). The matching
    of a layer is carried to the next one when the next one's inputs are the previous one's
    outputs (equal sizes), or their ``Flatten`` (conv followed by a Linear whose in-features
    are a multiple of the channels); pass ``carry=False`` if consecutive masks are not
    consecutive layers.

    Raises:
        ValueError: the masks differ in names, order, shapes or groups (the message names the
            layer), a mask is not 2-D or 4-D, or an unknown ``conv_mode``.
    """
    return _nnstd(_layers_from_masks(masks_a, groups), _layers_from_masks(masks_b, groups),
                  conv_mode, carry)


def _input_sets(full: np.ndarray, conv_mode: str) -> np.ndarray:
    """``[out, set elements]`` bool: each output unit's input set as a row."""
    if full.ndim == 2:
        return full
    if conv_mode == "channel":
        return full.reshape(full.shape[0], full.shape[1], -1).any(axis=2)
    return full.reshape(full.shape[0], -1)


def _set_distances(sets_a: np.ndarray, sets_b: np.ndarray) -> np.ndarray:
    """``[n_a, n_b]`` normalised edit distances between the rows of two bool matrices.

    Computed from exact integer counts (float64 holds them exactly), so the matrix of
    ``(b, a)`` is exactly the transpose of that of ``(a, b)``.
    """
    fa = sets_a.astype(np.float64)
    fb = sets_b.astype(np.float64)
    inter = fa @ fb.T
    union = fa.sum(axis=1)[:, None] + fb.sum(axis=1)[None, :] - inter
    return np.where(union > 0, (union - inter) / np.maximum(union, 1.0), 0.0)


def _match(cost: np.ndarray) -> np.ndarray:
    """The optimal assignment of rows to columns; near-ties go to the identity."""
    n = cost.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    perturbed = cost + _TIE_BREAK
    np.fill_diagonal(perturbed, np.diagonal(cost))
    rows, cols = linear_sum_assignment(perturbed)
    out = np.empty(n, dtype=np.int64)
    out[rows] = cols
    return out


def _carry_permutation(prev: _MaskLayer, layer: _MaskLayer,
                       matching: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The permutation of ``layer``'s input units induced by ``prev``'s output matching."""
    n_prev, n_in = prev.n_out, layer.n_in
    if n_in == n_prev:
        return matching, None
    if prev.kind == "conv" and layer.kind == "linear" and n_prev and n_in % n_prev == 0:
        hw = n_in // n_prev
        return (matching[:, None] * hw + np.arange(hw)[None, :]).reshape(-1), None
    if prev.kind == "conv" and layer.kind == "linear":
        reason = (f"not carried: {n_in} in-features are not a multiple of the {n_prev} "
                  f"channels of {prev.name!r}")
    else:
        reason = (f"not carried: {n_in} inputs do not match the {n_prev} outputs of "
                  f"{prev.name!r}")
    return None, reason


def _nnstd_ordered(a: list[_MaskLayer], b: list[_MaskLayer], conv_mode: str, carry: bool
                   ) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, bool],
                              dict[str, str]]:
    distances: dict[str, float] = {}
    matchings: dict[str, np.ndarray] = {}
    carried: dict[str, bool] = {}
    notes: dict[str, str] = {}
    previous: np.ndarray | None = None
    for k, (la, lb) in enumerate(zip(a, b)):
        full_b = lb.full()
        carried[la.name] = False
        if k > 0 and carry:
            perm, note = _carry_permutation(a[k - 1], la, previous)
            if perm is None:
                notes[la.name] = note
            else:
                full_b = full_b[:, perm]
                carried[la.name] = True
        cost = _set_distances(_input_sets(la.full(), conv_mode), _input_sets(full_b, conv_mode))
        matching = _match(cost)
        n = la.n_out
        distances[la.name] = (math.fsum(cost[np.arange(n), matching].tolist()) / n) if n else 0.0
        matchings[la.name] = matching
        previous = matching
    return distances, matchings, carried, notes


def _mask_key(layers: list[_MaskLayer]) -> bytes:
    return b"".join(np.packbits(layer.mask.reshape(-1)).tobytes() for layer in layers)


def _nnstd(a: list[_MaskLayer], b: list[_MaskLayer], conv_mode: str, carry: bool) -> NNSTDResult:
    if conv_mode not in _CONV_MODES:
        raise ValueError(f"conv_mode must be one of {_CONV_MODES}, not {conv_mode!r}.")
    _check_same_architecture(a, b)
    swap = _mask_key(a) > _mask_key(b)
    if swap:
        distances, matchings, carried, notes = _nnstd_ordered(b, a, conv_mode, carry)
        matchings = {name: np.argsort(m) for name, m in matchings.items()}  # the inverses
    else:
        distances, matchings, carried, notes = _nnstd_ordered(a, b, conv_mode, carry)
    values = list(distances.values())
    mean = math.fsum(values) / len(values) if values else math.nan
    return NNSTDResult(distances, mean, conv_mode, matchings, carried, notes)


# --------------------------------------------------------------------------------------------
# Graph measures: clustering coefficient and average shortest path length
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphMeasures:
    """Average clustering coefficient and average shortest-path length of an undirected graph.

    Attributes:
        nodes: number of nodes.
        edges: number of (undirected, non-loop) edges.
        clustering: average clustering coefficient :math:`C` over all nodes (nodes of degree
            below 2 count 0); NaN for a graph without nodes.
        path_length: average shortest-path length :math:`L` over ordered pairs of distinct
            nodes of the largest connected component (0 for a single node).
        connected: whether the graph is connected (if not, ``path_length`` is over the largest
            component only).
        largest_component: number of nodes of that component.
        components: number of connected components (an isolated node is one).
    """

    nodes: int
    edges: int
    clustering: float
    path_length: float
    connected: bool
    largest_component: int
    components: int


def _as_adjacency(adjacency: Any) -> sp.csr_matrix:
    """Symmetric 0/1 CSR adjacency without self-loops (float64)."""
    if isinstance(adjacency, torch.Tensor):
        adjacency = adjacency.detach().cpu().numpy()
    matrix = sp.csr_matrix(adjacency)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"the adjacency matrix must be square, not {matrix.shape}.")
    matrix = (matrix != 0).astype(np.float64)
    coo = ((matrix + matrix.T) != 0).tocoo()
    keep = coo.row != coo.col
    return sp.csr_matrix((np.ones(int(keep.sum())), (coo.row[keep], coo.col[keep])),
                         shape=matrix.shape)


def _dense_enough(adj: sp.csr_matrix) -> bool:
    """Whether dense float32 products beat sparse work: at most 8192 nodes, density > 2%."""
    n = adj.shape[0]
    return n <= 8192 and adj.nnz > 0.02 * n * n


def _average_clustering(adj: sp.csr_matrix) -> float:
    r"""Mean over nodes of :math:`c_v = (A^3)_{vv} / (d_v (d_v - 1))` (0 when :math:`d_v < 2`)."""
    n = adj.shape[0]
    if n == 0:
        return math.nan
    degree = np.asarray(adj.sum(axis=1)).ravel()
    closed = np.zeros(n)  # (A^3)_vv = 2 * triangles through v
    if _dense_enough(adj):
        # float32 products of 0/1 matrices are exact integers below 2**24 (n <= 8192)
        dense = adj.toarray().astype(np.float32)
        for start in range(0, n, 1024):
            rows = dense[start:start + 1024]
            closed[start:start + 1024] = ((rows @ dense).astype(np.float64) * rows).sum(axis=1)
    else:
        chunk = max(1, (1 << 22) // max(n, 1))
        for start in range(0, n, chunk):
            rows = adj[start:start + chunk]
            closed[start:start + chunk] = np.asarray(
                (rows @ adj).multiply(rows).sum(axis=1)).ravel()
    pairs = degree * (degree - 1)
    local = np.divide(closed, pairs, out=np.zeros(n), where=pairs > 0)
    return float(math.fsum(local.tolist()) / n)


def _distance_sum(adj: sp.csr_matrix, method: str = "auto") -> float:
    """Sum of the shortest-path lengths over all ordered pairs of a connected graph.

    ``"bfs"``: :func:`scipy.sparse.csgraph.shortest_path` (unweighted), ``O(n m)``;
    ``"matmul"``: breadth-first search from blocks of sources at once by dense products with the
    adjacency matrix, faster for dense graphs (``O(n^3 D)`` flops in BLAS, ``D`` the diameter).
    """
    n = adj.shape[0]
    if method == "auto":
        method = "matmul" if _dense_enough(adj) else "bfs"
    total = 0.0
    if method == "bfs":
        chunk = max(1, (1 << 22) // max(n, 1))
        for start in range(0, n, chunk):
            d = shortest_path(adj, method="D", directed=False, unweighted=True,
                              indices=np.arange(start, min(n, start + chunk)))
            total += float(d.sum())
        return total
    dense = adj.toarray().astype(np.float32)
    chunk = 512
    for start in range(0, n, chunk):
        sources = np.arange(start, min(n, start + chunk))
        frontier = np.zeros((sources.size, n), dtype=bool)
        frontier[np.arange(sources.size), sources] = True
        seen = frontier.copy()
        level = 0
        while frontier.any():
            level += 1
            active = np.flatnonzero(frontier.any(axis=0))  # only these rows of A matter
            frontier = ((frontier[:, active].astype(np.float32) @ dense[active]) > 0) & ~seen
            seen |= frontier
            total += level * float(frontier.sum())
    return total


def graph_measures(adjacency: Any, *, method: str = "auto") -> GraphMeasures:
    r"""Average clustering coefficient and average shortest-path length of an undirected graph.

    ``adjacency`` is a square matrix (scipy sparse, numpy or torch); ``u ~ v`` iff entry
    ``(u, v)`` or ``(v, u)`` is non-zero; self-loops are ignored. With :math:`A` the 0/1
    adjacency matrix and :math:`d_v` the degree,

    .. math::

        C = \frac{1}{n} \sum_v c_v, \quad c_v = \frac{(A^3)_{vv}}{d_v (d_v - 1)}
        \ (0 \text{ if } d_v < 2), \qquad
        L = \frac{1}{s(s-1)} \sum_{u \ne v \in G^*} \operatorname{dist}(u, v),

    where :math:`G^*` is the largest connected component (:math:`s` nodes; of several largest
    components, the one holding the lowest-numbered node) and :math:`L = 0` when :math:`s = 1`.
    These equal :func:`networkx.average_clustering` and
    :func:`networkx.average_shortest_path_length` of :math:`G^*`.

    Args:
        adjacency: the graph.
        method: how :math:`L` is computed: ``"bfs"`` (scipy's unweighted shortest paths),
            ``"matmul"`` (blocked breadth-first search by dense matrix products) or ``"auto"``
            (``"matmul"`` for dense graphs of at most 8192 nodes).
    """
    if method not in ("auto", "bfs", "matmul"):
        raise ValueError(f"method must be 'auto', 'bfs' or 'matmul', not {method!r}.")
    adj = _as_adjacency(adjacency)
    n = adj.shape[0]
    clustering = _average_clustering(adj)
    if n == 0:
        return GraphMeasures(0, 0, math.nan, math.nan, True, 0, 0)
    count, labels = connected_components(adj, directed=False)
    sizes = np.bincount(labels, minlength=count)
    first_node = np.full(count, n)
    np.minimum.at(first_node, labels, np.arange(n))
    largest = np.flatnonzero(sizes == sizes.max())
    best = largest[np.argmin(first_node[largest])]
    nodes = np.flatnonzero(labels == best)
    s = nodes.size
    path = _distance_sum(adj[nodes][:, nodes].tocsr(), method) / (s * (s - 1)) if s > 1 else 0.0
    return GraphMeasures(n, adj.nnz // 2, clustering, path, count == 1, int(s), int(count))


# --------------------------------------------------------------------------------------------
# Relational-graph measures (You et al. 2020)
# --------------------------------------------------------------------------------------------

#: Default number of nodes of a relational graph (You et al. work with 64-node graphs).
RELATIONAL_NODES = 64


@dataclass(frozen=True)
class RelationalMeasures:
    """:class:`GraphMeasures` of one relational graph a pruning leaves, beside the dense graph's.

    Attributes:
        name: the weight name (a layer's graph) or ``"network"`` (the union over layers).
        pruned: the measures with the present weights.
        dense: the measures of the same layer(s) with every weight present.
    """

    name: str
    pruned: GraphMeasures
    dense: GraphMeasures


@dataclass(frozen=True)
class RelationalResult:
    """Relational-graph measures of a network, per layer and for the network as a whole.

    Attributes:
        nodes: the node count asked for (``None``: as fine as each layer allows).
        layers: ``{weight name: RelationalMeasures}`` of every Linear/Conv2d weight.
        network: the measures of the union of the layers' graphs on one shared node set
            (the layers with at least ``nodes`` channels on both sides), or ``None`` when no
            such layer exists (see ``notes``).
        notes: ``{weight name or "network": text}``: why a layer is left out of the network
            graph, or why there is no network graph.
    """

    nodes: int | None
    layers: dict[str, RelationalMeasures]
    network: RelationalMeasures | None
    notes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text table: C and L of each relational graph, pruned and dense."""
        size = "per-layer node count" if self.nodes is None else f"at most {self.nodes} nodes"
        lines = [f"relational-graph measures (You et al. 2020; {size}; a disconnected graph's "
                 "L is over its largest component, noted)",
                 f"{'graph':<28}{'nodes':>7}{'edges':>7}{'C':>8}{'L':>8}"
                 f"{'edges*':>8}{'C*':>8}{'L*':>8}   (* = dense)"]
        rows = [*self.layers.values()] + ([self.network] if self.network is not None else [])
        for row in rows:
            p, d = row.pruned, row.dense
            mark = "" if p.connected else f" (largest component {p.largest_component})"
            lines.append(f"{row.name:<28}{p.nodes:>7}{p.edges:>7}{p.clustering:>8.4f}"
                         f"{p.path_length:>8.4f}{d.edges:>8}{d.clustering:>8.4f}"
                         f"{d.path_length:>8.4f}{mark}")
        lines += [f"note: {name}: {text}" for name, text in self.notes.items()]
        return "\n".join(lines)


def _check_nodes(nodes: int | None) -> int | None:
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int)
                              or nodes < 1):
        raise ValueError(f"nodes must be a positive integer or None, not {nodes!r}.")
    return nodes


def _node_edges(connected: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The node pairs ``(a, b)`` (``a != b``, unordered, unique) of the relational graph on ``n``
    nodes of one ``[out, in]`` connectivity matrix (see :func:`relational_graph`)."""
    n_out, n_in = connected.shape
    out_node = (np.arange(n_out) * n) // n_out
    in_node = (np.arange(n_in) * n) // n_in
    o, i = np.nonzero(connected)
    a, b = in_node[i], out_node[o]
    keep = a != b  # a node's own update is no edge
    a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    pairs = np.unique(a.astype(np.int64) * n + b)
    return pairs // n, pairs % n


def _adjacency(n: int, a: np.ndarray, b: np.ndarray) -> sp.csr_matrix:
    upper = sp.csr_matrix((np.ones(a.size), (a, b)), shape=(n, n))
    return ((upper + upper.T) > 0).astype(np.float64).tocsr()


def relational_graph(connected: MaskLike, nodes: int | None = RELATIONAL_NODES) -> sp.csr_matrix:
    r"""The relational graph (You et al. 2020) of one layer, as a 0/1 symmetric adjacency matrix.

    ``connected`` is the layer's ``[out, in]`` connectivity: entry ``[o, i]`` is true when the
    weight from input channel :math:`i` to output channel :math:`o` is present (for a conv, any
    non-zero tap of ``W[o, i]``). The graph has :math:`n = \min(\text{nodes}, n_{in},
    n_{out})` nodes (``nodes=None``: :math:`\min(n_{in}, n_{out})`); input channel :math:`i`
    belongs to node :math:`\lfloor i n / n_{in} \rfloor` and output channel :math:`o` to node
    :math:`\lfloor o n / n_{out} \rfloor` (contiguous groups whose sizes differ by at most one;
    with equal widths and :math:`n` = the width, input channel :math:`i` and output channel
    :math:`i` are the one node :math:`i`). Nodes :math:`a \ne b` are joined when a present
    weight goes from a channel of :math:`a` to a channel of :math:`b` or from :math:`b` to
    :math:`a`; a weight within one node is the node's own update, not an edge. A dense layer
    gives the complete graph (:math:`L = 1`, and :math:`C = 1` from 3 nodes on), and the graph
    is not bipartite: a layer can have triangles.

    Args:
        connected: ``[out, in]`` bool (or numeric: non-zero is present), numpy or torch.
        nodes: the node count to group into (at most), or ``None`` for the finest grouping.
    """
    nodes = _check_nodes(nodes)
    if isinstance(connected, torch.Tensor):
        array = (connected.detach() != 0).cpu().numpy()
    else:
        array = np.asarray(connected) != 0
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"connected must be a non-empty [out, in] matrix, not of shape "
                         f"{tuple(array.shape)}.")
    n = min(array.shape) if nodes is None else min(nodes, *array.shape)
    return _adjacency(n, *_node_edges(array, n))


def _layers_any(model: nn.Module) -> list[_MaskLayer]:
    """Every Linear/Conv2d weight of ``model`` (module order), as connectivity masks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, not {type(model).__name__}.")
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            groups = module.groups if kind == "conv" else 1
            layers.append(_MaskLayer(f"{name}.weight" if name else "weight",
                                 _nonzero(module).cpu().numpy(), groups, kind))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer.")
    return layers


def relational_measures(model: nn.Module, *, nodes: int | None = RELATIONAL_NODES,
                        method: str = "auto") -> RelationalResult:
    r"""Clustering coefficient :math:`C` and path length :math:`L` of the relational graphs
    (You et al., ICML 2020) of a model's layers, pruned and dense.

    Every ``Linear`` and ``Conv2d`` weight (any model: chains, residual networks, ViTs) defines
    one relational graph (:func:`relational_graph`): its input and output channels grouped into
    the same :math:`n` nodes, so input channel :math:`i` and output channel :math:`i` of an
    equal-width layer are one node, and an edge joins two nodes that exchange a message through
    a present weight. A conv pair of channels is present when any kernel tap is non-zero; a
    grouped conv joins only channels of one group. Present means non-zero
    (``weight_orig * weight_mask`` under a pruning reparametrisation).

    The network graph is the union of the layers' graphs on one node set of ``nodes`` nodes,
    from the layers with at least ``nodes`` channels on both sides (the others are listed in
    :attr:`RelationalResult.notes`); with ``nodes=None`` it is built only when every layer has
    the same node count. Each graph is reported beside the dense one (every weight present: the
    complete graph for an ungrouped layer: :math:`L = 1`, :math:`C = 1` from 3 nodes on).
    :math:`C` and :math:`L` are :func:`graph_measures`'; when pruning disconnects a graph,
    :math:`L` is over its largest component and ``connected`` is ``False``.

    Args:
        model: any module with ``Linear``/``Conv2d`` layers.
        nodes: the node count of the graphs (at most; a layer narrower than ``nodes`` uses its
            smaller width), or ``None`` for one node per channel of the narrower side.
        method: passed to :func:`graph_measures`.

    Raises:
        ValueError: no Linear/Conv2d layer, or a bad ``nodes``/``method``.
    """
    return _relational(_layers_any(model), _check_nodes(nodes), method)


def relational_measures_masks(masks: Mapping[str, MaskLike], *,
                              nodes: int | None = RELATIONAL_NODES,
                              groups: Mapping[str, int] | None = None,
                              method: str = "auto") -> RelationalResult:
    """:func:`relational_measures` of connectivity masks ``{weight name: tensor}`` (a Linear
    weight's ``[out, in]`` or a Conv2d weight's ``[out, in / groups, kh, kw]`` shape; non-zero
    is present); ``groups`` gives grouped convs' groups (default 1)."""
    return _relational(_layers_from_masks(masks, groups), _check_nodes(nodes), method)


def _relational(layers: list[_MaskLayer], nodes: int | None, method: str) -> RelationalResult:
    if method not in ("auto", "bfs", "matmul"):
        raise ValueError(f"method must be 'auto', 'bfs' or 'matmul', not {method!r}.")
    rows, notes = {}, {}
    pruned_units = [layer.unit_matrix() for layer in layers]
    dense_units = [_MaskLayer(l.name, np.ones_like(l.mask), l.groups, l.kind).unit_matrix()
                   for l in layers]
    for layer, p, d in zip(layers, pruned_units, dense_units):
        rows[layer.name] = RelationalMeasures(
            layer.name, graph_measures(relational_graph(p, nodes), method=method),
            graph_measures(relational_graph(d, nodes), method=method))
    widths = [min(u.shape) for u in pruned_units]
    if nodes is None:
        shared = widths[0] if len(set(widths)) == 1 else None
        if shared is None:
            notes["network"] = ("no network graph: the layers have different node counts "
                                f"({min(widths)} to {max(widths)}); pass nodes=N to group "
                                "every layer into N nodes")
    else:
        shared = nodes
        for layer, w in zip(layers, widths):
            if w < nodes:
                notes[layer.name] = (f"left out of the network graph: {w} channels on its "
                                     f"narrower side, fewer than {nodes} nodes")
        if all(w < nodes for w in widths):
            shared = None
            notes["network"] = (f"no network graph: no layer has {nodes} channels on both "
                                "sides; pass a smaller nodes")
    network = None
    if shared is not None:
        members = [k for k, w in enumerate(widths) if w >= shared]

        def union(units: list[np.ndarray]) -> sp.csr_matrix:
            pairs = [_node_edges(units[k], shared) for k in members]
            return _adjacency(shared, np.concatenate([a for a, _ in pairs]),
                              np.concatenate([b for _, b in pairs]))

        network = RelationalMeasures("network",
                                     graph_measures(union(pruned_units), method=method),
                                     graph_measures(union(dense_units), method=method))
    return RelationalResult(nodes, rows, network, notes)
