r"""``neural_curvature``: score every weight of a model by neural Ollivier-Ricci curvature.

For an edge ``i -> j`` of the neural graph with length :math:`d(i, j) = 1/|w_{ij}|`, on one
calibration example,

.. math::

    \kappa(i, j) = \frac{1}{1 - \alpha}\left(1 - \frac{W_1(\mu_i, \nu_j)}{d(i, j)}\right),

where :math:`\mu_i` puts mass :math:`\alpha` on ``i`` and :math:`1-\alpha` on its active
in-neighbours in proportion to :math:`\exp(-1/a^2)`, :math:`\nu_j` likewise on the out-neighbours
of ``j``, and :math:`W_1` is the exact optimal-transport cost under directed shortest-path
distances. A weight's score is the minimum over the positions that share it and over the
calibration examples. See ``docs/method.md`` for the full definitions.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import numbers
import sys
import threading
import time
import warnings

import torch
import torch.nn as nn

from ._checks import (
    GRANULARITIES,
    check_choice,
    check_module,
    check_node_reduction,
    check_threads,
)
from ._checks import check_alpha as _check_alpha
from ._checks import model_device as _model_device
from ._memory import release_free_memory
from .calibration import (
    capture_activations,
    half_dtype,
    is_single_pair,
    iter_calibration_inputs,
    normalise_activity,
    prepare_calibration,
    scoring_mode,
)
from .graphs.base import EdgeGraph, EdgeProblem, SolveSet
from .graphs.channel import ChannelDistances, ChannelGraph, ChannelProblems
from .graphs.neuron import NeuronGraph, chain_structure, hop_table_bytes, layer_edges, trace_chain
from .result import CurvatureResult
from .transport import CERTIFY_TOL, EngineOptions, EngineStats, MinimumSearch, NodeMeans
from .transport.solver import _pool

__all__ = ["neural_curvature", "EngineOptions", "channel_edge_bounds"]


#: Default memory budget (bytes) of the distance tables for ``granularity="auto"``.
MEMORY_BUDGET = 4 << 30


#: Calibration examples the channel tracer follows (the first ones); every example's
#: activities come from replaying that trace (``_channel_curvature``).
TRACE_EXAMPLES = 2


#: Default ``tolerance`` of :func:`neural_curvature` (and of the pruning functions,
#: :class:`~curvprune.importance.CurvatureImportance` and the CLI): every weight's certified
#: interval is at most 0.01 wide (kappa lies in [-2, 1]). Chosen for the real-size targets
#: (docs/benchmarks.md, "Default tolerance"): on three of the four reduced zoo models it scores
#: 1.5-1.7x faster than 1e-14 (vit_tiny: slower, 6.6 s against 5.1 s), and on all four its
#: midpoints remove exact's channels at ratios 0.1-0.5; on LeNet-5 its midpoints prune 99.97 %
#: of exact's set at 50 % sparsity and all of it at 80 and 90 %. The pruning functions are
#: decision-exact at any tolerance. ``tolerance=0`` is exact; ``1e-14`` is exact to a few ulps.
TOLERANCE = 1e-2


def check_tolerance(tolerance: float, name: str = "tolerance") -> float:
    """``tolerance`` as a float, checked: a finite real number ``>= 0`` (not a bool).

    Raises:
        TypeError: not a real number (or a bool).
        ValueError: negative, NaN or infinite.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
        raise TypeError(
            f"{name} must be a real number >= 0 (the largest width of a curvature interval), "
            f"not {type(tolerance).__name__}."
        )
    value = float(tolerance)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 (0 = exact curvature); got {tolerance!r}."
        )
    return value


def _resolve_tolerance(tolerance: float | None, certify_tol: float | None) -> float:
    """The tolerance to use, from ``tolerance`` and the deprecated ``certify_tol``."""
    if certify_tol is not None:
        warnings.warn("certify_tol is deprecated; use tolerance= (the same knob: the largest "
                      "width of a weight's curvature interval).", DeprecationWarning,
                      stacklevel=3)
        if tolerance is not None:
            raise ValueError("pass tolerance= only (certify_tol is its deprecated name), "
                             "not both.")
        return check_tolerance(certify_tol, "certify_tol")
    return TOLERANCE if tolerance is None else check_tolerance(tolerance)


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """The device the engine runs on: ``device`` if given (checked), else the model's."""
    if device is None:
        return _model_device(model)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device: {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA "
                "device(s) are visible."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'.")
    return device


def neural_curvature(
    model: nn.Module,
    calibration,
    *,
    alpha: float = 0.9,
    granularity: str = "neuron",
    device: str | torch.device | None = None,
    progress: bool = False,
    tolerance: float | None = None,
    threads: int | None = None,
    memory_budget: int | None = None,
    certify_tol: float | None = None,
    options: EngineOptions | None = None,
    node_reduction: str | None = None,
) -> CurvatureResult:
    r"""Neural Ollivier-Ricci curvature of every Linear/Conv2d weight of ``model``.

    For an edge ``i -> j`` on one calibration example,
    :math:`\kappa(i, j) = (1 - W_1(\mu_i, \nu_j) / d(i, j)) / (1 - \alpha)` with the measures
    and ground distances of ``docs/method.md`` (neuron graph) or ``docs/channels.md`` (channel
    graph); a weight's score is the minimum over its edges and the examples.

    Args:
        model: at neuron granularity, a chain of ``Conv2d`` (any kernel, stride, padding,
            dilation, groups; zero padding) and ``Linear`` layers with elementwise modules
            between them (ReLU, GELU, Tanh, Sigmoid, BatchNorm, Dropout, Flatten, ...); at
            channel granularity, any model the channel tracer follows (timm and torchvision
            CNNs and ViTs: residual adds, concatenation, depthwise convs, squeeze-excitation,
            attention...). It is run in eval mode under ``torch.no_grad()`` and left exactly as
            it was found; half-precision models are scored in float64 from their values.
        calibration: a tensor batch, an ``(inputs, targets)`` pair, or an iterable of batches
            (a ``DataLoader`` works). The paper uses a few correctly classified examples per
            class. A list of single examples without a batch dimension (``[C, H, W]`` images
            for a model whose first layer is a ``Conv2d``, ``[features]`` vectors, or the
            ``(example, label)`` items of a ``Dataset``) is stacked into one batch when they
            all have one shape (:func:`curvprune.calibration.prepare_calibration`). Images are
            channels first, ``[N, C, H, W]``.
        alpha: idleness :math:`\alpha \in [0, 1)` of the measures (the paper uses 0.9). For
            :math:`\alpha \ge 1/2` kappa does not depend on alpha (see ``docs/method.md``).
        granularity: ``"neuron"`` (the paper's graph: one node per neuron, chains only),
            ``"channel"`` (one node per channel, any model the channel tracer follows: see
            :mod:`curvprune.graphs.channel`; every element of ``W[o, i, ...]`` gets the curvature of
            the channel edge ``i -> o``, zero elements ``+inf``), or ``"auto"`` (neuron when the
            model is a chain whose distance tables fit ``memory_budget``, else channel).
        device: where the engine runs; defaults to the model's device. The model itself is not
            moved; inputs are moved to the model's device for the forward pass.
        progress: show a progress bar over calibration examples (tqdm, on stderr; when stderr
            is not a terminal, e.g. a log file, at most one line every 30 seconds).
        tolerance: the largest width of a weight's curvature interval (default
            :data:`TOLERANCE`, 0.01; ``1e-14``: a few ulps, exact in practice; ``0``: exact;
            study the curvature values themselves at one of those two). Every weight
            gets certified bounds ``result.kappa_lo <= kappa <= result.kappa_hi`` on its exact
            curvature, at most ``tolerance`` apart, and ``result.kappa`` is their midpoint. The
            engine spends the tolerance three ways (``docs/method.md``, "Curvature
            intervals"): masses whose effect on an edge's kappa is at most ``tolerance / 4``
            are cut from the measures (:func:`curvprune.transport.cut_measures`) and the bounds
            are widened by that; edges are settled by their bounds
            (:func:`curvprune.transport.bound_edges`); and the minimum search
            (:mod:`curvprune.transport.minimum`) stops solving a weight's edges once its
            interval is at most ``tolerance`` wide. :meth:`CurvatureResult.refine
            <curvprune.result.CurvatureResult.refine>` later solves chosen weights exactly.
        certify_tol: deprecated name of ``tolerance`` (a ``DeprecationWarning``).
        threads: CPU threads for the engine (default: ``torch.get_num_threads()``): an
            example's groups are bounded on a pool of this many threads, and the minimum
            search tightens and solves a round's examples on it (a single job spreads its
            exact solves over the threads). With more than one, torch's own ops run on one
            thread during the call (restored after), so that the two do not compete for the
            cores. The scores do not depend on it.
        memory_budget: bytes the distance tables may take (default :data:`MEMORY_BUDGET`,
            4 GiB): the neuron graph's hop tables; at channel granularity the needed
            distances plus the edge problems' index tables and the largest layer's measures
            (:func:`~curvprune.graphs.channel.channel_problem_bytes`). A larger graph is
            refused with a ``ValueError`` saying how much it needs, right after the channel
            structure is traced (on two examples) and before any distance is computed.
        options: the engine's tuning knobs (chunk sizes, hop-table windows, the bytes of
            solve sets kept between the search's rounds;
            :class:`~curvprune.transport.EngineOptions`); none changes a score.
        node_reduction: at channel granularity, spend the tolerance on each channel's
            curvature :meth:`result.node_kappa(node_reduction)
            <curvprune.result.CurvatureResult.node_kappa>` instead of on each weight:
            with ``"mean"`` or ``"weighted"`` the search stops solving a channel's edges once
            the interval of that mean (the same mean of its edges' bounds) is at most
            ``tolerance`` wide, so a single edge's interval, and ``result.max_width``, may be
            wider (``docs/method.md``, "A tolerance on channels"); with ``"min"`` every edge is
            certified within ``tolerance``, which already certifies the channel's minimum.
            :class:`~curvprune.CurvatureImportance` passes its ``reduction``. ``None``
            (default): every weight within ``tolerance``. Not allowed with
            ``granularity="neuron"``; when ``"auto"`` picks the neuron graph it has no
            effect there (every weight is certified within ``tolerance``, as with ``None``).

    Both granularities run one loop: build the graph once (the neuron graph and its hop
    tables, or the traced channel graph and its needed distances), capture every example's
    activities, bound every edge problem (built once per layer or group and example, then
    reused by the solve rounds), feed the minimum search, solve exactly only what can still
    move a weight's interval, and scatter the minima to the weights.

    Returns:
        A :class:`~curvprune.result.CurvatureResult`; ``result.kappa[name]`` has the shape of
        the weight ``name`` (``"<module>.weight"``, also on a model under pruning hooks, where
        the parameter itself is ``weight_orig``), and ``result.importance_scores()`` plugs into
        ``torch.nn.utils.prune.global_unstructured``.

    Raises:
        TypeError: bad argument types (``tolerance`` not a real number included), or a
            calibration batch that is not a tensor or pair.
        ValueError: an empty calibration set; NaN/Inf in inputs or activations; alpha outside
            ``[0, 1)``; a negative, NaN or infinite ``tolerance``; an unsupported model (the
            message names the module); inputs the model rejects; a device that is not there; a
            graph over ``memory_budget``; a model on the ``meta`` device; channels-last images
            ``[N, H, W, C]`` (the message says to permute them); single examples of several
            shapes.
        UntraceableModel: (a ``ValueError``) at channel granularity, the model calls functions
            the channel tracer cannot follow; ``.functions`` lists them. Pruning entry points
            (:func:`~curvprune.prune_model`, :class:`~curvprune.CurvatureImportance`) catch it
            and fall back to magnitude with a warning.
    """
    start = time.perf_counter()
    check_module(model)
    alpha = _check_alpha(alpha)
    tolerance = _resolve_tolerance(tolerance, certify_tol)
    calibration = prepare_calibration(model, calibration)
    check_choice(granularity, "granularity", GRANULARITIES)
    node_reduction = check_node_reduction(node_reduction, granularity)
    threads = check_threads(threads) or max(1, torch.get_num_threads())
    if memory_budget is None:
        memory_budget = MEMORY_BUDGET
    if options is None:
        options = EngineOptions()
    elif not isinstance(options, EngineOptions):
        raise TypeError(f"options must be a curvprune.transport.EngineOptions, not "
                        f"{type(options).__name__}.")
    model_device = _model_device(model)
    engine_device = resolve_device(device, model)
    if granularity == "auto":
        granularity = _choose_granularity(model, calibration, model_device, memory_budget)
    if granularity == "channel":
        return _channel_curvature(model, calibration, alpha=alpha, model_device=model_device,
                                  engine_device=engine_device, progress=progress,
                                  tolerance=tolerance, threads=threads,
                                  memory_budget=memory_budget, start=start, options=options,
                                  node_reduction=node_reduction)
    layers = trace_chain(model)
    modules = [layer.module for layer in layers]
    names = [layer.name for layer in layers]
    stats = EngineStats()
    graph: NeuronGraph | None = None
    weight_shapes = [m.weight.shape for m in modules]
    example_acts: list[list[torch.Tensor]] = []
    num_examples = 0
    first_shapes = None
    with _progress_bar(progress, "curvature", calibration) as bar, scoring_mode(model):
        for inputs in _float_batches(calibration, model_device, model, half_dtype(model)):
            values, in_shapes, out_shapes = capture_activations(model, modules, inputs)
            if graph is not None and (in_shapes, out_shapes) != first_shapes:
                raise ValueError(
                    f"calibration examples of shape {tuple(inputs.shape[1:])} give layer "
                    f"shapes {out_shapes}, but earlier examples gave {first_shapes[1]}: "
                    "every calibration example must have the same shape (one neural graph)."
                )
            if graph is None:
                first_shapes = (in_shapes, out_shapes)
                input_shape = tuple(inputs.shape[1:])
                structures = [layer_edges(m, in_shapes[k], out_shapes[k])
                              for k, m in enumerate(modules)]
                _check_shapes(structures, values, names)
                _check_table_bytes(hop_table_bytes(structures, options.window_fraction),
                                   memory_budget)
                graph = NeuronGraph.build(
                    structures, [m.weight.detach().flatten() for m in modules], engine_device,
                    options,
                )
                del structures  # the graph keeps the nonzero edges; the rest is not needed
                release_free_memory()
            acts = [normalise_activity(v).to(engine_device) for v in values]
            for b in range(acts[0].shape[0]):
                example_acts.append([a[b] for a in acts])
                num_examples += 1
        if graph is None:  # iter_calibration_inputs refuses an empty set; kept for safety
            raise ValueError("the calibration set is empty.")
        numels = [m.weight.numel() for m in modules]
        upper, lower, live = _search(graph, example_acts, alpha, tolerance, stats=stats,
                                     options=options, threads=threads, bar=bar)

    def refine(result: CurvatureResult, masks: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Exact minima (tolerance 0, uncut measures) of the weights in ``masks``."""
        flat = [masks[n].reshape(-1).to(engine_device) if n in masks else
                torch.zeros(numels[k], dtype=torch.bool, device=engine_device)
                for k, n in enumerate(names)]
        subsets = [torch.nonzero(flat[k][graph.layers[k].widx]).squeeze(1)
                   for k in range(len(names))]
        counts = EngineStats()
        exact, _, _ = _search(graph, example_acts, alpha, 0.0, stats=counts, options=options,
                              threads=threads, subsets=subsets)
        return {n: exact[k] for k, n in enumerate(names) if n in masks}, counts.as_dict()

    kappa = [0.5 * (lo + hi) for lo, hi in zip(lower, upper)]

    def shaped(values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: values[k].view(weight_shapes[k]).to(modules[k].weight.device)
                for k, n in enumerate(names)}

    return CurvatureResult(
        kappa=shaped(kappa),
        live=shaped(live),
        modules=dict(zip(names, modules)),
        alpha=alpha,
        granularity=granularity,
        num_examples=num_examples,
        edges_per_example={n: graph.layers[k].num_edges for k, n in enumerate(names)},
        seconds=time.perf_counter() - start,
        engine=stats.as_dict(),
        magnitude={n: modules[k].weight.detach().abs().to(torch.float64).clone()
                   for k, n in enumerate(names)},
        input_shape=input_shape,
        kappa_lo=shaped(lower),
        kappa_hi=shaped(upper),
        tolerance=tolerance,
        refiner=refine,
    )


def _search(graph: EdgeGraph, activities: list, alpha: float, tolerance: float, *,
            stats: EngineStats, options: EngineOptions, threads: int,
            subsets: list[torch.Tensor] | None = None, bar=None, nodes: NodeMeans | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The one scoring loop, for either graph: per group of ``graph``, ``(upper, lower,
    live)`` over its search slots: certified bounds on each slot's minimum curvature over the
    examples (``activities``, one per example), at most ``tolerance`` apart
    (``docs/method.md``), and whether the slot has a live edge.

    Every edge problem is bounded (:meth:`EdgeProblem.bounds`, without the edge-by-edge
    tightening), the bounds feed the minimum search
    (:class:`~curvprune.transport.MinimumSearch`), and the search first tightens
    (:meth:`SolveSet.bounds`), then solves exactly (:meth:`SolveSet.solve`), only the edges
    that can still move a slot's interval. Each problem
    is built once per (group, example) and bounded; the edges the search holds open on it
    are kept as a :class:`SolveSet` (:meth:`EdgeProblem.keep`: those edges and their ends'
    measure rows) while the sets kept fit ``options.problem_cache_bytes``, a set of an
    earlier group displacing those of later groups (the search resolves the groups in order,
    so the sets it needs first are the ones kept); a set not kept is rebuilt once, when the
    search reaches its group (twice under a tolerance on node means, whose tightening visits
    every group before the solves start). ``subsets``: per group,
    the edges to score (the others' slots stay ``+inf``). ``nodes``: spend the tolerance on
    these nodes' means instead of on each slot (:class:`~curvprune.transport.NodeMeans`)."""
    groups = range(graph.num_groups)
    slots, sizes = [], []
    for g in groups:
        slot, size = graph.slots(g)
        slots.append(slot if subsets is None else slot[subsets[g]])
        sizes.append(size)
    search = MinimumSearch(slots, sizes, tolerance=tolerance, nodes=nodes)
    live = [torch.zeros(n, dtype=torch.bool, device=s.device) for s, n in zip(slots, sizes)]
    cut_tol = tolerance / 2  # each edge within tolerance / 4 (transport.cut_measures)
    cache = _SolveCache(options.problem_cache_bytes)

    def in_problem(g: int, edges: torch.Tensor) -> torch.Tensor:
        """The search's edge indices of group ``g`` as indices into its edge problem."""
        return edges if subsets is None else subsets[g][edges]

    def bound(g: int, x: int
              ) -> tuple[EdgeProblem, torch.Tensor, torch.Tensor, EngineStats, torch.Tensor]:
        """One group's problem on one example and its bounds, with counts of its own (this
        runs on pool threads). From the second example on, edges whose cheap bound reaches
        their ceiling (the weight's best upper bound over the earlier examples less the
        tolerance) are screened (:func:`~curvprune.transport.bound_edges`). The ceiling is
        made here, when the job starts, so that queued jobs hold none: it reads only this
        group's minima, which no other job changes and which are recorded (``search.add``,
        on the calling thread) only after this job, so it is the same on any thread."""
        ceiling = search.ceiling(g) if x else None
        built = graph.edge_problem(g, activities[x], cut_tol)
        part = built if subsets is None else built.take(subsets[g])
        counts = EngineStats()
        lo, hi = part.bounds(alpha, tolerance, stats=counts, options=options, ceiling=ceiling,
                             tighten=False)
        return built, lo, hi, counts, ~part.dead

    _restart_clock(bar)  # the ETA is per example: the forward passes and build are not in it
    todo = [g for g in groups if subsets is None or subsets[g].numel()]
    for x in range(len(activities)):
        # Only the engine runs single-threaded: the model's forward pass keeps the user's
        # setting (float32 kernels round differently with other counts). With several
        # threads the groups of an example are built and bounded on a pool, one group a
        # thread (each computation is the same as on its own: the results do not depend on
        # the thread count), and recorded here in group order.
        with _torch_threads(1 if threads > 1 else None):
            jobs = [(g, x) for g in todo]
            done = (bound(*job) for job in jobs) if threads <= 1 or len(jobs) < 2 else \
                _in_order(threads, bound, jobs)
            for g, (built, lo, hi, counts, alive) in zip(todo, done):
                search.add(g, x, lo, hi)
                held = search.held(g, x)
                if held.numel():  # earlier groups first: the search resolves them first
                    cache.put((g, x), built.keep(in_problem(g, held)), evict_later=True)
                live[g].scatter_reduce_(0, slots[g], alive, reduce="amax")
                stats.add(counts)
                large = built.src.numel() >= _TRIM_EDGES
                del built
                if large:
                    release_free_memory()
        if bar is not None:
            bar.update(1)

    # What the search holds open when it starts: each solve set not kept is rebuilt from it.
    held = [{x: search.held(g, x) for x in range(len(activities))} for g in groups]

    lock = threading.Lock()  # the tightening runs on pool threads

    def kept(g: int, x: int) -> SolveSet:
        with lock:
            found = cache.get((g, x))
        if found is None:
            found = graph.edge_problem(g, activities[x], cut_tol).keep(in_problem(g, held[g][x]))
            with lock:
                cache.put((g, x), found, evict_later=True)
        return found

    def solve_one(g: int, x: int, edges: torch.Tensor, solver_threads: int
                  ) -> tuple[torch.Tensor, torch.Tensor, EngineStats]:
        """One example's solves, with counts of their own (this may run on a pool thread)."""
        counts = EngineStats()
        lo, hi = kept(g, x).solve(in_problem(g, edges), alpha, stats=counts, options=options,
                                  threads=solver_threads)
        return lo, hi, counts

    def solve(g: int, jobs: list[tuple[int, torch.Tensor]]):
        """Each job's values, in order. With several threads and several jobs (examples), the
        jobs run on a pool, one a thread, each solving its problems on its own thread, so
        that one job's problems are built while another's are solved; a single job spreads
        its problems over the threads instead (the values are the same either way)."""
        cache.drop_before(g)  # the search solves groups in order: earlier ones are done
        if threads <= 1 or len(jobs) < 2:
            done = (solve_one(g, *job, threads) for job in jobs)
        else:
            done = _in_order(threads, solve_one, [(g, *job, 1) for job in jobs])
        for lo, hi, counts in done:
            stats.add(counts)
            yield lo, hi

    def tighten_one(g: int, x: int, edges: torch.Tensor, ceiling: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kept(g, x).bounds(in_problem(g, edges), alpha, tolerance, stats=EngineStats(),
                                 options=options, ceiling=ceiling)

    def tighten(g: int, jobs: list[tuple[int, torch.Tensor, torch.Tensor]]):
        """Each job's bounds, in order; with several threads, the examples on a pool."""
        if nodes is None:  # the search tightens a group just before solving it
            cache.drop_before(g)
        stats.tightened += sum(edges.numel() for _, edges, _ in jobs)
        jobs = [(g, *job) for job in jobs]
        if threads <= 1 or len(jobs) < 2:
            return (tighten_one(*job) for job in jobs)
        return _in_order(threads, tighten_one, jobs)

    # Only the edges that can still matter to a slot's interval are tightened, then solved.
    with _torch_threads(1 if threads > 1 else None), _MinimaBar(bar is not None) as minima:
        upper = search.resolve(solve, on_progress=minima, tighten=tighten)
    stats.ruled_out += search.opened - search.solved
    cache.drop_before(graph.num_groups)  # every kept problem: the search is done
    held.clear()
    release_free_memory()
    return upper, search.lower(), live


def _in_order(threads: int, func, jobs: list[tuple]):
    """``func(*job)`` of each job on a pool of ``threads`` threads, yielded in the jobs' order,
    with at most ``2 * threads`` jobs started ahead of the one yielded (so that only a few
    groups' problems are alive at once)."""
    pool = _pool(threads, "bounds")
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.submit(func, *job))
        if len(pending) > 2 * threads:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


#: Freed memory is handed back to the system (:func:`release_free_memory`) only after steps
#: this large: a bounding job of at least this many edges, or kept problems of at least this
#: many bytes dropped at once. On small models a trim per step costs more than it returns
#: (LeNet-5, 10 examples: about 15 % slower with a trim after every job).
_TRIM_EDGES = 1 << 20
_TRIM_BYTES = 64 << 20


class _SolveCache:
    """Solve sets (:class:`SolveSet`) by ``(group, example)``, kept while their bytes fit
    ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.items: dict[tuple[int, int], SolveSet] = {}
        self.bytes = 0

    def get(self, key: tuple[int, int]) -> SolveSet | None:
        return self.items.get(key)

    def put(self, key: tuple[int, int], kept: SolveSet, *, evict_later: bool = False) -> None:
        """Keep ``kept`` if it fits; with ``evict_later``, first drop sets of later groups
        (the last first) to make room: the search resolves the groups in order, and the group
        being resolved needs its sets in every round, while a later group's are rebuilt once
        when its turn comes."""
        size = kept.nbytes
        if evict_later:
            for k in sorted((k for k in self.items if k[0] > key[0]), reverse=True):
                if self.bytes + size <= self.budget:
                    break
                self.bytes -= self.items.pop(k).nbytes
        if self.bytes + size <= self.budget:
            self.items[key] = kept
            self.bytes += size

    def drop_before(self, group: int) -> None:
        """Drop the problems of the groups before ``group`` (the minimum search resolves the
        groups in order, so those are done; the later ones are still to be solved and are
        kept, not rebuilt)."""
        dropped = 0
        for key in [k for k in self.items if k[0] < group]:
            dropped += self.items.pop(key).nbytes
        self.bytes -= dropped
        if dropped >= _TRIM_BYTES:
            release_free_memory()


def channel_edge_bounds(
    graph: ChannelGraph,
    distances: torch.Tensor | ChannelDistances,
    alpha: float,
    *,
    tolerance: float = CERTIFY_TOL,
    stats: EngineStats | None = None,
    threads: int = 1,
    edges: torch.Tensor | None = None,
    options: EngineOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Certified bounds on the curvature of every layer edge of one traced ``graph``, minimum
    over its batch's examples: the loop of :func:`neural_curvature` on the edges, without the
    scatter to weights.

    Returns ``(upper, lower, live)`` over all edges (``[num_edges]``): ``lower <= kappa <=
    upper`` with ``upper - lower <= tolerance`` (both exact and equal for ``tolerance=0``);
    merge edges, which are no weight, stay ``+inf``. ``live``: whether the edge was live on at
    least one example. ``distances``: the dense table of
    :func:`~curvprune.graphs.channel.channel_distances` or the needed pairs of
    :func:`~curvprune.graphs.channel.needed_distances` (the same numbers). ``edges``: a bool
    mask over all edges; only those layer edges are scored (the others stay ``+inf``).
    """
    problems = ChannelProblems(graph, distances, edges)
    upper, lower, live = _search(
        problems, list(graph.activity), alpha, tolerance,
        stats=stats if stats is not None else EngineStats(),
        options=options if options is not None else EngineOptions(), threads=threads)
    return (problems.on_edges(upper), problems.on_edges(lower),
            problems.on_edges([x.to(torch.float64) for x in live]) == 1.0)


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """Run torch's own ops on ``count`` intra-op threads (restored after); None leaves them.

    While the exact solves run on their own threads, torch's OpenMP threads only compete with
    them for the cores (measured: 50% more CPU time for the same work on 2 cores).
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _progress_bar(progress: bool, desc: str, calibration):
    """A tqdm bar over calibration examples (``None`` when ``progress`` is off), closed after.

    On a terminal (or a notebook) the bar redraws at most 10 times a second; when stderr is not
    a terminal (a log file, a CI job) it writes at most one line every 30 seconds, so long runs
    do not flood logs."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    interactive = _interactive(tqdm)
    bar = tqdm(desc=desc, unit="example", total=_count_examples(calibration),
               mininterval=0.1 if interactive else 30.0)
    bar.curvprune_interactive = interactive
    try:
        yield bar
    finally:
        bar.close()


def _restart_clock(bar) -> None:
    """Start ``bar``'s clock now (no example counted yet), so that its rate and ETA measure
    the per-example work only, not the graph build that came before."""
    if bar is not None and bar.n == 0:
        bar.reset()


class _MinimaBar:
    """The exact-minima phase's bar: ``on_progress(settled, total)`` of
    :meth:`MinimumSearch.resolve`, the open edge-examples settled (solved exactly, or ruled out
    by a solve) out of all those the bounds left open. The total is known when the phase
    starts, so the ETA is the remaining count at the rate so far (solves rule out more edges
    early on, so the rate is uneven). No bar without ``progress``."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.bar = None

    def __enter__(self) -> _MinimaBar:
        return self

    def __call__(self, settled: int, total: int) -> None:
        if not self.progress:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            interactive = _interactive(tqdm)
            self.bar = tqdm(desc="exact minima", unit="edge", total=total,
                            mininterval=0.1 if interactive else 30.0)
        self.bar.update(settled - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _interactive(tqdm) -> bool:
    """Whether ``tqdm`` draws in a notebook or on a terminal (else a log: redraw rarely)."""
    notebook = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    return notebook or _isatty(sys.stderr)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _float_batches(calibration, model_device: torch.device, model: nn.Module | None = None,
                   dtype: torch.dtype | None = None):
    """The calibration batches, checked to be floating point (and, with ``model``, channels
    first), on the model's device (and in ``dtype``, a half-precision model's, when given)."""
    for inputs in iter_calibration_inputs(calibration, model):
        if not inputs.is_floating_point():
            raise TypeError(f"calibration inputs must be floating point, not {inputs.dtype}.")
        yield inputs.to(model_device, dtype)


def _count_examples(calibration) -> int | None:
    """Number of calibration examples when it is known without iterating (for progress)."""
    if isinstance(calibration, torch.Tensor):
        return calibration.shape[0] if calibration.dim() else None
    if is_single_pair(calibration):
        return calibration[0].shape[0] if calibration[0].dim() else None
    if isinstance(calibration, (list, tuple)):  # a list of batches: count their examples
        try:
            return sum(inputs.shape[0] for inputs in iter_calibration_inputs(calibration))
        except (TypeError, ValueError):
            return None  # the scoring loop reports what is wrong with it
    dataset = getattr(calibration, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _check_shapes(structures, values, names) -> None:
    sizes = [v.shape[1] for v in values]
    for k, s in enumerate(structures):
        if s.n_in != sizes[k] or s.n_out != sizes[k + 1]:
            raise ValueError(
                f"'{names[k]}' connects {s.n_in} -> {s.n_out} nodes but its neighbouring node "
                f"layers have {sizes[k]} and {sizes[k + 1]}: only elementwise modules and "
                "flattening may sit between parametrised layers."
            )


def _first_example(calibration, model_device: torch.device,
                   model: nn.Module | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    inputs = next(iter(iter_calibration_inputs(calibration, model)))
    return inputs[:1].to(model_device, dtype if inputs.is_floating_point() else None)


def _check_table_bytes(needed: int, memory_budget: int) -> None:
    """Refuse a neuron graph whose hop tables exceed ``memory_budget``, before building them."""
    if needed > memory_budget:
        raise ValueError(
            f"the neuron graph's distance (hop) tables need {needed / 2**30:.2f} GiB, over "
            f"memory_budget={memory_budget / 2**30:.2f} GiB: use granularity='channel' (or "
            "'auto'), a smaller input, or raise memory_budget if the memory is there."
        )


def _choose_granularity(model: nn.Module, calibration, model_device: torch.device,
                        memory_budget: int) -> str:
    """``"neuron"`` if the model is a chain whose hop tables fit the budget, else ``"channel"``."""
    try:
        trace_chain(model)
    except ValueError:
        return "channel"
    _, structures = chain_structure(model, _first_example(calibration, model_device, model,
                                                          half_dtype(model)))
    return "neuron" if hop_table_bytes(structures) <= memory_budget else "channel"


def _channel_curvature(model, calibration, *, alpha, model_device, engine_device, progress,
                       tolerance, threads, memory_budget, start, options,
                       node_reduction=None) -> CurvatureResult:
    """``neural_curvature`` at channel granularity (see :mod:`curvprune.graphs.channel`).

    The structure is traced on the first two examples only (:data:`TRACE_EXAMPLES`), so the
    label tracer's cost does not grow with the calibration set; every batch, the first
    included, gives its activities by replaying the trace
    (:func:`~curvprune.graphs.channel.channel_activity`: bitwise a full trace's). Two, not one:
    with two examples the trace checks that every tensor it measures keeps the batch as its
    first dimension and carries the same channels on both examples, which the replay of the
    other examples relies on (a model where either fails is traced in full, batch by batch).
    """
    from .graphs.channel import _LayerSets, channel_activity, needed_distances, trace_channels

    stats = EngineStats()
    first = None
    problems = None
    activities: list[torch.Tensor] = []
    with _progress_bar(progress, "curvature (channel)", calibration) as bar, \
            scoring_mode(model):
        for inputs in _float_batches(calibration, model_device, model, half_dtype(model)):
            if first is None:
                first = trace_channels(model, inputs[:TRACE_EXAMPLES], device=engine_device)
                input_shape = tuple(inputs.shape[1:])
                # Only the pairs the measures touch; the distances and the problems' tables
                # are refused over memory_budget before they are built (the layer sets that
                # count the tables are those the problems then use:
                # channel_problem_bytes's count).
                sets = _LayerSets(first)
                distances = needed_distances(first, memory_budget=memory_budget,
                                             reserve=sets.nbytes())
                problems = ChannelProblems(first, distances, sets=sets)
                del distances
            activities.extend(channel_activity(model, inputs, first, engine_device))
        nodes = None
        if node_reduction in ("mean", "weighted") and tolerance > 0:
            nodes = problems.node_means(weighted=node_reduction == "weighted")
        upper, lower, live = _search(problems, activities, alpha, tolerance, stats=stats,
                                     options=options, threads=threads, bar=bar, nodes=nodes)
    # The result keeps the structure and every example's activities (no replay record).
    first = dataclasses.replace(first, replay=None, activity=torch.stack(activities))
    problems.graph = first
    edge_hi, edge_lo = problems.on_edges(upper), problems.on_edges(lower)
    edge_live = problems.on_edges([x.to(torch.float64) for x in live]) == 1.0
    kappa, kappa_lo, kappa_hi, live_w, modules, edges, magnitude = {}, {}, {}, {}, {}, {}, {}
    zeros = {}

    def to_weight(k: int, edge_values: torch.Tensor) -> torch.Tensor:
        """A weight element's value: the minimum over the channel edges it belongs to."""
        widx, eidx = first.weight_edges[k]
        flat = torch.full((zeros[k].numel(),), math.inf, dtype=torch.float64,
                          device=engine_device)
        flat.scatter_reduce_(0, widx, edge_values[eidx], reduce="amin")
        flat[zeros[k]] = math.inf  # a zero weight is no edge
        return flat

    for k, (name, module) in enumerate(first.modules):
        weight = module.weight.detach()
        widx, eidx = first.weight_edges[k]
        zeros[k] = weight.flatten().to(engine_device) == 0
        lo, hi = to_weight(k, edge_lo), to_weight(k, edge_hi)
        alive = torch.zeros(weight.numel(), dtype=torch.bool, device=engine_device)
        alive.scatter_reduce_(0, widx, edge_live[eidx], reduce="amax")
        alive &= ~zeros[k]
        kappa[name] = (0.5 * (lo + hi)).view(weight.shape).to(weight.device)
        kappa_lo[name] = lo.view(weight.shape).to(weight.device)
        kappa_hi[name] = hi.view(weight.shape).to(weight.device)
        live_w[name] = alive.view(weight.shape).to(weight.device)
        modules[name] = module
        edges[name] = int((first.module == k).sum())
        magnitude[name] = weight.abs().to(torch.float64).clone()

    def refine(result: CurvatureResult, masks: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Exact minima (tolerance 0, uncut measures) of the weights in ``masks``: every
        channel edge they belong to is solved exactly, on every example."""
        need = torch.zeros_like(first.src, dtype=torch.bool)
        for k, (name, _) in enumerate(first.modules):
            if name in masks:
                widx, eidx = first.weight_edges[k]
                need[eidx[masks[name].reshape(-1).to(engine_device)[widx]]] = True
        counts = EngineStats()
        upper, _, _ = _search(problems, activities, alpha, 0.0, stats=counts, options=options,
                              threads=threads, subsets=problems.subsets(need[problems.scored]))
        exact = problems.on_edges(upper)
        for values in (result.edge_kappa, result.edge_kappa_lo, result.edge_kappa_hi):
            values[need] = exact[need]
        out = {name: to_weight(k, exact) for k, (name, _) in enumerate(first.modules)
               if name in masks}
        return out, counts.as_dict()

    return CurvatureResult(
        kappa=kappa, live=live_w, modules=modules, alpha=alpha, granularity="channel",
        num_examples=len(activities), edges_per_example=edges,
        seconds=time.perf_counter() - start, engine=stats.as_dict(), magnitude=magnitude,
        channel_graph=first, edge_kappa=0.5 * (edge_lo + edge_hi), input_shape=input_shape,
        kappa_lo=kappa_lo, kappa_hi=kappa_hi, tolerance=tolerance, refiner=refine,
        edge_kappa_lo=edge_lo, edge_kappa_hi=edge_hi, node_reduction=node_reduction,
    )
