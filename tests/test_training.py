"""``curvprune.training.train_classifier``: the one training loop (demo, benchmarks, tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from curvprune.models import create_model
from curvprune.training import train_classifier


def _data(n: int = 300) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.randn(n, 20, generator=gen),
                                          torch.randint(0, 3, (n,), generator=gen))


def _fresh() -> nn.Module:
    torch.manual_seed(0)
    return create_model("mlp", in_channels=20, hidden=(8,), num_classes=3)


def test_equals_the_hand_written_loop_bitwise():
    data = _data()
    expected = _fresh()
    optimiser = torch.optim.Adam(expected.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        for x, y in loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(expected(x), y).backward()
            optimiser.step()
    model = train_classifier(_fresh(), data, epochs=2, batch_size=32, lr=1e-2, seed=3)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(expected.parameters(), model.parameters()))
    assert not torch.equal(expected[1].weight, _fresh()[1].weight)  # it did train


def test_max_steps_stops_early():
    data = _data()
    one_step = train_classifier(_fresh(), data, epochs=5, batch_size=32, seed=1, max_steps=1)
    again = train_classifier(_fresh(), data, epochs=1, batch_size=32, seed=1, max_steps=1)
    longer = train_classifier(_fresh(), data, epochs=1, batch_size=32, seed=1, max_steps=2)
    assert torch.equal(one_step[1].weight, again[1].weight)
    assert not torch.equal(one_step[1].weight, longer[1].weight)
    with pytest.raises(ValueError, match="at least 1"):
        train_classifier(_fresh(), data, epochs=0)


def test_epochs_none_trains_exactly_max_steps_across_epochs():
    data = _data(64)  # two batches of 32 per epoch: 5 steps run into the third epoch
    by_steps = train_classifier(_fresh(), data, epochs=None, batch_size=32, seed=2, max_steps=5)
    by_epochs = train_classifier(_fresh(), data, epochs=3, batch_size=32, seed=2, max_steps=5)
    four = train_classifier(_fresh(), data, epochs=2, batch_size=32, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(by_steps.parameters(), by_epochs.parameters()))
    assert not torch.equal(by_steps[1].weight, four[1].weight)  # the fifth step ran
    with pytest.raises(ValueError, match="pass max_steps"):
        train_classifier(_fresh(), data, epochs=None)
    with pytest.raises(ValueError, match="at least 1"):
        train_classifier(_fresh(), data, epochs=None, max_steps=0)
