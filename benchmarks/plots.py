"""Plots and Markdown tables of ``benchmarks/unstructured.py`` results.

    python benchmarks/plots.py benchmarks/results/unstructured.json          # PNGs into docs/
    python benchmarks/plots.py benchmarks/results/unstructured.json --table  # Markdown tables

Accuracy against sparsity, the mean over seeds with a min-max band, one panel per model; PNGs
are written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

STYLE = {
    "curv_pos": ("curvature positive first (paper)", "tab:blue", "-"),
    "curv_neg": ("curvature negative first (control)", "tab:red", "-"),
    "curv_wanda": ("curvature x Wanda (curvature_wanda)", "tab:cyan", "-"),
    "magnitude": ("magnitude", "tab:green", "-"),
    "random": ("random", "tab:gray", "--"),
    "lamp": ("LAMP", "tab:brown", "-"),
    "wanda_row": ("Wanda per row", "tab:purple", "-"),
    "wanda_global": ("Wanda global", "tab:purple", ":"),
    "snip": ("SNIP", "tab:orange", "-"),
    "curv_pos_layer": ("curvature positive first, per layer", "tab:blue", "-"),
    "curv_neg_layer": ("curvature negative first, per layer", "tab:red", "-"),
    "magnitude_layer": ("magnitude, per layer", "tab:green", "-"),
    "curv_pos_wanda_alloc": ("curvature positive first, Wanda's layer amounts", "tab:blue", "--"),
    "magnitude_wanda_alloc": ("magnitude, Wanda's layer amounts", "tab:green", "--"),
}
GROUPS = {
    "global": ["curv_pos", "curv_neg", "curv_wanda", "magnitude", "random", "lamp", "wanda_row",
               "wanda_global", "snip"],
    "layer": ["curv_pos_layer", "curv_neg_layer", "magnitude_layer", "random"],
    "allocation": ["curv_pos", "magnitude", "lamp", "wanda_global", "curv_pos_wanda_alloc",
                   "magnitude_wanda_alloc"],
}
OPTIONAL = {"lamp", "curv_wanda"}  # drawn where the results have them (older runs do not)
MODEL_TITLES = {"lenet5": "LeNet-5", "mlp": "MLP", "vgg9": "VGG-9"}


def model_title(name: str, entry: dict) -> str:
    """The model's display name; VGG-9's says which curvature graph its seeds were scored on."""
    title = MODEL_TITLES.get(name, name)
    graphs = {s.get("granularity") for s in entry["seeds"].values()} - {None}
    if name == "vgg9" and len(graphs) == 1:
        title += f" ({graphs.pop()} curvature)"
    return title


def curves(model_entry: dict, criterion: str) -> tuple[list[float], list[float], list[float],
                                                        list[float]]:
    """``(amounts, mean, min, max)`` of the accuracy over the seeds that finished."""
    seeds = list(model_entry["seeds"].values())
    keys = sorted(seeds[0]["accuracy"][criterion], key=float)
    amounts, mean, low, high = [], [], [], []
    for key in keys:
        values = [s["accuracy"][criterion][key] for s in seeds]
        amounts.append(float(key))
        mean.append(sum(values) / len(values))
        low.append(min(values))
        high.append(max(values))
    return amounts, mean, low, high


def plot_results(data: dict, folder: Path, stem: str = "unstructured") -> list[Path]:
    """Write ``{stem}_{group}.png`` into ``folder`` for each group of :data:`GROUPS` whose
    criteria the results have (``allocation`` is missing from runs made before it existed;
    criteria of :data:`OPTIONAL`, and those a run did not choose, are left out of a plot when
    missing); return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = sorted((m for m in data["models"] if data["models"][m]["seeds"]),
                    key=lambda m: (m != "lenet5", m))  # LeNet-5 (the paper's figure) first
    settings = data["settings"]
    written = []
    for group, criteria in GROUPS.items():
        present = [c for c in criteria if all(c in run["accuracy"] for m in models
                                              for run in data["models"][m]["seeds"].values())]
        chosen = settings.get("criteria", criteria)  # a run of some criteria (--criteria)
        if any(c not in present and c not in OPTIONAL and c in chosen for c in criteria) \
                or len(present) < 2:
            continue
        criteria = present
        fig, axes = plt.subplots(1, max(len(models), 1), figsize=(6.2 * max(len(models), 1), 4.6),
                                 squeeze=False)
        for ax, name in zip(axes[0], models):
            entry = data["models"][name]
            nseeds = len(entry["seeds"])
            base = [s["test_accuracy"] for s in entry["seeds"].values()]
            for criterion in criteria:
                label, colour, line = STYLE[criterion]
                if group == "layer" and criterion == "random":
                    label = "random (global)"
                x, mean, low, high = curves(entry, criterion)
                x = [100 * v for v in x]
                ax.plot(x, mean, line, color=colour, label=label, marker="o", markersize=3)
                if nseeds > 1:
                    ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
            ax.axhline(0.1, color="black", linewidth=0.6, linestyle=":")
            ax.set_title(f"{model_title(name, entry)} (dense {100 * min(base):.1f}-"
                         f"{100 * max(base):.1f}%; {nseeds} seed{'s' if nseeds > 1 else ''})")
            ax.set_xlabel("weights removed (%)" + (" in every layer" if group == "layer" else ""))
            ax.set_xlim(50 if group == "allocation" else 0, 100)
            ax.set_ylabel("test accuracy, no fine-tuning")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0][0].legend(loc="lower left", fontsize=8)
        scope = {"global": "global ranking", "layer": "same fraction per layer",
                 "allocation": "within-layer order against layer allocation"}[group]
        fig.suptitle(f"Fashion-MNIST, unstructured pruning ({scope})\ncalibration "
                     f"{settings['per_class']}/class, alpha {settings['alpha']}; "
                     "mean and min-max over seeds", fontsize=10)
        fig.tight_layout()
        path = folder / f"{stem}_{group}.png"
        tmp = folder / f".{stem}_{group}.tmp.png"
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def markdown_tables(data: dict, amounts: list[str] | None = None) -> str:
    """One Markdown table per model: mean accuracy (and min-max) per criterion and amount."""
    lines = []
    for name, entry in data["models"].items():
        if not entry["seeds"]:
            continue
        seeds = entry["seeds"]
        base = [s["test_accuracy"] for s in seeds.values()]
        criteria = list(next(iter(seeds.values()))["accuracy"])
        keys = amounts or sorted(next(iter(seeds.values()))["accuracy"][criteria[0]], key=float)
        lines.append(f"**{model_title(name, entry)}**, {len(seeds)} seed(s); dense test "
                     f"accuracy {', '.join(f'{100 * b:.2f}%' for b in base)}; "
                     "mean accuracy % (min-max over seeds)\n")
        lines.append("| criterion | " + " | ".join(f"{100 * float(k):g}%" for k in keys) + " |")
        lines.append("|---|" + "---|" * len(keys))
        for c in criteria:
            cells = []
            for k in keys:
                values = [100 * s["accuracy"][c][k] for s in seeds.values()]
                mean = sum(values) / len(values)
                cells.append(f"{mean:.1f}" if len(values) == 1 else
                             f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--plots", type=Path, default=Path(__file__).resolve().parent.parent
                        / "docs")
    parser.add_argument("--table", action="store_true", help="print Markdown tables instead")
    parser.add_argument("--amounts", nargs="+", default=None,
                        help="amount keys of the table (e.g. 0 0.5 0.8 0.9)")
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    if args.table:
        print(markdown_tables(data, args.amounts))
    else:
        stem = args.json.stem
        for path in plot_results(data, args.plots, stem=stem):
            print(path)


if __name__ == "__main__":
    main()
