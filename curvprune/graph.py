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
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ParamLayer", "trace_chain", "layer_edges", "conv_padding"]

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
class ParamLayer:
    """One parametrised layer of the chain: its qualified weight name and module."""

    name: str
    module: nn.Module


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function '{getattr(node.target, '__name__', node.target)}'"
    return f"{node.op} '{node.target}'"


def trace_chain(model: nn.Module) -> list[ParamLayer]:
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
        return [ParamLayer("weight", model)]
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
    layers: list[ParamLayer] = []
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
                layers.append(ParamLayer(name, module))
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
class LayerEdges:
    """The edges of one parametrised layer between node layers ``l-1`` and ``l``.

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
) -> LayerEdges:
    """Enumerate the structural edges of ``module`` given its per-example input/output shapes.

    Node indices follow PyTorch's row-major flattening of ``(C, H, W)`` (conv) or ``(F,)``
    (linear), so they match ``torch.flatten(x, 1)`` of the activations.
    """
    if isinstance(module, nn.Linear):
        n_in, n_out = module.in_features, module.out_features
        dst = torch.arange(n_out).repeat_interleave(n_in)
        src = torch.arange(n_in).repeat(n_out)
        return LayerEdges(src, dst, dst * n_in + src, n_in, n_out, (n_in,), (n_out,))
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
    return LayerEdges(src, dst, widx, c_in * h_in * w_in, c_out * h_out * w_out,
                      (c_in, h_in, w_in), (c_out, h_out, w_out))


def chain_structure(model: nn.Module, example: torch.Tensor
                    ) -> tuple[list[ParamLayer], list[LayerEdges]]:
    """The parametrised layers of a chain model and their structural edges.

    One forward pass of ``example[:1]`` (in scoring mode: eval, no autograd, the model left as
    it was) gives every layer's input and output shapes. Node-layer sizes are
    ``[structures[0].n_in] + [s.n_out for s in structures]``.
    """
    from .calibration import capture_activations, scoring_mode

    layers = trace_chain(model)
    modules = [layer.module for layer in layers]
    with scoring_mode(model):
        _, in_shapes, out_shapes = capture_activations(model, modules, example[:1])
    return layers, [layer_edges(m, in_shapes[k], out_shapes[k]) for k, m in enumerate(modules)]
