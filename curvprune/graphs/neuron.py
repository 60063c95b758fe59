"""The neural graph of a feed-forward chain, at neuron granularity.

Nodes are neurons: node layer 0 is the model input, node layer ``l`` (``1 <= l < n``) is the input
of the ``l+1``-th parametrised layer (so after its nonlinearity and normalisation), and node layer
``n`` is the model output. Every parametrised layer ``l`` (a :class:`~torch.nn.Linear` or
:class:`~torch.nn.Conv2d`) contributes one directed edge ``u -> v`` per structural connection
between node layers ``l-1`` and ``l``; a conv weight ``W[oc, ic, kh, kw]`` is shared by one edge
per output position it touches. The length of an edge is ``1 / |w|``; a zero weight is no edge.

The chain is read from the model's code with :mod:`torch.fx`, not guessed from module order, so a
residual add, a pooling call or any other operation that is not elementwise is refused with an
error that names it.

Distances between node layers do not depend on the example: the 2- and 3-hop tables are
min-plus products computed once per call (:func:`min_plus`), windowed for conv layers
(:class:`HopTable`). The edge problems of one example (:func:`layer_problem`) are handed to the
kernels of :mod:`curvprune.transport`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..transport import (
    CERTIFY_TOL,
    Distances,
    EngineOptions,
    EngineStats,
    bound_edges,
    cut_measures,
    node_measures,
    score_edges,
)
from ..transport.measures import _Measure, _padded_slots
from .base import EdgeProblem

#: Default of :attr:`EngineOptions.window_fraction <curvprune.transport.EngineOptions>`: a hop
#: table is windowed when its window covers at most this fraction of the target layer's
#: positions (else it is stored dense; the lookups are cheaper and the memory close).
WINDOW_FRACTION = EngineOptions.window_fraction

__all__ = ["ChainLayer", "trace_chain", "layer_edges", "conv_padding", "chain_structure",
           "StructuralEdges", "NeuronGraph", "HopTable", "hop_table_bytes", "length_matrix",
           "min_plus", "layer_problem", "bound_example", "score_example"]

# Modules allowed between parametrised layers: each maps a node to itself (or only reshapes).
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Hardtanh,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    nn.Flatten,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardtanh, F.dropout, torch.relu,
    torch.tanh, torch.sigmoid, torch.flatten, torch.nn.functional.tanh,
    torch.nn.functional.sigmoid,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "flatten", "view", "reshape", "contiguous"}
# Methods that read a tensor without being part of the chain (their result is not a tensor).
_SIDE_METHODS = {"size", "dim"}
_SIDE_FUNCTIONS = {operator.getitem, getattr}

_CHANNEL_HINT = (
    "Neuron granularity (the paper's graph) supports chains of Conv2d and Linear layers with "
    "elementwise modules between them; for models with pooling, residual branches or attention "
    "use the channel graph: granularity='channel' (or 'auto', which picks it)."
)


@dataclass(frozen=True)
class ChainLayer:
    """One parametrised layer (``Linear``/``Conv2d``) of the chain, in call order: its
    qualified weight name and module (formerly ``ParamLayer``)."""

    name: str
    module: nn.Module


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function '{getattr(node.target, '__name__', node.target)}'"
    return f"{node.op} '{node.target}'"


def trace_chain(model: nn.Module) -> list[ChainLayer]:
    """Return the parametrised layers of ``model`` in order, checking that they form a chain.

    Raises:
        ValueError: if the model cannot be traced, is not a single chain, uses an operation that
            is not elementwise between its layers, or has no Linear/Conv2d layer.
    """
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        # A bare layer is a one-layer chain (fx would trace its functional body instead).
        if isinstance(model, nn.Conv2d) and model.padding_mode != "zeros":
            raise ValueError(
                f"the Conv2d uses padding_mode='{model.padding_mode}'; only zero padding is "
                "supported at neuron granularity."
            )
        return [ChainLayer("weight", model)]
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types; all mean the same to the user
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}). {_CHANNEL_HINT}"
        ) from exc
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            f"the model's forward takes {len(placeholders)} inputs; neuron granularity needs "
            "exactly one input tensor."
        )
    current = placeholders[0]
    layers: list[ChainLayer] = []
    seen_weights: set[str] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            if node.op == "get_attr":
                raise ValueError(
                    f"the model reads attribute '{node.target}' in forward. {_CHANNEL_HINT}"
                )
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise ValueError(
                    f"the model's output is not the end of a single chain. {_CHANNEL_HINT}"
                )
            break
        tensor_args = [a for a in node.all_input_nodes]
        is_side = (node.op == "call_method" and node.target in _SIDE_METHODS) or (
            node.op == "call_function" and node.target in _SIDE_FUNCTIONS
        )
        if is_side:
            continue
        if current not in tensor_args:
            raise ValueError(
                f"{_describe(node, model)} does not take the previous layer's output: the "
                f"model is not a single chain. {_CHANNEL_HINT}"
            )
        others = [a for a in tensor_args if a is not current]
        if any(not _is_side_node(a) for a in others):
            raise ValueError(
                f"{_describe(node, model)} combines several tensors (a residual or "
                f"concatenation). {_CHANNEL_HINT}"
            )
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                name = f"{node.target}.weight"
                if name in seen_weights:
                    raise ValueError(
                        f"module '{node.target}' is applied twice; shared layers are not a "
                        f"chain. {_CHANNEL_HINT}"
                    )
                if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                    raise ValueError(
                        f"module '{node.target}' uses padding_mode='{module.padding_mode}'; "
                        "only zero padding is supported at neuron granularity."
                    )
                seen_weights.add(name)
                layers.append(ChainLayer(name, module))
            elif not isinstance(module, _ELEMENTWISE_MODULES):
                raise ValueError(
                    f"{_describe(node, model)} is not supported at neuron granularity. "
                    f"{_CHANNEL_HINT}"
                )
        elif node.op == "call_function":
            if node.target not in _ELEMENTWISE_FUNCTIONS:
                raise ValueError(
                    f"{_describe(node, model)} is not supported at neuron granularity. "
                    f"{_CHANNEL_HINT}"
                )
        elif node.op == "call_method":
            if node.target not in _ELEMENTWISE_METHODS:
                raise ValueError(
                    f"method '.{node.target}()' is not supported at neuron granularity. "
                    f"{_CHANNEL_HINT}"
                )
        current = node
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear or Conv2d layer: nothing to score."
        )
    return layers


def _is_side_node(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _SIDE_METHODS) or (
        node.op == "call_function" and node.target in _SIDE_FUNCTIONS
    )


@dataclass(frozen=True)
class StructuralEdges:
    """The structural edges of one parametrised layer between node layers ``l-1`` and ``l``:
    one per connection the layer's shape makes, zero weights included (formerly
    ``LayerEdges``; :class:`NeuronGraph` keeps the nonzero ones, with their lengths).

    Attributes:
        src: node index in layer ``l-1`` of each edge (int64, ``[E]``).
        dst: node index in layer ``l`` of each edge (int64, ``[E]``).
        widx: flat index into the weight of each edge (int64, ``[E]``).
        n_in: number of nodes in layer ``l-1``.
        n_out: number of nodes in layer ``l``.
        in_shape: per-example shape of node layer ``l-1`` (``(C, H, W)`` for a conv input,
            ``(F,)`` for a linear one; ``None``: unknown, taken as ``(n_in,)``).
        out_shape: per-example shape of node layer ``l`` (likewise).
    """

    src: torch.Tensor
    dst: torch.Tensor
    widx: torch.Tensor
    n_in: int
    n_out: int
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None


def conv_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """Zero padding of a Conv2d as ``((top, bottom), (left, right))``.

    Integer padding is symmetric; ``'valid'`` is none; for ``'same'`` PyTorch pads a total of
    ``dilation * (kernel - 1)`` per axis, the smaller half first.
    """
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0), (0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in conv.padding)


def layer_edges(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> StructuralEdges:
    """Enumerate the structural edges of ``module`` given its per-example input/output shapes.

    Node indices follow PyTorch's row-major flattening of ``(C, H, W)`` (conv) or ``(F,)``
    (linear), so they match ``torch.flatten(x, 1)`` of the activations.
    """
    if isinstance(module, nn.Linear):
        n_in, n_out = module.in_features, module.out_features
        dst = torch.arange(n_out).repeat_interleave(n_in)
        src = torch.arange(n_in).repeat(n_out)
        return StructuralEdges(src, dst, dst * n_in + src, n_in, n_out, (n_in,), (n_out,))
    assert isinstance(module, nn.Conv2d)
    c_in, h_in, w_in = in_shape
    c_out, h_out, w_out = out_shape
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    (ph, _), (pw, _) = conv_padding(module)
    cg_in = c_in // module.groups
    cg_out = c_out // module.groups
    oc = torch.arange(c_out).view(-1, 1, 1, 1, 1, 1)
    icg = torch.arange(cg_in).view(1, -1, 1, 1, 1, 1)
    ky = torch.arange(kh).view(1, 1, -1, 1, 1, 1)
    kx = torch.arange(kw).view(1, 1, 1, -1, 1, 1)
    yo = torch.arange(h_out).view(1, 1, 1, 1, -1, 1)
    xo = torch.arange(w_out).view(1, 1, 1, 1, 1, -1)
    yi = yo * sh - ph + ky * dh
    xi = xo * sw - pw + kx * dw
    ic = (oc // cg_out) * cg_in + icg
    shape = (c_out, cg_in, kh, kw, h_out, w_out)
    valid = ((yi >= 0) & (yi < h_in) & (xi >= 0) & (xi < w_in)).expand(shape)
    src = (ic * (h_in * w_in) + yi * w_in + xi).expand(shape)[valid]
    dst = (oc * (h_out * w_out) + yo * w_out + xo).expand(shape)[valid]
    widx = (((oc * cg_in + icg) * kh + ky) * kw + kx).expand(shape)[valid]
    return StructuralEdges(src, dst, widx, c_in * h_in * w_in, c_out * h_out * w_out,
                      (c_in, h_in, w_in), (c_out, h_out, w_out))


def chain_structure(model: nn.Module, example: torch.Tensor
                    ) -> tuple[list[ChainLayer], list[StructuralEdges]]:
    """The parametrised layers of a chain model and their structural edges.

    One forward pass of ``example[:1]`` (in scoring mode: eval, no autograd, the model left as
    it was) gives every layer's input and output shapes. Node-layer sizes are
    ``[structures[0].n_in] + [s.n_out for s in structures]``.
    """
    from ..calibration import capture_activations, scoring_mode

    layers = trace_chain(model)
    modules = [layer.module for layer in layers]
    with scoring_mode(model):
        _, in_shapes, out_shapes = capture_activations(model, modules, example[:1])
    return layers, [layer_edges(m, in_shapes[k], out_shapes[k]) for k, m in enumerate(modules)]




def length_matrix(
    src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor, n_src: int, n_dst: int
) -> torch.Tensor:
    """Dense ``[n_src, n_dst]`` matrix of edge lengths, ``inf`` where there is no edge."""
    out = torch.full((n_src, n_dst), float("inf"), dtype=length.dtype, device=length.device)
    out[src, dst] = length
    return out


def _neighbour_table(keys: torch.Tensor, values: torch.Tensor, n: int, n_values: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` grouped by ``keys`` into an ``[n, max_degree]`` int32 table padded with
    ``-1`` (:func:`~curvprune.transport.padded_neighbours`; ``values`` are ids below
    ``n_values``), and each value's slot in the flattened table (int32 ``[E]``). Node ids
    and slots fit 32 bits for any graph whose hop tables fit in memory; a larger one is
    refused here rather than wrapped."""
    slot, width = _padded_slots(keys, n)
    if max(n * width, n_values) >= 2**31:
        raise ValueError(
            f"a node layer of {n} nodes with up to {width} neighbours each (next to a layer "
            f"of {n_values} nodes) is too large for neuron granularity: over 2**31 table "
            "slots or node ids. Use granularity='channel' or a smaller input."
        )
    table = torch.full((n, width), -1, dtype=torch.int32, device=keys.device)
    table.view(-1)[slot] = values.to(torch.int32)
    return table, slot.to(torch.int32)


def min_plus(
    src: torch.Tensor,
    dst: torch.Tensor,
    length: torch.Tensor,
    n_src: int,
    rest: torch.Tensor,
    *,
    max_block: int = 1 << 22,
) -> torch.Tensor:
    """Min-plus product of a sparse first hop with a dense remainder.

    Returns ``D[a, c] = min over edges (a -> b) of length(a, b) + rest[b, c]`` as a dense
    ``[n_src, rest.shape[1]]`` tensor (``inf`` where unreachable).
    """
    n_target = rest.shape[1]
    out = torch.full((n_src, n_target), float("inf"), dtype=rest.dtype, device=rest.device)
    if src.numel() == 0 or n_target == 0:
        return out
    chunk = max(1, max_block // max(n_target, 1))
    for start in range(0, src.numel(), chunk):
        s, d, w = src[start:start + chunk], dst[start:start + chunk], length[start:start + chunk]
        candidate = rest[d] + w[:, None]
        out.scatter_reduce_(0, s[:, None].expand_as(candidate), candidate, reduce="amin")
    return out


@dataclass
class _WeightedEdges:
    """The nonzero edges of one parametrised layer, with their lengths ``1 / |w|``.

    The end nodes are stored as int32 (``ends``: ``[2, E]``, sources then targets; half the
    memory of int64 ids: 0.27 GiB on VGG-9) and read as int64 (:attr:`src`, :attr:`dst`,
    :meth:`part`), so that no index arithmetic downstream can wrap. Ids fit 32 bits: the
    neighbour tables refuse larger layers (:func:`_neighbour_table`) before the graph is
    used."""

    ends: torch.Tensor  # [2, E] int32: node in layer l-1, node in layer l
    widx: torch.Tensor  # [E] flat weight index
    length: torch.Tensor  # [E] float64, 1/|w|

    @property
    def src(self) -> torch.Tensor:
        """``[E]`` int64, each edge's node in layer ``l-1`` (a copy)."""
        return self.ends[0].long()

    @property
    def dst(self) -> torch.Tensor:
        """``[E]`` int64, each edge's node in layer ``l`` (a copy)."""
        return self.ends[1].long()

    def part(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src, dst)`` of the edges ``start:stop`` only, as int64."""
        ends = self.ends[:, start:stop].long()
        return ends[0], ends[1]

    @property
    def num_edges(self) -> int:
        return self.length.numel()


@dataclass
class NeuronGraph:
    """The example-independent part of the neural graph: edges, neighbours and distances.

    Node layers are ``0..n``; ``layers[l-1]`` holds the nonzero edges of parametrised layer
    ``l`` (between node layers ``l-1`` and ``l``). ``in_nbrs[L]`` (``L >= 1``) and
    ``out_nbrs[L]`` (``L < n``) are padded neighbour tables (int32, ``-1`` pads: half the
    memory of int64 node ids; the measures are read from them as int64) and
    ``in_slot``/``out_slot`` say where each edge of the layer sits in them (int32 ``[E]``,
    :func:`~curvprune.transport.measures._padded_slots`), so that each node's reach reads the
    edges' own lengths rather than a padded table of them; ``hop2[L]`` is the ``L -> L+2``
    distance table and ``hop3[L]`` the ``L -> L+3`` one (:class:`HopTable`: windowed for
    conv layers, so a conv node keeps only the targets its kernels can reach; dense
    otherwise). ``num_weights[l-1]`` is the number of elements of layer ``l``'s weight.

    It implements the scoring loop's graph interface
    (:class:`~curvprune.graphs.base.EdgeGraph`): one group per parametrised layer, each edge
    scored into its flat weight index, and :meth:`edge_problem` for one example's activities.
    """

    sizes: list[int]
    layers: list[_WeightedEdges]
    in_nbrs: list[torch.Tensor | None] = field(default_factory=list)
    out_nbrs: list[torch.Tensor | None] = field(default_factory=list)
    in_slot: list[torch.Tensor | None] = field(default_factory=list)
    out_slot: list[torch.Tensor | None] = field(default_factory=list)
    hop2: list[HopTable] = field(default_factory=list)
    hop3: list[HopTable] = field(default_factory=list)
    num_weights: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, structures: list[StructuralEdges], weights: list[torch.Tensor],
              device: torch.device, options: EngineOptions | None = None) -> NeuronGraph:
        """Build from each layer's structural edges and current (flattened) weight values
        (``options``: the hop tables' ``window_fraction`` and ``min_plus_block``)."""
        options = options if options is not None else EngineOptions()
        sizes = [structures[0].n_in] + [s.n_out for s in structures]
        layers = []
        for s, w in zip(structures, weights):
            w = w.to(device=device, dtype=torch.float64)
            widx = s.widx.to(device)
            value = w[widx]
            keep = value != 0
            ends = torch.stack([s.src.to(device)[keep], s.dst.to(device)[keep]])
            layers.append(_WeightedEdges(ends.to(torch.int32), widx[keep],
                                         1.0 / value[keep].abs()))
            del ends
        n = len(layers)
        graph = cls(sizes, layers, num_weights=[w.numel() for w in weights])
        graph.in_nbrs, graph.in_slot = [None], [None]
        graph.out_nbrs, graph.out_slot = [], []
        for L in range(1, n + 1):  # node layer L's in-neighbours, in layer L - 1
            table, slot = _neighbour_table(layers[L - 1].dst, layers[L - 1].src, sizes[L],
                                           sizes[L - 1])
            graph.in_nbrs.append(table)
            graph.in_slot.append(slot)
        for L in range(n):  # node layer L's out-neighbours, in layer L + 1
            table, slot = _neighbour_table(layers[L].src, layers[L].dst, sizes[L], sizes[L + 1])
            graph.out_nbrs.append(table)
            graph.out_slot.append(slot)
        graph.out_nbrs.append(None)
        graph.out_slot.append(None)
        # hop2[L]: L -> L+2 (through param layers L+1 and L+2); hop3[L]: L -> L+3.
        two, three = _hop_layouts(structures, options.window_fraction)
        shapes = _node_shapes(structures)
        block = options.min_plus_block
        # Conv chains from their kernels (same values: graphs/_conv_hops.py); else edge by edge.
        from ._conv_hops import ConvHops

        kernels = ConvHops(structures, layers, shapes)
        for L in range(n - 1):
            fast = kernels.table(L, 2, _on(two[L], device), None)
            if fast is not None:
                graph.hop2.append(HopTable(fast, _on(two[L], device)))
                continue
            one = _layout(_one_hop_box(structures[L + 1], shapes[L + 2]), shapes[L + 2],
                          options.window_fraction)
            rest = HopTable.of_edges(layers[L + 1], sizes[L + 1], one)
            graph.hop2.append(HopTable.compose(layers[L], sizes[L], rest, two[L],
                                               max_block=block))
            del rest
        for L in range(n - 2):
            rest = graph.hop2[L + 1]
            fast = kernels.table(L, 3, _on(three[L], device),
                                 rest.values if rest.layout.full else None)
            graph.hop3.append(HopTable(fast, _on(three[L], device)) if fast is not None else
                              HopTable.compose(layers[L], sizes[L], rest, three[L],
                                               max_block=block))
        return graph

    # The graph interface of the scoring loop (graphs.base.EdgeGraph): one group per layer.

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    def slots(self, group: int) -> tuple[torch.Tensor, int]:
        """Each edge of layer ``group + 1`` is scored into its flat weight index."""
        return self.layers[group].widx, self.num_weights[group]

    def edge_problem(self, group: int, activity: list[torch.Tensor],
                     cut_tol: float) -> EdgeProblem:
        """The problems of every (nonzero) edge of parametrised layer ``group + 1`` on one
        example (``activity``: normalised activities of node layers ``0..n``), measures cut
        within ``cut_tol / 2`` per edge."""
        layer = self.layers[group]
        dead, mu, nu, tables = _layer_measures(self, activity, group + 1)
        return EdgeProblem.build(layer.src, layer.dst, layer.length, dead, mu, nu, tables,
                                 layer.widx, cut_tol)


def hop_table_bytes(layers: list[int] | list[StructuralEdges],
                    window_fraction: float = WINDOW_FRACTION) -> int:
    """Bytes of the float64 hop tables ``L -> L+2`` and ``L -> L+3`` that
    :meth:`NeuronGraph.build` keeps: from the layers' structural edges (windowed conv tables,
    see :class:`HopTable`), or, given node-layer sizes only, of dense tables."""
    if layers and isinstance(layers[0], StructuralEdges):
        sizes = [layers[0].n_in] + [s.n_out for s in layers]
        two, three = _hop_layouts(layers, window_fraction)
        entries = sum(sizes[L] * t.width for L, t in enumerate(two))
        entries += sum(sizes[L] * t.width for L, t in enumerate(three))
        return 8 * entries
    sizes = layers
    entries = sum(sizes[L] * sizes[L + 2] for L in range(len(sizes) - 2))
    entries += sum(sizes[L] * sizes[L + 3] for L in range(len(sizes) - 3))
    return 8 * entries




def _node_shapes(structures: list[StructuralEdges]) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of every node layer (a flat layer of ``F`` nodes is ``(F, 1, 1)``)."""
    shapes = [structures[0].in_shape] + [s.out_shape for s in structures]
    sizes = [structures[0].n_in] + [s.n_out for s in structures]
    out = []
    for shape, size in zip(shapes, sizes):
        out.append(tuple(shape) if shape is not None and len(shape) == 3
                   and math.prod(shape) == size else (size, 1, 1))
    return out


_EMPTY = 1 << 40  # "no reachable target" sentinel of the boxes' lower ends


@dataclass
class _Box:
    """Per source node, the inclusive bounding box ``[lo, hi]`` (rows ``y``, columns ``x``) of
    the target positions it reaches structurally; ``lo = _EMPTY`` where it reaches none."""

    lo_y: torch.Tensor
    hi_y: torch.Tensor
    lo_x: torch.Tensor
    hi_x: torch.Tensor


def _one_hop_box(s: StructuralEdges, target: tuple[int, int, int]) -> _Box:
    _, h, w = target
    y, x = (s.dst // w) % h, s.dst % w
    lo = torch.full((s.n_in,), _EMPTY, dtype=torch.long)
    hi = torch.full((s.n_in,), -1, dtype=torch.long)
    return _Box(lo.scatter_reduce(0, s.src, y, reduce="amin"),
                hi.scatter_reduce(0, s.src, y, reduce="amax"),
                lo.scatter_reduce(0, s.src, x, reduce="amin"),
                hi.scatter_reduce(0, s.src, x, reduce="amax"))


def _back_box(s: StructuralEdges, box: _Box) -> _Box:
    """The box of ``s``'s sources: the union of the boxes of the nodes they reach."""
    lo = torch.full((s.n_in,), _EMPTY, dtype=torch.long)
    hi = torch.full((s.n_in,), -1, dtype=torch.long)
    return _Box(lo.scatter_reduce(0, s.src, box.lo_y[s.dst], reduce="amin"),
                hi.scatter_reduce(0, s.src, box.hi_y[s.dst], reduce="amax"),
                lo.scatter_reduce(0, s.src, box.lo_x[s.dst], reduce="amin"),
                hi.scatter_reduce(0, s.src, box.hi_x[s.dst], reduce="amax"))


@dataclass
class _Layout:
    """Where a hop table's values live: ``window = (Wy, Wx)`` positions of every channel of the
    target layer (shape ``target``), starting at ``(y0[a], x0[a])`` for source node ``a``;
    ``y0``/``x0`` are ``None`` for a dense table (the window is the whole layer)."""

    target: tuple[int, int, int]
    window: tuple[int, int]
    y0: torch.Tensor | None
    x0: torch.Tensor | None

    @property
    def full(self) -> bool:
        return self.y0 is None

    @property
    def width(self) -> int:
        return self.target[0] * self.window[0] * self.window[1]


def _layout(box: _Box, target: tuple[int, int, int],
            window_fraction: float = WINDOW_FRACTION) -> _Layout:
    _, h, w = target
    reach = box.lo_y < _EMPTY
    wy = int((box.hi_y - box.lo_y + 1)[reach].max()) if reach.any() else 1
    wx = int((box.hi_x - box.lo_x + 1)[reach].max()) if reach.any() else 1
    if wy * wx > window_fraction * h * w:
        return _Layout(target, (h, w), None, None)
    return _Layout(target, (wy, wx), torch.where(reach, box.lo_y, 0),
                   torch.where(reach, box.lo_x, 0))


def _hop_layouts(structures: list[StructuralEdges], window_fraction: float = WINDOW_FRACTION
                 ) -> tuple[list[_Layout], list[_Layout]]:
    """Layouts of the ``L -> L+2`` and ``L -> L+3`` tables, from the structural edges (so that
    zero weights change values, not sizes)."""
    shapes = _node_shapes(structures)
    n = len(structures)
    one = [_one_hop_box(structures[s], shapes[s + 1]) for s in range(n)]
    two = [_back_box(structures[L], one[L + 1]) for L in range(n - 1)]
    three = [_back_box(structures[L], two[L + 1]) for L in range(n - 2)]
    return ([_layout(two[L], shapes[L + 2], window_fraction) for L in range(n - 1)],
            [_layout(three[L], shapes[L + 3], window_fraction) for L in range(n - 2)])


class HopTable:
    r"""Shortest-path distances from one node layer to a later one, stored dense or windowed.

    ``table[rows, cols]`` (index tensors that broadcast together) is the distance from node
    ``rows`` to node ``cols``, ``+inf`` where there is no path, like indexing the dense
    ``[n_src, n_tgt]`` table. A conv node at ``(c, y, x)`` reaches only a spatial window of a
    layer two or three steps on (kernel extent, stride, dilation, padding), so a **windowed**
    table keeps, per source node ``a``, the ``C x Wy x Wx`` block of every target channel at
    rows ``y0[a] .. y0[a] + Wy - 1`` and columns ``x0[a] .. x0[a] + Wx - 1`` (the bounding box
    of what ``a`` reaches through the structural edges; every pair outside it is
    unreachable); a **dense** table (``values`` ``[n_src, n_tgt]``) is kept when the window
    would cover more than :data:`WINDOW_FRACTION` of the layer, and for flat (linear) targets.
    """

    def __init__(self, values: torch.Tensor, layout: _Layout):
        self.values = values  # [n_src, C * Wy * Wx]
        self.layout = layout
        if not layout.full:
            # A target column at (c, y, x) read from a source whose window starts at (y0, x0)
            # lies at (dy, dx) = (y - y0, x - x0) in it, and both ids fit one position each:
            # with span = 2w - 1, (y * span + x) - (y0 * span + x0) determines (dy, dx)
            # (|dx| < w), shifted here to index a table over every (dy, dx) that gives the
            # slot dy * Wx + dx in the window, or -1 outside it. The column adds its channel's
            # c * Wy * Wx. So a read is one subtraction and one lookup per value, no integer
            # division and no range tests.
            c, h, w = layout.target
            wy, wx = layout.window
            device = layout.y0.device
            span = 2 * w - 1
            # int32 (half the memory traffic of the [edges, slots, slots] reads; a window's
            # slots and a layer's positions are far below 2**31).
            col = torch.arange(c * h * w, device=device)
            y, x = (col // w) % h, col % w
            self._col_pos = (y * span + x + (h - 1) * span + (w - 1)).int()
            self._col_channel = ((col // (h * w)) * (wy * wx)).int()
            self._row_pos = (layout.y0 * span + layout.x0).int()
            dy = torch.arange(1 - h, h, device=device)[:, None]
            dx = torch.arange(1 - w, w, device=device)[None, :]
            in_window = (dy >= 0) & (dy < wy) & (dx >= 0) & (dx < wx)
            self._window_slot = torch.where(in_window, dy * wx + dx, -1).int().reshape(-1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], math.prod(self.layout.target))

    def numel(self) -> int:
        return self.values.numel()

    def element_size(self) -> int:
        return self.values.element_size()

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, cols = key
        if self.layout.full and max(rows.numel(), cols.numel()) < _FEW_VALUES:
            return self.values[rows, cols]  # fewer operations for a few values
        shape = None if self.layout.full or rows.numel() * cols.numel() <= _READ_BLOCK else \
            torch.broadcast_shapes(rows.shape, cols.shape)
        if shape is not None and len(shape) and shape[0] > 1 and math.prod(shape) > _READ_BLOCK:
            # A windowed read makes several int64 temporaries per value: large ones go by
            # pieces along the first dimension, so those stay within _READ_BLOCK values each.
            rows, cols = rows.expand(shape), cols.expand(shape)
            out = torch.empty(shape, dtype=self.values.dtype, device=self.values.device)
            step = max(1, _READ_BLOCK // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], step):
                out[start:start + step] = self[rows[start:start + step],
                                               cols[start:start + step]]
            return out
        n_src, n_tgt = self.shape
        # Negative ids count from the end, as in tensor indexing (padding reads, masked later).
        rows, cols = rows.long(), cols.long()
        rows = torch.where(rows < 0, rows + n_src, rows)
        cols = torch.where(cols < 0, cols + n_tgt, cols)
        values = self.values.reshape(-1)
        if self.layout.full:
            return _take(values, rows * n_tgt + cols)
        slot, inside = self._slot(rows, cols)
        return _take(values, rows * self.layout.width + slot).masked_fill_(~inside, math.inf)

    def _slot(self, rows: torch.Tensor, cols: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Column of ``values`` holding target ``cols`` for source ``rows`` (0 where the target
        lies outside the source's window), and whether it lies inside; ids not negative,
        shapes that broadcast together. Integer divisions are done once per target column
        in ``__init__``: here, only lookups, one subtraction and one addition."""
        if self.layout.full:
            return cols, torch.ones_like(cols, dtype=torch.bool)
        spatial = _take(self._window_slot, _take(self._col_pos, cols) - _take(self._row_pos, rows))
        inside = spatial >= 0
        return torch.where(inside, spatial + _take(self._col_channel, cols), 0).long(), inside

    @property
    def dense_values(self) -> torch.Tensor | None:
        """The ``[n_src, n_tgt]`` values when the table is stored dense, else ``None`` (the
        transport kernels then read it by :meth:`__getitem__`)."""
        return self.values if self.layout.full else None

    def dense(self) -> torch.Tensor:
        """The ``[n_src, n_tgt]`` table (for tests and small layers)."""
        n_src, n_tgt = self.shape
        rows = torch.arange(n_src, device=self.values.device)[:, None]
        return self[rows, torch.arange(n_tgt, device=self.values.device)[None, :]]

    @classmethod
    def of_edges(cls, layer: _WeightedEdges, n_src: int, layout: _Layout) -> HopTable:
        """The one-hop table of ``layer``'s edges (their lengths; ``inf`` elsewhere)."""
        if layout.full:
            return cls(length_matrix(layer.src, layer.dst, layer.length, n_src,
                                     math.prod(layout.target)), layout)
        layout = _on(layout, layer.length.device)
        values = torch.full((n_src, layout.width), math.inf, dtype=layer.length.dtype,
                            device=layer.length.device)
        src, dst = layer.src, layer.dst
        slot, _ = cls(values, layout)._slot(src, dst)
        values[src, slot] = layer.length
        return cls(values, layout)

    @classmethod
    def compose(cls, first: _WeightedEdges, n_src: int, rest: HopTable, layout: _Layout, *,
                max_block: int = 1 << 22) -> HopTable:
        r"""Min-plus product ``D[a, c] = min over edges a -> b of length(a, b) + rest[b, c]``
        over the sparse first hop, into ``layout`` (no dense intermediate: each edge adds its
        target's row of ``rest``, window to window; chunks of ``max_block`` entries)."""
        if layout.full and rest.layout.full:
            return cls(min_plus(first.src, first.dst, first.length, n_src, rest.values,
                                max_block=max_block),
                       layout)
        device = rest.values.device
        layout = _on(layout, device)
        values = torch.full((n_src, layout.width), math.inf, dtype=rest.values.dtype,
                            device=device)
        out = cls(values, layout)
        if first.num_edges == 0:
            return out
        _, h, w = rest.layout.target
        ry, rx = rest.layout.window
        cell = torch.arange(rest.layout.width, device=device)
        channel, cy, cx = cell // (ry * rx), (cell // rx) % ry, cell % rx
        chunk = max(1, max_block // max(1, rest.layout.width))
        flat = values.view(-1)
        for start in range(0, first.num_edges, chunk):
            a, b = first.part(start, start + chunk)
            candidate = rest.values[b] + first.length[start:start + chunk, None]
            if rest.layout.full:
                target = cell[None, :]
            else:
                y = (cy[None, :] + rest.layout.y0[b, None]).clamp(max=h - 1)
                x = (cx[None, :] + rest.layout.x0[b, None]).clamp(max=w - 1)
                target = (channel[None, :] * h + y) * w + x
            slot, inside = out._slot(a[:, None], target)
            candidate.masked_fill_(~inside, math.inf)
            flat.scatter_reduce_(0, (a[:, None] * layout.width + slot).view(-1),
                                 candidate.view(-1), reduce="amin")
        return out


#: A dense table is read by advanced indexing when both index tensors have fewer entries than
#: this (fewer operations for a few values), else by ``_take``; the values are the same.
_FEW_VALUES = 1 << 14

#: Values per piece of a large windowed read (:meth:`HopTable.__getitem__`): such a read holds
#: about six int64 temporaries per value, so a kernel chunk of 4M values made ~150 MiB of them
#: at once, beside the other bounding job's (VGG-9's peak). A dense table's read makes fewer,
#: and is not split (the pieces' extra copy cost LeNet-5 time).
_READ_BLOCK = 1 << 20


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` of a 1-D ``values``, by ``index_select`` on the flattened index
    (several times faster than advanced indexing on the CPU; the same values)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)


def _on(layout: _Layout, device: torch.device) -> _Layout:
    if layout.full or layout.y0.device == device:
        return layout
    return _Layout(layout.target, layout.window, layout.y0.to(device), layout.x0.to(device))



def _layer_measures(graph: NeuronGraph, acts: list[torch.Tensor], l: int
                    ) -> tuple[torch.Tensor, _Measure | None, _Measure | None, Distances]:
    """Dead-edge mask, uncut measures and distance tables of parametrised layer ``l``."""
    n = len(graph.layers)
    layer = graph.layers[l - 1]
    dead = torch.zeros_like(layer.length, dtype=torch.bool)
    if l > 1:
        dead |= acts[l - 1][layer.ends[0]] == 0  # int32 ids index as well as int64
    if l < n:
        dead |= acts[l][layer.ends[1]] == 0
    # mu_i over in-neighbours of i (layer l-2); nu_j over out-neighbours of j (layer l+1).
    # (The in-table of node layer l-1 holds parametrised layer l-1's edges, the out-table of
    # node layer l those of layer l+1: each edge's slot and length come from its own layer.)
    mu = node_measures(graph.in_nbrs[l - 1], acts[l - 2], graph.layers[l - 2].length,
                       slot=graph.in_slot[l - 1]) if l > 1 else None
    nu = node_measures(graph.out_nbrs[l], acts[l + 1], graph.layers[l].length,
                       slot=graph.out_slot[l]) if l < n else None
    tables = Distances(d_kj=graph.hop2[l - 2] if l > 1 else None,
                       d_im=graph.hop2[l - 1] if l < n else None,
                       d_km=graph.hop3[l - 2] if 1 < l < n else None)
    return dead, mu, nu, tables


def layer_problem(graph: NeuronGraph, acts: list[torch.Tensor], l: int,
                  certify_tol: float = CERTIFY_TOL
                  ) -> tuple[torch.Tensor, _Measure | None, _Measure | None, Distances]:
    """Dead-edge mask, measures (cut by :func:`cut_measures` within ``certify_tol / 2``) and
    distance tables of parametrised layer ``l`` (1-based) on one example (``acts``: normalised
    activities of node layers ``0..n``); :meth:`NeuronGraph.edge_problem` packs the same into
    an :class:`~curvprune.graphs.base.EdgeProblem`."""
    layer = graph.layers[l - 1]
    dead, mu, nu, tables = _layer_measures(graph, acts, l)
    mu, nu = cut_measures(mu, nu, layer.src, layer.dst, layer.length, certify_tol)
    return dead, mu, nu, tables


def bound_example(
    graph: NeuronGraph,
    acts: list[torch.Tensor],
    alpha: float,
    *,
    certify_tol: float = CERTIFY_TOL,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    settle: bool = True,
    cut_tol: float | None = None,
    edges: list[torch.Tensor | None] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Bounds ``(lo, hi, dead)`` on the edge curvatures of one example, per parametrised layer
    (see :func:`bound_edges`); no transport problem of a single edge is solved.

    The measures are cut with ``cut_tol`` (default ``certify_tol``; see :func:`layer_problem`).
    With ``settle=False`` the bounds are widened by :func:`~curvprune.transport.cut_error` and
    bracket the curvature of the uncut measures (interval mode, as
    :meth:`EdgeProblem.bounds <curvprune.graphs.base.EdgeProblem.bounds>`). ``edges``: per
    layer, the indices of the edges to bound (``None``: all of them); the outputs then follow
    that order.
    """
    out = []
    cut_tol = certify_tol if cut_tol is None else cut_tol
    stats = stats if stats is not None else EngineStats()
    for g in range(graph.num_groups):
        sub = None if edges is None else edges[g]
        if sub is not None and sub.numel() == 0:
            layer = graph.layers[g]
            out.append((layer.length[:0], layer.length[:0].clone(), layer.length[:0] < 0))
            continue
        problem = graph.edge_problem(g, acts, cut_tol)
        if sub is not None:
            problem = problem.take(sub)
        if settle:
            p = problem
            lo, hi = bound_edges(p.src, p.dst, p.length, p.dead, p.mu, p.nu, p.distances, alpha,
                                 certify_tol=certify_tol, block=block, stats=stats)
        else:
            lo, hi = problem.bounds(alpha, certify_tol, stats=stats,
                                    options=EngineOptions(block=block))
        out.append((lo, hi, problem.dead))
    return out


def score_example(
    graph: NeuronGraph,
    acts: list[torch.Tensor],
    alpha: float,
    *,
    certify_tol: float = CERTIFY_TOL,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    threads: int = 1,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Edge curvatures of one example, per parametrised layer, every edge exact.

    Returns ``(kappa, dead)``: float64 ``[E_l]`` curvatures and bool ``[E_l]`` dead-edge masks.
    (:func:`curvprune.neural_curvature` needs only each weight's minimum and solves fewer
    edges: see :mod:`curvprune.transport.minimum`.)

    Args:
        graph: the example-independent graph.
        acts: normalised activities of node layers ``0..n`` for this example.
        alpha: idleness in ``[0, 1)``.
        certify_tol: the measures are cut within ``certify_tol / 2`` (see
            :func:`cut_measures`) and an edge is taken from its bounds when they are at most
            ``certify_tol / 2`` apart (see :func:`bound_edges`); ``0`` solves every edge.
        block: number of float64 entries per vectorised chunk (bounds memory).
        stats: counters to update.
        threads: CPU threads for the exact network-simplex solves.
    """
    kappa, dead_masks = [], []
    for l in range(1, len(graph.layers) + 1):
        layer = graph.layers[l - 1]
        dead, mu, nu, tables = layer_problem(graph, acts, l, certify_tol)
        kappa.append(score_edges(layer.src, layer.dst, layer.length, dead, mu, nu, tables,
                                 alpha, certify_tol=certify_tol, block=block, stats=stats,
                                 threads=threads))
        dead_masks.append(dead)
    return kappa, dead_masks


