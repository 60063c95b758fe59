"""``create_model(spec)``: the one factory turning every model spec the library takes into a model.

A spec is one of (as the ``curvprune`` command's ``--model``):

- ``NAME`` or ``curvprune:NAME``: a network of the paper (:mod:`curvprune.models.paper`:
  ``lenet5``, ``mlp``, ``vgg9``);
- ``timm:NAME`` / ``torchvision:NAME``: that library's architecture with random weights (nothing
  is downloaded);
- ``zoo:NAME`` (e.g. ``zoo:timm/resnet18``): a reduced-width timm/torchvision architecture of
  :mod:`curvprune.models.zoo` (seeded weights, 10 classes, 3 x 32 x 32 inputs);
- a path ending in ``.pt``/``.pth`` (or containing a path separator): a whole model saved with
  ``torch.save(model, path)``.

timm and torchvision are imported only for the specs that need them, so ``import curvprune``
stays light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .paper import PAPER_MODELS, list_models

__all__ = ["create_model", "SOURCES"]

#: The prefixes ``create_model`` takes before ``:``.
SOURCES = ("curvprune", "timm", "torchvision", "zoo")

_KINDS = ("NAME (a paper network: {paper}), curvprune:NAME, timm:NAME, torchvision:NAME, "
          "zoo:NAME (e.g. zoo:timm/resnet18) or PATH.pt (a saved model)")


def _valid_specs() -> str:
    return _KINDS.format(paper=", ".join(list_models()))


def create_model(spec: str, *, num_classes: int | None = None, in_channels: int | None = None,
                 checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build the model a spec names, like ``timm.create_model``.

    ``spec``: ``NAME`` / ``curvprune:NAME`` (a paper network: ``lenet5``, ``mlp``, ``vgg9``),
    ``timm:NAME`` or ``torchvision:NAME`` (random weights, nothing downloaded), ``zoo:NAME``
    (a reduced-width entry of :mod:`curvprune.models.zoo`, e.g. ``zoo:timm/resnet18``), or a
    path to a whole model saved with ``torch.save(model, path)``.

    ``num_classes`` / ``in_channels``: the output classes and input channels of the
    architecture (``None``: its default; for ``mlp``, ``in_channels`` is its ``in_features``).
    A zoo entry predicts 10 classes from 3 channels and refuses other values; a saved model is
    returned as saved (neither is applied). ``kwargs`` go to a paper network's constructor
    (e.g. ``hidden=(64, 32)`` for ``mlp``), timm's ``create_model`` or torchvision's
    ``get_model``.

    ``checkpoint``: a state dict file (plain, or wrapped under ``"state_dict"``/``"model"``)
    loaded into the built model by :func:`curvprune.load_checkpoint`.

    Raises ``ValueError`` (one line naming the valid specs) for an unknown spec, a missing
    file, or a checkpoint that does not fit.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str such as 'lenet5' or 'timm:resnet18', "
                        f"not {type(spec).__name__}")
    model = _build(spec, num_classes=num_classes, in_channels=in_channels, kwargs=kwargs)
    if checkpoint is not None:
        from ..checkpoint import load_checkpoint

        try:
            load_checkpoint(model, checkpoint, label=f"checkpoint {checkpoint}")
        except ValueError as exc:
            hint = (f" The architecture was built with {num_classes} classes (num_classes)."
                    if "shape mismatch" in str(exc) and num_classes is not None else "")
            raise ValueError(f"{exc}{hint}") from exc
    return model


def _is_path(spec: str) -> bool:
    return spec.partition(":")[0] not in SOURCES and (
        spec.endswith((".pt", ".pth")) or os.path.sep in spec)


def _build(spec: str, *, num_classes: int | None, in_channels: int | None,
           kwargs: dict[str, Any]) -> nn.Module:
    if _is_path(spec):
        if kwargs:
            raise ValueError(f"{spec} is a saved model: it takes no constructor arguments "
                             f"({', '.join(sorted(kwargs))})")
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"model file not found: {spec}")
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise ValueError(
                f"{spec} holds a {type(obj).__name__}, not a model; save the whole model with "
                "torch.save(model, path), or build the architecture (timm:NAME, "
                "torchvision:NAME, curvprune:NAME) and pass the state dict as a checkpoint.")
        return obj
    kind, sep, name = spec.partition(":")
    if not sep:
        kind, name = "curvprune", spec
        if spec not in PAPER_MODELS:
            raise ValueError(f"unknown model {spec!r}; use {_valid_specs()}")
    if not name:
        raise ValueError(f"model spec {spec!r} needs a name; use {_valid_specs()}")
    if kind == "curvprune":
        if name not in PAPER_MODELS:
            raise ValueError(f"unknown curvprune model {name!r}; choose one of {list_models()}")
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if in_channels is not None:
            kwargs["in_channels" if name != "mlp" else "in_features"] = in_channels
        return PAPER_MODELS[name](**kwargs)
    if kind == "zoo":
        from . import zoo

        if name not in zoo.ZOO:
            raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(zoo.ZOO)}")
        if num_classes not in (None, zoo.NUM_CLASSES) or in_channels not in (
                None, zoo.INPUT_SIZE[0]) or kwargs:
            raise ValueError(f"zoo:{name} is built with {zoo.NUM_CLASSES} classes and "
                             f"{zoo.INPUT_SIZE[0]} input channels; drop num_classes, "
                             "in_channels and other arguments, or use timm:/torchvision:")
        return zoo.create(name)
    if kind == "timm":
        import timm

        if name not in timm.list_models():
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
        extra: dict[str, Any] = {"in_chans": in_channels or 3, **kwargs}
        if num_classes is not None:
            extra["num_classes"] = num_classes
        return timm.create_model(name, pretrained=False, **extra)
    if kind == "torchvision":
        import torchvision

        extra = dict(kwargs)
        if num_classes is not None:
            extra["num_classes"] = num_classes
        if in_channels not in (None, 3):
            raise ValueError(f"torchvision:{name} takes 3 input channels; drop in_channels")
        try:
            return torchvision.models.get_model(name, weights=None, **extra)
        except ValueError as exc:
            raise ValueError(f"unknown torchvision model {name!r} "
                             "(see torchvision.models.list_models())") from exc
    raise ValueError(f"unknown model source {kind!r} in {spec!r}; use {_valid_specs()}")
