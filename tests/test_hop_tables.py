"""Windowed hop tables (:class:`curvprune.graphs.neuron.HopTable`) against the dense ones.

``EngineOptions(window_fraction=1.0)`` windows every table whose target is spatial (even a
window as large as the layer) and ``0.0`` keeps every table dense, so on the small random
networks of ``net_specs`` both layouts are built and compared: the tables bitwise on every
pair, and the curvature of ``neural_curvature(..., tolerance=0)`` bitwise (and against the
reference).
"""

from __future__ import annotations

import math

import torch
from conftest import alphas, assert_kappa_equal, build, net_specs, profile_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import curvprune.graphs.neuron as engine_module
from curvprune import neural_curvature
from curvprune.graphs.neuron import (
    NeuronGraph,
    chain_structure,
    hop_table_bytes,
    layer_edges,
)
from curvprune.models import create_model
from curvprune.reference import reference_curvature
from curvprune.transport import EngineOptions

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _graph(model, x, fraction: float, max_block: int = 1 << 22) -> tuple[NeuronGraph, list]:
    layers, structures = chain_structure(model, x)
    options = EngineOptions(window_fraction=fraction, min_plus_block=max_block)
    graph = NeuronGraph.build(structures, [la.module.weight.detach().flatten()
                                           for la in layers], torch.device("cpu"), options)
    table_bytes = hop_table_bytes(structures, fraction)
    assert table_bytes == sum(t.numel() * t.element_size() for t in graph.hop2 + graph.hop3)
    return graph, structures


@settings(max_examples=profile_examples(120), **_SETTINGS)
@given(spec=net_specs(conv=True, max_convs=3, min_layers=2), max_block=st.integers(1, 64))
def test_windowed_tables_equal_dense(spec, max_block):
    """Every pair, windowed and dense, bitwise (inf where unreachable), with the min-plus
    products in chunks of ``max_block`` entries."""
    model, x = build(spec)
    dense, _ = _graph(model, x, 0.0)
    windowed, _ = _graph(model, x, 1.0, max_block)
    assert all(t.layout.full for t in dense.hop2 + dense.hop3)
    for got, want in zip(windowed.hop2 + windowed.hop3, dense.hop2 + dense.hop3):
        assert torch.equal(got.dense(), want.values)
        # Padded lookups of the engine's shape: [E, r, c] rows against columns.
        rows = torch.arange(got.shape[0])[:, None, None]
        cols = torch.arange(got.shape[1])[None, None, :]
        assert torch.equal(got[rows, cols], want.values[rows, cols])
        # A read larger than _READ_BLOCK values goes by pieces of rows: the same values.
        block = engine_module._READ_BLOCK
        engine_module._READ_BLOCK = 3
        try:
            assert torch.equal(got[rows, cols], want.values[rows, cols])
            assert torch.equal(got.dense(), want.values)
        finally:
            engine_module._READ_BLOCK = block
        # Negative ids count from the end, as in tensor indexing (the engine's padded reads).
        rows, cols = torch.tensor([-1, 0, -1])[:, None], torch.tensor([-1, 0, -2])[None, :]
        if got.shape[1] > 1:
            assert torch.equal(got[rows, cols], want.values[rows, cols])


@settings(max_examples=profile_examples(60), **_SETTINGS)
@given(spec=net_specs(conv=True, max_convs=3, min_layers=3, max_examples=2), alpha=alphas)
def test_windowed_curvature_equals_dense(spec, alpha):
    """``neural_curvature(tolerance=0)`` is bitwise the same with windowed and dense tables,
    and matches the reference."""
    model, x = build(spec)
    results = []
    for fraction in (0.0, 1.0):
        results.append(neural_curvature(model, x, alpha=alpha, tolerance=0.0,
                                        options=EngineOptions(window_fraction=fraction)))
    for name, kappa in results[0].kappa.items():
        assert torch.equal(kappa, results[1].kappa[name]), name
    assert_kappa_equal(results[1].kappa, reference_curvature(model, x, alpha=alpha),
                       atol=1e-6, context=repr(spec))


def test_windowed_table_is_kernel_sized():
    """A 3x3 conv pair on 16x16 keeps a 5x5 window per node (not 16x16), and +inf outside."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 5))
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    graph, structures = _graph(model, x, engine_module.WINDOW_FRACTION)
    table = graph.hop2[0]
    assert not table.layout.full and table.layout.window == (5, 5)
    assert table.numel() == 2 * 16 * 16 * 4 * 5 * 5
    full = table.dense()
    # Node (0, 8, 8) reaches rows/columns 6..10 of every channel, nothing else.
    reach = torch.isfinite(full[8 * 16 + 8].view(4, 16, 16))
    expected = torch.zeros(4, 16, 16, dtype=torch.bool)
    expected[:, 6:11, 6:11] = True
    assert torch.equal(reach, expected)
    dense = hop_table_bytes([s.n_in for s in structures] + [structures[-1].n_out])
    assert hop_table_bytes(structures) < dense


def test_vgg9_tables_fit():
    """The paper's VGG-9: windowed tables take well under half the dense tables' 5.9 GiB."""
    model = create_model("vgg9", in_channels=1)
    _, structures = chain_structure(model, torch.zeros(1, 1, 32, 32))
    dense = hop_table_bytes([structures[0].n_in] + [s.n_out for s in structures])
    assert math.isclose(dense / 2**30, 5.93, abs_tol=0.01)
    assert hop_table_bytes(structures) / 2**30 < 2.5
    assert layer_edges  # structures come from graph.layer_edges
