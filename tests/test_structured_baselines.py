"""The structured benchmark's Torch-Pruning activation and Hessian criteria, against brute force:
the calibration protocol each needs (one forward pass in ``compute_importance``; the diagonal
empirical Fisher in ``.grad``) gives the channel scores computed here by explicit loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import benchmark_module


@pytest.fixture(scope="module")
def structured():
    return benchmark_module("structured")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


def first_group(model: nn.Module, x: torch.Tensor):
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    return graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(5)))


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient(structured):
    model = small_model()
    x, y = torch.randn(6, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    structured.fisher_diagonal(model, x, y)
    for name, p in model.named_parameters():
        expected = torch.zeros_like(p)
        for i in range(len(x)):  # one fresh copy and .backward() per example
            other = copy.deepcopy(model)
            other.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(other(x[i:i + 1]), y[i:i + 1]).backward()
            expected += dict(other.named_parameters())[name].grad.pow(2)
        assert torch.allclose(p.grad, expected / len(x), rtol=1e-5, atol=1e-12), name
    # Torch-Pruning's OBD score of conv0's channels: sum of w^2 h over the channel's weights
    # (its output filter and bias-free; conv2's input slice), then the group's mean
    scores = tp.importance.GroupHessianImportance(normalizer=None)(first_group(model, x))
    w0, h0 = model[0].weight.detach(), model[0].weight.grad
    w2, h2 = model[2].weight.detach(), model[2].weight.grad
    brute = []
    for c in range(5):
        out = sum(float(w0[c].flatten()[k] ** 2 * h0[c].flatten()[k]) for k in range(18))
        inp = sum(float(w2[:, c].flatten()[k] ** 2 * h2[:, c].flatten()[k]) for k in range(36))
        brute.append((out + inp) / 2)
    assert torch.allclose(scores.double(), torch.tensor(brute, dtype=torch.float64), rtol=1e-5)


def test_activation_importance_is_the_mean_abs_activation_of_the_batch(structured):
    model = small_model()
    x = torch.randn(4, 2, 6, 6)
    importance = tp.importance.ActivationImportance(normalizer=None)
    with importance.compute_importance(model), torch.no_grad():
        model(x)  # the protocol of structured.prune_and_evaluate
    scores = importance(first_group(model, x))
    act = torch.relu(model[0](x)).detach()  # conv2's input
    brute = [sum(abs(float(v)) for v in act[:, c].flatten()) / act[:, c].numel()
             for c in range(5)]
    assert torch.allclose(scores.double(), torch.tensor(brute, dtype=torch.float64), rtol=1e-5)
    assert len(set(round(b, 6) for b in brute)) == 5  # the channels are told apart
