"""``curvprune.evaluation.accuracy`` against hand-made predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from curvprune.evaluation import accuracy


class FirstFeature(nn.Module):
    """Predicts class 1 when the first feature is positive, else class 0."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        first = x[:, 0] * self.scale
        return torch.stack([-first, first], dim=1)


def test_accuracy_counts_correct_predictions_and_respects_limit():
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0], [0.5]])
    y = torch.tensor([1, 0, 0, 0, 1])  # the third is wrong
    data = torch.utils.data.TensorDataset(x, y)
    model = FirstFeature().train()
    assert accuracy(model, data, batch_size=2) == pytest.approx(4 / 5)
    assert accuracy(model, data, limit=3) == pytest.approx(2 / 3)
    assert model.training  # left as found
    assert model.scale.grad is None


def test_accuracy_of_an_empty_dataset_is_an_error():
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        accuracy(FirstFeature(), empty)
