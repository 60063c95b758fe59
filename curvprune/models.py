"""The networks of the paper (method.md section 5), in a small registry.

``create_model(name)`` builds one by name, like ``timm.create_model``; :func:`list_models` lists
them. All are chains of Conv2d/Linear layers with elementwise modules, so the neuron graph fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name (e.g. ``"lenet5"``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}.")
    return _REGISTRY[name](**kwargs)


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
