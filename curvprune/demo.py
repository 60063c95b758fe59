"""The main job on an embedded default: ``python -m curvprune.demo``.

Trains a small MLP for one epoch (seconds), scores it by neural curvature on one correctly
classified example per class, and reports test accuracy after pruning 50/80/90% of the weights by
curvature ("pos"), the paper's control ("neg") and global magnitude, with no fine-tuning.

Data: Fashion-MNIST when Debian's ``dataset-fashion-mnist`` is installed, else a synthetic
10-class image set generated from a fixed seed (no download either way).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from .curvature import neural_curvature
from .data import class_balanced_calibration, fashion_mnist
from .evaluation import accuracy
from .models import create_model
from .pruning import CurvaturePruning, clone_pruned, make_permanent

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
             quiet: bool = False) -> dict:
    """Run the demo and return its numbers (accuracy per criterion and amount)."""
    say = (lambda *a: None) if quiet else print
    torch.manual_seed(seed)
    name, train, test = _datasets()
    model = create_model("mlp", hidden=(64, 32))
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for x, y in loader:
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    dense = accuracy(model, test)
    say(f"data: {name}; MLP 784-64-32-10 trained 1 epoch in {time.perf_counter() - start:.1f} s,"
        f" test accuracy {dense:.3f}")
    calibration, _ = class_balanced_calibration(model, test, 1, num_classes=10, seed=seed)
    scores = neural_curvature(model, calibration, progress=not quiet)
    say(scores.summary())
    params = [(m, "weight") for m in scores.modules.values()]
    report: dict = {"data": name, "dense_accuracy": dense, "seconds": scores.seconds,
                    "accuracy": {}}
    say(f"\n{'removed':>8} {'curvature':>10} {'control':>8} {'magnitude':>10}")
    for amount in amounts:
        row = {}
        for label, order in (("curvature", "pos"), ("control", "neg"), ("magnitude", None)):
            pruned = clone_pruned(model)
            targets = [(dict(pruned.named_modules())[n.rsplit(".", 1)[0]], "weight")
                       for n in scores.modules]
            if order is None:
                prune.global_unstructured(targets, pruning_method=prune.L1Unstructured,
                                          amount=amount)
            else:
                ranks = scores.importance_scores(order)
                keyed = {(t[0], "weight"): ranks[p] for t, p in zip(targets, params)}

                prune.global_unstructured(targets, pruning_method=CurvaturePruning,
                                          importance_scores=keyed, amount=amount)
            make_permanent(pruned)
            row[label] = accuracy(pruned, test)
        report["accuracy"][amount] = row
        say(f"{amount:>8.0%} {row['curvature']:>10.3f} {row['control']:>8.3f} "
            f"{row['magnitude']:>10.3f}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_demo(seed=args.seed, quiet=args.quiet)


if __name__ == "__main__":
    main()
