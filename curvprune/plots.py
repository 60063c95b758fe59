"""The figures of the command line and the demo (per-layer sparsity, kappa histograms, the
demo's accuracy curves), drawn with matplotlib's Agg backend and written atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .outputs import atomic_write

__all__ = ["plot_sparsity", "plot_kappa_histograms", "plot_demo_accuracy"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_sparsity(report: Any, path: Path) -> None:
    """A bar per pruned weight of a :class:`~curvprune.pruning.reports.PruningReport` (or a
    channel report with ``layers`` and ``overall_sparsity``): the fraction of it pruned."""
    plt = _pyplot()
    names = list(report.layers)
    values = [row.sparsity for row in report.layers.values()]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), values, color="#4a7ab5")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction pruned")
    ax.set_title(f"per-layer sparsity (overall {report.overall_sparsity:.1%})")
    _save(fig, path)


def plot_kappa_histograms(result: Any, path: Path, bins: int = 40) -> None:
    """One panel per scored layer of a :class:`~curvprune.result.CurvatureResult`: the
    histogram of its live weights' kappa (:func:`curvprune.analysis.histogram`), with 0 marked."""
    from .analysis import histogram

    plt = _pyplot()
    hists = histogram(result, bins=bins)
    fig, axes = plt.subplots(len(hists), 1, figsize=(6, 1.6 * len(hists) + 0.6), squeeze=False)
    for ax, (name, h) in zip(axes[:, 0], hists.items()):
        ax.stairs(h.counts, h.edges, fill=True, color="#b5644a")
        ax.axvline(0.0, color="k", lw=0.6)
        ax.set_ylabel(name, fontsize=8)
    axes[-1, 0].set_xlabel("kappa (live weights)")
    fig.suptitle(f"neural curvature per layer (alpha={result.alpha}, "
                 f"{result.num_examples} examples)", fontsize=10)
    _save(fig, path)


def plot_demo_accuracy(report: dict, path: Path) -> None:
    """The demo's test accuracy against the fraction of weights removed, one curve per
    criterion (``report`` as :func:`curvprune.demo.run_demo` returns it)."""
    plt = _pyplot()
    amounts = list(report["accuracy"])
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, style in (("curvature", "o-"), ("control", "s--"), ("magnitude", "^:")):
        ax.plot([0.0] + amounts,
                [report["dense_accuracy"]] + [report["accuracy"][a][label] for a in amounts],
                style, label=label)
    ax.set_xlabel("fraction of weights removed (no fine-tuning)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"demo: MLP on {report['data']}")
    ax.legend()
    _save(fig, path)
