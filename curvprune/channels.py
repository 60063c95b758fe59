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
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .calibration import normalise_activity
from .engine import (
    CERTIFY_TOL,
    Distances,
    EngineStats,
    bound_edges,
    cut_error,
    cut_measures,
    node_measures,
    solve_edges,
)
from .errors import UntraceableModel
from .measures import padded_neighbours
from .minimum import MinimumSearch

__all__ = ["ChannelDistances", "ChannelGraph", "NodeSet", "UntraceableModel",
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

    @property
    def num_nodes(self) -> int:
        return self.inputs.numel()

    def same_structure(self, other: ChannelGraph) -> bool:
        return (
            [(s.name, s.count) for s in self.sets] == [(s.name, s.count) for s in other.sets]
            and torch.equal(self.src, other.src) and torch.equal(self.dst, other.dst)
        )


# --------------------------------------------------------------------------------------------
# Function families
# --------------------------------------------------------------------------------------------

# Move data without changing it: applied to the labels as they are to the values.
_MOVE = {
    "view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "t", "T", "mT",
    "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
    "cat", "concat", "concatenate", "stack", "split", "split_with_sizes", "chunk", "unbind",
    "__getitem__", "narrow", "select", "flip", "roll", "movedim", "moveaxis", "view_as",
    "reshape_as", "index_select", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "tensor_split", "hsplit", "vsplit", "dsplit", "tile",
    "repeat_interleave", "contiguous", "unfold",
}
# Keep labels as they are (same shape, no channel mixing, or only a dtype/device change).
_KEEP = {
    "clone", "detach", "to", "float", "double", "half", "bfloat16", "type",
    "type_as", "cpu", "cuda", "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardtanh",
    "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "softplus", "mish",
    "prelu", "rrelu", "threshold", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "batch_norm", "layer_norm", "group_norm",
    "instance_norm", "rms_norm", "local_response_norm", "normalize", "abs", "neg", "__neg__",
    "exp", "sqrt", "rsqrt", "square", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
    "softmax", "log_softmax", "_softmax", "erf", "sign", "reciprocal", "pow", "__pow__",
    "log", "log1p", "sin", "cos", "logsigmoid", "glu_inactive", "nan_to_num",
}
# Elementwise functions of several tensors (broadcasting).
_MERGE = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
    "__isub__", "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__div__",
    "__truediv__", "__rtruediv__", "__itruediv__", "true_divide", "maximum", "minimum",
    "addcmul", "lerp", "where",
}
# Spatial resampling of [N, C, *spatial]: channel labels per (example, channel) carry over.
_SPATIAL = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices",
    "_adaptive_max_pool2d", "lp_pool2d", "lp_pool1d", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "grid_sample_inactive",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp",
           "prod", "nansum", "nanmean"}
_MATMUL = {"matmul", "__matmul__", "bmm", "mm"}
# Results that are not graph values: shape queries, comparisons, factories.
_IGNORE = {
    "size", "dim", "numel", "shape", "dtype", "device", "is_floating_point", "__len__",
    "__bool__", "item", "tolist", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "isnan", "isinf", "isfinite", "any", "all",
    "argmax", "argmin", "argsort", "new_zeros", "new_ones", "new_empty", "new_full",
    "new_tensor", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
    "randn_like", "_assert", "is_contiguous", "stride", "data_ptr", "requires_grad_",
    "__format__", "__repr__", "__hash__", "get_device", "storage_offset", "element_size",
    "nelement", "ndimension", "__index__", "__int__", "__float__", "numpy", "equal",
    "allclose", "_is_view", "untyped_storage", "layout", "is_cuda", "ndim", "names",
    "requires_grad", "grad", "data", "is_leaf", "__get__",
}


def _unique_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distinct ``(a, b)`` pairs as a ``[2, P]`` tensor, sorted (a 1-D unique: fast)."""
    if a.numel() == 0:
        return torch.zeros((2, 0), dtype=torch.long, device=a.device)
    span = int(b.max()) + 1
    key = torch.unique(a * span + b)
    return torch.stack([key // span, key % span])


def _column_labels(lab: torch.Tensor) -> torch.Tensor | None:
    """The label of each column of ``lab`` (over dim -2, kept): its one label, ignoring -1.

    ``None`` if a column carries two different labels. Rows of -1 are padding or tokens that
    are no channel (halo windows, a class token), which attention mixes in without a channel.
    """
    valid = lab >= 0
    high = torch.where(valid, lab, -1).amax(-2, keepdim=True)
    low = torch.where(valid, lab, torch.iinfo(torch.long).max).amin(-2, keepdim=True)
    if not bool(((high < 0) | (high == low)).all()):
        return None
    return high


def _constant_labels(lab: torch.Tensor, dims: list[int]) -> torch.Tensor | None:
    """``lab`` reduced over ``dims`` (kept, size 1) where its valid labels are constant along
    them, ignoring -1 (padding, tokens without a channel); ``None`` where they vary."""
    if not dims:
        return lab
    valid = lab >= 0
    high = torch.where(valid, lab, -1).amax(dims, keepdim=True)
    low = torch.where(valid, lab, torch.iinfo(torch.long).max).amin(dims, keepdim=True)
    if not bool(((high < 0) | (high == low)).all()):
        return None
    return high


def _name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as Tensor.T or Tensor.shape
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _replace(obj, swap):
    """``obj`` with every tensor replaced by ``swap(tensor)`` (nested lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return swap(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_replace(item, swap) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace(item, swap) for item in obj)
    return obj


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------


class _Tracer:
    def __init__(self, model: nn.Module, batch: int):
        self.batch = batch
        self.labels = WeakIdKeyDictionary()
        self.sets: list[NodeSet] = []
        self.num_nodes = 0
        self.edges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.num_edges = 0
        self.weight_edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.module_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.module_outputs: list[int] = []
        self.modules: list[tuple[str, nn.Module]] = []
        self.module_index: dict[int, int] = {}
        self.candidates = [(name, m) for name, m in model.named_modules()
                           if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        # Tensors that hold a layer's weight as the forward uses it: the parameter, the
        # pruning reparametrisation (weight_orig * mask), a standardised weight (StdConv2d).
        self.owner = WeakIdKeyDictionary()
        for name, m in self.candidates:
            for attr in ("weight", "weight_orig"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor):
                    self.owner[t] = (name, m)
        self.untraced: dict[str, int] = {}
        # Unlabelled tensors computed from labelled ones: "weights" (attention logits, q k^T,
        # and what is computed from them alone) or "statistic" (a reduction across channels,
        # a comparison). Unlabelled tensors in neither are constants (parameters, buffers).
        self.derived = WeakIdKeyDictionary()
        self.skipped: list[str] = []  # layers that read no channel (attention weights, constants)
        self.activity: dict[int, torch.Tensor] = {}  # node set index -> [batch, count] raw

    # ---- bookkeeping ----------------------------------------------------------------------

    def new_set(self, name: str, kind: str, count: int) -> int:
        start = self.num_nodes
        self.sets.append(NodeSet(name, kind, start, count))
        self.num_nodes += count
        return start

    def add_edges(self, src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor,
                  module: int) -> int:
        first = self.num_edges
        self.edges.append((src, dst, length, module))
        self.num_edges += src.numel()
        return first

    def label(self, t) -> torch.Tensor | None:
        return self.labels.get(t) if isinstance(t, torch.Tensor) else None

    def set_label(self, t: torch.Tensor, label: torch.Tensor, measure: bool) -> None:
        self.labels[t] = label
        if measure and t.is_floating_point():
            self.measure(t, label)

    def measure(self, t: torch.Tensor, label: torch.Tensor) -> None:
        """Record mean |h| per (node, example) for the nodes present in ``t``."""
        valid = label >= 0
        if not bool(valid.any()):
            return
        keys = label[valid]
        values = t.detach()[valid].abs().to(torch.float64)
        # Sums per key by counting over the (small) range of keys present: no sort.
        low = int(keys.min())
        shifted = keys - low
        width = int(shifted.max()) + 1
        sums = torch.bincount(shifted, weights=values, minlength=width)
        counts = torch.bincount(shifted, minlength=width)
        present = torch.nonzero(counts).squeeze(1)
        unique = present + low
        sums, counts = sums[present], counts[present].to(torch.float64)
        nodes, examples = unique // self.batch, unique % self.batch
        means = sums / counts
        # Scatter into the node sets' activity tables (the last measurement wins).
        starts = torch.tensor([s.start for s in self.sets], device=t.device)
        set_of = torch.searchsorted(starts, nodes, right=True) - 1
        for s in torch.unique(set_of).tolist():
            pick = set_of == s
            table = self.activity.get(s)
            if table is None:
                table = torch.zeros((self.batch, self.sets[s].count), dtype=torch.float64,
                                    device=t.device)
                self.activity[s] = table
            table[examples[pick], nodes[pick] - self.sets[s].start] = means[pick]

    # ---- the model input -----------------------------------------------------------------

    def start(self, inputs: torch.Tensor) -> None:
        channels = inputs.shape[1]
        base = self.new_set("input", "input", channels)
        shape = [1] * inputs.dim()
        shape[1] = channels
        node = torch.arange(base, base + channels, device=inputs.device).view(shape)
        example = torch.arange(self.batch, device=inputs.device).view([-1] + [1] * (inputs.dim()
                                                                                   - 1))
        self.set_label(inputs, (node * self.batch + example).expand(inputs.shape).contiguous(),
                       measure=True)

    # ---- dispatch -------------------------------------------------------------------------

    def record(self, func, args: tuple, kwargs: dict, out) -> None:
        name = _name(func)
        inputs = [t for t in _tensors(args) + _tensors(list(kwargs.values()))
                  if self.label(t) is not None]
        if name in ("linear", "conv2d", "conv1d"):
            self.layer(name, args, kwargs, out)
            return
        if not inputs:
            self.derive(args, kwargs, out)
            self.derive_weight(args, kwargs, out)
            return
        if name in _IGNORE:
            self.mark(out, "statistic")
            return
        outs = _tensors(out)
        if not outs:
            if name == "__setitem__":
                self.setitem(args)
            return
        if name in _MOVE:
            self.move(func, args, kwargs, out)
        elif name in _KEEP:
            src = self.label(inputs[0])
            if out is not None and isinstance(out, torch.Tensor) and out.shape == src.shape:
                self.set_label(out, src, measure=True)
            else:
                self.fail(name)
        elif name in _MERGE:
            self.merge(name, args, kwargs, out)
        elif name in _SPATIAL:
            self.spatial(name, inputs[0], out)
        elif name in _REDUCE:
            self.reduce(name, args, kwargs, out)
        elif name in _MATMUL:
            self.matmul(name, args, out)
        elif func is torch.nn.functional.fold:
            self.fold(args, kwargs, out)
        elif name == "einsum":
            self.einsum(args, out)
        elif name == "scaled_dot_product_attention":
            self.attention(args, kwargs, out)
        elif name in ("pad",):
            self.pad(args, kwargs, out)
        elif name in ("copy_",):
            self.set_label(out, self.label(args[1]).expand(out.shape).contiguous()
                           if self.label(args[1]) is not None else
                           torch.full(out.shape, -1, dtype=torch.long, device=out.device),
                           measure=True)
        else:
            self.fail(name)
        self.mark(out, "statistic")  # outputs left without labels: statistics of channels

    def mark(self, out, kind: str) -> None:
        """Mark the unlabelled tensors of ``out`` as derived from channels (``kind``)."""
        for t in _tensors(out):
            if t not in self.labels and t not in self.derived:
                self.derived[t] = kind

    def derive(self, args, kwargs, out) -> None:
        """A function of unlabelled tensors only: derived if one of them is (statistic first)."""
        kinds = {self.derived.get(t) for t in _tensors(args) + _tensors(list(kwargs.values()))}
        if "statistic" in kinds:
            self.mark(out, "statistic")
        elif "weights" in kinds:
            self.mark(out, "weights")

    def derive_weight(self, args, kwargs, out) -> None:
        """A function of one layer's weight alone (same number of elements) is that weight."""
        if not isinstance(out, torch.Tensor):
            return
        owners = {id(self.owner[t][1]): self.owner[t] for t in
                  _tensors(args) + _tensors(list(kwargs.values())) if t in self.owner}
        if len(owners) == 1:
            (name, module), = owners.values()
            if out.numel() == module.weight.numel():
                self.owner[out] = (name, module)

    def fail(self, name: str) -> None:
        self.untraced[name] = self.untraced.get(name, 0) + 1

    # ---- families -------------------------------------------------------------------------

    def move(self, func, args, kwargs, out) -> None:
        def swap(t):
            lab = self.label(t)
            if lab is not None:
                return lab
            if t.is_floating_point() or t.is_complex():
                return torch.full(t.shape, -1, dtype=torch.long, device=t.device)
            return t  # index tensors stay
        if func is torch.nn.functional.unfold:  # im2col has no integer kernel: exact in float64
            lab = self.label(args[0]).to(torch.float64) + 1  # zero padding becomes label -1
            rest = _replace(args[1:], swap)
            moved = (func(lab, *rest, **_replace(kwargs, swap)) - 1).to(torch.long)
            self.set_label(out, moved, measure=False)
            return
        try:
            moved = func(*_replace(args, swap), **_replace(kwargs, swap))
        except RuntimeError:  # e.g. view() of a label that is a transposed (strided) view
            try:
                moved = func(*_replace(args, lambda t: swap(t).contiguous()),
                             **_replace(kwargs, lambda t: swap(t).contiguous()))
            except (RuntimeError, TypeError, IndexError) as exc:
                self.fail(f"{_name(func)} ({exc.__class__.__name__})")
                return
        except (TypeError, IndexError) as exc:
            self.fail(f"{_name(func)} ({exc.__class__.__name__})")
            return
        for value, lab in zip(_tensors(out), _tensors(moved)):
            if lab.shape != value.shape or lab.dtype != torch.long:
                self.fail(_name(func))
                return
            self.set_label(value, lab, measure=False)

    def fold(self, args, kwargs, out) -> None:
        """``F.fold`` (col2im) sums overlapping patches: followed where every output element
        sums elements of one channel (as ``F.unfold`` then ``F.fold`` of outlook attention)."""
        lab = self.label(args[0])
        valid = (lab >= 0).to(torch.float64)
        value = (lab + 1).to(torch.float64) * valid  # exact: labels are far below 2**26

        def fold(t):
            return torch.nn.functional.fold(t, *args[1:], **kwargs)
        count, total, square = fold(valid), fold(value), fold(value * value)
        if not bool((square * count == total * total).all()):  # two labels in one element
            self.fail("fold")
            return
        new = torch.where(count > 0, total / count.clamp(min=1) - 1, -1.0).round().long()
        self.set_label(out, new, measure=True)

    def setitem(self, args) -> None:
        target, index, value = args[0], args[1], args[2]
        lab = self.label(target)
        if lab is None:
            lab = torch.full(target.shape, -1, dtype=torch.long, device=target.device)
        lab = lab.clone()
        vlab = self.label(value) if isinstance(value, torch.Tensor) else None
        lab[index] = vlab if vlab is not None else -1
        self.set_label(target, lab, measure=True)

    def pad(self, args, kwargs, out) -> None:
        lab = self.label(args[0])
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        if mode == "constant":
            moved = torch.nn.functional.pad(lab, pad, value=-1)
        else:
            moved = torch.nn.functional.pad(lab.to(torch.float64), pad, mode=mode).to(torch.long)
        self.set_label(out, moved, measure=False)

    def spatial(self, name: str, x: torch.Tensor, out) -> None:
        lab = self.label(x)
        value = _tensors(out)[0]
        # One label per (example, channel); padded positions (-1) do not count.
        per_channel = lab.flatten(2).amax(2, keepdim=True) if lab.dim() > 2 else None
        if (per_channel is None or value.shape[:2] != lab.shape[:2]
                or not bool(((lab.flatten(2) == per_channel) | (lab.flatten(2) < 0)).all())):
            self.fail(name)
            return
        new = per_channel.view(list(lab.shape[:2]) + [1] * (value.dim() - 2))
        self.set_label(value, new.expand(value.shape).contiguous(), measure=True)

    def reduce(self, name: str, args, kwargs, out) -> None:
        x = args[0]
        lab = self.label(x)
        dim = args[1] if len(args) > 1 and not isinstance(args[1], bool) else kwargs.get("dim")
        if name == "norm":
            dim = args[2] if len(args) > 2 else kwargs.get("dim")
        value = _tensors(out)[0]
        if dim is None or (name in ("max", "min") and len(args) < 2 and "dim" not in kwargs):
            return  # a full reduction: a statistic, not a graph value
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = sorted(d % lab.dim() for d in dims)
        index = [slice(None)] * lab.dim()
        for d in dims:
            index[d] = slice(0, 1)
        first = lab[tuple(index)]
        if not bool((lab == first).all()):
            return  # reduced across channels: a statistic (as a norm's mean), not graph nodes
        keepdim = value.dim() == lab.dim()
        new = first if keepdim else first.squeeze(dims) if dims else first
        if new.shape != value.shape:
            self.fail(name)
            return
        self.set_label(value, new.contiguous(), measure=True)

    def matmul(self, name: str, args, out) -> None:
        a, b = args[0], args[1]
        la, lb = self.label(a), self.label(b)
        value = _tensors(out)[0]
        if a.dim() < 2 or b.dim() < 2:
            self.fail(name)
            return

        def rows_only(lab):  # constant along the contracted (last) dim
            return lab is None or bool((lab == lab[..., :1]).all())

        def cols_only(lab):
            return lab is None or _column_labels(lab) is not None

        a_contracted = la is not None and not rows_only(la)
        b_contracted = lb is not None and not cols_only(lb)
        if (a_contracted or la is None) and (b_contracted or lb is None):
            # q k^T (or q against a relative-position table, or a constant query, as a class
            # token's, against k^T): channels weigh the mixing; the result is attention
            # logits, not a channel tensor.
            self.mark(value, "weights")
            return
        if lb is not None and cols_only(lb) and (la is None or not rows_only(la)):
            # attn @ v; or channels of a layer used as attention weights over the positions
            # of v (outlook attention): they weigh the mixing, v's channels carry over
            new = _column_labels(lb)
        elif lb is None and la is not None and rows_only(la):
            new = la[..., :1]
        else:
            self.fail(name)  # channel mixing by something that is not a traced layer
            return
        self.set_label(value, torch.broadcast_to(new, value.shape).contiguous(), measure=True)

    def einsum(self, args, out) -> None:
        """``einsum`` as ``matmul``: channels contracted give attention logits; otherwise the
        labelled operand's channels carry over (the others weigh positions or tokens)."""
        equation = args[0] if isinstance(args[0], str) else None
        operands = _tensors(args[1:])
        value = _tensors(out)[0]
        if equation is None or "..." in equation or "->" not in equation:
            self.fail("einsum")
            return
        left, result = equation.replace(" ", "").split("->")
        subscripts = left.split(",")
        if len(subscripts) != len(operands) or any(len(set(s)) != len(s) for s in subscripts):
            self.fail("einsum")
            return
        carried = []  # per labelled operand: its labels reduced over contracted letters, or None
        for letters, t in zip(subscripts, operands):
            lab = self.label(t)
            if lab is None:
                continue
            contracted = [d for d, c in enumerate(letters) if c not in result]
            reduced = _constant_labels(lab, contracted)
            carried.append((letters, reduced))
        varying = [r is None for _, r in carried]
        if all(varying):  # every labelled operand has channels contracted: q k^T
            self.mark(value, "weights")
            return
        if len(carried) != 1:
            self.fail("einsum")  # channels of two tensors meet: not a known form
            return
        letters, reduced = carried[0]
        kept = "".join(c for c in letters if c in result)
        lab = reduced.reshape([n for c, n in zip(letters, reduced.shape) if c in result])
        order = [kept.index(c) for c in result if c in kept]
        lab = lab.permute(order) if order else lab
        shape = [lab.shape[order.index(kept.index(c))] if c in kept else 1 for c in result]
        lab = lab.reshape(shape)
        self.set_label(value, torch.broadcast_to(lab, value.shape).contiguous(), measure=True)

    def attention(self, args, kwargs, out) -> None:
        v = args[2] if len(args) > 2 else kwargs["value"]
        lab = self.label(v)
        new = None if lab is None else _column_labels(lab)
        if new is None:
            self.fail("scaled_dot_product_attention")
            return
        self.set_label(out, torch.broadcast_to(new, out.shape).contiguous(), measure=True)

    def merge(self, name: str, args, kwargs, out) -> None:
        value = out if isinstance(out, torch.Tensor) else _tensors(out)[0]
        operands = [t for t in _tensors(args) + _tensors(list(kwargs.values()))
                    if t.is_floating_point() or t.dtype == torch.long]
        labelled = []
        seen = set()
        weights = [t for t in operands
                   if self.label(t) is None and self.derived.get(t) == "weights"]
        for t in operands:
            lab = self.label(t)
            if lab is None or id(t) in seen:
                continue
            seen.add(id(t))
            try:
                labelled.append(torch.broadcast_to(lab, value.shape).reshape(-1))
            except RuntimeError:
                self.fail(name)
                return
        if weights and not self.weighs_positions(weights, labelled, value):
            # attention weights (or channels contracted with a parameter) meet channels
            self.fail(f"{name} of channels and attention weights")
            return
        if len(labelled) == 1:
            self.set_label(value, labelled[0].view(value.shape).clone(), measure=True)
            return
        batch = self.batch
        nodes = [torch.where(lab >= 0, lab // batch, -1) for lab in labelled]
        # The structure is the same for every example: read it from example 0's elements.
        element_example = torch.stack([torch.where(lab >= 0, lab % batch, -1)
                                       for lab in labelled]).amax(0)
        ex0 = element_example == 0
        nodes0 = [n[ex0] for n in nodes]
        distinct = [int(torch.unique(n[n >= 0]).numel()) for n in nodes0]
        if max(distinct) == 0:
            self.set_label(value, labelled[0].view(value.shape).clone(), measure=True)
            return
        keys = [n for n, c in zip(nodes, distinct) if c == max(distinct)]
        keys0 = [n for n, c in zip(nodes0, distinct) if c == max(distinct)]
        # Union the nodes that meet in one element: each component is one merged channel.
        key_nodes = torch.unique(torch.cat([k[k >= 0] for k in keys0]))
        local = {int(g): i for i, g in enumerate(key_nodes.tolist())}
        lookup = torch.full((int(key_nodes.max()) + 1,), -1, dtype=torch.long)
        lookup[key_nodes.cpu()] = torch.arange(key_nodes.numel())
        keys_cpu = [k.cpu() for k in keys0]
        pairs_a, pairs_b = [], []
        for k1, k2 in zip(keys_cpu[:-1], keys_cpu[1:]):
            both = (k1 >= 0) & (k2 >= 0)
            pair = _unique_pairs(lookup[k1[both]], lookup[k2[both]])
            pairs_a.append(pair[0])
            pairs_b.append(pair[1])
        n_local = len(local)
        a = torch.cat(pairs_a).numpy() if pairs_a else np.zeros(0, dtype=np.int64)
        b = torch.cat(pairs_b).numpy() if pairs_b else np.zeros(0, dtype=np.int64)
        adjacency = scipy.sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(n_local, n_local))
        _, component = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
        # Number components by their smallest node id (deterministic).
        component = torch.from_numpy(component).long()
        first = torch.full((int(component.max()) + 1,), n_local, dtype=torch.long)
        first.scatter_reduce_(0, component, torch.arange(n_local), reduce="amin")
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(first.numel())
        component = rank[component].to(value.device)
        lookup = lookup.to(value.device)
        base = self.new_set(name, "merge", first.numel())
        out_node = torch.full_like(labelled[0], -1)
        example = torch.full_like(labelled[0], -1)
        for k, lab in zip(keys, [lab for lab, c in zip(labelled, distinct)
                                 if c == max(distinct)]):
            take = (out_node < 0) & (k >= 0)
            out_node[take] = base + component[lookup[k[take]]]
            example[take] = lab[take] % batch
        # Edges of length 1 from every labelled operand's node to the merged node.
        pairs = []
        for n in nodes:
            both = (n >= 0) & (out_node >= 0) & ex0
            pairs.append(torch.stack([n[both], out_node[both]]))
        joined = torch.cat(pairs, 1)
        pair = _unique_pairs(joined[0], joined[1])
        self.add_edges(pair[0], pair[1], torch.ones(pair.shape[1], dtype=torch.float64,
                                                    device=pair.device), -1)
        new = torch.where(out_node >= 0, out_node * batch + example, -1)
        self.set_label(value, new.view(value.shape), measure=True)

    def weighs_positions(self, weights: list[torch.Tensor], labelled: list[torch.Tensor],
                         value: torch.Tensor) -> bool:
        """Whether attention weights in a merge only weigh positions or tokens: constant along
        every dim where the channels (nodes) vary, as the per-token weights of additive
        attention (SwiftFormer); they then act on the channels as a constant does."""
        for w in weights:
            shape = [1] * (value.dim() - w.dim()) + list(w.shape)
            dims = [d for d, n in enumerate(shape) if n > 1]
            for lab in labelled:
                lab = lab.view(value.shape)
                nodes = torch.where(lab >= 0, lab // self.batch, -1)
                if dims and _constant_labels(nodes, dims) is None:
                    return False
        return True

    def one_node_per_channel(self, lab: torch.Tensor) -> bool:
        """Whether every channel (dim 1) of ``lab`` carries one node at all its positions."""
        moved = lab.movedim(1, -1).reshape(-1, lab.shape[1])
        valid = moved >= 0
        nodes = torch.where(valid, moved // self.batch, -1)
        high = nodes.amax(0)
        low = torch.where(valid, nodes, int(high.max()) + 1).amin(0)
        fed = valid.any(0)
        return bool((high[fed] == low[fed]).all())

    def examples(self, mod_name: str, name: str, lab, x: torch.Tensor,
                 channel_dim: int) -> torch.Tensor | None:
        """Example index per Linear row ``[...]`` or per Conv2d sample ``[N]`` (-1: none)."""
        batch = self.batch
        if lab is None:
            return None
        valid = lab >= 0
        reduce = [channel_dim] if name == "linear" else list(range(1, lab.dim()))
        high = torch.where(valid, lab % batch, -1).amax(dim=reduce)
        low = torch.where(valid, lab % batch, batch).amin(dim=reduce)
        if bool(((high >= 0) & (high != low)).any()):
            self.fail(f"{mod_name} mixes calibration examples in one row")
            return None
        if x.shape[0] == batch:  # rows without a channel label (a class token): dim 0
            first = torch.arange(batch, device=lab.device).view([-1] + [1] * (high.dim() - 1))
            high = torch.where(high >= 0, high, first.expand_as(high))
        return high

    def layer(self, name: str, args, kwargs, out) -> None:
        x = args[0]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        owner = next(((n, m) for n, m in self.candidates if getattr(m, "weight", None)
                      is weight), None)
        if owner is None and weight in self.owner:
            owner = self.owner[weight]
            if owner[1].weight.shape != weight.shape:
                owner = None
        lab = self.label(x)
        if owner is None:
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            if (lab is not None and name == "conv2d" and x.dim() == 4
                    and groups == x.shape[1] == weight.shape[0]):
                self.spatial(name, x, out)  # a fixed filter per channel (blur pooling)
            elif lab is not None:
                self.fail(f"{name} with a weight that is not a Conv2d/Linear module's")
            return
        mod_name, module = owner
        if lab is None or not bool((lab >= 0).any()):
            kind = self.derived.get(x)
            if kind == "statistic":
                self.fail(f"{mod_name} reads no traced channel")
            else:  # attention weights (talking heads) or constants: not a channel layer
                self.skipped.append(mod_name)
                if kind is not None:
                    self.mark(out, kind)
            return
        if id(module) in self.module_index:
            self.fail(f"{mod_name} called twice (a shared layer)")
            return
        out_features = weight.shape[0]
        value = out
        if name in ("conv2d", "conv1d"):
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            if x.dim() != (4 if name == "conv2d" else 3):
                self.fail(f"{name} on an unbatched input")
                return
            channel_dim, in_channels = 1, x.shape[1]
            if name == "conv1d" and not self.one_node_per_channel(lab):
                self.fail(f"{mod_name} convolves channels laid out as positions")
                return
        else:
            groups, channel_dim, in_channels = 1, x.dim() - 1, x.shape[-1]
        index = len(self.modules)
        self.modules.append((mod_name + ".weight", module))
        self.module_index[id(module)] = index
        base = self.new_set(mod_name, "layer", out_features)
        self.module_outputs.append(base)
        # Output labels: node base + o; the example of each output row (Linear) or sample
        # (Conv2d) is read from the input labels, else from dim 0 when it is the batch.
        example = self.examples(mod_name, name, lab, x, channel_dim)
        if example is None:
            return
        shape = [1] * value.dim()
        shape[-1 if name == "linear" else 1] = out_features
        node = torch.arange(base, base + out_features, device=value.device).view(shape)
        example = example.view(list(example.shape) + [1] * (value.dim() - example.dim()))
        new = torch.where(example >= 0, node * self.batch + example, -1)
        self.set_label(value, new.expand(value.shape).contiguous(), measure=True)
        # Which nodes feed each input channel: unique (node, channel) pairs.
        moved = lab.movedim(channel_dim, -1).reshape(-1, in_channels)
        # The structure is the same for every example: read it from example 0's elements.
        valid = (moved >= 0) & (moved % self.batch == 0)
        channel = torch.arange(in_channels, device=lab.device).expand_as(moved)
        high = torch.where(valid, moved, -1).amax(0)
        low = torch.where(valid, moved, moved.max() + 1).amin(0)
        fed = valid.any(0)
        if bool((high[fed] == low[fed]).all()):  # one node per channel: the common case
            chans = torch.nonzero(fed).squeeze(1)
            pairs = torch.stack([high[chans] // self.batch, chans])
        else:
            pairs = _unique_pairs(moved[valid] // self.batch, channel[valid])
        if name == "linear" and in_channels > 1 and torch.unique(pairs[0]).numel() > 1:
            row_nodes = torch.where(valid, moved // self.batch, -1)
            one_per_row = (row_nodes.amax(1) == torch.where(valid, row_nodes,
                                                              row_nodes.amax() + 1).amin(1))
            if bool(one_per_row[valid.any(1)].all()):
                self.fail(f"{mod_name} mixes positions (tokens), not channels")
                return
        self.module_inputs.append((pairs[0], pairs[1]))
        src_nodes, pair_node = torch.unique(pairs[0], return_inverse=True)
        w = weight.detach().to(torch.float64)
        per_group = w.shape[1]
        w_sq = w.pow(2).reshape(out_features, per_group, -1).sum(2)  # [O, Cin/groups]
        # Full [O, Cin] squared norms: row o holds its group's input channels, zero elsewhere.
        out_per_group = out_features // groups
        group_cols = ((torch.arange(out_features, device=w.device) // out_per_group)[:, None]
                      * per_group + torch.arange(per_group, device=w.device))
        full = torch.zeros(out_features, in_channels, dtype=torch.float64, device=w.device)
        full.scatter_(1, group_cols, w_sq)
        assign = torch.zeros(src_nodes.numel(), in_channels, dtype=torch.float64,
                             device=w.device)
        assign[pair_node, pairs[1]] = 1.0
        norm_sq = full @ assign.T  # [O, U]
        edge_o, edge_u = torch.nonzero(norm_sq > 0, as_tuple=True)
        first = self.add_edges(src_nodes[edge_u], base + edge_o,
                               1.0 / norm_sq[edge_o, edge_u].sqrt(), index)
        edge_of = torch.full(norm_sq.shape, -1, dtype=torch.long, device=w.device)
        edge_of[edge_o, edge_u] = torch.arange(first, first + edge_o.numel(), device=w.device)
        # Weight element (o, c_local, k) -> edge (node of channel c, o) for each such node.
        kernel = w[0, 0].numel()
        # For each pair (u, c), the weight rows o whose group holds channel c.
        c_pair, u_pair = pairs[1], pair_node
        g_pair = c_pair // per_group
        c_local = c_pair % per_group
        rows = (g_pair[:, None] * out_per_group
                + torch.arange(out_per_group, device=w.device)[None, :])  # [P, O/g]
        edges = edge_of[rows, u_pair[:, None].expand_as(rows)]
        base_w = (rows * per_group + c_local[:, None]) * kernel  # [P, O/g]
        kk = torch.arange(kernel, device=w.device)
        widx = (base_w[:, :, None] + kk).reshape(-1)
        eidx = edges[:, :, None].expand(-1, -1, kernel).reshape(-1)
        keep = eidx >= 0
        self.weight_edges.append((widx[keep], eidx[keep]))

    # ---- result ---------------------------------------------------------------------------

    def graph(self, output: torch.Tensor, device: torch.device) -> ChannelGraph:
        out_lab = self.label(output)
        if out_lab is None or not bool((out_lab >= 0).any()):
            self.fail("the model output (it carries no traced channel)")
        if self.untraced:
            listed = ", ".join(f"{k} (x{v})" for k, v in sorted(self.untraced.items()))
            raise UntraceableModel(
                f"the channel tracer cannot follow: {listed}", sorted(self.untraced)
            )
        if not self.modules:
            raise ValueError("the model has no Conv2d or Linear layer to score.")
        n = self.num_nodes
        if self.edges:
            src = torch.cat([e[0].to(device) for e in self.edges])
            dst = torch.cat([e[1].to(device) for e in self.edges])
            length = torch.cat([e[2].to(device) for e in self.edges])
            module = torch.cat([torch.full((e[0].numel(),), e[3], dtype=torch.long,
                                           device=device) for e in self.edges])
        else:
            src = dst = module = torch.zeros(0, dtype=torch.long, device=device)
            length = torch.zeros(0, dtype=torch.float64, device=device)
        inputs = torch.zeros(n, dtype=torch.bool, device=device)
        inputs[self.sets[0].start:self.sets[0].start + self.sets[0].count] = True
        outputs = torch.zeros(n, dtype=torch.bool, device=device)
        if out_lab is not None:
            nodes = out_lab[out_lab >= 0] // self.batch
            outputs[nodes.to(device)] = True
        activity = torch.zeros((self.batch, n), dtype=torch.float64, device=device)
        for s, table in self.activity.items():  # min-max per node set, as per neuron layer
            node_set = self.sets[s]
            activity[:, node_set.start:node_set.start + node_set.count] = normalise_activity(
                table.to(device))
        if not torch.isfinite(activity).all():
            raise ValueError("the activations contain NaN or Inf; check the data and the model.")
        return ChannelGraph(
            sets=list(self.sets), src=src, dst=dst, length=length, module=module,
            modules=list(self.modules),
            weight_edges=[(w.to(device), e.to(device)) for w, e in self.weight_edges],
            module_inputs=[(u.to(device), c.to(device)) for u, c in self.module_inputs],
            module_outputs=list(self.module_outputs),
            inputs=inputs, outputs=outputs, activity=activity, unscored=list(self.skipped),
        )


class _LabelMode(TorchFunctionMode):
    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer.record(func, args, kwargs, out)
        return out


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
    tracer = _Tracer(model, inputs.shape[0])
    inputs = inputs.detach().clone()
    if not torch.isfinite(inputs).all():
        raise ValueError("the calibration inputs contain NaN or Inf; check the data.")
    tracer.start(inputs)
    try:
        with _LabelMode(tracer):
            output = model(inputs)
    except UntraceableModel:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"the model rejects calibration inputs of shape {tuple(inputs.shape)} and dtype "
            f"{inputs.dtype}: {exc}"
        ) from exc
    if isinstance(output, (tuple, list)) or not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; expected one tensor.")
    return tracer.graph(output, device if device is not None else inputs.device)


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


class ChannelDistances:
    r"""Shortest-path distances of the channel graph on the pairs the measures need only.

    Looked up like the dense table of :func:`channel_distances`: ``distances[a, b]`` with
    index tensors ``a`` and ``b`` (broadcast) returns float64 ``D(a, b)`` for every stored pair
    and ``+inf`` for the others. The engine (:class:`~curvprune.engine.Distances`,
    :func:`~curvprune.engine.bound_edges`, :func:`~curvprune.engine.solve_edges`) reads only
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
        out = torch.full(key.shape, math.inf, dtype=torch.float64, device=self.keys.device)
        if self.keys.numel() and key.numel():
            pos = torch.searchsorted(self.keys, key).clamp_(max=self.keys.numel() - 1)
            found = self.keys[pos] == key
            out[found] = self.values[pos[found]]
        return out.view(rows.shape)


def _bool(matrix: scipy.sparse.spmatrix) -> scipy.sparse.csr_matrix:
    """The nonzero pattern of ``matrix`` as a csr matrix of float32 ones (sorted, no
    duplicates)."""
    matrix = scipy.sparse.csr_matrix(matrix)
    matrix.sum_duplicates()
    matrix.sort_indices()
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
    return _bool(_bool(x @ group) @ y[first])


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
    # (I + A) S (I + A) = T + A T with T = S + S A.
    after = _bool(scored + _bool_product(scored, pattern))
    needed = _bool(after + _bool_product(pattern, after))
    return adjacency, needed


def needed_distance_bytes(graph: ChannelGraph) -> int:
    """Bytes :func:`needed_distances` keeps for ``graph``: 16 per needed node pair (one sparse
    product counts them; no Dijkstra runs)."""
    return 16 * int(_needed_structure(graph)[1].nnz)


def needed_distances(graph: ChannelGraph, *, block: int = 1 << 25,
                     memory_budget: int | None = None,
                     _by_levels: bool = True) -> ChannelDistances:
    r"""The shortest-path distances of ``graph`` on the pairs the measures need, no more.

    The measures of a layer edge ``i -> j`` live on ``i`` and its in-neighbours ``k``, and on
    ``j`` and its out-neighbours ``m``, so its transport problem reads :math:`D(k, m)`,
    :math:`D(k, j)`, :math:`D(i, m)` and :math:`D(i, j)` only. Stored: every pair ``(a, b)``
    with ``a`` in :math:`\{i\} \cup N^-(i)` and ``b`` in :math:`\{j\} \cup N^+(j)` for some
    layer edge ``i -> j`` (all in-/out-neighbours, active or not: the measures of every example
    are supported there), i.e. the pattern of :math:`(I + A)\, S\, (I + A)` with ``A`` the
    adjacency and ``S`` the layer edges.

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
    more is refused with a ``ValueError`` before any Dijkstra runs (counting the pairs is one
    sparse product, seconds even on full-width ImageNet models).
    """
    n = graph.num_nodes
    adjacency, needed = _needed_structure(graph)
    need = 16 * int(needed.nnz)
    if memory_budget is not None and need > memory_budget:
        raise ValueError(
            f"the channel graph has {n} nodes and its measures need the distances of "
            f"{needed.nnz} node pairs ({need / 2**30:.1f} GiB), over memory_budget "
            f"({memory_budget / 2**30:.1f} GiB). This does not depend on the number of "
            "images, the input size or the tolerance (it is fixed by the model's widths): "
            f"raise memory_budget to at least {need / 2**30:.1f} GiB if the machine has the "
            "memory, or score a narrower model (or granularity='neuron' on a small chain)."
        )
    device = graph.length.device
    if _by_levels and bool((graph.src < graph.dst).all()) and bool((graph.length > 0).all()):
        from ._channel_distances import needed_pair_distances  # min-plus, level by level
        return ChannelDistances(*needed_pair_distances(adjacency, needed, block=block,
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


def channel_edge_bounds(
    graph: ChannelGraph,
    distances: torch.Tensor | ChannelDistances,
    alpha: float,
    *,
    tolerance: float = CERTIFY_TOL,
    stats=None,
    threads: int = 1,
    on_example=None,
    upper: torch.Tensor | None = None,
    on_solved=None,
    on_progress=None,
    edges: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified bounds on the curvature of every layer edge of ``graph``, minimum over the
    traced batch's examples.

    Returns ``(upper, lower, live)`` over all edges (``[num_edges]``): ``lower <= kappa <=
    upper`` with ``upper - lower <= tolerance`` (both exact and equal for ``tolerance=0``),
    where ``kappa`` is the minimum over the batch's examples and ``upper`` (upper bounds from
    earlier batches); merge edges, which are no weight, stay ``+inf``. ``live``: whether the
    edge was live on at least one example. The tolerance is spent as in
    :func:`curvprune.neural_curvature` (``docs/method.md``): the measures are cut within
    ``tolerance / 4`` per edge, the bounds are widened by that, and the minimum search stops
    once an edge's bounds are ``tolerance`` apart. Only the (edge, example)s that can matter are
    solved exactly (:mod:`curvprune.minimum`). ``distances``: the dense table of
    :func:`channel_distances` or the needed pairs of :func:`needed_distances` (the same
    numbers). ``edges``: a bool mask over all edges; only those
    layer edges are scored (the others stay ``+inf``). ``on_example()``, ``on_solved(count)``
    and ``on_progress(settled, total)`` report progress.
    """
    stats = stats if stats is not None else EngineStats()
    n = graph.num_nodes
    in_table = padded_neighbours(graph.dst, graph.src, n)
    out_table = padded_neighbours(graph.src, graph.dst, n)
    chosen = graph.module >= 0
    if edges is not None:
        chosen &= edges.to(chosen.device)
    scored = torch.nonzero(chosen).squeeze(1)
    src, dst = graph.src[scored], graph.dst[scored]
    d = distances[src, dst]
    tables = Distances(distances, distances, distances)
    cut_tol = tolerance / 2

    in_len = padded_neighbours(graph.dst, graph.length, n, fill=0.0)
    out_len = padded_neighbours(graph.src, graph.length, n, fill=0.0)

    def measures(b: int):
        mu = node_measures(in_table, graph.activity[b], in_len)
        nu = node_measures(out_table, graph.activity[b], out_len)
        mu.has &= ~graph.inputs  # an input node's measure is its point mass
        nu.has &= ~graph.outputs  # so is an output node's
        # Every path k -> i -> j -> m is at most reach + D(i, j) + reach long (edge lengths
        # bound shortest paths), so the cut of negligible masses is bounded as in the engine.
        return cut_measures(mu, nu, src, dst, d, cut_tol)

    initial = None if upper is None else [upper[scored].clone()]
    search = MinimumSearch([torch.arange(scored.numel(), device=d.device)], [scored.numel()],
                           initial=initial, tolerance=tolerance)
    live = torch.zeros(graph.src.numel(), dtype=torch.bool, device=d.device)
    for b in range(graph.activity.shape[0]):
        acts = graph.activity[b]
        dead = ((~graph.inputs[src]) & (acts[src] == 0)) | ((~graph.outputs[dst])
                                                            & (acts[dst] == 0))
        mu, nu = measures(b)
        lo, hi = bound_edges(src, dst, d, dead, mu, nu, tables, alpha, certify_tol=tolerance,
                             stats=stats, settle=False,
                             error=cut_error(mu, nu, src, dst, dead, cut_tol))
        search.add(0, b, lo, hi)
        live[scored] |= ~dead
        if on_example is not None:
            on_example()

    def solve(group: int, b: int, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, nu = measures(b)
        value = solve_edges(src[edges], dst[edges], d[edges], mu, nu, tables, alpha,
                            stats=stats, threads=threads)
        error = cut_error(mu, nu, src[edges], dst[edges],
                          torch.zeros_like(edges, dtype=torch.bool), cut_tol)
        return value - error, value + error

    minimum = search.resolve(solve, on_solved=on_solved, on_progress=on_progress)[0]
    stats.bounded += search.opened - search.solved
    hi = torch.full((graph.src.numel(),), math.inf, dtype=torch.float64, device=d.device)
    lo = hi.clone()
    hi[scored] = minimum
    lo[scored] = search.lower()[0]
    return hi, lo, live
