"""The demo, ``python -m curvprune.demo``: the main job (train, score, prune, compare) on an
embedded default.

Trains a small MLP (784-64-32-10) for one epoch (seconds), scores it by neural curvature on one
correctly classified example per class, and reports test accuracy after pruning 50/80/90% of the
weights by curvature (``"positive_first"``), the paper's control (``"negative_first"``) and global
magnitude, with no fine-tuning.

Writes to ``--out`` (default: the current folder) ``model.pt``, the trained dense model saved
whole (``torch.save(model)``), so that ``curvprune prune --model model.pt ...`` and
``curvprune analyze --model model.pt ...`` run on it next; ``demo_accuracy.png`` (accuracy
against the fraction removed, per criterion) and ``kappa_histograms.png`` (curvature per layer).

Data: Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed, else a synthetic
10-class image set generated from a fixed seed (no download either way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from .curvature import neural_curvature
from .data import class_balanced_calibration, fashion_mnist
from .errors import UsageError
from .evaluation import accuracy
from .models import create_model
from .outputs import atomic_write, output_dir
from .plots import plot_demo_accuracy, plot_kappa_histograms
from .pruning import CurvaturePruning, clone_pruned, make_permanent
from .training import train_classifier

__all__ = ["synthetic_images", "run_demo"]


def synthetic_images(n: int, *, seed: int = 0, size: int = 28,
                     classes: int = 10) -> torch.utils.data.TensorDataset:
    """A deterministic synthetic image set: each class is a smooth random template plus noise."""
    generator = torch.Generator().manual_seed(1234)
    coarse = torch.rand(classes, 1, 7, 7, generator=generator)
    templates = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                          align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    noise = 0.35 * torch.randn(n, 1, size, size, generator=generator)
    images = (templates[labels] + noise).clamp(0.0, 1.0)
    return torch.utils.data.TensorDataset(images, labels)


def _datasets() -> tuple[str, torch.utils.data.Dataset, torch.utils.data.Dataset]:
    try:
        return "Fashion-MNIST", fashion_mnist(train=True), fashion_mnist(train=False)
    except FileNotFoundError:
        return "synthetic", synthetic_images(12000, seed=0), synthetic_images(2000, seed=1)


def run_demo(*, amounts: tuple[float, ...] = (0.5, 0.8, 0.9), seed: int = 0,
             quiet: bool = False, out: str | Path | None = None) -> dict:
    """Run the demo and return its numbers (accuracy per criterion and amount).

    With ``out`` (a folder, created if missing; an unwritable one raises
    ``curvprune.errors.UsageError`` before training), also write ``model.pt`` (the trained dense
    model, saved whole), ``demo_accuracy.png`` and ``kappa_histograms.png`` there; the report's
    ``"files"`` lists them."""
    say = (lambda *a: None) if quiet else print
    if out is not None:  # checked before training: an unwritable folder fails at once
        out = output_dir(out)
    torch.manual_seed(seed)
    name, train, test = _datasets()
    model = create_model("mlp", hidden=(64, 32))
    start = time.perf_counter()
    train_classifier(model, train, epochs=1, batch_size=128, lr=1e-3, seed=seed)
    dense = accuracy(model, test)
    say(f"data: {name}; MLP 784-64-32-10 trained 1 epoch in {time.perf_counter() - start:.1f} s,"
        f" test accuracy {dense:.3f}")
    calibration, _ = class_balanced_calibration(model, test, 1, num_classes=10, seed=seed)
    scores = neural_curvature(model, calibration, progress=not quiet)
    say(scores.summary())
    report: dict = {"data": name, "dense_accuracy": dense, "seconds": scores.seconds,
                    "accuracy": {}}
    say(f"\n{'removed':>8} {'curvature':>10} {'control':>8} {'magnitude':>10}")
    for amount in amounts:
        row = {}
        for label, order in (("curvature", "positive_first"), ("control", "negative_first"),
                             ("magnitude", None)):
            pruned = clone_pruned(model)
            bound = scores.bind(pruned)  # the same scores, keyed by the clone's modules
            targets = [(module, "weight") for module in bound.modules.values()]
            if order is None:
                prune.global_unstructured(targets, pruning_method=prune.L1Unstructured,
                                          amount=amount)
            else:
                prune.global_unstructured(targets, pruning_method=CurvaturePruning,
                                          importance_scores=bound.importance_scores(order),
                                          amount=amount)
            make_permanent(pruned)
            row[label] = accuracy(pruned, test)
        report["accuracy"][amount] = row
        say(f"{amount:>8.0%} {row['curvature']:>10.3f} {row['control']:>8.3f} "
            f"{row['magnitude']:>10.3f}")
    if out is not None:
        report["files"] = _write_outputs(Path(out), model, scores, report)
        say(f"wrote {', '.join(report['files'])}")
    return report


def _write_outputs(out: Path, model: nn.Module, scores, report: dict) -> list[str]:
    """``model.pt``, ``demo_accuracy.png`` and ``kappa_histograms.png`` in ``out``."""
    atomic_write(out / "model.pt", lambda tmp: torch.save(model, tmp))
    plot_demo_accuracy(report, out / "demo_accuracy.png")
    plot_kappa_histograms(scores, out / "kappa_histograms.png")
    return [str(out / name) for name in ("model.pt", "demo_accuracy.png", "kappa_histograms.png")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=".",
                        help="folder for model.pt, demo_accuracy.png and kappa_histograms.png "
                             "(default: the current folder)")
    args = parser.parse_args(argv)
    try:
        run_demo(seed=args.seed, quiet=args.quiet, out=args.out)
    except UsageError as exc:
        sys.stderr.write(f"curvprune demo: error: {exc}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
