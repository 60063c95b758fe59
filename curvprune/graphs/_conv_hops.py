r"""Hop tables of conv chains from their kernels: the same values as the edge-by-edge
min-plus products (:meth:`curvprune.graphs.neuron.HopTable.compose`), in a fraction of the work.

A conv layer's edge ``(c, y_in, x_in) -> (c', y, x)`` exists when ``y_in = s y - p + d k`` for a
kernel row ``k`` (and likewise for columns), and its length ``1 / |W[c', c, k_y, k_x]|`` does not
depend on the position. Along a path of ``h`` convs from node layer ``L`` to ``L + h`` ending at
target position ``t`` (per axis), every node is at ``y_j = S_j t + o_j`` with
``S_j = s_{j+1} \cdots s_h`` and an **offset** ``o_j`` fixed by the kernel rows taken above it
(``o_h = 0``, ``o_{j-1} = s_j o_j - p_j + d_j k_j``). So the shortest path from source
``(c_0, y_0, x_0)`` to target ``(c_h, t_y, t_x)`` is

.. math::

    D = \min \; \ell_1 + (\ell_2 + (\dots + \ell_h)) \quad \text{over channels and kernel
    positions with } y_0 = S_0 t_y + o_0,\; x_0 = S_0 t_x + o_0',

subject only to the intermediate nodes existing: ``0 <= S_j t + o_j < H_j`` for ``0 < j < h``
(padding removes them near the borders). Targets ``t`` that agree on those conditions for
every offset form one **class** per axis (the interior is one class; a few rows and columns
near each border are others), and within a pair of classes ``D`` depends only on the channel
pair and the offsets: one table ``R_0[o_y, o_x, c_0, c_h]`` per pair of classes, built from the
target side (``R_{j-1} = \min_{k_j, c_j} \ell_j + R_j`` over the offsets valid for the class),
then broadcast to every position.

**Exactness.** The tables hold the same floats as :meth:`~curvprune.graphs.neuron.HopTable.compose`:
both are the minimum, over exactly the structural paths, of ``l_1 + (l_2 + l_3)`` in IEEE
double (sums formed in the same order), and ``fl(a + min_i b_i) = min_i fl(a + b_i)`` because
rounded addition is monotone, so taking minima early (over paths that share an offset) changes
nothing. Zero weights have infinite length; a candidate that includes one is ``inf`` and cannot
lower a minimum, and a pair with no finite path is ``inf`` in both.

A table whose first layer is a conv and whose remainder is a dense table (a linear layer
next, after ``flatten``) is composed kernel position by kernel position with dense min-plus
products; a table whose first layer is linear, likewise. Any other chain (a layer whose
geometry cannot be recovered from its edges, a reshape between layers) is left to
:meth:`~curvprune.graphs.neuron.HopTable.compose` (``None`` is returned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._min_plus import min_plus
from .neuron import StructuralEdges as LayerEdges
from .neuron import layer_edges


@dataclass(frozen=True)
class _Geometry:
    """A conv layer as its edges describe it (verified by regenerating them)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]  # top, left
    dilation: tuple[int, int]
    groups: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]

    def axis(self, a: int) -> tuple[int, int, int, int]:
        """``(kernel, stride, padding, dilation)`` of axis ``a`` (0: rows, 1: columns)."""
        return self.kernel[a], self.stride[a], self.padding[a], self.dilation[a]


def _axis_params(pos_in: torch.Tensor, pos_out: torch.Tensor, widx: torch.Tensor,
                 n_w: int, extent: int) -> list[tuple[int, int, int, int]]:
    """Candidate ``(kernel, stride, padding, dilation)`` of one axis, from the edges: the
    stride from a weight that touches several output positions, else every stride up to the
    input's ``extent`` (only one position is touched: several strides fit the positions)."""
    lo = torch.full((n_w,), 1 << 40, dtype=torch.long).scatter_reduce(
        0, widx, pos_out, reduce="amin")
    hi = torch.full((n_w,), -1, dtype=torch.long).scatter_reduce(
        0, widx, pos_out, reduce="amax")
    spread = torch.where(hi >= 0, hi - lo, -1)
    w = int(spread.argmax())
    if int(spread[w]) > 0:
        mine = widx == w
        o, i = pos_out[mine], pos_in[mine]
        num = int(i[o.argmax()]) - int(i[o.argmin()])
        if num % int(spread[w]) or num // int(spread[w]) < 1:
            return []
        strides = [num // int(spread[w])]
    else:
        strides = list(range(1, extent + 2))
    out = []
    for stride in strides:
        const = torch.full((n_w,), 1 << 40, dtype=torch.long).scatter_reduce(
            0, widx, pos_in - stride * pos_out, reduce="amin")
        values = torch.unique(const[const < (1 << 40)])
        kernel = values.numel()
        dilation = int(values[1] - values[0]) if kernel > 1 else 1
        padding = -int(values[0])
        if padding >= 0 and dilation >= 1:
            out.append((kernel, stride, padding, dilation))
    return out


def conv_geometry(s: LayerEdges) -> _Geometry | None:
    """The conv geometry that generates exactly ``s``'s edges (same ``src``, ``dst``, ``widx``,
    checked by regenerating them with :func:`curvprune.graphs.neuron.layer_edges`), or ``None``."""
    if (s.in_shape is None or s.out_shape is None or len(s.in_shape) != 3
            or len(s.out_shape) != 3 or s.src.numel() == 0):
        return None
    c_in, h_in, w_in = s.in_shape
    c_out, h_out, w_out = s.out_shape
    src, dst, widx = s.src.cpu(), s.dst.cpu(), s.widx.cpu()
    n_w = int(widx.max()) + 1
    if n_w % c_out:
        return None
    rows = _axis_params((src // w_in) % h_in, (dst // w_out) % h_out, widx, n_w, h_in)
    cols = _axis_params(src % w_in, dst % w_out, widx, n_w, w_in)
    per_out = n_w // c_out
    for r in rows:
        for c in cols:
            if per_out % (r[0] * c[0]):
                continue
            cg_in = per_out // (r[0] * c[0])
            if c_in % cg_in or c_out % (c_in // cg_in):
                continue
            geometry = _Geometry((r[0], c[0]), (r[1], c[1]), (r[2], c[2]), (r[3], c[3]),
                                 c_in // cg_in, tuple(s.in_shape), tuple(s.out_shape))
            conv = nn.Conv2d(c_in, c_out, geometry.kernel, stride=geometry.stride,
                             padding=geometry.padding, dilation=geometry.dilation,
                             groups=geometry.groups, bias=False, device="meta")
            again = layer_edges(conv, s.in_shape, s.out_shape)
            if (torch.equal(again.src, src) and torch.equal(again.dst, dst)
                    and torch.equal(again.widx, widx)):
                return geometry
    return None


def _kernel_lengths(geometry: _Geometry, widx: torch.Tensor, length: torch.Tensor
                    ) -> torch.Tensor:
    """``[C_out, C_in, kh, kw]`` edge lengths by weight (``inf`` for a zero weight or a channel
    pair in different groups)."""
    c_in, c_out = geometry.in_shape[0], geometry.out_shape[0]
    kh, kw = geometry.kernel
    g = geometry.groups
    cg_in, cg_out = c_in // g, c_out // g
    flat = torch.full((c_out * cg_in * kh * kw,), math.inf, dtype=length.dtype,
                      device=length.device)
    flat[widx] = length
    grouped = flat.view(c_out, cg_in, kh, kw)
    if g == 1:
        return grouped
    out = torch.full((c_out, c_in, kh, kw), math.inf, dtype=length.dtype, device=length.device)
    for k in range(g):
        out[k * cg_out:(k + 1) * cg_out, k * cg_in:(k + 1) * cg_in] = \
            grouped[k * cg_out:(k + 1) * cg_out]
    return out


@dataclass
class _Axis:
    """One spatial axis of a path of ``h`` convs: the offsets of every level (``lo[j]`` ..
    ``lo[j] + size[j] - 1``), the scales ``S_j`` and the classes of the target coordinates."""

    lo: list[int]
    size: list[int]
    scale: list[int]
    params: list[tuple[int, int, int, int]]  # (kernel, stride, padding, dilation) per layer
    heights: list[int]  # extent of every node level along this axis
    cls: torch.Tensor  # [H_h] class of each target coordinate
    keys: list[tuple[tuple[bool, ...], ...]]  # per class: validity of every offset, level 1..h-1
    members: list[list[int]]  # per class: its target coordinates

    def valid(self, c: int, j: int) -> torch.Tensor:
        """Which offsets of level ``j`` (``0 < j < h``) are real nodes for class ``c``."""
        return torch.tensor(self.keys[c][j - 1], dtype=torch.bool)

    def needed(self, c: int) -> torch.Tensor:
        """Which source offsets (level 0) some target of class ``c`` has in range."""
        o = torch.arange(self.lo[0], self.lo[0] + self.size[0])
        t = torch.tensor(self.members[c])
        y = self.scale[0] * t[:, None] + o[None, :]
        return ((y >= 0) & (y < self.heights[0])).any(0)


def _axis(params: list[tuple[int, int, int, int]], heights: list[int]) -> _Axis:
    h = len(params)
    lo, hi, scale = [0] * (h + 1), [0] * (h + 1), [1] * (h + 1)
    for j in range(h, 0, -1):
        k, s, p, d = params[j - 1]
        lo[j - 1] = s * lo[j] - p
        hi[j - 1] = s * hi[j] - p + d * (k - 1)
        scale[j - 1] = s * scale[j]
    size = [hi[j] - lo[j] + 1 for j in range(h + 1)]
    keys: dict[tuple, int] = {}
    cls, members = [], []
    for t in range(heights[h]):
        key = tuple(tuple(0 <= scale[j] * t + o < heights[j] for o in range(lo[j], hi[j] + 1))
                    for j in range(1, h))
        if key not in keys:
            keys[key] = len(keys)
            members.append([])
        cls.append(keys[key])
        members[keys[key]].append(t)
    return _Axis(lo, size, scale, params, heights, torch.tensor(cls, dtype=torch.long),
                 list(keys), members)


def _step(variants: list[torch.Tensor], groups: list[tuple[int, torch.Tensor, torch.Tensor,
                                                           torch.Tensor, torch.Tensor]],
          kernel: torch.Tensor, ay: _Axis, ax: _Axis, j: int) -> list[torch.Tensor]:
    """One level down, for every group of class pairs at once: group ``g = (v, vy, vx, ny, nx)``
    gets ``R_{j-1}[o_y, o_x, c_{j-1}, c_h] = min over kernel positions and offsets (o_y', o_x')
    of level j allowed by ``vy``/``vx`` of  kernel[c_j, c_{j-1}, k_y, k_x] +
    variants[v][o_y', o_x', c_j, c_h]``, at the offsets ``ny``/``nx`` of level ``j - 1`` (the
    others stay ``inf``). A row ``variants[v][o_y', o_x']`` equal to another variant's row at
    the same offset is multiplied once (min-plus products are the cost)."""
    ky_n, sy, py, dy = ay.params[j - 1]
    kx_n, sx, px, dx = ax.params[j - 1]
    device = variants[0].device
    c_prev, c_h = kernel.shape[1], variants[0].shape[3]
    live = [torch.isfinite(r).flatten(2).any(2).cpu() for r in variants]  # [ny, nx] each
    # Distinct rows: (offset, content) -> index into ``rows``; per group its usable offsets.
    rows: list[torch.Tensor] = []
    seen: dict[tuple[int, int], list[int]] = {}
    usable = []
    for v, vy, vx, _, _ in groups:
        pick = vy[:, None] & vx[None, :] & live[v]
        iy, ix = pick.nonzero(as_tuple=True)
        ids = []
        for y, x in zip(iy.tolist(), ix.tolist()):
            row = variants[v][y, x]
            same = next((r for r in seen.get((y, x), []) if torch.equal(rows[r], row)), None)
            if same is None:
                same = len(rows)
                rows.append(row)
                seen.setdefault((y, x), []).append(same)
            ids.append(same)
        usable.append((iy, ix, torch.tensor(ids, dtype=torch.long)))
    out = [torch.full((ay.size[j - 1], ax.size[j - 1], c_prev, c_h), math.inf,
                      dtype=variants[0].dtype, device=device) for _ in groups]
    if not rows:
        return out
    stacked = torch.stack(rows)
    for ky in range(ky_n):
        for kx in range(kx_n):
            a = kernel[:, :, ky, kx].T  # [c_{j-1}, c_j]
            if not torch.isfinite(a).any():
                continue
            # Targets of every group's usable offsets, kept where the group needs them.
            plans, wanted = [], torch.zeros(len(rows), dtype=torch.bool)
            for (_, _, _, ny, nx), (iy, ix, ids) in zip(groups, usable):
                ty = sy * (iy + ay.lo[j]) - py + dy * ky - ay.lo[j - 1]
                tx = sx * (ix + ax.lo[j]) - px + dx * kx - ax.lo[j - 1]
                keep = ny[ty] & nx[tx]
                plans.append((ty[keep], tx[keep], ids[keep]))
                wanted[ids[keep]] = True
            if not wanted.any():
                continue
            index = wanted.nonzero().squeeze(1)
            where = torch.full((len(rows),), -1, dtype=torch.long)
            where[index] = torch.arange(index.numel())
            res = min_plus(a, stacked[index.to(device)])
            for r, (ty, tx, ids) in zip(out, plans):
                if ids.numel():
                    y, x = ty.to(device), tx.to(device)
                    r[y, x] = torch.minimum(r[y, x], res[where[ids].to(device)])
    return out


class ConvHops:
    """Builds the ``L -> L+2`` and ``L -> L+3`` hop tables of a chain from its kernels.

    ``structures`` are the layers' structural edges and ``layers`` the kept edges with their
    lengths (zero weights removed), as in :meth:`curvprune.graphs.neuron.NeuronGraph.build`;
    ``shapes[L]`` is node layer ``L``'s ``(C, H, W)``.
    """

    def __init__(self, structures: list[LayerEdges], layers: list, shapes: list[tuple]):
        self.layers = layers
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.geometry: list[_Geometry | None] = []
        self.linear: list[bool] = []
        for L, s in enumerate(structures):
            g = conv_geometry(s)
            # The conv must read and write the node layers as the tables lay them out.
            if g is not None and (tuple(shapes[L]) != g.in_shape
                                  or tuple(shapes[L + 1]) != g.out_shape):
                g = None
            self.geometry.append(g)
            self.linear.append(g is None and _is_dense(s))
        self._kernels: dict[int, torch.Tensor] = {}

    def kernel(self, L: int) -> torch.Tensor:
        if L not in self._kernels:
            layer = self.layers[L]
            self._kernels[L] = _kernel_lengths(self.geometry[L], layer.widx, layer.length)
        return self._kernels[L]

    def table(self, L: int, hops: int, layout, rest: torch.Tensor | None) -> torch.Tensor | None:
        """The values of the ``L -> L+hops`` table in ``layout`` (an engine ``_Layout``), or
        ``None`` where this chain is left to the edge-by-edge product. ``rest`` is the dense
        ``L+1 -> L+hops`` table when there is one (``None`` for ``hops == 2``: the one-hop
        table is built here)."""
        path = range(L, L + hops)
        if all(self.geometry[k] is not None for k in path):
            return self._conv_chain(L, hops, layout)
        if not layout.full:
            return None
        if hops == 2:
            if not self.linear[L + 1]:
                return None
            nxt = self.layers[L + 1]
            rest = torch.full((self.sizes[L + 1], self.sizes[L + 2]), math.inf,
                              dtype=nxt.length.dtype, device=nxt.length.device)
            rest[nxt.src, nxt.dst] = nxt.length
        if rest is None:
            return None
        if self.geometry[L] is not None:
            return self._conv_then_dense(L, rest)
        if self.linear[L]:
            first = self.layers[L]
            a = torch.full((self.sizes[L], self.sizes[L + 1]), math.inf,
                           dtype=first.length.dtype, device=first.length.device)
            a[first.src, first.dst] = first.length
            return min_plus(a, rest[None])[0]
        return None

    def _conv_chain(self, L: int, hops: int, layout) -> torch.Tensor:
        geoms = [self.geometry[k] for k in range(L, L + hops)]
        heights = [[self.shapes[L + j][1 + a] for j in range(hops + 1)] for a in (0, 1)]
        ay = _axis([g.axis(0) for g in geoms], heights[0])
        ax = _axis([g.axis(1) for g in geoms], heights[1])
        device = self.layers[L].length.device
        # R_{h-1}: the last layer's kernel, at offsets -p + d k.
        last = self.kernel(L + hops - 1)
        kh, _, ph, dh = ay.params[-1]
        kw, _, pw, dw = ax.params[-1]
        top = torch.full((ay.size[hops - 1], ax.size[hops - 1], last.shape[1], last.shape[0]),
                         math.inf, dtype=last.dtype, device=device)
        for ky in range(kh):
            for kx in range(kw):
                top[-ph + dh * ky - ay.lo[hops - 1], -pw + dw * kx - ax.lo[hops - 1]] = \
                    last[:, :, ky, kx].T
        pairs = [(cy, cx) for cy in range(len(ay.keys)) for cx in range(len(ax.keys))]
        variants, variant_of = [top], [0] * len(pairs)
        for j in range(hops - 1, 0, -1):
            # Pairs with the same R_j and the same conditions at level j share R_{j-1}.
            keys: dict[tuple, int] = {}
            groups = []
            for p, (cy, cx) in enumerate(pairs):
                vy, vx = ay.valid(cy, j), ax.valid(cx, j)
                if j == 1:
                    ny, nx = ay.needed(cy), ax.needed(cx)
                else:
                    ny = torch.ones(ay.size[j - 1], dtype=torch.bool)
                    nx = torch.ones(ax.size[j - 1], dtype=torch.bool)
                key = (variant_of[p], ay.keys[cy][j - 1], ax.keys[cx][j - 1],
                       tuple(ny.tolist()), tuple(nx.tolist()))
                if key not in keys:
                    keys[key] = len(groups)
                    groups.append((variant_of[p], vy, vx, ny, nx))
                variant_of[p] = keys[key]
            variants = _step(variants, groups, self.kernel(L + j - 1), ay, ax, j)
        c0 = self.shapes[L][0]
        ch = self.shapes[L + hops][0]
        pad = torch.full((len(ay.keys), len(ax.keys), ay.size[0] + 1, ax.size[0] + 1, c0, ch),
                         math.inf, dtype=last.dtype, device=device)
        for p, (cy, cx) in enumerate(pairs):
            pad[cy, cx, :-1, :-1] = variants[variant_of[p]]
        del variants
        return _fill(pad, layout, ay, ax, self.shapes[L], self.shapes[L + hops], device)

    def _conv_then_dense(self, L: int, rest: torch.Tensor) -> torch.Tensor:
        """``D[(c, y_in, x_in), :] = min over kernel positions and c' of
        kernel[c', c, k] + rest[(c', y, x), :]`` with ``y_in = s y - p + d k`` in range."""
        g = self.geometry[L]
        kernel = self.kernel(L)
        c_in, h_in, w_in = g.in_shape
        c_out, h_out, w_out = g.out_shape
        n_t = rest.shape[1]
        grid = rest.view(c_out, h_out, w_out, n_t)
        out = torch.full((c_in, h_in, w_in, n_t), math.inf, dtype=rest.dtype,
                         device=rest.device)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
        yo_all, xo_all = torch.arange(h_out), torch.arange(w_out)
        for ky in range(kh):
            yi = sh * yo_all - ph + dh * ky
            oy = (yi >= 0) & (yi < h_in)
            for kx in range(kw):
                xi = sw * xo_all - pw + dw * kx
                ox = (xi >= 0) & (xi < w_in)
                a = kernel[:, :, ky, kx].T  # [c_in, c_out]
                if not oy.any() or not ox.any() or not torch.isfinite(a).any():
                    continue
                ys, xs = yo_all[oy].to(rest.device), xo_all[ox].to(rest.device)
                b = grid[:, ys][:, :, xs].permute(1, 2, 0, 3).reshape(-1, c_out, n_t)
                res = min_plus(a, b).view(ys.numel(), xs.numel(), c_in, n_t)
                res = res.permute(2, 0, 1, 3)
                y_in = yi[oy].to(rest.device)[:, None]
                x_in = xi[ox].to(rest.device)[None, :]
                out[:, y_in, x_in] = torch.minimum(out[:, y_in, x_in], res)
        return out.view(c_in * h_in * w_in, n_t)


def _is_dense(s: LayerEdges) -> bool:
    """A linear layer: every (input, output) pair is one edge, weight ``dst * n_in + src``."""
    if s.src.numel() != s.n_in * s.n_out:
        return False
    dst = torch.arange(s.n_out).repeat_interleave(s.n_in)
    src = torch.arange(s.n_in).repeat(s.n_out)
    return (torch.equal(s.src.cpu(), src) and torch.equal(s.dst.cpu(), dst)
            and torch.equal(s.widx.cpu(), dst * s.n_in + src))


def _fill(pad: torch.Tensor, layout, ay: _Axis, ax: _Axis, source: tuple, target: tuple,
          device: torch.device) -> torch.Tensor:
    """Broadcast the per-class tables into ``layout``: the entry of source ``(c, y, x)`` and
    target ``(c', t_y, t_x)`` is ``pad[class(t_y), class(t_x), y - S t_y, x - S t_x, c, c']``
    (the last offset row and column, ``inf``, stand for offsets out of range)."""
    c0, h0, w0 = source
    ch, ht, wt = target
    wy, wx = layout.window
    n_src = c0 * h0 * w0
    values = torch.empty((n_src, ch * wy * wx), dtype=pad.dtype, device=device)
    cls_y, cls_x = ay.cls.to(device), ax.cls.to(device)
    step = max(1, (1 << 22) // max(1, ch * wy * wx))
    iy_w, ix_w = torch.arange(wy, device=device), torch.arange(wx, device=device)
    for start in range(0, n_src, step):
        a = torch.arange(start, min(n_src, start + step), device=device)
        c, y, x = a // (h0 * w0), (a // w0) % h0, a % w0
        if layout.full:
            ty, tx = iy_w[None, :].expand(a.numel(), wy), ix_w[None, :].expand(a.numel(), wx)
        else:
            ty = layout.y0.to(device)[a, None] + iy_w[None, :]
            tx = layout.x0.to(device)[a, None] + ix_w[None, :]
        oy = y[:, None] - ay.scale[0] * ty - ay.lo[0]
        ox = x[:, None] - ax.scale[0] * tx - ax.lo[0]
        oy = torch.where((ty < ht) & (oy >= 0) & (oy < ay.size[0]), oy, ay.size[0])
        ox = torch.where((tx < wt) & (ox >= 0) & (ox < ax.size[0]), ox, ax.size[0])
        gy = cls_y[ty.clamp(max=ht - 1)]
        gx = cls_x[tx.clamp(max=wt - 1)]
        block = pad[gy[:, :, None], gx[:, None, :], oy[:, :, None], ox[:, None, :],
                    c[:, None, None]]  # [n, wy, wx, ch]
        values[start:start + a.numel()] = block.permute(0, 3, 1, 2).reshape(a.numel(), -1)
    return values
