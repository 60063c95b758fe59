"""What a pruning call did: :class:`PruningReport` and its rows, :class:`LayerSparsity`."""

from __future__ import annotations

from dataclasses import dataclass

from ..result import CurvatureResult, ImportanceScores

__all__ = ["PruningReport", "LayerSparsity"]


@dataclass(frozen=True)
class LayerSparsity:
    """How much of one weight is pruned (masked to zero).

    Attributes:
        name: the qualified weight name (``"3.weight"``).
        pruned: entries whose mask is zero (from this call and earlier ones).
        total: entries of the weight.
        excluded: whether ``prune_model`` was told to leave it alone.
    """

    name: str
    pruned: int
    total: int
    excluded: bool = False

    @property
    def sparsity(self) -> float:
        """``pruned / total``."""
        return self.pruned / self.total if self.total else 0.0


@dataclass
class PruningReport:
    """What :func:`prune_model` did.

    Attributes:
        layers: ``{weight name: LayerSparsity}`` for every scored weight, excluded ones too.
        newly_pruned: entries masked by this call.
        amount: the ``amount`` asked for.
        scope: ``"global"`` or ``"layer"``.
        order: ``"positive_first"`` or ``"negative_first"``.
        result: the :class:`~curvprune.result.CurvatureResult` the ranking came from (``None``
            after a fallback).
        fallback: ``None``, or why the weights were ranked by magnitude instead (a model the
            channel tracer cannot follow; a warning was issued too).
        scores: the :class:`~curvprune.result.ImportanceScores` the masks were computed from
            (higher = keep): the curvature ranks of ``result``, or with ``allocation="wanda"``
            / ``"magnitude"`` the re-allocated scores (:func:`~curvprune.allocate_like`), or
            the magnitude ranking of a fallback. ``scores.bind(other_model)`` carries them to
            a copy of the model (see ``docs/pruning.md``).
        tolerance: the curvature tolerance the scores were computed with.
        refined: weights solved exactly so that the pruned set is the one exact curvature
            gives (those whose interval straddled the pruning boundary; see
            :mod:`curvprune.decision`).
        refine_rounds: rounds of that refinement (0 when no interval straddled).
    """

    layers: dict[str, LayerSparsity]
    newly_pruned: int
    amount: int | float
    scope: str
    order: str
    result: CurvatureResult | None
    fallback: str | None = None
    scores: ImportanceScores | None = None
    tolerance: float | None = None
    refined: int = 0
    refine_rounds: int = 0

    @property
    def sparsity(self) -> dict[str, float]:
        """``{weight name: pruned / total}``."""
        return {name: layer.sparsity for name, layer in self.layers.items()}

    @property
    def pruned(self) -> int:
        """Masked entries over all scored weights."""
        return sum(layer.pruned for layer in self.layers.values())

    @property
    def total(self) -> int:
        """Entries of all scored weights."""
        return sum(layer.total for layer in self.layers.values())

    @property
    def overall_sparsity(self) -> float:
        r"""Sparsity over all scored weights: :math:`\sum \text{pruned} / \sum \text{total}`."""
        return self.pruned / self.total if self.total else 0.0

    @property
    def excluded(self) -> list[str]:
        """Names of the scored weights that were left unpruned on request."""
        return [name for name, layer in self.layers.items() if layer.excluded]

    def summary(self) -> str:
        """A plain-text table of the per-weight sparsity."""
        lines = [
            f"curvature pruning ({self.scope}, order={self.order!r}, amount={self.amount}): "
            f"{self.newly_pruned} entries pruned now, overall sparsity "
            f"{100 * self.overall_sparsity:.2f}% ({self.pruned}/{self.total})",
            f"{'weight':<28}{'pruned':>9}{'total':>9}{'sparsity':>10}",
        ]
        if self.refined:
            lines.insert(1, f"decision-exact: {self.refined} weights solved exactly in "
                            f"{self.refine_rounds} round(s) (tolerance {self.tolerance:g})")
        for layer in self.layers.values():
            note = "  (excluded)" if layer.excluded else ""
            lines.append(f"{layer.name:<28}{layer.pruned:>9}{layer.total:>9}"
                         f"{100 * layer.sparsity:>9.2f}%{note}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PruningReport(scope={self.scope!r}, order={self.order!r}, "
                f"amount={self.amount}, newly_pruned={self.newly_pruned}, "
                f"overall_sparsity={self.overall_sparsity:.4f})")
