"""Models: one factory, :func:`create_model`, for every spec (paper networks, timm, torchvision,
the reduced-width zoo, a saved file).

- :mod:`curvprune.models.registry`: ``create_model(spec)``, the one registry and factory;
- :mod:`curvprune.models.paper`: the networks of the paper (``lenet5``, ``mlp``, ``vgg9``);
- :mod:`curvprune.models.zoo`: reduced-width timm/torchvision architectures for coverage tests
  (imports timm and torchvision; loaded only when a ``zoo:`` spec is built).
"""

from __future__ import annotations

from typing import Any

from .paper import lenet5, list_models, mlp, register_model, vgg9
from .registry import SOURCES, create_model

__all__ = ["create_model", "list_models", "register_model", "SOURCES", "lenet5", "mlp", "vgg9",
           "zoo"]


def __getattr__(name: str) -> Any:
    if name == "zoo":  # imports timm and torchvision: on first use only
        import importlib

        module = importlib.import_module(".zoo", __name__)
        globals()["zoo"] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
