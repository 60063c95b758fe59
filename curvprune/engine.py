r"""The fast exact engine for neural curvature at neuron granularity.

It computes the same :math:`\kappa` as :mod:`curvprune.reference` on every edge, by exploiting
the structure of the problem instead of solving one linear program per edge:

* **Distances once.** Ground distances do not depend on the example: 2- and 3-hop shortest-path
  tables are min-plus products computed once per call (:mod:`curvprune.distance`), windowed
  for conv layers (a node keeps only the targets its kernels reach: :class:`HopTable`).
* **Dead edges** (an end with activity 0) get :math:`\kappa = 1` with no transport at all.
* **Point masses.** If :math:`\mu_i = \delta_i` (input layer, or no active in-neighbour) then
  :math:`W_1 = \alpha d + (1-\alpha)\sum_m q_m D(i, m)` and
  :math:`\kappa = 1 - \sum_m q_m D(i, m) / d`; symmetrically for :math:`\nu_j = \delta_j`.
* **Shared problems and bounds.** Write :math:`\mu_i = \alpha\delta_i +
  (1-\alpha)p` and :math:`\nu_j = \alpha\delta_j + (1-\alpha)q`. The plan that sends
  :math:`\alpha` along ``i -> j`` and transports ``p`` to ``q`` optimally under
  :math:`C(k, m)` costs :math:`\alpha d + (1-\alpha) X_0` with :math:`X_0 = OT(p, q; C)`, and
  :math:`X_0` depends on the edge only through ``(p, q)``, which many edges share (in a dense
  layer every node has the same neighbour measure). With optimal potentials ``(f, g)`` of
  :math:`X_0`, the plan is optimal for the edge's full problem whenever

  .. math::

      \max_{k} \big(f_k - D(k, j)\big) + \max_{m} \big(g_m - D(i, m) + d\big) \le 0,

  because then ``(f, g)`` extended by potentials for ``i`` and ``j`` is dual feasible for
  :math:`W_1(\mu_i, \nu_j)` (the swap ``k -> j``, ``i -> m`` never pays). Clipping the
  shifted potentials to those constraints gives a dual-feasible point, hence a lower bound, for
  every edge; the no-swap plan and a plan that swaps a share of every unit (all of it for
  :math:`\alpha \ge 1/2`) give upper bounds (:func:`bound_edges`). Edges whose bounds are
  close are settled; :func:`curvprune.neural_curvature` solves the others only while they can
  matter to their weight's minimum, to within its ``tolerance`` (:mod:`curvprune.minimum`).
* **Negligible masses cut.** Neighbour weights :math:`\exp(-1/a^2)` span hundreds of orders of
  magnitude; the smallest masses are dropped while a bound on their effect on every edge's
  kappa stays within half the cut tolerance (:func:`cut_measures`; ``tolerance / 4`` in
  :func:`curvprune.neural_curvature`, whose bounds are widened by it: :func:`cut_error`),
  which shrinks the problems.
* **Full swaps** (:math:`\alpha \ge 1/2`). If :math:`D(k, j) + D(i, m) - d \le C(k, m)` on the
  supports, every unit of ``p`` is best routed through ``j`` and every unit of ``q`` from ``i``:
  :math:`\kappa = 1 - (\sum_k p_k D(k, j) + \sum_m q_m D(i, m) - d) / d`. With
  :math:`\alpha \ge 1/2` the atoms at ``i`` and ``j`` can absorb every such swap, so this is exact.
* **Exact fallback.** Every remaining edge is one exact network-simplex solve (POT's C++ solver,
  the one behind ``ot.emd2``) of the full problem.

The vectorised parts run on the device of the model (or ``device=``); the network-simplex
solves run on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ._conv_hops import ConvHops
from .distance import length_matrix, min_plus
from .graph import LayerEdges
from .measures import neighbour_measures, padded_neighbours

__all__ = ["NeuronGraph", "EngineStats", "Distances", "score_example", "score_edges",
           "bound_example", "bound_edges", "solve_layer_edges", "solve_edges", "layer_problem",
           "node_measures", "cut_measures", "cut_error", "hop_table_bytes", "HopTable",
           "CERTIFY_TOL"]

# POT (which imports networkx and scikit-learn) is loaded by the first transport problem, not by
# ``import curvprune``; ``emd_c`` is its network simplex.


def __getattr__(name: str) -> object:
    if name == "emd_c":
        from ot.lp.emd_wrap import emd_c

        globals()["emd_c"] = emd_c
        return emd_c
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Default tolerance of the engine's shortcuts, in units of kappa (a few ulps). In the
#: per-edge functions (``certify_tol``): half of it for cutting negligible masses from the
#: measures (:func:`cut_measures`), half for settling an edge whose bounds are that close
#: (:func:`bound_edges`), so every kappa is within it of the exact value. In
#: :func:`curvprune.neural_curvature` it is the default ``tolerance``: the largest width of a
#: weight's certified interval. 0 turns the shortcuts off.
CERTIFY_TOL = 1e-14

_MAX_ITER = 1_000_000
_OPTIMAL = 1  # POT's result code for an optimal solution


@dataclass
class EngineStats:
    """Counts of how the engine resolved each (edge, example).

    ``dead``: an end has activity 0 (kappa 1). ``point_mass``: a side is a point mass (closed
    form). ``certified``: settled by the bounds of :func:`bound_edges`. ``full_swap``: solved
    in closed form (every unit swaps). ``solved``: solved by network simplex. ``bounded``: left
    open by the bounds but never needed, since it cannot be its weight's minimum
    (:mod:`curvprune.minimum`). ``shared_problems``: the ``(p, q)`` problems solved for the
    bounds (one per distinct pair of neighbour measures).
    """

    dead: int = 0
    point_mass: int = 0
    certified: int = 0
    full_swap: int = 0
    solved: int = 0
    bounded: int = 0
    shared_problems: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Layer:
    src: torch.Tensor  # [E] node in layer l-1
    dst: torch.Tensor  # [E] node in layer l
    widx: torch.Tensor  # [E] flat weight index
    length: torch.Tensor  # [E] float64, 1/|w|


@dataclass
class NeuronGraph:
    """The example-independent part of the neural graph: edges, neighbours and distances.

    Node layers are ``0..n``; ``layers[l-1]`` holds the nonzero edges of parametrised layer
    ``l`` (between node layers ``l-1`` and ``l``). ``in_nbrs[L]`` (``L >= 1``) and
    ``out_nbrs[L]`` (``L < n``) are padded neighbour tables and ``in_len``/``out_len`` the
    lengths of those edges, slot by slot; ``hop2[L]`` is the ``L -> L+2`` distance table and
    ``hop3[L]`` the ``L -> L+3`` one (:class:`HopTable`: windowed for conv layers, so a conv
    node keeps only the targets its kernels can reach; dense otherwise).
    """

    sizes: list[int]
    layers: list[_Layer]
    in_nbrs: list[torch.Tensor | None] = field(default_factory=list)
    out_nbrs: list[torch.Tensor | None] = field(default_factory=list)
    in_len: list[torch.Tensor | None] = field(default_factory=list)
    out_len: list[torch.Tensor | None] = field(default_factory=list)
    hop2: list[HopTable] = field(default_factory=list)
    hop3: list[HopTable] = field(default_factory=list)

    @classmethod
    def build(cls, structures: list[LayerEdges], weights: list[torch.Tensor],
              device: torch.device) -> NeuronGraph:
        """Build from each layer's structural edges and current (flattened) weight values."""
        sizes = [structures[0].n_in] + [s.n_out for s in structures]
        layers = []
        for s, w in zip(structures, weights):
            w = w.to(device=device, dtype=torch.float64)
            widx = s.widx.to(device)
            value = w[widx]
            keep = value != 0
            layers.append(_Layer(s.src.to(device)[keep], s.dst.to(device)[keep], widx[keep],
                                 1.0 / value[keep].abs()))
        n = len(layers)
        graph = cls(sizes, layers)
        graph.in_nbrs = [None] + [
            padded_neighbours(layers[L - 1].dst, layers[L - 1].src, sizes[L])
            for L in range(1, n + 1)
        ]
        graph.out_nbrs = [
            padded_neighbours(layers[L].src, layers[L].dst, sizes[L]) for L in range(n)
        ] + [None]
        graph.in_len = [None] + [
            padded_neighbours(layers[L - 1].dst, layers[L - 1].length, sizes[L], fill=0.0)
            for L in range(1, n + 1)
        ]
        graph.out_len = [
            padded_neighbours(layers[L].src, layers[L].length, sizes[L], fill=0.0)
            for L in range(n)
        ] + [None]
        # hop2[L]: L -> L+2 (through param layers L+1 and L+2); hop3[L]: L -> L+3.
        two, three = _hop_layouts(structures)
        shapes = _node_shapes(structures)
        # Conv chains from their kernels (same values: curvprune/_conv_hops.py); else edge by edge.
        kernels = ConvHops(structures, layers, shapes)
        for L in range(n - 1):
            fast = kernels.table(L, 2, _on(two[L], device), None)
            if fast is not None:
                graph.hop2.append(HopTable(fast, _on(two[L], device)))
                continue
            one = _layout(_one_hop_box(structures[L + 1], shapes[L + 2]), shapes[L + 2])
            rest = HopTable.of_edges(layers[L + 1], sizes[L + 1], one)
            graph.hop2.append(HopTable.compose(layers[L], sizes[L], rest, two[L]))
            del rest
        for L in range(n - 2):
            rest = graph.hop2[L + 1]
            fast = kernels.table(L, 3, _on(three[L], device),
                                 rest.values if rest.layout.full else None)
            graph.hop3.append(HopTable(fast, _on(three[L], device)) if fast is not None else
                              HopTable.compose(layers[L], sizes[L], rest, three[L]))
        return graph


def hop_table_bytes(layers: list[int] | list[LayerEdges]) -> int:
    """Bytes of the float64 hop tables ``L -> L+2`` and ``L -> L+3`` that
    :meth:`NeuronGraph.build` keeps: from the layers' structural edges (windowed conv tables,
    see :class:`HopTable`), or, given node-layer sizes only, of dense tables."""
    if layers and isinstance(layers[0], LayerEdges):
        sizes = [layers[0].n_in] + [s.n_out for s in layers]
        two, three = _hop_layouts(layers)
        entries = sum(sizes[L] * t.width for L, t in enumerate(two))
        entries += sum(sizes[L] * t.width for L, t in enumerate(three))
        return 8 * entries
    sizes = layers
    entries = sum(sizes[L] * sizes[L + 2] for L in range(len(sizes) - 2))
    entries += sum(sizes[L] * sizes[L + 3] for L in range(len(sizes) - 3))
    return 8 * entries


#: A hop table is windowed when its window covers at most this fraction of the target layer's
#: positions (else it is stored dense; the lookups are cheaper and the memory close).
WINDOW_FRACTION = 0.5


def _node_shapes(structures: list[LayerEdges]) -> list[tuple[int, int, int]]:
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


def _one_hop_box(s: LayerEdges, target: tuple[int, int, int]) -> _Box:
    _, h, w = target
    y, x = (s.dst // w) % h, s.dst % w
    lo = torch.full((s.n_in,), _EMPTY, dtype=torch.long)
    hi = torch.full((s.n_in,), -1, dtype=torch.long)
    return _Box(lo.scatter_reduce(0, s.src, y, reduce="amin"),
                hi.scatter_reduce(0, s.src, y, reduce="amax"),
                lo.scatter_reduce(0, s.src, x, reduce="amin"),
                hi.scatter_reduce(0, s.src, x, reduce="amax"))


def _back_box(s: LayerEdges, box: _Box) -> _Box:
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


def _layout(box: _Box, target: tuple[int, int, int]) -> _Layout:
    _, h, w = target
    reach = box.lo_y < _EMPTY
    wy = int((box.hi_y - box.lo_y + 1)[reach].max()) if reach.any() else 1
    wx = int((box.hi_x - box.lo_x + 1)[reach].max()) if reach.any() else 1
    if wy * wx > WINDOW_FRACTION * h * w:
        return _Layout(target, (h, w), None, None)
    return _Layout(target, (wy, wx), torch.where(reach, box.lo_y, 0),
                   torch.where(reach, box.lo_x, 0))


def _hop_layouts(structures: list[LayerEdges]) -> tuple[list[_Layout], list[_Layout]]:
    """Layouts of the ``L -> L+2`` and ``L -> L+3`` tables, from the structural edges (so that
    zero weights change values, not sizes)."""
    shapes = _node_shapes(structures)
    n = len(structures)
    one = [_one_hop_box(structures[s], shapes[s + 1]) for s in range(n)]
    two = [_back_box(structures[L], one[L + 1]) for L in range(n - 1)]
    three = [_back_box(structures[L], two[L + 1]) for L in range(n - 2)]
    return ([_layout(two[L], shapes[L + 2]) for L in range(n - 1)],
            [_layout(three[L], shapes[L + 3]) for L in range(n - 2)])


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

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], math.prod(self.layout.target))

    def numel(self) -> int:
        return self.values.numel()

    def element_size(self) -> int:
        return self.values.element_size()

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, cols = key
        if self.layout.full:
            return self.values[rows, cols]
        rows, cols = torch.broadcast_tensors(rows, cols)
        slot, inside = self._slot(rows, cols)
        out = self.values[rows, slot]
        return out.masked_fill_(~inside, math.inf)

    def _slot(self, rows: torch.Tensor, cols: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Column of ``values`` holding target ``cols`` for source ``rows``, and whether the
        target lies in the source's window at all."""
        if self.layout.full:
            return cols, torch.ones_like(cols, dtype=torch.bool)
        _, h, w = self.layout.target
        wy, wx = self.layout.window
        pos = cols % (h * w)
        iy = pos // w - self.layout.y0[rows]
        ix = pos % w - self.layout.x0[rows]
        inside = (iy >= 0) & (iy < wy) & (ix >= 0) & (ix < wx)
        slot = ((cols // (h * w)) * wy + iy.clamp(0, wy - 1)) * wx + ix.clamp(0, wx - 1)
        return slot, inside

    def dense(self) -> torch.Tensor:
        """The ``[n_src, n_tgt]`` table (for tests and small layers)."""
        n_src, n_tgt = self.shape
        rows = torch.arange(n_src, device=self.values.device)[:, None]
        return self[rows, torch.arange(n_tgt, device=self.values.device)[None, :]]

    @classmethod
    def of_edges(cls, layer: _Layer, n_src: int, layout: _Layout) -> HopTable:
        """The one-hop table of ``layer``'s edges (their lengths; ``inf`` elsewhere)."""
        if layout.full:
            return cls(length_matrix(layer.src, layer.dst, layer.length, n_src,
                                     math.prod(layout.target)), layout)
        layout = _on(layout, layer.length.device)
        values = torch.full((n_src, layout.width), math.inf, dtype=layer.length.dtype,
                            device=layer.length.device)
        slot, _ = cls(values, layout)._slot(layer.src, layer.dst)
        values[layer.src, slot] = layer.length
        return cls(values, layout)

    @classmethod
    def compose(cls, first: _Layer, n_src: int, rest: HopTable, layout: _Layout, *,
                max_block: int = 1 << 22) -> HopTable:
        r"""Min-plus product ``D[a, c] = min over edges a -> b of length(a, b) + rest[b, c]``
        over the sparse first hop, into ``layout`` (no dense intermediate: each edge adds its
        target's row of ``rest``, window to window; chunks of ``max_block`` entries)."""
        if layout.full and rest.layout.full:
            return cls(min_plus(first.src, first.dst, first.length, n_src, rest.values),
                       layout)
        device = rest.values.device
        layout = _on(layout, device)
        values = torch.full((n_src, layout.width), math.inf, dtype=rest.values.dtype,
                            device=device)
        out = cls(values, layout)
        if first.src.numel() == 0:
            return out
        _, h, w = rest.layout.target
        ry, rx = rest.layout.window
        cell = torch.arange(rest.layout.width, device=device)
        channel, cy, cx = cell // (ry * rx), (cell // rx) % ry, cell % rx
        chunk = max(1, max_block // max(1, rest.layout.width))
        flat = values.view(-1)
        for start in range(0, first.src.numel(), chunk):
            a = first.src[start:start + chunk]
            b = first.dst[start:start + chunk]
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


def _on(layout: _Layout, device: torch.device) -> _Layout:
    if layout.full or layout.y0.device == device:
        return layout
    return _Layout(layout.target, layout.window, layout.y0.to(device), layout.x0.to(device))


def _gather_rows(table: torch.Tensor | HopTable, rows: torch.Tensor,
                 cols: torch.Tensor) -> torch.Tensor:
    """``table[rows[e], cols[e, s]]`` with padded columns (``-1``) mapped to column 0."""
    return table[rows[:, None], cols.clamp(min=0)]


@dataclass
class _Measure:
    """Neighbour parts of the measures of one node layer on one example, support first.

    ``table[v, s]`` is the neighbour in slot ``s`` of node ``v`` and ``mass[v, s]`` its mass
    (0 past the support); ``has[v]`` says whether ``v`` has any support (else a point mass).
    ``reach[v]`` bounds the distance between ``v`` and every node of its (uncut) support;
    ``cut[v]`` says whether :func:`cut_measures` dropped mass from ``v``'s measure (``None``:
    nothing was cut anywhere).
    """

    table: torch.Tensor
    mass: torch.Tensor
    has: torch.Tensor
    reach: torch.Tensor
    cut: torch.Tensor | None = None


def node_measures(table: torch.Tensor, activity: torch.Tensor,
                  lengths: torch.Tensor | None = None) -> _Measure:
    """Measures of a layer with each node's support moved to the front and empty slots cut.

    ``lengths`` (the edge lengths to the neighbours, slot by slot) give ``reach``; without
    them ``reach`` is ``+inf`` (and :func:`cut_measures` cuts nothing)."""
    mass, has = neighbour_measures(table, activity)
    if lengths is None:
        reach = torch.full_like(has, math.inf, dtype=mass.dtype)
    else:
        reach = torch.where(mass > 0, lengths, 0.0).amax(1) if mass.shape[1] else \
            torch.zeros_like(has, dtype=mass.dtype)
    return _support_first(table, mass, has, reach)


def _support_first(table: torch.Tensor, mass: torch.Tensor, has: torch.Tensor,
                   reach: torch.Tensor, cut: torch.Tensor | None = None) -> _Measure:
    order = torch.argsort((mass <= 0).to(torch.int8), dim=1, stable=True)
    width = int((mass > 0).sum(dim=1).max()) if mass.numel() else 0
    order = order[:, :width]
    return _Measure(table.gather(1, order), mass.gather(1, order), has, reach, cut)


def cut_measures(mu: _Measure | None, nu: _Measure | None, src: torch.Tensor,
                 dst: torch.Tensor, d: torch.Tensor, tol: float
                 ) -> tuple[_Measure | None, _Measure | None]:
    r"""Drop the negligible masses of the measures of edges ``src -> dst`` (distance ``d``),
    moving every edge's curvature by at most ``tol / 2``.

    Neighbour weights :math:`\exp(-1/a^2)` span hundreds of orders of magnitude, so most of a
    support often carries less mass than the rounding of the rest. Cutting mass
    :math:`\epsilon_p` from ``p`` and :math:`\epsilon_q` from ``q`` (the rest rescaled to 1)
    changes :math:`\kappa` by at most :math:`(\epsilon_p + \epsilon_q) M / d`, where ``M``
    bounds every ground cost of the edge's problem: optimal potentials can be taken
    c-concave, so they vary by at most ``M`` over a side, and the change of the masses sums to
    zero on each side. With :math:`M \le L_p + d + L_q` (the path ``k -> i -> j -> m``;
    ``L`` the nodes' ``reach``), each node's cut is chosen from its shortest edge in ``d`` and
    the longest reach of the other side so that every edge stays within ``tol / 2``. The
    smallest masses are cut first; the largest always stays.
    """
    if tol <= 0 or src.numel() == 0:
        return mu, nu
    if mu is not None:
        other = float(nu.reach.max()) if nu is not None and nu.reach.numel() else 0.0
        mu = _cut(mu, _cut_budget(mu, src, d, other, tol))
    if nu is not None:
        other = float(mu.reach.max()) if mu is not None and mu.reach.numel() else 0.0
        nu = _cut(nu, _cut_budget(nu, dst, d, other, tol))
    return mu, nu


def _cut_budget(measure: _Measure, nodes: torch.Tensor, d: torch.Tensor, other: float,
                tol: float) -> torch.Tensor:
    """Mass each node may lose: ``eps ((reach + other) / d_min + 1) <= tol / 4``."""
    d_min = torch.full_like(measure.reach, math.inf).scatter_reduce_(0, nodes, d, reduce="amin")
    budget = (tol / 4) / ((measure.reach + other) / d_min + 1.0)
    return torch.nan_to_num(budget, nan=0.0)


def _cut(measure: _Measure, budget: torch.Tensor) -> _Measure:
    """Zero each node's smallest masses while their sum stays within its budget; rescale."""
    mass = measure.mass
    if mass.shape[1] == 0:
        return measure
    ascending, order = torch.sort(torch.where(mass > 0, mass, math.inf), dim=1)
    finite = torch.isfinite(ascending)
    dropped = torch.cumsum(torch.where(finite, ascending, 0.0), dim=1)
    cut_sorted = finite & (dropped <= budget[:, None])
    # The largest mass always stays (a budget of 1 or more would otherwise empty the measure).
    largest = finite.sum(1, keepdim=True) - 1
    cut_sorted &= torch.arange(mass.shape[1], device=mass.device)[None, :] != largest
    cut = torch.zeros_like(cut_sorted).scatter_(1, order, cut_sorted)
    if not cut.any():
        return measure
    kept = torch.where(cut, 0.0, mass)
    total = kept.sum(1, keepdim=True)
    kept = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 0.0)
    return _support_first(measure.table, kept, measure.has, measure.reach, cut.any(1))


def _chunks(index: torch.Tensor, block: int, width: int) -> tuple[torch.Tensor, ...]:
    """Split ``index`` so that each chunk times ``width`` stays within ``block`` entries."""
    if index.numel() == 0:
        return ()
    return index.split(max(1, block // max(1, width)))


def _weighted_sum(mass: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    return torch.where(mass > 0, mass * cost, torch.zeros((), dtype=cost.dtype,
                                                          device=cost.device)).sum(dim=1)


def _solve_one(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> tuple[float, np.ndarray,
                                                                         np.ndarray]:
    """Exact OT by POT's network simplex (the solver behind ``ot.emd2``).

    Zero-mass rows and columns are dropped by the solver itself, so padded problems are fine.
    Returns ``(cost, source potentials, target potentials)``.

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
    if shift < 0:
        value, f, g = _solve_one(a, b, cost - shift)
        return value + shift * float(a.sum()), f + shift, g
    code = None
    for attempt, budget in enumerate((_MAX_ITER, _MAX_ITER, _MAX_ITER, 100 * _MAX_ITER)):
        if attempt == 1:  # transposed: W(a, b; C) = W(b, a; C^T), potentials swap
            _, value, g, f, code = emd_c(b, a, np.ascontiguousarray(cost.T), budget, 1)
        elif attempt == 2:  # rows in reverse order
            _, value, f, g, code = emd_c(a[::-1].copy(), b, np.ascontiguousarray(cost[::-1]),
                                         budget, 1)
            f = f[::-1]
        else:
            _, value, f, g, code = emd_c(a, b, cost, budget, 1)
        if code == _OPTIMAL:
            return float(value), f, g
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


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool per thread count (threads are reused across calls)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="curvprune-ot")
    return _POOLS[threads]


@dataclass
class Distances:
    """Ground distances an edge set needs, as tables indexed by the measures' node ids.

    ``d_kj[k, j]``: from ``i``'s neighbours to ``j``; ``d_im[i, m]``: from ``i`` to ``j``'s
    neighbours; ``d_km[k, m]``: between the neighbours. For the layered neuron graph these are
    the hop tables of consecutive layers; for the channel graph, one all-pairs table.
    """

    d_kj: torch.Tensor | HopTable | None
    d_im: torch.Tensor | HopTable | None
    d_km: torch.Tensor | HopTable | None


def layer_problem(graph: NeuronGraph, acts: list[torch.Tensor], l: int,
                  certify_tol: float = CERTIFY_TOL
                  ) -> tuple[torch.Tensor, _Measure | None, _Measure | None, Distances]:
    """Dead-edge mask, measures (cut by :func:`cut_measures` within ``certify_tol / 2``) and
    distance tables of parametrised layer ``l`` (1-based) on one example (``acts``: normalised
    activities of node layers ``0..n``)."""
    n = len(graph.layers)
    layer = graph.layers[l - 1]
    dead = torch.zeros_like(layer.src, dtype=torch.bool)
    if l > 1:
        dead |= acts[l - 1][layer.src] == 0
    if l < n:
        dead |= acts[l][layer.dst] == 0
    # mu_i over in-neighbours of i (layer l-2); nu_j over out-neighbours of j (layer l+1).
    mu = node_measures(graph.in_nbrs[l - 1], acts[l - 2], graph.in_len[l - 1]) if l > 1 else None
    nu = node_measures(graph.out_nbrs[l], acts[l + 1], graph.out_len[l]) if l < n else None
    mu, nu = cut_measures(mu, nu, layer.src, layer.dst, layer.length, certify_tol)
    tables = Distances(d_kj=graph.hop2[l - 2] if l > 1 else None,
                       d_im=graph.hop2[l - 1] if l < n else None,
                       d_km=graph.hop3[l - 2] if 1 < l < n else None)
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
    With ``settle=False`` the bounds are widened by :func:`cut_error` and bracket the
    curvature of the uncut measures (interval mode). ``edges``: per layer, the indices of the
    edges to bound (``None``: all of them); the outputs then follow that order.
    """
    out = []
    cut_tol = certify_tol if cut_tol is None else cut_tol
    for l in range(1, len(graph.layers) + 1):
        layer = graph.layers[l - 1]
        sub = None if edges is None else edges[l - 1]
        if sub is not None and sub.numel() == 0:
            empty = layer.length[:0]
            out.append((empty, empty.clone(), layer.src[:0] < 0))
            continue
        dead, mu, nu, tables = layer_problem(graph, acts, l, cut_tol)
        src, dst, length = layer.src, layer.dst, layer.length
        if sub is not None:
            src, dst, length, dead = src[sub], dst[sub], length[sub], dead[sub]
        error = None if settle else cut_error(mu, nu, src, dst, dead, cut_tol)
        lo, hi = bound_edges(src, dst, length, dead, mu, nu, tables, alpha,
                             certify_tol=certify_tol, block=block, stats=stats, settle=settle,
                             error=error)
        out.append((lo, hi, dead))
    return out


def solve_layer_edges(
    graph: NeuronGraph,
    acts: list[torch.Tensor],
    l: int,
    edges: torch.Tensor,
    alpha: float,
    *,
    certify_tol: float = CERTIFY_TOL,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    threads: int = 1,
    with_error: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact curvatures of the live edges ``edges`` (indices into ``graph.layers[l - 1]``,
    both of whose measures have neighbour parts) on one example (see :func:`solve_edges`;
    ``certify_tol`` as for :func:`layer_problem`).

    With ``with_error=True`` returns ``(value - e, value + e)`` with ``e`` the
    :func:`cut_error` of each edge: bounds on the curvature of the uncut measures."""
    layer = graph.layers[l - 1]
    _, mu, nu, tables = layer_problem(graph, acts, l, certify_tol)
    src, dst = layer.src[edges], layer.dst[edges]
    value = solve_edges(src, dst, layer.length[edges], mu, nu, tables, alpha, block=block,
                        stats=stats, threads=threads)
    if not with_error:
        return value
    error = cut_error(mu, nu, src, dst, torch.zeros_like(src, dtype=torch.bool), certify_tol)
    return value - error, value + error


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
    edges: see :mod:`curvprune.minimum`.)

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


def score_edges(
    src: torch.Tensor,
    dst: torch.Tensor,
    d: torch.Tensor,
    dead: torch.Tensor,
    mu: _Measure | None,
    nu: _Measure | None,
    tables: Distances,
    alpha: float,
    *,
    certify_tol: float = CERTIFY_TOL,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    threads: int = 1,
) -> torch.Tensor:
    """Exact curvatures ``[E]`` (float64) of edges ``src -> dst`` of distance ``d`` on one
    example: :func:`bound_edges`, then :func:`solve_edges` where the bounds differ."""
    lo, hi = bound_edges(src, dst, d, dead, mu, nu, tables, alpha, certify_tol=certify_tol,
                         block=block, stats=stats)
    open_ = torch.nonzero(lo < hi).squeeze(1)
    if open_.numel():
        lo[open_] = solve_edges(src[open_], dst[open_], d[open_], mu, nu, tables, alpha,
                                block=block, stats=stats, threads=threads)
    return lo


def bound_edges(
    src: torch.Tensor,
    dst: torch.Tensor,
    d: torch.Tensor,
    dead: torch.Tensor,
    mu: _Measure | None,
    nu: _Measure | None,
    tables: Distances,
    alpha: float,
    *,
    certify_tol: float = CERTIFY_TOL,
    block: int = 1 << 22,
    stats: EngineStats | None = None,
    settle: bool = True,
    error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Bounds ``lo <= kappa <= hi`` (float64 ``[E]``) on the curvatures of edges ``src -> dst``
    of distance ``d`` on one example; ``lo == hi`` where the value is settled.

    With ``settle=False`` (interval mode, used by :func:`curvprune.neural_curvature`) no edge
    is collapsed onto one of its bounds: ``lo`` and ``hi`` are widened by ``error`` (a bound
    per edge on how far the measures' cut moved kappa, :func:`cut_error`), so that they
    bracket the curvature of the uncut measures, and edges whose widened bounds are at most
    ``certify_tol`` apart are counted as certified.

    ``dead`` edges get 1 and point-mass sides their closed forms; ``mu``/``nu`` are the
    neighbour measures of the sources' and the targets' node sets (``None``: every node of that
    side is a point mass). For the other edges, with :math:`X = (W_1 - \alpha d)/(1 - \alpha)`
    so that :math:`\kappa = 1 - X / d`, the shared problem :math:`X_0 = OT(p, q; C)` and its
    optimal potentials ``(f, g)`` give

    .. math::

        \max_t \sum_k p_k \min(f_k + t, A_k) + \sum_m q_m \min(g_m - t, B_m) - s
        \;\le\; X \;\le\; \min\big(X_0,\ \lambda (p \cdot A + q \cdot B)
        + (1 - \lambda) X_0\big),

    with :math:`A_k = D(k, j)`, :math:`B_m = D(i, m) - d`,
    :math:`\lambda = \min(1, \alpha / (1 - \alpha))` and ``s`` the potentials' own
    feasibility residual. The left side is the value of a dual-feasible point of the edge's
    problem (clipping ``f + t`` and ``g - t`` keeps :math:`f + g \le C` and adds the swap
    constraints; the atoms take :math:`\alpha d`), so it holds for every alpha. The right side
    is the cost of the no-swap plan and of a plan that routes a share :math:`\lambda` of every
    unit through the atoms (``k -> j`` and ``i -> m``; the atoms hold :math:`\alpha`, so the
    share is all of it only for :math:`\alpha \ge 1/2`) and the rest by the shared plan. It is
    maximised over ``t`` at three points: the largest ``t`` that clips no row, the smallest that
    clips no column, and their midpoint; when the first is not below the second, no term is
    clipped and the two sides meet at :math:`X_0` (the certificate of the module docstring).
    Bounds at most ``certify_tol / 2`` apart settle the edge at ``lo``, the cost of a plan.
    """
    stats = stats if stats is not None else EngineStats()
    kappa = torch.ones_like(d)
    stats.dead += int(dead.sum())
    mu_point = ~mu.has[src] if mu is not None else torch.ones_like(dead)
    nu_point = ~nu.has[dst] if nu is not None else torch.ones_like(dead)
    live = ~dead
    both = live & mu_point & nu_point
    kappa[both] = 0.0
    # mu = delta_i: kappa = 1 - sum_m q_m D(i, m) / d
    sel = torch.nonzero(live & mu_point & ~nu_point).squeeze(1)
    for chunk in _chunks(sel, block, nu.mass.shape[1] if nu is not None else 1):
        i, j = src[chunk], dst[chunk]
        cost = _gather_rows(tables.d_im, i, nu.table[j])
        kappa[chunk] = 1.0 - _weighted_sum(nu.mass[j], cost) / d[chunk]
    # nu = delta_j: kappa = 1 - sum_k p_k D(k, j) / d
    sel2 = torch.nonzero(live & ~mu_point & nu_point).squeeze(1)
    for chunk in _chunks(sel2, block, mu.mass.shape[1] if mu is not None else 1):
        i, j = src[chunk], dst[chunk]
        cost = tables.d_kj[mu.table[i].clamp(min=0), j[:, None]]
        kappa[chunk] = 1.0 - _weighted_sum(mu.mass[i], cost) / d[chunk]
    stats.point_mass += int(both.sum()) + sel.numel() + sel2.numel()
    upper = kappa.clone()
    general = torch.nonzero(live & ~mu_point & ~nu_point).squeeze(1)
    if general.numel():
        kappa[general], upper[general] = _shared_bounds(
            tables, src[general], dst[general], d[general], mu, nu, alpha, certify_tol, block,
            stats, settle)
    if not settle:
        if error is not None:
            kappa, upper = kappa - error, upper + error
        stats.certified += int((upper[general] - kappa[general] <= certify_tol).sum())
    return kappa, upper


def cut_error(mu: _Measure | None, nu: _Measure | None, src: torch.Tensor, dst: torch.Tensor,
              dead: torch.Tensor, cut_tol: float) -> torch.Tensor:
    """Per edge, a bound on how far :func:`cut_measures` (run with ``cut_tol``) moved kappa:
    ``cut_tol / 2`` for a live edge one of whose measures lost mass, else 0 (float64 ``[E]``).
    """
    touched = torch.zeros_like(dead)
    if mu is not None and mu.cut is not None:
        touched |= mu.cut[src] & mu.has[src]
    if nu is not None and nu.cut is not None:
        touched |= nu.cut[dst] & nu.has[dst]
    touched &= ~dead
    return touched.to(torch.float64) * (cut_tol / 2)


def solve_edges(src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor, mu: _Measure,
                nu: _Measure, tables: Distances, alpha: float, *, block: int = 1 << 22,
                stats: EngineStats | None = None, threads: int = 1) -> torch.Tensor:
    """Exact curvatures of live edges whose two measures both have neighbour parts (see the
    module docstring: full swaps in closed form, the rest by network simplex)."""
    stats = stats if stats is not None else EngineStats()
    device = d.device
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    d_kj, d_im, d_km = tables.d_kj, tables.d_im, tables.d_km
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    kappa = torch.empty_like(d)
    zero = torch.zeros((), dtype=d.dtype, device=device)
    p_count, q_count = (p_mass > 0).sum(1), (q_mass > 0).sum(1)
    # Similar support sizes in one chunk, so each chunk is cut to its own widths.
    pending = torch.argsort(p_count[src] * (dm + 1) + q_count[dst])
    in_flight: list[tuple] = []
    for chunk in _chunks(pending, block, 4 * (dk + 1) * (dm + 1)):
        i, j, de = src[chunk], dst[chunk], d[chunk]
        r, c = int(p_count[i].max()), int(q_count[j].max())
        k_idx, m_idx = k_tab[i, :r].clamp(min=0), m_tab[j, :c].clamp(min=0)
        pm, qm = p_mass[i, :r], q_mass[j, :c]
        rows, cols = pm > 0, qm > 0
        support = rows[:, :, None] & cols[:, None, :]
        a_k = torch.where(rows, d_kj[k_idx, j[:, None]], zero)  # D(k, j)
        d_i_m = torch.where(cols, d_im[i[:, None], m_idx], zero)  # D(i, m)
        if alpha >= 0.5:
            # X = OT(p, q; min(C, A + B)); rows (columns) that take the swap on every support
            # cell differ only by a constant and are merged into one row (column), exactly.
            b_m = torch.where(cols, d_i_m - de[:, None], zero)
            c_km = d_km[k_idx[:, :, None], m_idx[:, None, :]]  # C(k, m)
            swap = a_k[:, :, None] + b_m[:, None, :]  # A(k) + B(m)
            margin = (c_km - swap).masked_fill_(~support, math.inf)
            hub_row = (margin.amin(2) >= 0) & rows
            hub_col = (margin.amin(1) >= 0) & cols
            x = (torch.where(hub_row, pm * a_k, zero).sum(1)
                 + torch.where(hub_col, qm * b_m, zero).sum(1))
            need = torch.nonzero(~(hub_row | ~rows).all(1)).squeeze(1)
            stats.full_swap += chunk.numel() - need.numel()
            if need.numel():
                cost = torch.zeros((need.numel(), r + 1, c + 1), dtype=d.dtype, device=device)
                # Each cell exactly C or A + B, whichever is smaller (no re-association, which
                # would cost precision when d is small against A and B); off-support cells carry
                # no mass and get zero.
                cost[:, :r, :c] = torch.where(support[need], torch.minimum(c_km[need],
                                                                           swap[need]), zero)
                cost[:, r, :c] = b_m[need]
                cost[:, :r, c] = a_k[need]
                hr, hc, pn, qn = hub_row[need], hub_col[need], pm[need], qm[need]
                row_mass = torch.cat([torch.where(hr, zero, pn),
                                      torch.where(hr, pn, zero).sum(1, keepdim=True)], 1)
                col_mass = torch.cat([torch.where(hc, zero, qn),
                                      torch.where(hc, qn, zero).sum(1, keepdim=True)], 1)
                wait = _submit_batch(row_mass.cpu().numpy(), col_mass.cpu().numpy(),
                                     cost.cpu().numpy(), threads)
                in_flight.append((chunk, x, need, de, wait))
                stats.solved += need.numel()
                if len(in_flight) > 1:  # at most two chunks' problems held in memory
                    _finish(in_flight.pop(0), kappa)
            else:
                kappa[chunk] = 1.0 - x / de
        else:
            # alpha < 1/2: the atoms limit the swaps; solve the full problem.
            cost = torch.empty((chunk.numel(), r + 1, c + 1), dtype=d.dtype, device=device)
            cost[:, 0, 0] = de
            cost[:, 0, 1:] = d_i_m
            cost[:, 1:, 0] = a_k
            cost[:, 1:, 1:] = torch.where(support, d_km[k_idx[:, :, None], m_idx[:, None, :]],
                                          zero)
            atom = torch.full((chunk.numel(), 1), alpha, dtype=d.dtype, device=device)
            w1 = _solve_batch(torch.cat([atom, (1 - alpha) * pm], 1).cpu().numpy(),
                              torch.cat([atom, (1 - alpha) * qm], 1).cpu().numpy(),
                              cost.cpu().numpy(), threads)
            kappa[chunk] = (1.0 - torch.from_numpy(w1).to(device) / de) / (1.0 - alpha)
            stats.solved += chunk.numel()
    for item in in_flight:
        _finish(item, kappa)
    return kappa


def _finish(item: tuple, kappa: torch.Tensor) -> None:
    """Wait for a chunk's merged problems and write ``kappa = 1 - X / d`` for the chunk."""
    chunk, x, need, de, wait = item
    x[need] += torch.from_numpy(wait()).to(x.device)
    kappa[chunk] = 1.0 - x / de



def _shared_bounds(tables: Distances, src: torch.Tensor, dst: torch.Tensor, d: torch.Tensor,
                   mu: _Measure, nu: _Measure, alpha: float, certify_tol: float, block: int,
                   stats: EngineStats, settle: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` of :func:`bound_edges` for edges with two neighbour parts.

    Solves ``X0 = OT(p, q; C)`` once per distinct ``(p, q)`` pair (bounded memory: the shared
    problems' cost blocks are built a chunk at a time).
    """
    device = d.device
    k_tab, m_tab, p_mass, q_mass = mu.table, nu.table, mu.mass, nu.mass
    d_kj, d_im, d_km = tables.d_kj, tables.d_im, tables.d_km
    dk, dm = k_tab.shape[1], m_tab.shape[1]
    p_key = torch.unique(torch.cat([k_tab.to(torch.float64), p_mass], 1), dim=0,
                         return_inverse=True)[1]
    q_key = torch.unique(torch.cat([m_tab.to(torch.float64), q_mass], 1), dim=0,
                         return_inverse=True)[1]
    pair = p_key[src] * (int(q_key.max()) + 1) + q_key[dst]
    pairs, pair_of_edge = torch.unique(pair, return_inverse=True)
    first_edge = torch.full((pairs.numel(),), src.numel(), dtype=torch.long, device=device)
    first_edge.scatter_reduce_(0, pair_of_edge, torch.arange(src.numel(), device=device),
                               reduce="amin")
    rep_i, rep_j = src[first_edge], dst[first_edge]
    stats.shared_problems += pairs.numel()
    x0 = np.empty(pairs.numel())
    f_pad = np.zeros((pairs.numel(), dk))
    g_pad = np.zeros((pairs.numel(), dm))
    slack = np.empty(pairs.numel())
    for part in _chunks(torch.arange(pairs.numel(), device=device), block, dk * dm):
        ri, rj = rep_i[part], rep_j[part]
        pm, qm = p_mass[ri], q_mass[rj]
        support = (pm > 0)[:, :, None] & (qm > 0)[:, None, :]
        cost = torch.where(support, d_km[k_tab[ri].clamp(min=0)[:, :, None],
                                         m_tab[rj].clamp(min=0)[:, None, :]], 0.0)
        pm_np, qm_np, cost_np = pm.cpu().numpy(), qm.cpu().numpy(), cost.cpu().numpy()
        for s, t in enumerate(part.tolist()):
            x0[t], f, g = _solve_one(pm_np[s], qm_np[s], cost_np[s])
            rows, cols = pm_np[s] > 0, qm_np[s] > 0
            f_pad[t, rows], g_pad[t, cols] = f[rows], g[cols]
            # (f, g) may miss feasibility by rounding; the lower bound pays for that residual.
            slack[t] = max(0.0, float((f[rows, None] + g[None, cols]
                                       - cost_np[s][np.ix_(rows, cols)]).max()))
    x0_t, slack_t = torch.from_numpy(x0).to(device), torch.from_numpy(slack).to(device)
    f_t, g_t = torch.from_numpy(f_pad).to(device), torch.from_numpy(g_pad).to(device)
    lo, hi = torch.empty_like(d), torch.empty_like(d)
    lam = min(1.0, alpha / (1.0 - alpha))
    inf = torch.tensor(math.inf, dtype=d.dtype, device=device)
    zero = torch.zeros((), dtype=d.dtype, device=device)
    for chunk in _chunks(torch.arange(src.numel(), device=device), block, 4 * (dk + dm)):
        i, j, de, pe = src[chunk], dst[chunk], d[chunk], pair_of_edge[chunk]
        pm, qm = p_mass[i], q_mass[j]
        rows, cols = pm > 0, qm > 0
        a_k = d_kj[k_tab[i].clamp(min=0), j[:, None]]  # A(k) = D(k, j)
        b_m = _gather_rows(d_im, i, m_tab[j]) - de[:, None]  # B(m) = D(i, m) - d
        f, g = f_t[pe], g_t[pe]
        # Plans: no swap (X0), and a share lam of every unit swapped (all of it for alpha >= 1/2).
        upper = x0_t[pe]
        if lam > 0:
            swap = _weighted_sum(pm, a_k) + _weighted_sum(qm, b_m)
            upper = torch.minimum(upper, lam * swap + (1.0 - lam) * upper)
        t_row = torch.where(rows, a_k - f, inf).amin(1)  # largest t that clips no row
        t_col = torch.where(cols, g - b_m, -inf).amax(1)  # smallest t that clips no column
        lower = torch.full_like(de, -math.inf)
        for t in (t_row, t_col, 0.5 * (t_row + t_col)):
            value = (torch.where(rows, pm * torch.minimum(f + t[:, None], a_k), zero).sum(1)
                     + torch.where(cols, qm * torch.minimum(g - t[:, None], b_m), zero).sum(1))
            lower = torch.maximum(lower, value)
        lower = lower - slack_t[pe]
        lo[chunk] = 1.0 - upper / de
        hi[chunk] = 1.0 - lower / de
    if settle:
        settled = hi - lo <= certify_tol / 2
        hi[settled] = lo[settled]
        stats.certified += int(settled.sum())
    return lo, hi
