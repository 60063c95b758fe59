"""Deprecated path of the engine, kept so old imports work (with a ``DeprecationWarning``).

The neuron graph and its edge problems are in :mod:`curvprune.graphs.neuron`; the kernels
(measures, bounds, exact solves, the POT adapter) in :mod:`curvprune.transport`.
"""

from ._moved import moved

_NEURON = "curvprune.graphs.neuron"
_TRANSPORT = "curvprune.transport"
__getattr__, __dir__ = moved(__name__, {
    **dict.fromkeys(["NeuronGraph", "HopTable", "hop_table_bytes", "layer_problem",
                     "bound_example", "score_example"], _NEURON),
    **dict.fromkeys(["EngineStats", "EngineOptions", "Distances", "CERTIFY_TOL", "bound_edges",
                     "solve_edges", "score_edges", "node_measures", "cut_measures",
                     "cut_error"], _TRANSPORT),
})
