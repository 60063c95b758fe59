"""Hop tables from the kernels (:mod:`curvprune.graphs._conv_hops`) against the edge-by-edge
min-plus products (:meth:`curvprune.graphs.neuron.HopTable.compose`): bitwise equal
(``torch.equal``, ``inf`` where unreachable) on random conv chains (zero weights, padding
0/1/2, stride 1/2, kernels 1/3/5, non-square maps, linear layers after ``flatten``), windowed
and dense."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import build, net_specs, profile_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvprune.graphs import _conv_hops
from curvprune.graphs.neuron import HopTable, NeuronGraph, chain_structure
from curvprune.transport import EngineOptions

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _weights(layers) -> list[torch.Tensor]:
    return [la.module.weight.detach().flatten() for la in layers]


def _reference(structures, weights, options=None) -> tuple[list[HopTable], list[HopTable]]:
    """The tables as NeuronGraph.build made them before the kernel path: edge by edge."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_conv_hops.ConvHops, "table", lambda self, *a: None)
        graph = NeuronGraph.build(structures, weights, torch.device("cpu"), options)
    return graph.hop2, graph.hop3


def _assert_same(model: nn.Module, x: torch.Tensor, options=None) -> NeuronGraph:
    layers, structures = chain_structure(model, x)
    weights = _weights(layers)
    want2, want3 = _reference(structures, weights, options)
    graph = NeuronGraph.build(structures, weights, torch.device("cpu"), options)
    assert len(graph.hop2) == len(want2) and len(graph.hop3) == len(want3)
    for kind, got, want in [("hop2", graph.hop2, want2), ("hop3", graph.hop3, want3)]:
        for L, (g, w) in enumerate(zip(got, want)):
            assert g.layout.window == w.layout.window and g.layout.full == w.layout.full
            assert g.values.dtype == w.values.dtype == torch.float64
            assert torch.equal(g.values, w.values), f"{kind}[{L}] differs"
    return graph


@st.composite
def conv_chains(draw):
    """A chain of 2-3 convs (kernels 1/3/5, padding 0/1/2, stride 1/2, non-square maps, some
    zero weights), then optionally flatten and 1-2 linear layers."""
    gen_seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(gen_seed)
    c = draw(st.integers(1, 3))
    h, w = draw(st.integers(3, 11)), draw(st.integers(3, 11))
    shape = (c, h, w)
    modules: list[nn.Module] = []
    for _ in range(draw(st.integers(2, 3))):
        k = draw(st.sampled_from([1, 3, 5]))
        kw = k if draw(st.booleans()) else draw(st.sampled_from([1, 3]))
        p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        s = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        ho = (shape[1] + 2 * p[0] - k) // s[0] + 1
        wo = (shape[2] + 2 * p[1] - kw) // s[1] + 1
        if ho < 1 or wo < 1:  # the kernel does not fit: a 1x1 kernel, stride 1
            k, kw, s = 1, 1, (1, 1)
            ho, wo = shape[1] + 2 * p[0], shape[2] + 2 * p[1]
        out = draw(st.integers(1, 4))
        conv = nn.Conv2d(shape[0], out, (k, kw), stride=s, padding=p, bias=False)
        modules += [conv, nn.ReLU()]
        shape = (out, ho, wo)
    for _ in range(draw(st.integers(0, 2))):
        if not any(isinstance(m, nn.Flatten) for m in modules):
            modules.append(nn.Flatten())
            shape = (math.prod(shape),)
        modules += [nn.Linear(shape[0], draw(st.integers(1, 5))), nn.ReLU()]
        shape = (modules[-2].out_features,)
    model = nn.Sequential(*modules[:-1]).eval()
    zero = draw(st.sampled_from([0.0, 0.0, 0.3, 0.9]))
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= zero)
    return model, torch.randn(1, c, h, w, generator=gen)


@settings(max_examples=profile_examples(150), **_SETTINGS)
@given(chain=conv_chains(), fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_kernel_tables_equal_edge_by_edge(chain, fraction):
    """Every table bitwise equal, windowed (``WINDOW_FRACTION`` 1), dense (0) or as chosen."""
    model, x = chain
    _assert_same(model, x, EngineOptions(window_fraction=fraction))


@settings(max_examples=profile_examples(60), **_SETTINGS)
@given(spec=net_specs(conv=True, max_convs=3, min_layers=2))
def test_kernel_tables_on_net_specs(spec):
    """The shared random networks (dilation, groups, 'same' padding, batchnorm, zero rows and
    columns): equal wherever the kernel path applies, the rest edge by edge as before."""
    model, x = build(spec)
    _assert_same(model, x)


def test_geometry_recovered_exactly():
    """The geometry read back from the edges is the module's (or None for a linear layer)."""
    model = nn.Sequential(nn.Conv2d(2, 4, (3, 5), stride=(2, 1), padding=(1, 2),
                                    dilation=(1, 2), groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 3, 3))
    _, structures = chain_structure(model, torch.zeros(1, 2, 9, 7))
    g = _conv_hops.conv_geometry(structures[0])
    assert (g.kernel, g.stride, g.padding, g.dilation, g.groups) == ((3, 5), (2, 1), (1, 2),
                                                                     (1, 2), 2)
    assert _conv_hops.conv_geometry(structures[1]) is None


def test_border_classes_matter():
    """Padding removes intermediate nodes near the borders: built with the interior's class for
    every target (no border patch), the tables differ from the reference; with it, they agree."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=2))
    with torch.no_grad():
        for m in model[::2]:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.1)
    x = torch.zeros(1, 1, 6, 6)
    _assert_same(model, x)
    original = _conv_hops._axis

    def interior_only(params, heights):
        axis = original(params, heights)
        middle = int(axis.cls[heights[-1] // 2])
        axis.cls = torch.full_like(axis.cls, middle)
        axis.members = [list(range(heights[-1])) if c == middle else []
                        for c in range(len(axis.keys))]
        return axis

    layers, structures = chain_structure(model, x)
    want, _ = _reference(structures, _weights(layers))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_conv_hops, "_axis", interior_only)
        graph = NeuronGraph.build(structures, _weights(layers), torch.device("cpu"))
    assert not torch.equal(graph.hop2[0].values, want[0].values)


def test_vgg9_reduced_width_tables():
    """VGG-9's geometry (3x3, stride 2 in convs 1/3/5, padding 1, linear head) at reduced width:
    every table from the kernels, bitwise equal."""
    small = nn.Sequential(nn.Conv2d(1, 3, 3, 2, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, 2, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, 1, 1, bias=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3))
    calls = []
    original = _conv_hops.ConvHops.table

    def spy(self, *a):
        out = original(self, *a)
        calls.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_conv_hops.ConvHops, "table", spy)
        _assert_same(small.eval(), torch.zeros(1, 1, 16, 16))
    assert all(calls) and len(calls) == 5 + 4
