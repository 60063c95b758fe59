"""``load_checkpoint``: a user's trained weights, into an architecture, before pruning.

Nobody prunes random weights: the everyday case is a timm/torchvision architecture fine-tuned on
one's own data and saved with ``torch.save(model.state_dict(), path)``. :func:`load_checkpoint`
loads such a file (or a training checkpoint that wraps the state dict) into a freshly built
model, and says in one line what does not fit when it does not.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._checks import check_module

__all__ = ["load_checkpoint"]

#: Keys under which training scripts commonly store the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")

_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_SHOWN = 4  # keys listed per kind of mismatch


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights_only" not in str(exc):
                raise
            # Holds Python objects besides tensors (a whole model, training arguments): a full
            # unpickle, which runs code from the file. Only load checkpoints you trust.
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load fails in many ways on a file that is not its own
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"cannot read checkpoint {path} with torch.load "
                         f"({type(exc).__name__}: {first}); is it a file torch.save wrote?"
                         ) from exc


def _unwrap(obj: Any, label: str) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, a wrapped one, or a whole model's."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        key = next((k for k in WRAPPER_KEYS if k in obj), None)
        if key is None:
            break
        obj = obj[key]
    kind = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}")
    raise ValueError(
        f"{label} holds {kind}, not a state dict; save one with "
        "torch.save(model.state_dict(), path) (a dict wrapping it under 'state_dict', 'model' "
        "or 'model_state_dict' works too).")


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and \
                not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _names(keys: list[str], shown: int = _SHOWN) -> str:
    text = ", ".join(keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def state_mismatches(target: Mapping[str, Any], state: Mapping[str, Any]
                     ) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` fails to fit ``target`` (a model's state dict): the keys of ``target`` it
    lacks, the keys it has that ``target`` does not, and the keys both hold as tensors of
    different shapes (each in its dict's order)."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in target if k in state and isinstance(target[k], torch.Tensor)
              and isinstance(state[k], torch.Tensor) and target[k].shape != state[k].shape]
    return missing, unexpected, shapes


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], *,
                    label: str | None = None) -> nn.Module:
    """Load trained weights into ``model`` (in place) and return it.

    ``checkpoint`` is a path to a file written by ``torch.save`` or an object already loaded.
    It may hold:

    * a state dict (``torch.save(model.state_dict(), path)``);
    * a dict wrapping one under ``"state_dict"``, ``"model"``, ``"model_state_dict"`` or
      ``"module"`` (training checkpoints with optimiser state, epoch, ...);
    * a whole model (its ``state_dict()`` is used).

    Keys prefixed by ``module.`` (``DataParallel``) or ``_orig_mod.`` (``torch.compile``) are
    stripped when every key has the prefix and the model's keys do not. Loading is strict:
    every parameter and buffer of ``model`` must be in the checkpoint with its shape, and the
    checkpoint may hold nothing else (BatchNorm's ``num_batches_tracked`` counters may be
    missing). A file is read with ``weights_only=True``; one that holds other Python objects is
    unpickled in full, which runs code from the file: load only checkpoints you trust.

    Args:
        model: the architecture, built with the same configuration as the trained model
            (number of classes, input channels, width).
        checkpoint: a path, or an already loaded state dict / wrapper / model.
        label: how to name the checkpoint in messages (default: the path).

    Returns:
        ``model``, with the checkpoint's values copied into its parameters and buffers (their
        dtype and device are kept).

    Raises:
        ValueError: a missing or unreadable file, an object that holds no state dict, or keys
            and shapes that do not match ``model`` (the message names them).
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    check_module(model)
    if isinstance(checkpoint, (str, os.PathLike)):
        label = label or str(checkpoint)
        obj = _read(Path(checkpoint))
    else:
        label = label or "the checkpoint"
        obj = checkpoint
    target = model.state_dict()
    state = _strip_prefixes(_unwrap(obj, label), set(target))
    missing, unexpected, mismatched = state_mismatches(target, state)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if any(k.endswith(("weight_orig", "weight_mask")) for k in unexpected):
        raise ValueError(
            f"{label} was saved from a model under pruning hooks (weight_orig/weight_mask "
            "keys); call curvprune.make_permanent(model) before saving its state dict, or load "
            "it with curvprune.load_pruned.")
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(target[k].shape)} in the "
              "model" for k in mismatched]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_names(shapes, 2)}")
        raise ValueError(
            f"{label} does not fit {type(model).__name__}: {'; '.join(parts)}. Build the "
            "architecture the checkpoint was trained with (same model name, number of classes "
            "and input channels).")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)  # checked above, counters may be missing
    return model
