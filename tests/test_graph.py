"""The neural graph: structural edges of conv/linear layers, and tracing chains with torch.fx."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ConcatNet, ResidualNet, conv_out_size, profile_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune import neural_curvature
from curvprune.graphs.neuron import chain_structure, layer_edges, trace_chain

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# --------------------------------------------------------------------------------------------
# layer_edges against an independent construction
# --------------------------------------------------------------------------------------------


def _edges_by_perturbation(conv: nn.Conv2d, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """Sorted keys of the edges ``(u, v, w)``: an edge exists iff a one-hot input at ``u`` and
    weight ``w`` give a nonzero output at ``v`` (F.conv2d does the indexing; layer_edges is not
    used).

    One input per node (the identity batch) and all weights at once: with all-ones weights the
    output counts the weights joining ``u`` to ``v`` (checked to be 0 or 1), and with weight
    ``w`` set to ``w + 1`` the output names that weight.
    """
    n_in = in_shape[0] * in_shape[1] * in_shape[2]
    inputs = torch.eye(n_in, dtype=torch.float64).view(n_in, *in_shape)

    def run(weight):
        return F.conv2d(inputs, weight.view(conv.weight.shape), None, conv.stride, conv.padding,
                        conv.dilation, conv.groups).flatten(1)

    count = run(torch.ones(conv.weight.numel(), dtype=torch.float64))
    assert ((count == 0) | (count == 1)).all(), "two weights join the same pair of nodes"
    which = run(torch.arange(1, conv.weight.numel() + 1, dtype=torch.float64))
    u, v = torch.nonzero(which, as_tuple=True)
    w = which[u, v].round().long() - 1
    return torch.sort(_key(u, v, w, n_in, which.shape[1])).values


def _key(u, v, w, n_in, n_out):
    return (w * n_in + u) * n_out + v


def _edge_keys(edges) -> torch.Tensor:
    keys = torch.sort(_key(edges.src, edges.dst, edges.widx, edges.n_in, edges.n_out)).values
    assert keys.unique().numel() == keys.numel(), "duplicate edges"
    return keys


@st.composite
def _conv_cases(draw):
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    if draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
        stride = (1, 1) if padding == "same" else (draw(st.integers(1, 3)),
                                                   draw(st.integers(1, 3)))
    else:
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pads = (padding, padding) if isinstance(padding, str) else padding
    if (conv_out_size(h, kh, stride[0], pads[0], dilation[0]) < 1
            or conv_out_size(w, kw, stride[1], pads[1], dilation[1]) < 1):
        padding, stride = "same", (1, 1)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    return conv, (c_in, h, w)


@settings(max_examples=profile_examples(200), deadline=None)
@given(_conv_cases())
def test_conv_edges_match_one_hot_convolution(case):
    conv, in_shape = case
    out_shape = tuple(conv(torch.zeros(1, *in_shape)).shape[1:])
    edges = layer_edges(conv, in_shape, out_shape)
    assert edges.n_in == in_shape[0] * in_shape[1] * in_shape[2]
    assert edges.n_out == out_shape[0] * out_shape[1] * out_shape[2]
    assert torch.equal(_edge_keys(edges), _edges_by_perturbation(conv, in_shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=2, padding="same"),  # even kernel: PyTorch pads less on the left/top
        dict(kernel_size=(2, 4), padding="same", dilation=(1, 3)),
        dict(kernel_size=3, padding="same", dilation=2, groups=2),
        dict(kernel_size=3, stride=(2, 1), padding=(0, 2)),
        dict(kernel_size=1, stride=3),
        dict(kernel_size=5, padding=2),  # larger than the input
    ],
)
def test_conv_edges_special_cases(kwargs):
    conv = nn.Conv2d(2, 4, **kwargs)
    in_shape = (2, 3, 4)
    out_shape = tuple(conv(torch.zeros(1, *in_shape)).shape[1:])
    edges = layer_edges(conv, in_shape, out_shape)
    assert torch.equal(_edge_keys(edges), _edges_by_perturbation(conv, in_shape))


def test_chain_structure_gives_layer_sizes_and_edges_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers, structures = chain_structure(model, torch.randn(5, 2, 6, 6))
    assert [layer.name for layer in layers] == ["0.weight", "4.weight"]
    assert [structures[0].n_in] + [s.n_out for s in structures] == [72, 27, 4]
    # Each output position of the stride-2 conv sees a 3x3 window clipped by the border.
    assert structures[0].src.numel() == 3 * 2 * sum(
        len([r for r in range(2 * y - 1, 2 * y + 2) if 0 <= r < 6])
        * len([c for c in range(2 * x - 1, 2 * x + 2) if 0 <= c < 6])
        for y in range(3) for x in range(3))
    assert structures[1].src.numel() == 27 * 4
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_linear_edges_are_complete_bipartite():
    lin = nn.Linear(4, 3)
    edges = layer_edges(lin, (4,), (3,))
    u, v = torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij")
    expected = torch.sort(_key(u.flatten(), v.flatten(), v.flatten() * 4 + u.flatten(), 4,
                               3)).values
    assert torch.equal(_edge_keys(edges), expected)
    assert (edges.n_in, edges.n_out) == (4, 3)


def test_edges_per_example_counts_nonzero_weight_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32, 3))
    with torch.no_grad():
        model[0].weight[0, 0, 1, 1] = 0
        model[3].weight[:, :5] = 0
    result = neural_curvature(model, torch.randn(1, 1, 4, 4))
    conv_edges = layer_edges(model[0], (1, 4, 4), (2, 4, 4))
    nonzero = model[0].weight.flatten()[conv_edges.widx] != 0
    assert result.edges_per_example["0.weight"] == int(nonzero.sum()) == 2 * 10 * 10 - 16
    assert result.edges_per_example["3.weight"] == 3 * 27


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


class FunctionalLeNet(nn.Module):
    """A LeNet written with F.relu and x.view(x.size(0), -1), its layers declared out of order."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(8, 4)
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.fc1 = nn.Linear(2 * 4 * 4, 8)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class MethodLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        x = torch.flatten(x, 1).contiguous()
        return self.fc(x.reshape(x.shape[0], -1))


def test_functional_lenet_traces_in_forward_order():
    layers = trace_chain(FunctionalLeNet())
    assert [layer.name for layer in layers] == ["conv1.weight", "conv2.weight", "fc1.weight",
                                                 "fc2.weight"]
    result = neural_curvature(FunctionalLeNet(), torch.randn(2, 1, 6, 6))
    assert list(result.kappa) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_method_calls_and_shape_reads_are_accepted():
    layers = trace_chain(MethodLeNet())
    assert [layer.name for layer in layers] == ["conv.weight", "fc.weight"]


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.max_pool2d(self.conv(x), 2).flatten(1))


class Branch(nn.Module):
    """Two heads on the same features: not a chain."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) * self.c(h)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.a(x) * self.scale


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.a(x)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(F.relu(self.a(x)))


@pytest.mark.parametrize(
    "model, fragment",
    [
        (ResidualNet(), "add"),
        (ConcatNet(), "cat"),
        (Pooled(), "max_pool2d"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)),
         "MaxPool2d"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(2, 2)), "AdaptiveAvgPool2d"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "LayerNorm"),
        (Branch(), "chain"),
        (Scaled(), "scale"),
        (TwoInputs(), "2 inputs"),
        (Shared(), "applied twice"),
    ],
    ids=["residual", "cat", "F.max_pool2d", "MaxPool2d", "AdaptiveAvgPool2d", "LayerNorm",
         "branch", "parameter-read", "two-inputs", "shared-layer"],
)
def test_non_chains_are_rejected_with_a_message(model, fragment):
    with pytest.raises(ValueError, match=fragment):
        trace_chain(model)


@pytest.mark.parametrize("model", [ResidualNet(), ConcatNet(), Pooled()],
                         ids=["add", "cat", "pool"])
def test_rejection_points_to_channel_granularity(model):
    with pytest.raises(ValueError, match="granularity='channel'"):
        trace_chain(model)


def test_untraceable_model_is_rejected():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value: fx cannot trace it
                return self.a(x)
            return self.a(-x)

    with pytest.raises(ValueError, match="cannot trace DataDependent"):
        trace_chain(DataDependent())


def test_reflect_padding_is_rejected():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        trace_chain(model)


@pytest.mark.parametrize("padding, kernel, dilation", [("same", 4, 1), ("same", 3, 2),
                                                       ("same", (2, 5), (3, 1)), ("valid", 3, 1),
                                                       (2, 3, 1), ((1, 0), 3, 2)])
def test_conv_padding_reproduces_pytorch(padding, kernel, dilation):
    """Padding explicitly by ``conv_padding`` and convolving unpadded gives PyTorch's output."""
    from curvprune.graphs.neuron import conv_padding

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding=padding, dilation=dilation)
    x = torch.randn(1, 2, 9, 8)
    (top, bottom), (left, right) = conv_padding(conv)
    manual = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias,
                      dilation=conv.dilation)
    torch.testing.assert_close(manual, conv(x))
