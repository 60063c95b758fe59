"""The networks of the paper (method.md section 5): LeNet-5, an MLP and VGG-9, registered by name.

All are chains of Conv2d/Linear layers with elementwise modules, so the neuron graph fits. Build
one with :func:`curvprune.models.create_model` (``"lenet5"`` or ``"curvprune:lenet5"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

__all__ = ["lenet5", "mlp", "vgg9", "list_models", "register_model"]

PAPER_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name (a bare name or
    ``curvprune:NAME`` in :func:`curvprune.models.create_model`)."""
    PAPER_MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered networks (bare names accepted by
    :func:`curvprune.models.create_model`)."""
    return sorted(PAPER_MODELS)


@register_model
def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The paper's LeNet-5 variant for 28x28 inputs: conv 1->6 k6 s2, conv 6->16 k6 s2,
    FC 256-120-84-classes, ReLU after every hidden layer (2118 nodes, ~128k edges)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 6, stride=2), nn.ReLU(),
        nn.Conv2d(6, 16, 6, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


@register_model
def mlp(num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] = (300, 100)
        ) -> nn.Module:
    """A plain MLP on flattened inputs (LeNet-300-100 by default)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model
def vgg9(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A 9-layer VGG variant for 32x32 inputs: six 3x3 convs (64, 96, 96, 192, 192, 192
    channels; stride 2 in convs 1, 3 and 5 instead of pooling, which the neuron graph does not
    have), each with BatchNorm and ReLU, then FC 3072-512-256-classes.

    method.md gives the paper's VGG only by size (69k nodes, 43M edges per example); this one has
    69,386 nodes and 42.8M edges per example with 3 input channels.
    """
    widths = (64, 96, 96, 192, 192, 192)
    strides = (2, 1, 2, 1, 2, 1)
    layers: list[nn.Module] = []
    channels = in_channels
    for width, stride in zip(widths, strides):
        layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    layers += [nn.Flatten(), nn.Linear(192 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 256),
               nn.ReLU(), nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)
