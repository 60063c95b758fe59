r"""The channel-level neural graph of any model, traced from a real forward pass.

Nodes are channels (a conv's output channels; a Linear's output features, with tokens as
positions), edges are the channel-to-channel connections of ``Conv2d``, ``Conv1d`` and
``Linear`` weights, and of parameter-free merges (residual adds, gating products):

* a ``Conv2d``/``Linear`` edge ``u -> o`` has length :math:`1 / \lVert W[o, u] \rVert_2`, the
  norm taken over the kernel and over every input feature that carries channel ``u`` (a
  flattened ``[C, H, W]`` feature map gives ``H W`` input features per channel); an all-zero
  block is no edge;
* an elementwise merge of several channel tensors (``a + b``, ``x * gate``) makes new nodes, one
  per merged channel, with an edge of length 1 (a weight of 1) from each merged input channel;
* everything that does not mix channels keeps the nodes of its input: activations,
  BatchNorm/LayerNorm/GroupNorm (their statistics are not graph nodes), dropout, pooling and
  resizing, reshapes, permutes, slices, concatenation and splitting (``cat`` only lays the
  channels of its inputs side by side), multiplication by constants and parameters;
* attention: ``softmax(q k^T) v`` and ``scaled_dot_product_attention`` (by ``matmul`` or
  ``einsum``) carry the channels of ``v`` (mixing over tokens only); ``q`` and ``k`` only weigh
  the mixing and have no out-edges, as do attention weights a layer computes directly (outlook
  attention), relative-position terms ``q R``, per-token weights (additive attention) and a
  constant query against ``k``. Unlabelled tensors computed from channels are tracked as
  attention *weights* or channel *statistics*: a layer that reads weights (talking heads) or
  constants (a relative-position MLP) is no graph layer (``ChannelGraph.unscored``); one that
  reads a statistic, or weights that vary across channels merged into channels, is untraceable.

**Why trace with a torch-function mode and not with torch.fx or Torch-Pruning's dependency
graph.** fx fails on data-dependent Python control flow common in timm models, and the
dependency graph answers another question: which channels must be *removed together*
(coupling), which merges a residual stream and every layer that reads or writes it into one
group, and a depthwise conv's input and output into one channel. The curvature graph needs
who feeds whom. So the model runs for real under a :class:`~torch.overrides.TorchFunctionMode`
and every tensor carries an integer *label* tensor of its own shape: ``node * batch + example``
(``-1`` where an element is not a channel of the graph, e.g. a class token or a constant).
Data-movement functions (``view``, ``permute``, ``cat``, ``split``, indexing, padding...) are
applied to the labels themselves, so channels are followed through any reshape, including the
head split of attention, without rules per architecture. A function the tracer does not know
that reads a labelled tensor makes the model *untraceable*: :class:`UntraceableModel` names the
functions, and the caller falls back (see :mod:`curvprune.curvature`).

Node activity (per example): the mean of :math:`|h|` over the positions (and tokens) of the
channel, measured on the last value-changing operation whose output carries the node (the
tensor the next layers read: after the nonlinearity and normalisation; reshapes and slices do
not re-measure); then min-max normalised per node set (the nodes one operation created) per
example, as the neuron graph normalises per layer.
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.nn as nn

from ..errors import UntraceableModel
from ..transport import Distances, NodeMeans, node_measures
from .base import EdgeProblem

__all__ = ["ChannelDistances", "ChannelGraph", "ChannelProblems", "NodeSet", "UntraceableModel",
           "channel_activity", "channel_distances", "channel_problem_bytes",
           "needed_distance_bytes", "needed_distances", "trace_channels"]



@dataclass
class NodeSet:
    """Nodes created by one operation: ``start .. start + count``."""

    name: str
    kind: str  # "input", "layer" or "merge"
    start: int
    count: int


@dataclass
class ChannelGraph:
    """A traced channel graph (example-independent) and the activities of one calibration batch.

    Node ids follow creation order, and every edge goes from a lower id to a higher one (the
    graph is a DAG in topological order).

    Attributes:
        sets: the node sets in creation order.
        src, dst, length: edges (``length`` float64); ``module[e]`` is the index in ``modules``
            of the layer an edge belongs to, ``-1`` for merge edges.
        modules: ``(qualified weight name, module)`` of every traced Conv2d/Linear, in call order.
        weight_edges: per module, ``(weight flat index, edge index)`` pairs: the edges that
            each weight element belongs to (an element may belong to several).
        module_inputs: per module, ``(node, input channel)`` pairs: the nodes that feed each
            input channel (a channel may be fed by several, as around a class token).
        module_outputs: per module, the first node id of its output channels (channel ``o`` is
            node ``module_outputs[k] + o``).
        inputs, outputs: bool ``[num_nodes]`` masks of the model-input and model-output nodes.
        activity: float64 ``[batch, num_nodes]`` normalised activities of the traced batch.
        unscored: names of the Conv1d/Conv2d/Linear modules that ran but read no channel (they
            act on attention weights, as talking heads, or on constants, as a relative-position
            MLP): no nodes, no edges, their weights are not scored.
        replay: how :func:`channel_activity` measures another batch without tracing it (the
            functions called, in order, and where the trace measured which nodes); ``None``
            when a measured tensor does not keep the batch as its first dimension.
    """

    sets: list[NodeSet]
    src: torch.Tensor
    dst: torch.Tensor
    length: torch.Tensor
    module: torch.Tensor
    modules: list[tuple[str, nn.Module]]
    weight_edges: list[tuple[torch.Tensor, torch.Tensor]]
    module_inputs: list[tuple[torch.Tensor, torch.Tensor]]
    module_outputs: list[int]
    inputs: torch.Tensor
    outputs: torch.Tensor
    activity: torch.Tensor = field(repr=False)
    unscored: list[str] = field(default_factory=list)
    replay: dict | None = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return self.inputs.numel()

    def same_structure(self, other: ChannelGraph) -> bool:
        return (
            [(s.name, s.count) for s in self.sets] == [(s.name, s.count) for s in other.sets]
            and torch.equal(self.src, other.src) and torch.equal(self.dst, other.dst)
        )

    def mean_weights(self, weighted: bool, edges: slice = slice(None)) -> torch.Tensor:
        """Each edge's coefficient in its channels' mean curvature (float64 ``[E]``, or the
        ``edges`` only): 1, or with ``weighted`` its weight norm :math:`1 / d(e)`
        (``reduction="mean"`` and ``"weighted"`` of :meth:`CurvatureResult.node_kappa
        <curvprune.result.CurvatureResult.node_kappa>`)."""
        if weighted:
            return 1.0 / self.length[edges].to(torch.float64)
        return torch.ones(self.src[edges].numel(), dtype=torch.float64, device=self.src.device)


# --------------------------------------------------------------------------------------------


def trace_channels(model: nn.Module, inputs: torch.Tensor,
                   device: torch.device | None = None) -> ChannelGraph:
    """Trace the channel graph of ``model`` on a batch ``inputs`` (channels first: ``[N, C, ...]``).

    Call it in eval mode under ``torch.no_grad()`` (:func:`curvprune.calibration.scoring_mode`).
    The model runs once, for real; nothing of it is changed.

    Raises:
        UntraceableModel: the model calls functions the tracer cannot follow (listed).
        ValueError: the model has nothing to score, rejects the inputs, or produces NaN/Inf.
    """
    if inputs.dim() < 2:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)}: expected [N, C, ...].")
    from ._trace import trace

    return trace(model, inputs, device)


def channel_activity(model: nn.Module, inputs: torch.Tensor, graph: ChannelGraph,
                     device: torch.device | None = None) -> torch.Tensor:
    """The normalised activities ``[N, num_nodes]`` of another batch ``inputs`` on the traced
    ``graph``, without tracing it again.

    The model runs once under a light :class:`~torch.overrides.TorchFunctionMode` that
    propagates no labels: at each step where :func:`trace_channels` measured a tensor it
    measures the same output, labelled for this batch from the nodes the trace recorded, with
    the tracer's own arithmetic, so the activities are bitwise those a full trace gives
    (tested). When the model calls other functions than at the trace (data-dependent control
    flow), or ``graph.replay`` is ``None``, the batch is traced in full and its structure
    checked against ``graph``.

    Raises:
        ValueError: the batch gives another channel graph than ``graph``; NaN/Inf.
    """
    from ._trace import activity

    return activity(model, inputs, graph, device)


def channel_distances(graph: ChannelGraph) -> torch.Tensor:
    """All-pairs directed shortest paths ``D[u, v]`` of the channel graph (dense float64).

    Dijkstra's algorithm from every node (``scipy.sparse.csgraph``, on the CPU; the result is
    moved to the graph's device). Memory: ``num_nodes**2`` float64.
    """
    dist = scipy.sparse.csgraph.dijkstra(_adjacency(graph), directed=True)
    return torch.from_numpy(dist).to(graph.length.device)


def _adjacency(graph: ChannelGraph) -> scipy.sparse.csr_matrix:
    """The weighted adjacency Dijkstra runs on (duplicate ``(src, dst)`` lengths summed, as
    ``csr_matrix`` does; :func:`channel_distances` and :func:`needed_distances` share it)."""
    n = graph.num_nodes
    return scipy.sparse.csr_matrix(
        (graph.length.cpu().numpy(), (graph.src.cpu().numpy(), graph.dst.cpu().numpy())),
        shape=(n, n))


#: Lookups of more keys than this are sorted first (:meth:`ChannelDistances.__getitem__`).
_SORT_LOOKUPS = 1 << 16


class ChannelDistances:
    r"""Shortest-path distances of the channel graph on the pairs the measures need only.

    Looked up like the dense table of :func:`channel_distances`: ``distances[a, b]`` with
    index tensors ``a`` and ``b`` (broadcast) returns float64 ``D(a, b)`` for every stored pair
    and ``+inf`` for the others. The engine (:class:`~curvprune.transport.Distances`,
    :func:`~curvprune.transport.bound_edges`, :func:`~curvprune.transport.solve_edges`) reads only
    stored pairs where a result depends on the value (every other lookup is a padded slot that
    the engine masks), so it gets the same numbers as with the dense table; see
    :func:`needed_distances` for which pairs are stored and why the values are the same.

    Memory: 16 bytes per stored pair (a sorted int64 key ``a * num_nodes + b`` and the float64
    distance), against ``8 * num_nodes**2`` for the dense table.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_nodes: int) -> None:
        self.keys = keys
        self.values = values
        self.num_nodes = num_nodes

    @property
    def num_pairs(self) -> int:
        return self.keys.numel()

    @property
    def nbytes(self) -> int:
        return 16 * self.keys.numel()

    def to(self, device: torch.device) -> ChannelDistances:
        return ChannelDistances(self.keys.to(device), self.values.to(device), self.num_nodes)

    def __getitem__(self, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, cols = index
        rows, cols = torch.broadcast_tensors(torch.as_tensor(rows, device=self.keys.device),
                                             torch.as_tensor(cols, device=self.keys.device))
        key = (rows.to(torch.long) * self.num_nodes + cols.to(torch.long)).reshape(-1)
        if not (self.keys.numel() and key.numel()):
            return torch.full(rows.shape, math.inf, dtype=torch.float64, device=self.keys.device)
        # Many lookups are searched in key order: consecutive binary searches then walk the
        # same paths through the (large) key array, from cache; about 25 times faster than in
        # random order on a full-width resnet50's 87M pairs.
        order = None
        if key.numel() > _SORT_LOOKUPS and not bool((key[1:] >= key[:-1]).all()):
            order = torch.argsort(key)
            key = key[order]
        pos = torch.searchsorted(self.keys, key).clamp_(max=self.keys.numel() - 1)
        out = torch.where(self.keys[pos] == key, self.values[pos], math.inf)
        if order is not None:
            out = torch.empty_like(out).index_copy_(0, order, out)
        return out.view(rows.shape)


def _bool(matrix: scipy.sparse.spmatrix) -> scipy.sparse.csr_matrix:
    """The nonzero pattern of ``matrix`` as a csr matrix of float32 ones (sorted, no
    duplicates)."""
    matrix = scipy.sparse.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix.sort_indices()
    if matrix.dtype == np.float32 and not (matrix.data == 0).any():
        matrix.data.fill(1.0)  # in place: a product's fresh pattern needs no copy
        return matrix
    return scipy.sparse.csr_matrix((np.ones(matrix.nnz, dtype=np.float32), matrix.indices,
                                    matrix.indptr), shape=matrix.shape)


def _bool_product(x: scipy.sparse.csr_matrix, y: scipy.sparse.csr_matrix
                  ) -> scipy.sparse.csr_matrix:
    """The pattern of ``x @ y``, with the rows of ``y`` that have one pattern merged first.

    A channel graph's rows repeat (every output channel of a dense layer has the same
    out-neighbours), so ``x @ y = (x @ G) @ Y_c``, with ``Y_c`` the distinct rows of ``y`` and
    ``G`` the row-to-class map, adds each distinct row once per row of ``x`` instead of once
    per neighbour: the same pattern for a fraction of the work.
    """
    classes: dict[bytes, int] = {}
    label = np.empty(y.shape[0], dtype=np.int64)
    for r in range(y.shape[0]):
        label[r] = classes.setdefault(y.indices[y.indptr[r]:y.indptr[r + 1]].tobytes(),
                                      len(classes))
    first = np.full(len(classes), -1, dtype=np.int64)
    first[label[::-1]] = np.arange(y.shape[0])[::-1]  # the first row of each class
    group = scipy.sparse.csr_matrix((np.ones(y.shape[0], dtype=np.float32),
                                     (np.arange(y.shape[0]), label)),
                                    shape=(y.shape[0], len(classes)))
    product = _bool(x @ group)
    del group
    return _bool(product @ y[first])


def _needed_structure(graph: ChannelGraph) -> tuple[scipy.sparse.csr_matrix,
                                                    scipy.sparse.csr_matrix]:
    """``(adjacency, needed)``: the graph's adjacency and the pattern of the needed pairs
    (``needed[a, b] != 0``, sorted indices)."""
    n = graph.num_nodes
    adjacency = _adjacency(graph)
    pattern = _bool(adjacency)
    layer = (graph.module >= 0).cpu().numpy()
    src, dst = graph.src.cpu().numpy()[layer], graph.dst.cpu().numpy()[layer]
    scored = _bool(scipy.sparse.csr_matrix((np.ones(src.size, dtype=np.float32), (src, dst)),
                                           shape=(n, n)))
    # (k, m) with k = i or k -> i, i -> j scored, m = j or j -> m: the pattern of
    # (I + A) S (I + A) = (I + A) T with T = S (I + A), each one product (all entries are
    # positive: no cancellation), so no sum of two [nnz] patterns is ever held.
    loops = _bool(pattern + scipy.sparse.identity(n, dtype=np.float32, format="csr"))
    del pattern
    after = _bool_product(scored, loops)
    del scored
    return adjacency, _bool_product(loops, after)


def needed_distance_bytes(graph: ChannelGraph) -> int:
    """Bytes :func:`needed_distances` keeps for ``graph``: 16 per needed node pair (one sparse
    product counts them; no Dijkstra runs)."""
    return 16 * int(_needed_structure(graph)[1].nnz)


def channel_problem_bytes(graph: ChannelGraph) -> int:
    """Bytes the scoring loop holds for ``graph`` besides the needed distances, counted from
    the structure before any distance is computed.

    :class:`ChannelProblems` groups the layer edges by layer and keeps, per layer edge, its
    index, its two end nodes' ranks in the layer's measures and its length (32 bytes); per
    edge of the graph, its place in the in- and out-neighbour lists (16 bytes); per node, its
    degree and first place in both lists (32 bytes); per layer its source, target, near and
    far channels (8 bytes each) and its dense distance blocks (8 bytes an entry: ``K T + S M
    + K M`` for ``S`` sources, ``T`` targets, ``K`` in-neighbours of the sources, ``M``
    out-neighbours of the targets). One layer's measures on one example are padded tables
    over its sources and targets only: ``S D_in + T D_out`` slots for the largest in-/
    out-degrees among them, a neighbour, a float64 mass and the slot's position each (24
    bytes); the largest layer's count is added. The engine's temporaries come on top (a few
    more such tables while a layer's measures are computed), and so do the solve sets
    the scoring loop keeps between its rounds (:attr:`EngineOptions.problem_cache_bytes
    <curvprune.transport.EngineOptions.problem_cache_bytes>`)."""
    return _LayerSets(graph).nbytes()


class _LayerSets:
    """The scored edges of a channel graph grouped by layer, and per layer the channel sets
    its problems read: ``sources`` / ``targets`` (sorted node ids), each edge's ends' ranks
    in them (``src``, ``dst``), the sources' in-neighbours ``near`` and the targets'
    out-neighbours ``far`` (sorted node ids); with the graph's neighbour lists."""

    def __init__(self, graph: ChannelGraph, edges: torch.Tensor | None = None) -> None:
        n = graph.num_nodes
        self.edgeless = graph.src.numel() == 0
        chosen = graph.module >= 0
        if edges is not None:
            chosen &= edges.to(chosen.device)
        scored = torch.nonzero(chosen).squeeze(1)
        module = graph.module[scored]
        #: The scored edges, layer by layer (within a layer in edge order): group ``g`` is
        #: ``scored[offsets[g]:offsets[g + 1]]``.
        self.scored = scored[torch.argsort(module, stable=True)]
        counts = torch.bincount(module, minlength=len(graph.modules))
        self.layers = torch.nonzero(counts).squeeze(1).tolist()
        sizes = counts[self.layers].tolist()
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.in_lists = _NeighbourLists(graph.dst, n)
        self.out_lists = _NeighbourLists(graph.src, n)
        self.sources, self.targets, self.src, self.dst, self.near, self.far = \
            [], [], [], [], [], []
        self.widths = []  # per layer: (largest in-degree of sources, out-degree of targets)
        src, dst = graph.src[self.scored], graph.dst[self.scored]
        for part_src, part_dst in zip(src.split(sizes), dst.split(sizes)):
            sources, src_rank = torch.unique(part_src, return_inverse=True)
            targets, dst_rank = torch.unique(part_dst, return_inverse=True)
            self.sources.append(sources)
            self.targets.append(targets)
            self.src.append(src_rank)
            self.dst.append(dst_rank)
            table = self.in_lists.table(sources, graph.src)[0]
            self.near.append(torch.unique(table[table >= 0]))
            width_in = table.shape[1]
            table = self.out_lists.table(targets, graph.dst)[0]
            self.far.append(torch.unique(table[table >= 0]))
            self.widths.append((width_in, table.shape[1]))
            del table

    def nbytes(self) -> int:
        """What :class:`ChannelProblems` holds with these sets, and one layer's measures (see
        :func:`channel_problem_bytes`); 0 for a graph without edges."""
        if self.edgeless:
            return 0
        held = 32 * self.scored.numel() + 8 * (self.in_lists.order.numel()
                                                + self.out_lists.order.numel())
        held += 16 * (self.in_lists.degree.numel() + self.out_lists.degree.numel())
        largest = 0
        for g in range(len(self.layers)):
            s, t = self.sources[g].numel(), self.targets[g].numel()
            k, m = self.near[g].numel(), self.far[g].numel()
            held += 8 * (s + t + k + m) + 8 * (k * t + s * m + k * m)
            largest = max(largest, 24 * (s * self.widths[g][0] + t * self.widths[g][1]))
        return held + largest


def needed_distances(graph: ChannelGraph, *, block: int = 1 << 25,
                     memory_budget: int | None = None, reserve: int = 0,
                     _by_levels: bool = True) -> ChannelDistances:
    r"""The shortest-path distances of ``graph`` on the pairs the measures need, no more.

    The measures of a layer edge ``i -> j`` live on ``i`` and its in-neighbours ``k``, and on
    ``j`` and its out-neighbours ``m``, so its transport problem reads :math:`D(k, m)`,
    :math:`D(k, j)`, :math:`D(i, m)` and :math:`D(i, j)` only. Stored: every pair ``(a, b)``
    with ``a`` in :math:`\{i\} \cup N^-(i)` and ``b`` in :math:`\{j\} \cup N^+(j)` for some
    layer edge ``i -> j`` (all in-/out-neighbours, active or not: the measures of every example
    are supported there), i.e. the pattern of :math:`(I + A)\, S\, (I + A)` with ``A`` the
    adjacency and ``S`` the layer edges.

    **How.** The graph's node ids are a topological order, so the distances are filled level
    by level by min-plus products in torch on the graph's device
    (``curvprune/graphs/_channel_distances.py``; its docstring proves that every value is
    bitwise the all-pairs Dijkstra one). Graphs whose ids are not in topological order (and
    lengths that are not all positive) take the per-window Dijkstra below, which
    ``_by_levels=False`` (private, for tests and benchmarks) forces.

    **The values equal the all-pairs ones, computed per window.** Node ids are a topological
    order (every edge goes from a lower id to a higher one), so every path from ``a`` to ``b``
    visits only nodes with ids in ``[a, b]``. Sources are taken in id order in blocks; a block
    of sources ``a_0 < ... < a_s`` whose needed targets go up to id ``M`` runs one Dijkstra per
    source (:func:`scipy.sparse.csgraph.dijkstra`, as :func:`channel_distances` runs it) on the
    subgraph induced by the window ``[a_0, M]``, with the same edge lengths. That subgraph
    holds every path from each source to each of its needed targets, and no path of the whole
    graph between them leaves it, so the set of paths is the same. In floating point,
    Dijkstra with positive lengths returns for each node the minimum over paths of the
    left-to-right rounded sum of their lengths (rounded addition of a positive length is
    monotone and never decreases the sum, the two properties its correctness needs): one
    number for one set of paths, whatever order the nodes are settled in. Hence every stored
    value is bitwise the all-pairs one (tested on the random graphs of
    ``tests/test_channels.py``), and the curvature computed from them is identical.

    A block holds at most about ``block`` float64 entries (sources times window width, the
    dense output of its Dijkstra runs); memory is ``16 * num_pairs`` bytes for the
    result plus one block. With ``memory_budget`` (bytes), a graph whose needed pairs take
    more than ``memory_budget - reserve`` is refused with a ``ValueError`` before any Dijkstra
    runs (counting the pairs is one sparse product, seconds even on full-width ImageNet
    models); ``reserve``: bytes the caller needs besides (:func:`neural_curvature
    <curvprune.neural_curvature>` reserves :func:`channel_problem_bytes`), refused on its own
    before the pairs are counted when it alone is over the budget.
    """
    n = graph.num_nodes
    if memory_budget is not None and reserve > memory_budget:
        _refuse(graph, None, reserve, memory_budget)
    adjacency, needed = _needed_structure(graph)
    need = 16 * int(needed.nnz)
    if memory_budget is not None and need + reserve > memory_budget:
        _refuse(graph, int(needed.nnz), reserve, memory_budget)
    device = graph.length.device
    if _by_levels and bool((graph.src < graph.dst).all()) and bool((graph.length > 0).all()):
        from ._channel_distances import needed_pair_distances  # min-plus, level by level
        # The pattern's rows and columns only: its float32 data (4 bytes a pair) is freed.
        pattern = _Pattern(needed.indptr, needed.indices)
        del needed
        return ChannelDistances(*needed_pair_distances(adjacency, pattern, block=block,
                                                       device=device), n)
    sources = np.nonzero(np.diff(needed.indptr))[0]
    # Per source, the largest needed target (indices are sorted within rows).
    last = needed.indices[needed.indptr[sources + 1] - 1]
    if not bool((graph.src < graph.dst).all()):  # not in topological order: no windows
        last = np.full_like(last, n - 1)
        sources_first = np.zeros_like(sources)
    else:
        sources_first = sources
    keys, values = [], []
    p = 0
    while p < sources.size:
        first, top, q = sources_first[p], last[p], p + 1
        while q < sources.size and (q + 1 - p) * (max(top, last[q]) - first + 1) <= block:
            top = max(top, last[q])
            q += 1
        chunk = sources[p:q]
        window = adjacency[first:top + 1, first:top + 1]
        dist = scipy.sparse.csgraph.dijkstra(window, directed=True, indices=chunk - first)
        rows = needed[chunk]
        local = np.repeat(np.arange(chunk.size), np.diff(rows.indptr))
        keys.append(chunk[local].astype(np.int64) * n + rows.indices.astype(np.int64))
        values.append(dist[local, rows.indices - first])
        p = q
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    value = np.concatenate(values) if values else np.zeros(0)
    return ChannelDistances(torch.from_numpy(key).to(device), torch.from_numpy(value).to(device),
                            n)


class _Pattern:
    """A csr pattern without its data: ``indptr``, ``indices`` (sorted within rows), ``nnz``."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray) -> None:
        self.indptr, self.indices = indptr, indices
        self.nnz = int(indptr[-1])


def _refuse(graph: ChannelGraph, pairs: int | None, reserve: int, memory_budget: int) -> None:
    """The ``ValueError`` of a channel graph over ``memory_budget``: what takes how much, and
    what would fit."""
    gib = 2**30
    parts, need = [], reserve
    if pairs is not None:
        parts.append(f"the distances of {pairs} node pairs the measures read "
                     f"({16 * pairs / gib:.2f} GiB)")
        need += 16 * pairs
    if reserve:
        parts.append(f"the edge problems' index tables and one layer's measures "
                     f"({reserve / gib:.2f} GiB)")
    raise ValueError(
        f"the channel graph has {graph.num_nodes} nodes and {graph.src.numel()} edges; "
        f"{' and '.join(parts)} need {'at least ' if pairs is None else ''}"
        f"{need / gib:.2f} GiB, over memory_budget={memory_budget / gib:.2f} GiB. Fewer "
        "calibration images, a smaller input or a tolerance would not help: the nodes are "
        "channels and the edges the weights' channel pairs, fixed by the model's widths. "
        f"Pass memory_budget={need} (bytes) or more if the machine has the memory (the "
        "engine's temporaries come on top), or score a narrower model."
    )


class ChannelProblems:
    """The channel graph's side of the scoring loop (:class:`~curvprune.graphs.base.EdgeGraph`):
    one group per layer (its layer edges; merge edges are no weight), each edge its own search
    slot; activities are rows of :attr:`ChannelGraph.activity` (one example each).

    A layer's edge problem reads the measures of the layer's sources ``S`` (supported on their
    in-neighbours ``K``) and targets ``T`` (on their out-neighbours ``M``), and distances
    ``D(k, t)``, ``D(s, m)`` and ``D(k, m)`` only. So each layer keeps these three as dense
    blocks ``[K, T]``, ``[S, M]`` and ``[K, M]``, looked up once here from ``distances`` (the
    same numbers, read with dense gathers afterwards, not searched per lookup), and its
    measures are padded tables over ``S`` and ``T`` whose widths are the largest degrees
    among them, with every node numbered by its rank in its set: one problem's memory is
    that of one layer, not of the model (a full-width ``resnet50``: 42,667 channels, in-degrees
    up to 2,048; its blocks hold 81M entries, fewer than the 87M needed pairs). Pairs of a
    block that no edge of the layer reads (a depthwise layer's ``k`` and ``m`` of different
    channels) hold ``+inf`` with :class:`ChannelDistances` and are never read where a result
    depends on them. ``distances`` is the dense table of :func:`channel_distances` or the
    needed pairs of :func:`needed_distances`; it is not kept. ``edges``: a bool mask over all
    edges; only those layer edges are scored. ``sets``: the layer sets of ``graph`` and
    ``edges`` if they were already built (by the memory check), else built here.
    """

    def __init__(self, graph: ChannelGraph, distances: torch.Tensor | ChannelDistances,
                 edges: torch.Tensor | None = None, *, sets: _LayerSets | None = None) -> None:
        self.graph = graph
        sets = _LayerSets(graph, edges) if sets is None else sets
        self.sets = sets
        self.scored, self.offsets, self.layers = sets.scored, sets.offsets, sets.layers
        self.length = distances[graph.src[self.scored], graph.dst[self.scored]]
        self.blocks = [Distances(distances[sets.near[g][:, None], sets.targets[g][None, :]],
                                 distances[sets.sources[g][:, None], sets.far[g][None, :]],
                                 distances[sets.near[g][:, None], sets.far[g][None, :]])
                       for g in range(len(self.layers))]

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    def slots(self, group: int) -> tuple[torch.Tensor, int]:
        """Each scored edge is its own slot (a weight element belongs to several edges: the
        minima are scattered to the weights afterwards)."""
        size = self.offsets[group + 1] - self.offsets[group]
        return torch.arange(size, device=self.scored.device), size

    def edge_problem(self, group: int, activity: torch.Tensor, cut_tol: float) -> EdgeProblem:
        """The problems of the scored edges of layer ``group`` on one example (``activity``:
        ``[num_nodes]``), every node numbered by its rank in its set of the layer."""
        graph, sets = self.graph, self.sets
        sources, targets = sets.sources[group], sets.targets[group]
        src, dst = sets.src[group], sets.dst[group]
        part = slice(self.offsets[group], self.offsets[group + 1])
        dead_src = (~graph.inputs[sources]) & (activity[sources] == 0)
        dead_dst = (~graph.outputs[targets]) & (activity[targets] == 0)
        dead = dead_src[src] | dead_dst[dst]
        measures = []
        for lists, nodes, others, support in ((sets.in_lists, sources, graph.src,
                                               sets.near[group]),
                                              (sets.out_lists, targets, graph.dst,
                                               sets.far[group])):
            table, slot, edge = lists.table(nodes, others)
            table = torch.where(table >= 0, torch.searchsorted(support, table), -1)
            measures.append(node_measures(table, activity[support], graph.length[edge],
                                          slot=slot))
        mu, nu = measures
        mu.has &= ~graph.inputs[sources]  # an input node's measure is its point mass
        nu.has &= ~graph.outputs[targets]  # so is an output node's
        # Every path k -> i -> j -> m is at most reach + D(i, j) + reach long (edge lengths
        # bound shortest paths), so the cut of negligible masses is bounded as in the engine.
        return EdgeProblem.build(src, dst, self.length[part], dead, mu, nu, self.blocks[group],
                                 torch.arange(src.numel(), device=src.device), cut_tol)

    def subsets(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Per group, the indices of its edges where ``mask`` (a bool over :attr:`scored`)
        holds: the ``subsets`` of the scoring loop."""
        return [torch.nonzero(mask[a:b]).squeeze(1)
                for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def node_means(self, weighted: bool = False) -> NodeMeans:
        """Each channel's curvature as a mean over its layer edges (the search slots), for a
        tolerance on channels (:class:`~curvprune.transport.NodeMeans`): every edge counts
        once (``reduction="mean"`` of :meth:`CurvatureResult.node_kappa
        <curvprune.result.CurvatureResult.node_kappa>`) or by its weight norm ``1 / d(e)``
        (``weighted``)."""
        graph = self.graph
        layer = graph.module >= 0
        coeff = graph.mean_weights(weighted)
        total = torch.zeros(graph.num_nodes, dtype=torch.float64, device=graph.src.device)
        total.index_add_(0, graph.src[layer], coeff[layer])
        total.index_add_(0, graph.dst[layer], coeff[layer])
        parts = [self.scored[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        return NodeMeans(ends=[torch.stack([graph.src[e], graph.dst[e]]) for e in parts],
                         weight=[coeff[e] for e in parts], total=total)

    def on_edges(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Per-group, per-slot ``values`` laid out over all edges of the graph (``+inf`` on the
        others)."""
        dtype = values[0].dtype if values else torch.float64
        out = torch.full((self.graph.src.numel(),), math.inf, dtype=dtype,
                         device=self.scored.device)
        if values:
            out[self.scored] = torch.cat(values)
        return out


class _NeighbourLists:
    """The edges of a graph grouped by one end (``keys``: the edges' targets for in-neighbour
    lists, their sources for out-neighbour lists), each node's in edge order: compressed rows,
    from which the padded table of any node set is gathered."""

    def __init__(self, keys: torch.Tensor, n: int) -> None:
        self.order = torch.argsort(keys, stable=True)
        self.degree = torch.bincount(keys, minlength=n)
        self.start = torch.cumsum(self.degree, 0) - self.degree

    def table(self, nodes: torch.Tensor, others: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(table, slot, edge)`` of ``nodes``: ``table[r, t]`` the other end (from
        ``others``) of the ``t``-th edge of ``nodes[r]`` (``-1`` pads), bitwise the row of
        :func:`~curvprune.transport.padded_neighbours` over all nodes, cut to the widest of
        ``nodes``; ``slot`` where each of those edges sits in the flattened table and ``edge``
        its index in the graph (:func:`~curvprune.transport.node_measures`' ``slot`` and
        lengths)."""
        degree = self.degree[nodes]
        width = int(degree.max()) if nodes.numel() else 0
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), degree)
        first = torch.cumsum(degree, 0) - degree
        position = torch.arange(rows.numel(), device=nodes.device) - first[rows]
        edge = self.order[self.start[nodes][rows] + position]
        slot = rows * width + position
        table = torch.full((nodes.numel(), width), -1, dtype=others.dtype, device=others.device)
        table.view(-1)[slot] = others[edge]
        return table, slot, edge
