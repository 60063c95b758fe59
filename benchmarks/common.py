"""Shared pieces of the benchmark scripts: seeded training with cached checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from curvprune.data import fashion_mnist
from curvprune.evaluation import accuracy
from curvprune.models import create_model
from curvprune.training import train_classifier

CACHE = Path(os.environ.get("CURVPRUNE_CACHE", Path(__file__).parent / ".cache"))
RESULTS = Path(__file__).parent / "results"

#: The tolerance the quality benchmarks score curvature at: intervals a few ulps wide (exact in
#: practice), the setting their stored results were produced with. The library's default
#: (``curvprune.curvature.TOLERANCE``) is wider; pass it explicitly to measure that instead.
EXACT = 1e-14


def evaluate(model: nn.Module, dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (see :func:`curvprune.evaluation.accuracy`)."""
    return accuracy(model, dataset, batch_size=batch_size)


def trained_model(name: str, *, epochs: int = 5, seed: int = 0, pad_to: int | None = None,
                  lr: float = 1e-3, in_channels: int = 1, verbose: bool = True
                  ) -> tuple[nn.Module, float]:
    """A ``create_model(name)`` trained on Fashion-MNIST with Adam, cached by its settings.

    A name with a slash is a :mod:`curvprune.models.zoo` entry (``"timm/resnet18"``, built as
    ``create_model("zoo:timm/resnet18")``): 3 x 32 x 32 inputs, so use ``pad_to=32,
    in_channels=3`` (the grey channel repeated).
    Returns ``(model in eval mode, test accuracy)``.
    """
    settings = dict(name=name, epochs=epochs, seed=seed, pad_to=pad_to, lr=lr,
                    in_channels=in_channels)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"{name.replace('/', '_')}-{key}.pt"
    if "/" in name:
        model = create_model(f"zoo:{name}")
    else:  # seeded initial weights: torch's own start seed varies by process
        torch.manual_seed(seed)
        model = create_model(name, in_channels=in_channels)
    test = fashion_mnist(train=False, pad_to=pad_to, channels=in_channels)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        torch.manual_seed(seed)
        train = fashion_mnist(train=True, pad_to=pad_to, channels=in_channels)
        start = time.perf_counter()
        train_classifier(model, train, epochs=epochs, batch_size=128, lr=lr, seed=seed,
                         progress=verbose, desc=f"train {name}")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
        if verbose:
            print(f"trained {name} in {time.perf_counter() - start:.0f} s -> {path}")
    model.eval()
    return model, evaluate(model, test)


def resumable(path: Path, settings: dict, ignore: set[str]) -> dict:
    """``{model: {seed: results}}`` of an earlier run written to ``path`` (a benchmark JSON with
    ``settings`` and ``models[name]["seeds"]``), for a script's ``--resume``; ``{}`` when there
    is no such file. The settings must equal ``settings`` except the keys in ``ignore``: a file
    written with other settings is an error rather than silently mixed in."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    mismatched = sorted(k for k in set(settings) | set(old.get("settings", {}))
                        if k not in ignore and settings.get(k) != old["settings"].get(k))
    if mismatched:
        raise SystemExit(f"--resume: {path} was written with other settings "
                         f"({', '.join(mismatched)}); move it away or drop --resume")
    return {name: entry["seeds"] for name, entry in old.get("models", {}).items()}
