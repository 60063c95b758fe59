r"""``estimate``: what a scoring run will cost, before it runs.

:func:`estimate` takes the arguments of :func:`~curvprune.curvature.neural_curvature` and
returns a :class:`ScoringEstimate`: the granularity ``"auto"`` picks, the graph's nodes and
edges per example, the bytes of its distance tables, the number of calibration examples, and a
time estimate measured on this machine. ``curvprune estimate`` prints the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ._checks import (
    GRANULARITIES,
    check_alpha,
    check_choice,
    check_module,
    check_node_reduction,
    check_threads,
)
from ._checks import model_device as _model_device
from .calibration import iter_calibration_inputs, scoring_mode
from .curvature import (
    MEMORY_BUDGET,
    _choose_granularity,
    neural_curvature,
    resolve_device,
)
from .graphs.neuron import NeuronGraph, chain_structure, hop_table_bytes

__all__ = ["ScoringEstimate", "estimate"]


@dataclass(frozen=True)
class ScoringEstimate:
    """The cost of scoring a model on a calibration set (see :func:`estimate`).

    Attributes:
        granularity: ``"neuron"`` or ``"channel"`` (what ``"auto"`` resolves to).
        nodes: nodes of the graph (neurons, or channels) of one example.
        edges: edges of the graph of one example: at neuron granularity the edges of non-zero
            weights (every position of a conv weight is an edge); at channel granularity every
            traced edge (channel pairs of each layer, and the merge edges of residual adds and
            concatenations).
        edges_per_layer: ``{weight name: edges}`` as ``CurvatureResult.edges_per_example``.
        distance_bytes: bytes of the distance tables the engine keeps (neuron: the
            ``L -> L+2`` and ``L -> L+3`` hop tables; channel: 16 bytes per node pair the
            measures need, :func:`curvprune.graphs.channel.needed_distance_bytes`).
        memory_budget: the budget the tables are checked against.
        fits: ``distance_bytes + problem_bytes <= memory_budget`` (``"auto"`` picks the
            neuron graph only when it fits; a channel graph over it is refused).
        calibration_examples: examples in the calibration set.
        build_seconds: measured time of building the graph and its distance tables (paid once);
            ``None`` when not measured.
        example_seconds: measured time of scoring one example, the build excluded (the first
            example's bounds and its exact solves); ``None`` when not measured.
        seconds: the estimated total, ``build_seconds + calibration_examples *
            example_seconds``; ``None`` when not measured.
        notes: why something was not measured.
        problem_bytes: at channel granularity, what the edge problems hold besides the
            distances (:func:`curvprune.graphs.channel.channel_problem_bytes`), also checked
            against ``memory_budget``; 0 at neuron granularity.
    """

    granularity: str
    nodes: int
    edges: int
    edges_per_layer: dict[str, int]
    distance_bytes: int
    memory_budget: int
    fits: bool
    calibration_examples: int
    build_seconds: float | None
    example_seconds: float | None
    seconds: float | None
    notes: list[str] = field(default_factory=list)
    problem_bytes: int = 0

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """A few plain-text lines: graph size, memory, time."""
        mib = self.distance_bytes / 2**20
        problems = (f", edge-problem tables {self.problem_bytes / 2**20:,.1f} MiB"
                    if self.problem_bytes else "")
        lines = [
            f"granularity {self.granularity}: {self.nodes:,} nodes, {self.edges:,} edges per "
            f"example, {len(self.edges_per_layer)} weights",
            f"distance tables {mib:,.1f} MiB{problems} (budget "
            f"{self.memory_budget / 2**20:,.0f} MiB"
            f"{'' if self.fits else ': OVER the budget'})",
            f"calibration examples {self.calibration_examples}",
        ]
        if self.seconds is not None:
            lines.append(
                f"estimated time {self.seconds:,.1f} s = build {self.build_seconds:.2f} s + "
                f"{self.calibration_examples} x {self.example_seconds:.2f} s per example "
                "(measured on one example here; usually an overestimate, see docs)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _count(calibration, model_device: torch.device) -> tuple[int, torch.Tensor]:
    count, first = 0, None
    for inputs in iter_calibration_inputs(calibration):
        if first is None:
            first = inputs[:1].to(model_device)
        count += inputs.shape[0]
    return count, first


def _neuron_structure(model: nn.Module, example: torch.Tensor
                      ) -> tuple[int, dict[str, int], int, list, list]:
    """Nodes, non-zero edges per weight and hop-table bytes of the neuron graph (as
    :meth:`NeuronGraph.build` counts them), with the structures and layers to build it."""
    layers, structures = chain_structure(model, example)
    sizes = [structures[0].n_in] + [s.n_out for s in structures]
    edges = {}
    for layer, s in zip(layers, structures):
        weight = layer.module.weight.detach().flatten()
        edges[layer.name] = int((weight[s.widx.to(weight.device)] != 0).sum())
    return sum(sizes), edges, hop_table_bytes(structures), structures, layers


def estimate(
    model: nn.Module,
    calibration,
    *,
    granularity: str = "auto",
    alpha: float = 0.9,
    device: str | torch.device | None = None,
    tolerance: float | None = None,
    threads: int | None = None,
    memory_budget: int | None = None,
    measure: bool = True,
    node_reduction: str | None = None,
) -> ScoringEstimate:
    r"""What :func:`~curvprune.curvature.neural_curvature` will cost on ``calibration``.

    The structural numbers are exact: they are computed as the engine computes them (the same
    tracing, one forward pass of the first example), so ``edges_per_layer`` equals the
    ``edges_per_example`` of the result and ``distance_bytes`` the size of the tables it builds.

    The time is measured, not modelled. With ``measure=True`` the graph and its distance tables
    are built once (``build_seconds``), then ``neural_curvature`` runs on the first calibration
    example alone (its own build included), and ``example_seconds`` is that run's time minus
    ``build_seconds``. The estimate is

    .. math::

        T \approx T_{\text{build}} + n \cdot T_{\text{example}},

    for :math:`n` calibration examples. It is usually an **overestimate**: with one example
    every edge whose bounds do not settle it is solved exactly, whereas with :math:`n`
    examples only the edges that can still be a weight's minimum over all of them are
    (:mod:`curvprune.transport.minimum`), so the exact solves grow more slowly than :math:`n`.
    Measured on 2 shared cores with 10 examples: LeNet-5 (neuron) estimated 29.2 s against
    17.3 s taken, the zoo's reduced ResNet-18 (channel) 10.3 s against 3.9 s (``docs/cli.md``).
    It also varies with the load of the machine. Measuring costs
    about two graph builds and one example's scoring; ``measure=False`` skips it (the time
    fields are then ``None``). Nothing is measured when the tables exceed ``memory_budget``.

    Args:
        model, calibration, granularity, alpha, device, tolerance, threads, memory_budget,
            node_reduction: as for :func:`~curvprune.curvature.neural_curvature`
            (``granularity`` defaults to ``"auto"`` here, as in the CLI). Pass the
            ``node_reduction`` the run will use (:class:`~curvprune.CurvatureImportance`
            and :func:`~curvprune.prune_channels` use their ``reduction``, ``"mean"`` by
            default): it changes how much of the exact solving one example needs.
        measure: time the build and one example (see above).

    Returns:
        A :class:`ScoringEstimate`; ``print(e.summary())`` shows it.

    Raises:
        TypeError, ValueError: what :func:`~curvprune.curvature.neural_curvature` raises for
            the same arguments, before any scoring (an untraceable model at channel
            granularity raises :class:`~curvprune.errors.UntraceableModel`).
    """
    check_module(model)
    alpha = check_alpha(alpha)
    check_choice(granularity, "granularity", GRANULARITIES)
    check_threads(threads)
    node_reduction = check_node_reduction(node_reduction, granularity)
    budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    model_device = _model_device(model)
    engine_device = resolve_device(device, model)
    count, example = _count(calibration, model_device)
    if granularity == "auto":
        granularity = _choose_granularity(model, example, model_device, budget)
    notes: list[str] = []
    build = None
    problem_bytes = 0
    with scoring_mode(model):
        if granularity == "neuron":
            nodes, edges, table_bytes, structures, layers = _neuron_structure(model, example)
            total_edges = sum(edges.values())
            if measure and table_bytes <= budget:
                start = time.perf_counter()
                NeuronGraph.build(structures, [layer.module.weight.detach().flatten()
                                               for layer in layers], engine_device)
                build = time.perf_counter() - start
        else:
            from .graphs.channel import (
                channel_problem_bytes,
                needed_distance_bytes,
                needed_distances,
                trace_channels,
            )

            start = time.perf_counter()
            graph = trace_channels(model, example, device=engine_device)
            nodes = graph.num_nodes
            table_bytes = needed_distance_bytes(graph)
            problem_bytes = channel_problem_bytes(graph)
            edges = {name: int((graph.module == k).sum())
                     for k, (name, _) in enumerate(graph.modules)}
            total_edges = int(graph.src.numel())
            if measure and table_bytes + problem_bytes <= budget:
                needed_distances(graph)
                build = time.perf_counter() - start
    fits = table_bytes + problem_bytes <= budget
    per_example = seconds = None
    if measure and not fits:
        notes.append("not timed: the distance tables exceed memory_budget")
        build = None
    elif measure:
        start = time.perf_counter()
        neural_curvature(model, example, alpha=alpha, granularity=granularity, device=device,
                         tolerance=tolerance, threads=threads, memory_budget=budget,
                         node_reduction=node_reduction if granularity == "channel" else None)
        one = time.perf_counter() - start
        per_example = max(one - build, 0.0)
        seconds = build + count * per_example
    return ScoringEstimate(
        granularity=granularity, nodes=int(nodes), edges=int(total_edges),
        edges_per_layer=edges, distance_bytes=int(table_bytes), memory_budget=int(budget),
        fits=fits, calibration_examples=count, build_seconds=build,
        example_seconds=per_example, seconds=seconds, notes=notes,
        problem_bytes=int(problem_bytes))
