"""``train_classifier``: the one training loop of the demo, the benchmarks (training and
fine-tuning) and the tests (Adam, cross-entropy, a seeded shuffle)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn as nn

__all__ = ["train_classifier"]


def train_classifier(model: nn.Module, dataset, *, epochs: int | None = 1, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, max_steps: int | None = None,
                     progress: bool = False, desc: str = "train") -> nn.Module:
    """Train ``model`` in place on ``dataset`` (``(input, label)`` pairs) and return it in eval
    mode.

    Adam (learning rate ``lr``) on the cross-entropy loss, batches of ``batch_size`` drawn by a
    ``DataLoader`` shuffled with a generator seeded by ``seed`` (so the same call trains the
    same weights from the same start), for ``epochs`` epochs or ``max_steps`` optimiser steps,
    whichever ends first; ``epochs=None`` trains for exactly ``max_steps`` steps, as many
    epochs as that takes (the steps are those of a long enough ``epochs``). ``progress`` shows
    a bar per epoch labelled ``desc``. A model under pruning hooks trains its unpruned entries
    (the masks stay), which is how the benchmarks fine-tune.

    Raises:
        ValueError: ``epochs`` or ``max_steps`` below 1, or neither given.
    """
    if (epochs is not None and epochs < 1) or (max_steps is not None and max_steps < 1):
        raise ValueError(f"epochs and max_steps must be at least 1; got {epochs}, {max_steps}.")
    if epochs is None and max_steps is None:
        raise ValueError("epochs=None trains for max_steps steps: pass max_steps too.")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    epoch_range: Iterable[int] = itertools.count() if epochs is None else range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=desc)
    steps = 0
    model.train()
    for _ in epoch_range:
        for x, y in loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return model.eval()
    return model.eval()
