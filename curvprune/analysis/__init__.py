r"""Analysis of pruned networks: the topology and the curvature statistics of a model.

:mod:`curvprune.analysis.topology` holds NNSTD and the relational-graph measures,
:mod:`curvprune.analysis.statistics` the curvature statistics. Three groups of functions
(see ``docs/analysis.md`` for the conventions in full):

* **NNSTD** (Liu et al., ECML-PKDD 2020): :func:`nnstd` and :func:`nnstd_masks` compare the
  connectivity of two sparse networks of one architecture, layer by layer, up to a relabelling of
  the hidden neurons.
* **Relational-graph measures** (You et al., ICML 2020): :func:`relational_measures` (and
  :func:`relational_measures_masks`) give the average clustering coefficient :math:`C` and the
  average shortest-path length :math:`L` of the relational graph (:func:`relational_graph`:
  a layer's input and output channels grouped into one set of nodes) each layer of a pruned
  model defines, and of their union, beside the dense graphs'; any model with Linear/Conv2d
  layers. :func:`graph_measures` computes both for any undirected graph.
* **Curvature statistics** of a :class:`~curvprune.result.CurvatureResult`:
  :func:`curvature_statistics`, :func:`most_negative` (bottlenecks) and :func:`histogram`.

NNSTD reads a network as a chain of ``Linear``/``Conv2d`` weights
(:func:`~curvprune.graphs.neuron.trace_chain`); the relational measures read every
``Linear``/``Conv2d`` weight on its own. Connectivity is the set of non-zero weights
(:func:`connectivity_masks`), which respects ``torch.nn.utils.prune`` masks.
"""

from __future__ import annotations

from .statistics import (
    Bottlenecks,
    CurvatureStatistics,
    Histogram,
    curvature_statistics,
    histogram,
    most_negative,
)
from .topology import (
    GraphMeasures,
    NNSTDResult,
    RelationalMeasures,
    RelationalResult,
    connectivity_masks,
    graph_measures,
    nnstd,
    nnstd_masks,
    relational_graph,
    relational_measures,
    relational_measures_masks,
)

__all__ = [
    "connectivity_masks",
    "NNSTDResult",
    "nnstd",
    "nnstd_masks",
    "GraphMeasures",
    "RelationalMeasures",
    "RelationalResult",
    "graph_measures",
    "relational_graph",
    "relational_measures",
    "relational_measures_masks",
    "CurvatureStatistics",
    "Bottlenecks",
    "Histogram",
    "curvature_statistics",
    "most_negative",
    "histogram",
]
