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

import contextlib
import math
import numbers
import sys
import time

import torch
import torch.nn as nn

from .calibration import (
    capture_activations,
    half_dtype,
    is_single_pair,
    iter_calibration_inputs,
    normalise_activity,
    prepare_calibration,
    scoring_mode,
)
from .engine import (
    CERTIFY_TOL,
    EngineStats,
    NeuronGraph,
    bound_example,
    hop_table_bytes,
    solve_layer_edges,
)
from .graph import chain_structure, layer_edges, trace_chain
from .minimum import MinimumSearch
from .result import CurvatureResult

__all__ = ["neural_curvature"]

_GRANULARITIES = ("neuron", "channel", "auto")

#: Default memory budget (bytes) of the distance tables for ``granularity="auto"``.
MEMORY_BUDGET = 4 << 30


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in [0, 1), not {type(alpha).__name__}.")
    alpha = float(alpha)
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1) (the idleness of the measures); got {alpha}.")
    return alpha


def _model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are on several devices ({sorted(map(str, devices))}); "
            "move the model to one device first."
        )
    return devices.pop() if devices else torch.device("cpu")


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
    certify_tol: float = CERTIFY_TOL,
    threads: int | None = None,
    memory_budget: int | None = None,
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
            :mod:`curvprune.channels`; every element of ``W[o, i, ...]`` gets the curvature of
            the channel edge ``i -> o``, zero elements ``+inf``), or ``"auto"`` (neuron when the
            model is a chain whose distance tables fit ``memory_budget``, else channel).
        device: where the engine runs; defaults to the model's device. The model itself is not
            moved; inputs are moved to the model's device for the forward pass.
        progress: show a progress bar over calibration examples (tqdm, on stderr; when stderr
            is not a terminal, e.g. a log file, at most one line every 30 seconds).
        certify_tol: tolerance of the engine's shortcuts (default 1e-14, a few ulps): masses
            whose effect on kappa is below half of it are cut from the measures
            (:func:`curvprune.engine.cut_measures`), and an edge whose curvature bounds are less
            than half of it apart is settled without a transport solve
            (:func:`curvprune.engine.bound_edges`); every kappa is within it of the exact value.
            ``0`` turns both off. Other edges are solved exactly when they can be their
            weight's minimum (:mod:`curvprune.minimum`).
        threads: CPU threads for the exact transport solves (default: ``torch.get_num_threads()``).
            With more than one, torch's own ops run on one thread during the call (restored
            after), so that the two do not compete for the cores.
        memory_budget: bytes the distance tables may take (default :data:`MEMORY_BUDGET`,
            4 GiB); a larger graph is refused with a ``ValueError`` saying how much it needs.

    Returns:
        A :class:`~curvprune.result.CurvatureResult`; ``result.kappa[name]`` has the shape of
        the weight ``name`` (``"<module>.weight"``, also on a model under pruning hooks, where
        the parameter itself is ``weight_orig``), and ``result.importance_scores()`` plugs into
        ``torch.nn.utils.prune.global_unstructured``.

    Raises:
        TypeError: bad argument types, or a calibration batch that is not a tensor or pair.
        ValueError: an empty calibration set; NaN/Inf in inputs or activations; alpha outside
            ``[0, 1)``; an unsupported model (the message names the module); inputs the model
            rejects; a device that is not there; a graph over ``memory_budget``; a model on
            the ``meta`` device; channels-last images ``[N, H, W, C]`` (the message says to
            permute them); single examples of several shapes.
        UntraceableModel: (a ``ValueError``) at channel granularity, the model calls functions
            the channel tracer cannot follow; ``.functions`` lists them. Pruning entry points
            (:func:`~curvprune.prune_model`, :class:`~curvprune.CurvatureImportance`) catch it
            and fall back to magnitude with a warning.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
    alpha = _check_alpha(alpha)
    calibration = prepare_calibration(model, calibration)
    if granularity not in _GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {_GRANULARITIES}; got {granularity!r}."
        )
    if threads is None:
        threads = max(1, torch.get_num_threads())
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}.")
    if memory_budget is None:
        memory_budget = MEMORY_BUDGET
    model_device = _model_device(model)
    engine_device = resolve_device(device, model)
    if granularity == "auto":
        granularity = _choose_granularity(model, calibration, model_device, memory_budget)
    if granularity == "channel":
        return _channel_curvature(model, calibration, alpha=alpha, model_device=model_device,
                                  engine_device=engine_device, progress=progress,
                                  certify_tol=certify_tol, threads=threads,
                                  memory_budget=memory_budget, start=start)
    layers = trace_chain(model)
    modules = [layer.module for layer in layers]
    names = [layer.name for layer in layers]
    stats = EngineStats()
    graph: NeuronGraph | None = None
    weight_shapes = [m.weight.shape for m in modules]
    example_acts: list[list[torch.Tensor]] = []
    live = [torch.zeros(m.weight.numel(), dtype=torch.bool, device=engine_device)
            for m in modules]
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
                graph = NeuronGraph.build(
                    structures, [m.weight.detach().flatten() for m in modules], engine_device
                )
                search = MinimumSearch([layer.widx for layer in graph.layers],
                                       [m.weight.numel() for m in modules])
                _restart_clock(bar)  # the ETA is per example: the one-off build is not in it
            acts = [normalise_activity(v).to(engine_device) for v in values]
            for b in range(acts[0].shape[0]):
                example_acts.append([a[b] for a in acts])
                # Only the engine runs single-threaded: the model's forward pass keeps the
                # user's setting (float32 kernels round differently with other counts).
                with _torch_threads(1 if threads > 1 else None):
                    bounds = bound_example(graph, example_acts[-1], alpha,
                                           certify_tol=certify_tol, stats=stats)
                for k, (lo, hi, dead) in enumerate(bounds):
                    search.add(k, num_examples, lo, hi)
                    live[k].scatter_reduce_(0, graph.layers[k].widx, ~dead, reduce="amax")
                num_examples += 1
                if bar is not None:
                    bar.update(1)
        # Only the edges that can still be a weight's minimum are solved exactly.
        with _torch_threads(1 if threads > 1 else None), _MinimaBar(progress) as minima:
            kappa = search.resolve(
                lambda k, x, edges: solve_layer_edges(graph, example_acts[x], k + 1, edges,
                                                      alpha, certify_tol=certify_tol,
                                                      stats=stats, threads=threads),
                on_progress=minima)
        stats.bounded += search.opened - search.solved
    return CurvatureResult(
        kappa={n: kappa[k].view(weight_shapes[k]).to(modules[k].weight.device)
               for k, n in enumerate(names)},
        live={n: live[k].view(weight_shapes[k]).to(modules[k].weight.device)
              for k, n in enumerate(names)},
        modules=dict(zip(names, modules)),
        alpha=alpha,
        granularity=granularity,
        num_examples=num_examples,
        edges_per_example={n: int(graph.layers[k].src.numel()) for k, n in enumerate(names)},
        seconds=time.perf_counter() - start,
        engine=stats.as_dict(),
        magnitude={n: modules[k].weight.detach().abs().to(torch.float64).clone()
                   for k, n in enumerate(names)},
        input_shape=input_shape,
    )


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


def _choose_granularity(model: nn.Module, calibration, model_device: torch.device,
                        memory_budget: int) -> str:
    """``"neuron"`` if the model is a chain whose hop tables fit the budget, else ``"channel"``."""
    try:
        trace_chain(model)
    except ValueError:
        return "channel"
    _, structures = chain_structure(model, _first_example(calibration, model_device, model,
                                                          half_dtype(model)))
    sizes = [structures[0].n_in] + [s.n_out for s in structures]
    return "neuron" if hop_table_bytes(sizes) <= memory_budget else "channel"


def _channel_curvature(model, calibration, *, alpha, model_device, engine_device, progress,
                       certify_tol, threads, memory_budget, start) -> CurvatureResult:
    """``neural_curvature`` at channel granularity (see :mod:`curvprune.channels`)."""
    from .channels import channel_distances, score_channel_edges, trace_channels

    stats = EngineStats()
    first = None
    distances = None
    edge_kappa = edge_live = None
    num_examples = 0
    with _progress_bar(progress, "curvature (channel)", calibration) as bar, \
            scoring_mode(model):
        for inputs in _float_batches(calibration, model_device, model, half_dtype(model)):
            graph = trace_channels(model, inputs, device=engine_device)
            if first is None:
                need = 8 * graph.num_nodes ** 2
                if need > memory_budget:
                    raise ValueError(
                        f"the channel graph has {graph.num_nodes} nodes; its distance table "
                        f"needs {need / 2**30:.1f} GiB, over memory_budget "
                        f"({memory_budget / 2**30:.1f} GiB). Raise memory_budget if the "
                        "machine has the memory."
                    )
                first = graph
                input_shape = tuple(inputs.shape[1:])
                distances = channel_distances(graph)
                _restart_clock(bar)  # the ETA is per example: the one-off build is not in it
                edge_kappa = torch.full_like(graph.length, math.inf)
                edge_live = torch.zeros_like(graph.src, dtype=torch.bool)
            elif not first.same_structure(graph):
                raise ValueError(
                    f"calibration examples of shape {tuple(inputs.shape[1:])} give another "
                    "channel graph than the first batch: every calibration example must "
                    "have the same shape."
                )
            with _torch_threads(1 if threads > 1 else None), _MinimaBar(progress) as minima:
                value, live = score_channel_edges(
                    graph, distances, alpha, certify_tol=certify_tol, stats=stats,
                    threads=threads, on_example=bar.update if bar is not None else None,
                    best=edge_kappa, on_progress=minima)
            edge_kappa = torch.minimum(edge_kappa, value)
            edge_live |= live
            num_examples += inputs.shape[0]
    kappa, live_w, modules, edges, magnitude = {}, {}, {}, {}, {}
    for k, (name, module) in enumerate(first.modules):
        weight = module.weight.detach()
        widx, eidx = first.weight_edges[k]
        flat = torch.full((weight.numel(),), math.inf, dtype=torch.float64, device=engine_device)
        flat.scatter_reduce_(0, widx, edge_kappa[eidx], reduce="amin")
        alive = torch.zeros(weight.numel(), dtype=torch.bool, device=engine_device)
        alive.scatter_reduce_(0, widx, edge_live[eidx], reduce="amax")
        zero = weight.flatten().to(engine_device) == 0
        flat[zero] = math.inf  # a zero weight is no edge
        alive &= ~zero
        kappa[name] = flat.view(weight.shape).to(weight.device)
        live_w[name] = alive.view(weight.shape).to(weight.device)
        modules[name] = module
        edges[name] = int((first.module == k).sum())
        magnitude[name] = weight.abs().to(torch.float64).clone()
    return CurvatureResult(
        kappa=kappa, live=live_w, modules=modules, alpha=alpha, granularity="channel",
        num_examples=num_examples, edges_per_example=edges,
        seconds=time.perf_counter() - start, engine=stats.as_dict(), magnitude=magnitude,
        channel_graph=first, edge_kappa=edge_kappa, input_shape=input_shape,
    )
