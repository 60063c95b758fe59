"""The neuron graph's compact neighbour tables (:class:`curvprune.graphs.neuron.NeuronGraph`).

The graph keeps each node layer's neighbour tables as int32 node ids and, per edge, its slot
in them (int32), instead of int64 tables and padded tables of the edges' lengths (the
paper's VGG-9 at neuron granularity: about 0.75 GiB less). The measures read from them must
be bitwise those of the padded int64 tables, on random chains with zero weights and dead
neurons.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build, net_specs, profile_examples
from hypothesis import HealthCheck, given, settings

from curvprune.calibration import capture_activations, normalise_activity, scoring_mode
from curvprune.graphs.neuron import NeuronGraph, _neighbour_table, chain_structure
from curvprune.transport import node_measures, padded_neighbours


@settings(max_examples=profile_examples(100), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=net_specs(conv=None, max_examples=2))
def test_compact_tables_give_the_padded_tables_measures(spec):
    model, x = build(spec)
    x = torch.cat([x, torch.zeros_like(x[:1])])  # the input layer all dead on this one
    layers, structures = chain_structure(model, x)
    graph = NeuronGraph.build(structures, [la.module.weight.detach().flatten()
                                           for la in layers], torch.device("cpu"))
    with scoring_mode(model):
        values, _, _ = capture_activations(model, [la.module for la in layers], x)
    acts = [normalise_activity(v) for v in values]
    n = len(graph.layers)
    sides = [(graph.in_nbrs[L], graph.in_slot[L], graph.layers[L - 1], "dst", "src", L - 1)
             for L in range(1, n + 1)]
    sides += [(graph.out_nbrs[L], graph.out_slot[L], graph.layers[L], "src", "dst", L + 1)
              for L in range(n)]
    for table, slot, edges, key, value, other in sides:
        assert table.dtype == torch.int32 and slot.dtype == torch.int32
        keys, ids = getattr(edges, key), getattr(edges, value)
        n_keys = table.shape[0]
        wide = padded_neighbours(keys, ids, n_keys)
        assert torch.equal(table.long(), wide)
        lengths = padded_neighbours(keys, edges.length, n_keys, fill=0.0)
        for activity in acts[other]:
            got = node_measures(table, activity, edges.length, slot=slot)
            want = node_measures(wide, activity, lengths)
            assert got.table.dtype == torch.int64
            for field in ("table", "mass", "has", "reach"):
                assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_neighbour_table_refuses_ids_past_32_bits():
    keys = torch.tensor([0, 0, 1])
    table, slot = _neighbour_table(keys, torch.tensor([4, 2, 7]), 2, 8)
    assert table.tolist() == [[4, 2], [7, -1]] and slot.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="granularity='channel'"):
        _neighbour_table(keys, torch.tensor([4, 2, 7]), 2, 2**31)
