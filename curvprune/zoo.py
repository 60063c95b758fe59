"""Deprecated module path: the zoo now lives in :mod:`curvprune.models.zoo` (build an entry with
``curvprune.models.create_model("zoo:timm/resnet18")``). Every name is re-exported here."""

from __future__ import annotations

from .models.zoo import (  # noqa: F401
    INPUT_SIZE,
    NUM_CLASSES,
    ZOO,
    ZooEntry,
    __all__,  # noqa: F401
    attention_heads,
    classifier_layers,
    create,
    example_input,
    ignored_layers,
    refresh_after_pruning,
    refresh_attention,
)
