r"""The transport kernels of the engine: measures, bounds, exact solves and the minimum search.

They know edges, measures and distance tables, never a graph (no module here imports
:mod:`curvprune.graphs`); both graphs hand them the same problems.

It computes the same :math:`\kappa` as :mod:`curvprune.reference` on every edge, by exploiting
the structure of the problem instead of solving one linear program per edge:

* **Distances once.** Ground distances do not depend on the example: 2- and 3-hop shortest-path
  tables are min-plus products computed once per call (:mod:`curvprune.graphs.neuron`), windowed
  for conv layers (a node keeps only the targets its kernels reach: :class:`HopTable`).
* **Dead edges** (an end with activity 0) get :math:`\kappa = 1` with no transport at all.
* **Point masses.** If :math:`\mu_i = \delta_i` (input layer, or no active in-neighbour) then
  :math:`W_1 = \alpha d + (1-\alpha)\sum_m q_m D(i, m)` and
  :math:`\kappa = 1 - \sum_m q_m D(i, m) / d`; symmetrically for :math:`\nu_j = \delta_j`.
* **Shared problems and bounds.** Write :math:`\mu_i = \alpha\delta_i +
  (1-\alpha)p` and :math:`\nu_j = \alpha\delta_j + (1-\alpha)q`. The plan that sends
  :math:`\alpha` along ``i -> j`` and transports ``p`` to ``q`` optimally under
  :math:`C(k, m)` costs :math:`\alpha d + (1-\alpha) X_0` with :math:`X_0 = OT(p, q; C)`, and
  :math:`X_0` depends on the edge only through ``(p, q)``, which many edges share (in a dense
  layer every node has the same neighbour measure). With optimal potentials ``(f, g)`` of
  :math:`X_0`, the plan is optimal for the edge's full problem whenever

  .. math::

      \max_{k} \big(f_k - D(k, j)\big) + \max_{m} \big(g_m - D(i, m) + d\big) \le 0,

  because then ``(f, g)`` extended by potentials for ``i`` and ``j`` is dual feasible for
  :math:`W_1(\mu_i, \nu_j)` (the swap ``k -> j``, ``i -> m`` never pays). Clipping the
  shifted potentials to those constraints gives a dual-feasible point, hence a lower bound, for
  every edge; the no-swap plan and a plan that swaps a share of every unit (all of it for
  :math:`\alpha \ge 1/2`) give upper bounds (:func:`bound_edges`). Edges whose bounds are
  close are settled; :func:`curvprune.neural_curvature` solves the others only while they can
  matter to their weight's minimum, to within its ``tolerance``
  (:mod:`curvprune.transport.minimum`).
* **Negligible masses cut.** Neighbour weights :math:`\exp(-1/a^2)` span hundreds of orders of
  magnitude; the smallest masses are dropped while a bound on their effect on every edge's
  kappa stays within half the cut tolerance (:func:`cut_measures`; ``tolerance / 4`` in
  :func:`curvprune.neural_curvature`, whose bounds are widened by it: :func:`cut_error`),
  which shrinks the problems.
* **Full swaps** (:math:`\alpha \ge 1/2`). If :math:`D(k, j) + D(i, m) - d \le C(k, m)` on the
  supports, every unit of ``p`` is best routed through ``j`` and every unit of ``q`` from ``i``:
  :math:`\kappa = 1 - (\sum_k p_k D(k, j) + \sum_m q_m D(i, m) - d) / d`. With
  :math:`\alpha \ge 1/2` the atoms at ``i`` and ``j`` can absorb every such swap, so this is exact.
* **Exact fallback.** Every remaining edge is one exact network-simplex solve (POT's C++ solver,
  the one behind ``ot.emd2``) of the full problem.

The vectorised parts run on the device of the model (or ``device=``); the network-simplex
solves run on the CPU.
"""

from __future__ import annotations

from .base import CERTIFY_TOL, Distances, EngineOptions, EngineStats
from .bounds import bound_edges
from .exact import score_edges, solve_edges
from .measures import cut_error, cut_measures, neighbour_measures, node_measures, padded_neighbours
from .minimum import MinimumSearch, NodeMeans

__all__ = ["CERTIFY_TOL", "Distances", "EngineOptions", "EngineStats", "MinimumSearch",
           "NodeMeans", "bound_edges", "cut_error", "cut_measures", "neighbour_measures",
           "node_measures", "padded_neighbours", "score_edges", "solve_edges"]
