r"""The result of a curvature scoring call and the ranking it induces.

Ranking (the paper's, made deterministic). Give each weight a value

* :math:`+\infty` if it has no edge (the weight is exactly zero, or it touches no position),
* :math:`2` if every one of its edges is dead on every calibration example,
* :math:`\kappa` otherwise (the minimum over its positions and examples, dead edges counting 1).

Live curvature is always below 2 (:math:`\kappa \le 1/(1-\alpha) < 2` for :math:`\alpha < 1/2`,
and :math:`\kappa = 1 - X/d` with :math:`X > -d` for :math:`\alpha \ge 1/2`), so dead weights sit
between the zero weights and every live weight. Order ``"positive_first"`` prunes the highest
value first (zero weights, then dead weights, then live weights from the most positive curvature
down); order ``"negative_first"`` prunes zero weights first and then the lowest value first (the
paper's control).
Ties are broken by smaller ``|w|`` first, then by position (layer order, then the weight's
flattened index), so the ranking is a total order that does not depend on the device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ._checks import (
    REDUCTIONS,
    check_choice,
    check_module,
    check_order,
    check_score,
    describe_module,
    missing_score_message,
)

__all__ = ["CurvatureResult", "ImportanceScores", "LayerSummary"]



@dataclass(frozen=True)
class LayerSummary:
    """Statistics of one scored weight."""

    name: str
    weights: int
    zero: int
    dead: int
    live: int
    edges_per_example: int
    kappa_min: float
    kappa_median: float
    kappa_max: float
    negative_share: float


@dataclass
class CurvatureResult:
    """Neural curvature of a model's weights.

    Attributes:
        kappa: ``{parameter name: tensor of the weight's shape}`` (float64, on the weight's
            device): the minimum curvature over the weight's positions and the calibration
            examples; an edge with a dead end counts as exactly 1.0; a weight with no edge
            (exactly zero) is ``+inf``. It is the midpoint of the certified interval
            ``kappa_lo``/``kappa_hi`` (exact in practice at the default tolerance).
        live: ``{parameter name: bool tensor}``: whether the weight has at least one live edge.
        modules: ``{parameter name: module}`` owning each weight (its attribute is ``"weight"``).
        alpha: the idleness used.
        granularity: ``"neuron"`` (the paper's graph: one node per neuron) or ``"channel"``
            (one node per channel, :mod:`curvprune.graphs.channel`).
        num_examples: calibration examples scored.
        edges_per_example: ``{parameter name: edges}`` (nonzero weights times positions).
        seconds: wall time of the scoring call.
        engine: how the engine resolved the live edges (see
            :class:`~curvprune.transport.EngineStats`).
        magnitude: ``{parameter name: |w|}`` (float64) at scoring time: the ranking's tie-break,
            kept so that a later change of the model does not change the order.
        channel_graph: at channel granularity, the traced
            :class:`~curvprune.graphs.channel.ChannelGraph` (``None`` at neuron granularity).
        edge_kappa: at channel granularity, the curvature of every edge of ``channel_graph``
            (minimum over examples; merge edges, which are no weight, ``+inf``).
        input_shape: the shape of one calibration example (``(C, H, W)``, ``(features,)``...),
            or ``None`` when unknown; :func:`~curvprune.prune_channels` traces the model with
            a zero example of this shape when it is given a result and no calibration.
        kappa_lo, kappa_hi: ``{parameter name: tensor}`` shaped like ``kappa``: certified
            bounds ``kappa_lo <= exact kappa <= kappa_hi`` at most ``tolerance`` apart
            (``docs/method.md``, "Curvature intervals"); ``kappa`` is their midpoint
            :math:`(lo + hi) / 2`, hence within ``tolerance / 2`` of the exact value. Both are
            ``+inf`` on zero weights, and equal to ``kappa`` where it is exact.
        tolerance: the ``tolerance`` the scores were computed with.
        edge_kappa_lo, edge_kappa_hi: at channel granularity, the same bounds per channel edge
            (``edge_kappa`` is their midpoint).
        node_reduction: ``"mean"`` or ``"weighted"`` when the tolerance was spent on each
            channel's :meth:`node_kappa` with that reduction instead of on each weight
            (``neural_curvature(node_reduction=...)``): then the channels' intervals
            (:meth:`node_kappa_bounds`) are at most ``tolerance`` wide, and single weights may
            be wider; ``None`` otherwise.
        refined: weights solved exactly by :meth:`refine` since scoring.
        refiner: the engine's hook behind :meth:`refine` (``None``: cannot refine).

    Every per-weight mapping is keyed by the qualified parameter name (``"features.0.weight"``),
    so a result can be moved to another instance of the same architecture with :meth:`bind`.
    """

    kappa: dict[str, torch.Tensor]
    live: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    alpha: float
    granularity: str
    num_examples: int
    edges_per_example: dict[str, int]
    seconds: float
    engine: dict[str, int] = field(default_factory=dict)
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    channel_graph: Any = None
    edge_kappa: torch.Tensor | None = None
    input_shape: tuple[int, ...] | None = None
    kappa_lo: dict[str, torch.Tensor] = field(default_factory=dict)
    kappa_hi: dict[str, torch.Tensor] = field(default_factory=dict)
    tolerance: float = 0.0
    edge_kappa_lo: torch.Tensor | None = None
    edge_kappa_hi: torch.Tensor | None = None
    node_reduction: str | None = None
    refined: int = 0
    refiner: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # The engine's hook holds the graph and activities of the call: not pickled (a loaded
        # result keeps its values and bounds but cannot refine).
        state = self.__dict__.copy()
        state["refiner"] = None
        return state

    def __post_init__(self) -> None:
        # A result built without bounds is exact: its bounds are its values.
        for name, k in self.kappa.items():
            self.kappa_lo.setdefault(name, k.clone())
            self.kappa_hi.setdefault(name, k.clone())

    @property
    def max_width(self) -> float:
        """The largest interval width ``kappa_hi - kappa_lo`` over the weights (0 if exact)."""
        width = 0.0
        for name, lo in self.kappa_lo.items():
            hi = self.kappa_hi[name]
            finite = torch.isfinite(lo) & torch.isfinite(hi)
            if finite.any():
                width = max(width, float((hi - lo)[finite].max()))
        return width

    def exact(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool tensor}``: where the interval has width 0 (the value is the
        exact curvature, up to the solver's rounding)."""
        return {name: self.kappa_lo[name] == self.kappa_hi[name] for name in self.kappa}

    def refine(self, weights: Mapping[str, torch.Tensor], *, force: bool = False) -> int:
        """Solve the chosen weights exactly, in place: their ``kappa``, ``kappa_lo`` and
        ``kappa_hi`` become the exact curvature (as with ``tolerance=0``).

        The engine reruns its minimum search with tolerance 0 and uncut measures, restricted
        to every edge (position, example) of those weights; the rest of the result is left as
        it is (at channel granularity every element of a refined channel edge changes).

        Args:
            weights: ``{parameter name: bool tensor of the weight's shape}``; weights already
                exact (``kappa_lo == kappa_hi``) are skipped unless ``force``, zero weights
                always.
            force: solve the chosen weights again even where the scoring found them exactly
                (so that their values are those of a ``tolerance=0`` run to the last bit).

        Returns:
            The number of weights solved.

        Raises:
            ValueError: an unknown name, a mask of another shape, or a result that cannot be
                refined (built by hand, or from a pickle).
            TypeError: a mask that is not a bool tensor.
        """
        masks = {}
        for name, mask in weights.items():
            if name not in self.kappa:
                raise ValueError(f"refine: {name!r} is not a scored weight; the scored weights "
                                 f"are {list(self.kappa)}.")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"refine: the mask of {name!r} must be a bool tensor.")
            if mask.shape != self.kappa[name].shape:
                raise ValueError(f"refine: the mask of {name!r} has shape {tuple(mask.shape)}, "
                                 f"the weight {tuple(self.kappa[name].shape)}.")
            lo, hi = self.kappa_lo[name], self.kappa_hi[name]
            mask = mask.to(lo.device) & torch.isfinite(hi) & ((lo < hi) | force)
            if mask.any():
                masks[name] = mask
        if not masks:
            return 0
        if self.refiner is None:
            raise ValueError("refine: this result holds no engine to refine with; rescore the "
                             "model with neural_curvature(..., tolerance=0) instead.")
        exact, _ = self.refiner(self, masks)
        count = 0
        for name, mask in masks.items():
            value = exact[name].view(mask.shape).to(mask.device)
            for target in (self.kappa, self.kappa_lo, self.kappa_hi):
                target[name][mask] = value[mask].to(target[name].dtype)
            count += int(mask.sum())
        self.refined += count
        return count

    def node_kappa(self, reduction: str = "mean") -> torch.Tensor:
        r"""Curvature of each channel node: its incident layer edges' kappa combined.

        Over the Conv2d/Linear edges :math:`E(v)` into and out of ``v`` (merge edges excluded):

        * ``"mean"``: :math:`\kappa(v) = \frac{1}{|E(v)|} \sum_{e \in E(v)} \kappa(e)`;
        * ``"min"``: :math:`\kappa(v) = \min_{e \in E(v)} \kappa(e)`;
        * ``"weighted"``: the mean weighted by each edge's weight norm
          :math:`\lVert W_e \rVert_2 = 1 / d(e)` (the inverse of its length),
          :math:`\kappa(v) = \sum_{e} \lVert W_e \rVert \kappa(e) / \sum_{e} \lVert W_e \rVert`,
          so strong connections count more than weak ones (every edge has a positive norm:
          an all-zero block is no edge).

        ``nan`` for a node with no such edge. Channel granularity only.
        """
        if self.channel_graph is None or self.edge_kappa is None:
            raise ValueError("node_kappa needs a result of granularity='channel'.")
        return self._reduce_to_nodes(self.edge_kappa, reduction)

    def node_kappa_bounds(self, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Certified bounds ``(lo, hi)`` on :meth:`node_kappa` (the same reduction of the
        edges' lower and upper bounds: each reduction is nondecreasing in every edge's value).
        Channel granularity only."""
        if (self.channel_graph is None or self.edge_kappa_lo is None
                or self.edge_kappa_hi is None):
            raise ValueError("node_kappa_bounds needs a result of granularity='channel'.")
        return (self._reduce_to_nodes(self.edge_kappa_lo, reduction),
                self._reduce_to_nodes(self.edge_kappa_hi, reduction))

    def max_node_width(self, reduction: str = "mean") -> float:
        """The largest width ``hi - lo`` of :meth:`node_kappa_bounds` over the nodes whose
        bounds are finite (0 if every node is exact): what a tolerance on node means bounds
        (``neural_curvature(..., node_reduction=reduction)``), while single edges may be
        wider (:attr:`max_width`). Channel granularity only."""
        lo, hi = self.node_kappa_bounds(reduction)
        width = (hi - lo)[torch.isfinite(lo) & torch.isfinite(hi)]
        return float(width.max()) if width.numel() else 0.0

    def _reduce_to_nodes(self, edge_values: torch.Tensor, reduction: str, *,
                         block: int = 1 << 22) -> torch.Tensor:
        """``edge_values`` (one per channel edge) combined per node as :meth:`node_kappa`.

        The edges are read ``block`` at a time, every block's sources first, then every
        block's targets: each node sums its edges in the order of one pass over the sources
        then one over the targets whatever ``block`` (a full-width ``convnext_tiny``, 27M
        edges, needed 1.4 GiB of temporaries at once, its scoring's peak)."""
        check_choice(reduction, "reduction", REDUCTIONS)
        graph = self.channel_graph
        n, count_edges = graph.num_nodes, graph.src.numel()
        parts = [slice(a, a + block) for a in range(0, count_edges, block)]
        if reduction == "min":
            out = torch.full((n,), math.inf, dtype=torch.float64, device=edge_values.device)
            for ends in (graph.src, graph.dst):
                for part in parts:
                    layer = graph.module[part] >= 0
                    out.scatter_reduce_(0, ends[part][layer], edge_values[part][layer],
                                        reduce="amin")
            return torch.where(torch.isinf(out), math.nan, out)
        weighted = reduction == "weighted"
        total = torch.zeros(n, dtype=torch.float64, device=edge_values.device)
        count = torch.zeros(n, dtype=torch.float64, device=edge_values.device)
        for ends in (graph.src, graph.dst):
            for part in parts:
                layer = graph.module[part] >= 0
                weight = graph.mean_weights(weighted, part)[layer]
                values = edge_values[part][layer]
                at = ends[part][layer]
                total.index_add_(0, at, values * weight if weighted else values)
                count.index_add_(0, at, weight)
        return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), math.nan)

    def rank_values(self) -> dict[str, torch.Tensor]:
        """The ranking value of each weight: ``+inf`` (no edge), ``2`` (dead) or kappa."""
        return {
            name: torch.where(torch.isinf(k), k, torch.where(self.live[name], k,
                                                             torch.full_like(k, 2.0)))
            for name, k in self.kappa.items()
        }

    def pruning_order(self, order: str = "positive_first") -> dict[str, torch.Tensor]:
        """Global pruning rank of every weight (0 = pruned first), as int64 tensors.

        Args:
            order: ``"positive_first"`` (highest curvature first, the paper's method) or
                ``"negative_first"`` (lowest first, the control). The old ``"pos"``/``"neg"``
                still work, with a ``DeprecationWarning``.
        """
        order = check_order(order)
        keys = {}
        for n, v in self.rank_values().items():
            key = v if order == "negative_first" else -v
            keys[n] = torch.where(torch.isinf(v), torch.full_like(key, -math.inf), key)
        return self.rank_by(keys)

    def rank_by(self, keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Global rank of every entry of ``keys`` (0 = smallest key, pruned first), as int64
        tensors shaped like the keys: ties go to the smaller ``|w|`` (the result's tie-break
        magnitudes), then to position (the order of ``keys``, then the flattened index).
        :meth:`pruning_order` is this with key :math:`\\mp\\kappa`; other criteria built on
        the curvature (:mod:`curvprune.pruning.criteria`) pass their own keys.

        Raises:
            ValueError: a name of ``keys`` that the result does not score.
        """
        unknown = [n for n in keys if n not in self.kappa]
        if unknown:
            raise ValueError(f"rank_by: {unknown[0]!r} is not a weight this result scores "
                             f"(it scores {list(self.kappa)}).")
        names = list(keys)
        if not names:
            return {}
        device = keys[names[0]].device
        flat_v = torch.cat([keys[n].reshape(-1).to(device) for n in names])
        flat_w = torch.cat([self._magnitude(n).reshape(-1).to(device) for n in names])
        perm = torch.argsort(flat_w, stable=True)
        perm = perm[torch.argsort(flat_v[perm], stable=True)]
        ranks = torch.empty_like(perm)
        ranks[perm] = torch.arange(perm.numel(), device=device)
        out, start = {}, 0
        for n in names:
            size = keys[n].numel()
            out[n] = ranks[start:start + size].view(keys[n].shape).to(keys[n].device)
            start += size
        return out

    def _magnitude(self, name: str) -> torch.Tensor:
        if name in self.magnitude:
            return self.magnitude[name]
        return self.modules[name].weight.detach().abs().to(torch.float64)

    def importance_scores(self, order: str = "positive_first") -> ImportanceScores:
        """Scores for :func:`torch.nn.utils.prune.global_unstructured`: higher means keep.

        Each score is the weight's global rank in :meth:`pruning_order` as float64 (exact up to
        2**53 weights), on the weight's device, keyed by ``(module, "weight")``. The scores are
        distinct, so "prune the ``n`` lowest scores" selects exactly the first ``n`` weights of
        :meth:`pruning_order`. The mapping is an :class:`ImportanceScores`: asking it for a
        parameter it does not score raises instead of letting PyTorch fall back to the raw
        weight values. ``order`` is :meth:`pruning_order`'s.
        """
        ranks = self.pruning_order(check_order(order))
        return ImportanceScores(
            {(self.modules[n], "weight"): r.to(torch.float64) for n, r in ranks.items()},
            names={(self.modules[n], "weight"): n for n in ranks},
        )

    def bind(self, model: nn.Module) -> CurvatureResult:
        """This result's scores for ``model``, another instance of the architecture scored.

        ``model`` can be a clone (:func:`~curvprune.clone_pruned`, ``copy.deepcopy``), a model
        rebuilt and loaded from a checkpoint (``load_state_dict``, :func:`~curvprune.load_pruned`)
        or the scored model itself. Every scored parameter is looked up by its name
        (``"features.0.weight"``) and must exist in ``model`` with the scored shape, on a
        module of the same type; a model under pruning hooks binds too (its ``weight`` is the
        masked ``weight_orig``). Nothing is recomputed and nothing of ``model`` is changed: the
        returned result holds the same curvature and tie-break magnitudes, moved to each
        weight's device, and ``modules`` (and the channel graph's modules) point into
        ``model``. So ``prune_model(clone, None, amount, result=result.bind(clone))`` prunes
        exactly the entries that scoring and pruning the clone would (the scoring is
        deterministic).

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: the first scored parameter that ``model`` lacks, that has another
                shape, or that sits on a module of another type (the architectures differ).
        """
        modules = bind_modules(model, {n: tuple(k.shape) for n, k in self.kappa.items()},
                               self.modules)

        def moved(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: v.to(_weight_of(modules[n]).device) if n in modules else v
                    for n, v in values.items()}

        graph = self.channel_graph
        if graph is not None:
            graph = dataclasses.replace(
                graph, modules=[(n, modules.get(n, m)) for n, m in graph.modules])
        return dataclasses.replace(
            self, kappa=moved(self.kappa), live=moved(self.live), modules=modules,
            kappa_lo=moved(self.kappa_lo), kappa_hi=moved(self.kappa_hi),
            magnitude=moved(self.magnitude), channel_graph=graph,
            edges_per_example=dict(self.edges_per_example), engine=dict(self.engine))

    def layer_summaries(self) -> list[LayerSummary]:
        """Per-weight statistics: counts of zero, dead and live weights and kappa quantiles."""
        rows = []
        for name, k in self.kappa.items():
            live = self.live[name]
            scored = k[live]
            zero = int(torch.isinf(k).sum())
            rows.append(LayerSummary(
                name=name,
                weights=k.numel(),
                zero=zero,
                dead=k.numel() - zero - int(live.sum()),
                live=int(live.sum()),
                edges_per_example=self.edges_per_example[name],
                kappa_min=float(scored.min()) if scored.numel() else math.nan,
                kappa_median=float(scored.median()) if scored.numel() else math.nan,
                kappa_max=float(scored.max()) if scored.numel() else math.nan,
                negative_share=float((scored < 0).double().mean()) if scored.numel() else math.nan,
            ))
        return rows

    def _tolerance_scope(self) -> str:
        if self.node_reduction in ("mean", "weighted") and self.tolerance > 0:
            width = self.max_node_width(self.node_reduction)
            return (f" on each channel's {self.node_reduction} curvature: largest channel "
                    f"width {width:.2g}")
        return ""

    def summary(self) -> str:
        """A plain-text table of :meth:`layer_summaries` with the totals."""
        lines = [
            f"neural curvature ({self.granularity}, alpha={self.alpha}) on {self.num_examples} "
            f"examples, {sum(self.edges_per_example.values())} edges per example, "
            f"{self.seconds:.2f} s, largest interval width {self.max_width:.2g} "
            f"(tolerance {self.tolerance:g}{self._tolerance_scope()})",
            f"{'weight':<28}{'weights':>9}{'zero':>8}{'dead':>8}{'live':>8}"
            f"{'k min':>9}{'k med':>9}{'k max':>9}{'neg %':>7}",
        ]
        for r in self.layer_summaries():
            lines.append(
                f"{r.name:<28}{r.weights:>9}{r.zero:>8}{r.dead:>8}{r.live:>8}"
                f"{r.kappa_min:>9.3f}{r.kappa_median:>9.3f}{r.kappa_max:>9.3f}"
                f"{100 * r.negative_share:>7.1f}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"CurvatureResult(granularity={self.granularity!r}, alpha={self.alpha}, "
                f"weights={list(self.kappa)}, num_examples={self.num_examples}, "
                f"seconds={self.seconds:.3f})")


def _weight_of(module: nn.Module, attr: str = "weight") -> torch.Tensor | None:
    """``module.<attr>``, or ``<attr>_orig`` on a module under pruning hooks whose computed
    attribute is absent; ``None`` if neither is a tensor."""
    weight = getattr(module, attr, None)
    if not isinstance(weight, torch.Tensor):
        weight = getattr(module, attr + "_orig", None)
    return weight if isinstance(weight, torch.Tensor) else None


def bind_modules(model: nn.Module, shapes: Mapping[str, tuple[int, ...]],
                 scored: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """``{parameter name: module of model}`` for qualified names (``"<module>.weight"``).

    Checks, in the order of ``shapes``, that ``model`` has each parameter with that shape and,
    when ``scored`` gives the module the name was scored on, a module of the same type.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: naming the first parameter that is missing, has another shape, or sits on
            a module of another type.
    """
    check_module(model)
    named = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        module = named.get(owner)
        weight = _weight_of(module, attr) if module is not None and attr else None
        if weight is None:
            raise ValueError(
                f"cannot bind the scores to {type(model).__name__}: it has no parameter "
                f"{name!r}; bind them to an instance of the architecture that was scored."
            )
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(
                f"cannot bind the scores to {type(model).__name__}: parameter {name!r} has "
                f"shape {tuple(weight.shape)} but was scored with shape {tuple(shape)}; the "
                "architectures differ (rescore this model)."
            )
        old = (scored or {}).get(name)
        if old is not None and type(old) is not type(module):
            raise ValueError(
                f"cannot bind the scores to {type(model).__name__}: parameter {name!r} belongs "
                f"to a {type(module).__name__} but was scored on a {type(old).__name__}."
            )
        out[name] = module
    return out


class ImportanceScores(dict):
    """``{(module, name): score tensor}`` that refuses to make up a missing score.

    A plain ``dict`` for :func:`torch.nn.utils.prune.global_unstructured` (higher score = keep),
    with one difference: PyTorch looks each parameter up with
    ``importance_scores.get((module, name), getattr(module, name))``, which silently ranks a
    parameter missing from the mapping by its raw weight values. Here :meth:`get` raises a
    :class:`ValueError` naming the missing parameter instead, and checks that the score has the
    parameter's shape and device. ``scores[key]`` raises :class:`KeyError` as usual.

    A dict comprehension over an ``ImportanceScores`` builds a plain ``dict`` again (Python's
    rule for subclasses); wrap the result, ``ImportanceScores({...})``, to keep the check.
    :meth:`copy` and ``|`` keep the type.

    Args:
        scores: the ``{(module, name): tensor}`` items.
        names: optional ``{(module, name): qualified parameter name}`` used in messages.
    """

    def __init__(self, scores: Mapping[tuple[nn.Module, str], torch.Tensor] | None = None, *,
                 names: Mapping[tuple[nn.Module, str], str] | None = None) -> None:
        super().__init__(scores or {})
        self.names: dict[tuple[nn.Module, str], str] = dict(names or {})
        if isinstance(scores, ImportanceScores):
            self.names = {**scores.names, **self.names}

    def _label(self, key: Any) -> str:
        if key in self.names:
            return repr(self.names[key])
        if isinstance(key, tuple) and len(key) == 2:
            return f"{key[1]!r} of {describe_module(key[0])}"
        return repr(key)

    def _missing_message(self, key: Any) -> str:
        return missing_score_message(self._label(key),
                                     [self.names.get(k, self._label(k)) for k in self])

    def get(self, key: Any, default: Any = None) -> torch.Tensor:
        """The score of ``key``; raises :class:`ValueError` if it is missing (never ``default``).

        When ``key`` is ``(module, name)`` and the module has that tensor, the score must have
        the tensor's shape and device (else :class:`ValueError`).
        """
        if key not in self:
            raise ValueError(self._missing_message(key))
        score = dict.__getitem__(self, key)
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], nn.Module):
            target = getattr(key[0], key[1], None)
            if isinstance(target, torch.Tensor):
                check_score(score, target, self._label(key))
        return score

    def __missing__(self, key: Any) -> torch.Tensor:
        raise KeyError(self._missing_message(key))

    def by_name(self) -> dict[str, torch.Tensor]:
        """The scores keyed by qualified parameter name (``{"features.0.weight": tensor}``).

        Every key needs a recorded name (:attr:`names`; :meth:`CurvatureResult.importance_scores`
        and the scores of :mod:`curvprune.baselines` have them), else :class:`ValueError`.
        """
        out = {}
        for key, score in self.items():
            if key not in self.names:
                raise ValueError(
                    f"the score of {self._label(key)} has no parameter name; build the "
                    "ImportanceScores with names={(module, 'weight'): 'layer.weight', ...}."
                )
            out[self.names[key]] = score
        return out

    def bind(self, model: nn.Module) -> ImportanceScores:
        """The same scores keyed by ``model``'s modules, found by parameter name.

        For another instance of the scored architecture (a clone, a reloaded checkpoint): each
        named parameter must exist in ``model`` with the score's shape (see
        :meth:`CurvatureResult.bind`); scores are moved to each parameter's device, not
        recomputed. Use it to prune a copy with the scores a :class:`~curvprune.PruningReport`
        returns (``report.scores``), e.g. the re-allocated ones of ``allocation="wanda"``.

        Raises:
            ValueError: a score without a parameter name, or the first parameter ``model``
                lacks or holds with another shape or module type.
        """
        by_name = self.by_name()
        scored = {self.names[k]: k[0] for k in self
                  if isinstance(k, tuple) and k and isinstance(k[0], nn.Module)}
        modules = bind_modules(model, {n: tuple(s.shape) for n, s in by_name.items()}, scored)
        keys = {n: (modules[n], n.rpartition(".")[2]) for n in by_name}
        return ImportanceScores(
            {keys[n]: s.to(_weight_of(*keys[n]).device) for n, s in by_name.items()},
            names={keys[n]: n for n in by_name},
        )

    def copy(self) -> ImportanceScores:
        """A shallow copy that keeps the type and the names."""
        return ImportanceScores(self)

    def __or__(self, other: Any) -> ImportanceScores:
        if not isinstance(other, Mapping):
            return NotImplemented
        merged = ImportanceScores(self)
        merged.update(other)
        if isinstance(other, ImportanceScores):
            merged.names.update(other.names)
        return merged

    def __repr__(self) -> str:
        return f"ImportanceScores({[self.names.get(k, self._label(k)) for k in self]})"
