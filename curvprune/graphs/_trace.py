"""The channel tracer: runs a model under a :class:`~torch.overrides.TorchFunctionMode` and
follows every channel through it by label tensors (the design is in
:mod:`curvprune.graphs.channel`, which owns the graph it returns)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..calibration import normalise_activity
from ..errors import UntraceableModel
from .channel import ChannelGraph, NodeSet

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


def _compact(nodes: torch.Tensor) -> torch.Tensor:
    """``nodes`` reduced to size 1 along every dim where it is constant (an expanded view of
    the result is ``nodes`` again): a replay record keeps one node per channel of a feature
    map, not one per position."""
    for d in range(nodes.dim()):
        if nodes.shape[d] > 1:
            head = nodes.narrow(d, 0, 1)
            if bool((nodes == head).all()):
                nodes = head
    return nodes.contiguous()


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
        # For replays (:func:`activity`): the function called at each step, the output being
        # recorded, and per measurement ``(step, output position, node of each element of one
        # example)``; ``None`` once a measurement does not fit that per-example form.
        self.calls: list[str] = []
        self.current: Any = None
        self.replay: list[tuple[int, int, torch.Tensor]] | None = []
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
        if label.numel() == 0:
            return
        low, high = int(label.min()), int(label.max())
        if high < 0:
            return
        self._note_replay(t, label)
        if low >= 0:  # every element is a channel's: no mask to apply
            keys = label.reshape(-1)
            values = t.detach().abs().to(torch.float64).reshape(-1)
        else:
            valid = label >= 0
            keys = label[valid]
            values = t.detach()[valid].abs().to(torch.float64)
            low = int(keys.min())
        # Sums per key by counting over the (small) range of keys present: no sort.
        shifted = keys - low
        width = high - low + 1
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

    def _note_replay(self, t: torch.Tensor, label: torch.Tensor) -> None:
        """Record where this measurement happens and which node each element of one example
        carries, if every example's labels are the first's shifted by its index (the batch is
        dimension 0, as :func:`activity` assumes); else give up replays for this model."""
        if self.replay is None:
            return
        if self.calls:
            found = [k for k, u in enumerate(_tensors(self.current)) if u is t]
            position = found[0] if found else None
        else:
            position = -1  # the model input
        first = label[0] if label.dim() and label.shape[0] == self.batch else None
        if position is None or first is None or label.shape != t.shape:
            self.replay = None
            return
        shift = torch.arange(self.batch, device=label.device).view([-1] + [1] * (label.dim() - 1))
        if not torch.equal(label, torch.where(first >= 0, first + shift, -1)):
            self.replay = None
            return
        nodes = torch.where(first >= 0, torch.div(first, self.batch, rounding_mode="floor"), -1)
        self.replay.append((len(self.calls), position, _compact(nodes), tuple(nodes.shape)))

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
        activity = _activity_table(self, n, device)
        return ChannelGraph(
            sets=list(self.sets), src=src, dst=dst, length=length, module=module,
            modules=list(self.modules),
            weight_edges=[(w.to(device), e.to(device)) for w, e in self.weight_edges],
            module_inputs=[(u.to(device), c.to(device)) for u, c in self.module_inputs],
            module_outputs=list(self.module_outputs),
            inputs=inputs, outputs=outputs, activity=activity, unscored=list(self.skipped),
            replay=None if self.replay is None else {"calls": list(self.calls),
                                                     "measures": list(self.replay)},
        )


class _LabelMode(TorchFunctionMode):
    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer.calls.append(_name(func))
        self.tracer.current = out
        self.tracer.record(func, args, kwargs, out)
        return out


#: Elements of a measured tensor a replay labels at a time (a few examples' worth).
_MEASURE_CHUNK = 1 << 22


class _Replay(Exception):
    """A replay met another call sequence or shape than the trace: trace the batch instead."""


class _ReplayMode(TorchFunctionMode):
    """Runs the model and measures, at the steps the trace measured, the tensors it measured,
    labelled for this batch from the recorded nodes (no labels are propagated)."""

    def __init__(self, graph: ChannelGraph, recorder: _Tracer):
        super().__init__()
        self.graph, self.recorder = graph, recorder
        self.steps: dict[int, list[tuple[int, torch.Tensor, tuple[int, ...]]]] = {}
        for step, position, nodes, shape in graph.replay["measures"]:
            self.steps.setdefault(step, []).append((position, nodes, shape))
        self.step = 0

    def measure(self, t: torch.Tensor, nodes: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Measure ``t`` (``[batch, *shape]``) as the trace measured it, a few examples at a
        time (at most :data:`_MEASURE_CHUNK` elements), so that the labels and temporaries
        do not grow with the batch. Each ``(node, example)`` mean sums the same elements in
        the same order as one call on the whole batch: bitwise the same activities."""
        batch = self.recorder.batch
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, *shape):
            raise _Replay
        nodes = nodes.to(t.device).expand(shape).unsqueeze(0)
        step = max(1, _MEASURE_CHUNK // max(1, t[0].numel()))
        for b in range(0, batch, step):
            shift = torch.arange(b, min(batch, b + step), device=t.device).view(
                [-1] + [1] * len(shape))
            label = torch.where(nodes >= 0, nodes * batch + shift, -1)
            self.recorder.measure(t[b:b + step], label)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        calls = self.graph.replay["calls"]
        if self.step >= len(calls) or calls[self.step] != _name(func):
            raise _Replay
        self.step += 1
        for position, nodes, shape in self.steps.get(self.step, ()):
            outs = _tensors(out)
            if position >= len(outs):
                raise _Replay
            self.measure(outs[position], nodes, shape)
        return out


def activity(model: nn.Module, inputs: torch.Tensor, graph: ChannelGraph,
             device: torch.device | None = None) -> torch.Tensor:
    """:func:`curvprune.graphs.channel.channel_activity` (its documentation)."""
    device = device if device is not None else graph.src.device
    if graph.replay is not None:
        recorder = _Tracer(model, inputs.shape[0])
        recorder.sets = graph.sets
        recorder.replay = None
        inputs = inputs.detach().clone()
        if not torch.isfinite(inputs).all():
            raise ValueError("the calibration inputs contain NaN or Inf; check the data.")
        mode = _ReplayMode(graph, recorder)
        try:
            for _, nodes, shape in mode.steps.get(0, ()):
                mode.measure(inputs, nodes, shape)
            with mode:
                model(inputs)
            if mode.step == len(graph.replay["calls"]):
                return _activity_table(recorder, graph.num_nodes, device)
        except (_Replay, RuntimeError, TypeError, IndexError, ValueError):
            pass  # traced in full below, which says what is wrong with the batch, if anything
    other = trace(model, inputs, device)
    if not graph.same_structure(other):
        raise ValueError(
            f"calibration examples of shape {tuple(inputs.shape[1:])} give another channel "
            "graph than the first batch: every calibration example must have the same shape."
        )
    return other.activity


def _activity_table(tracer: _Tracer, num_nodes: int, device: torch.device) -> torch.Tensor:
    """The ``[batch, num_nodes]`` normalised activities of what ``tracer`` measured."""
    activity = torch.zeros((tracer.batch, num_nodes), dtype=torch.float64, device=device)
    for s, table in tracer.activity.items():  # min-max per node set, as per neuron layer
        node_set = tracer.sets[s]
        activity[:, node_set.start:node_set.start + node_set.count] = normalise_activity(
            table.to(device))
    if not torch.isfinite(activity).all():
        raise ValueError("the activations contain NaN or Inf; check the data and the model.")
    return activity


def trace(model: nn.Module, inputs: torch.Tensor,
          device: torch.device | None = None) -> ChannelGraph:
    """:func:`curvprune.graphs.channel.trace_channels` (its documentation)."""
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

