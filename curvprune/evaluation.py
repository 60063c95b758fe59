"""Top-1 accuracy of a classifier on a dataset (eval mode, no gradients, flags restored)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .calibration import model_device, scoring_mode

__all__ = ["accuracy"]


def accuracy(model: nn.Module, dataset, *, batch_size: int = 1000, limit: int | None = None
             ) -> float:
    """Fraction of ``dataset`` (items ``(input, label)``) that ``model`` classifies correctly.

    Args:
        model: a classifier; it runs on its own device, in eval mode, and is left as found.
        dataset: a map-style dataset of ``(input tensor, int label)`` pairs.
        batch_size: examples per forward pass.
        limit: evaluate on the first ``limit`` examples only.
    """
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("cannot measure accuracy on an empty dataset.")
    device = model_device(model)
    correct = 0
    with scoring_mode(model):
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / len(dataset)
