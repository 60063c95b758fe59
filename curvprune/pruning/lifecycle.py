"""The life cycle of a pruned model: its hooks, made permanent, saved, loaded and cloned.

Works on PyTorch's pruned layout (``<name>_orig`` parameter, ``<name>_mask`` buffer and a
forward pre-hook per pruned tensor) whatever method pruned it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
import torch.nn as nn
from torch.nn.utils import prune

from ..checkpoint import state_mismatches

__all__ = ["pruning_hooks", "make_permanent", "save_pruned", "load_pruned", "clone_pruned"]


def pruning_hooks(model: nn.Module) -> list[tuple[str, nn.Module, prune.BasePruningMethod]]:
    """Every pruning reparametrisation in ``model``: ``(module name, module, method)``.

    ``method._tensor_name`` is the pruned tensor's name in the module.
    """
    found = []
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append((module_name, module, hook))
    return found


def refresh_weights(model: nn.Module) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` now (PyTorch does it before forward)."""
    for _, module, hook in pruning_hooks(model):
        setattr(module, hook._tensor_name, hook.apply_mask(module))


def mask_of(module: nn.Module, name: str) -> torch.Tensor | None:
    """The ``<name>_mask`` buffer of ``module``, or ``None`` when ``name`` is not pruned."""
    mask = getattr(module, name + "_mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


def unpruned_count(module: nn.Module, name: str) -> int:
    """How many entries of ``module.<name>`` its mask keeps (all of them when unpruned)."""
    mask = mask_of(module, name)
    if mask is None:
        return getattr(module, name).numel()
    return int((mask != 0).sum())


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every pruning reparametrisation in ``model`` (``prune.remove`` on each).

    Each pruned tensor becomes a plain parameter again holding ``orig * mask`` (the pruned
    entries stay exactly zero); ``*_orig`` parameters, ``*_mask`` buffers and the hooks go. The
    masks are gone too, so later training can revive the zeros; keep them if you need them.

    Returns:
        ``model``, modified in place.
    """
    for _, module, hook in pruning_hooks(model):
        prune.remove(module, hook._tensor_name)
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike | BinaryIO) -> None:
    """Save a (possibly pruned) model's ``state_dict``, masks included, with :func:`torch.save`.

    The file holds PyTorch's pruned layout (``<name>_orig`` and ``<name>_mask`` per pruned
    tensor); read it back with :func:`load_pruned`.
    """
    torch.save(model.state_dict(), path)


def load_pruned(
    model: nn.Module,
    source: str | os.PathLike | BinaryIO | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> nn.Module:
    """Load a pruned ``state_dict`` (file or mapping) into ``model``, masks and hooks included.

    ``model.load_state_dict`` cannot read a pruned state dict into a fresh model: the keys
    ``<name>_orig``/``<name>_mask`` do not exist until the tensor is pruned. For every
    ``<module>.<name>_mask`` key this adds the reparametrisation with
    :func:`torch.nn.utils.prune.identity` (an all-ones mask) when the tensor is not pruned yet,
    then loads (values are copied onto the model's devices) and recomputes ``<name>``. Keys and
    shapes are checked before anything is copied (``load_state_dict`` alone copies what fits
    and then raises); if loading fails, the identity reparametrisations it added are removed
    again and the model is as it was.

    Args:
        model: a model of the same architecture (fresh, or pruned already).
        source: a path or file object written by :func:`save_pruned` (read with
            ``torch.load(weights_only=True)``), or a state dict.
        strict: passed to :meth:`~torch.nn.Module.load_state_dict`.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: a mask without its ``<name>_orig`` entry, or a mask for a tensor the model
            does not have; a pruned tensor in ``model`` that the state dict holds unpruned.
        RuntimeError: missing or unexpected keys (``strict``) or shape mismatches, as
            ``load_state_dict`` reports them.
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    named = dict(model.named_modules())
    pruned_now = {(id(m), h._tensor_name) for _, m, h in pruning_hooks(model)}
    to_add = []
    for key in state:
        if not key.endswith("_mask"):
            continue
        full = key[: -len("_mask")]
        owner, _, name = full.rpartition(".")
        if full + "_orig" not in state:
            raise ValueError(f"state dict has {key!r} but no {full + '_orig'!r}.")
        module = named.get(owner)
        if module is None or not isinstance(getattr(module, name, None), torch.Tensor):
            if not strict:
                continue
            raise ValueError(f"state dict has a mask for {full!r}, which the model lacks.")
        if (id(module), name) not in pruned_now:
            to_add.append((module, name))
    if strict:
        for owner, _module, hook in pruning_hooks(model):
            full = f"{owner}.{hook._tensor_name}" if owner else hook._tensor_name
            if full in state and full + "_orig" not in state:
                raise ValueError(
                    f"{full!r} is pruned in the model but not in the state dict; call "
                    "make_permanent(model) first, or load with strict=False."
                )
    added = []
    try:
        for module, name in to_add:
            prune.identity(module, name)
            added.append((module, name))
        _check_state(model, state, strict)
        model.load_state_dict(state, strict=strict)
    except Exception:
        for module, name in reversed(added):
            prune.remove(module, name)
        raise
    refresh_weights(model)
    return model


def _check_state(model: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Refuse a state dict ``load_state_dict`` would only half load (it copies what fits, then
    raises): wrong shapes, and with ``strict`` missing or unexpected keys."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected, shapes = state_mismatches(own, state)
    errors = []
    if strict:
        if unexpected:
            errors.append(f"Unexpected key(s) in state_dict: {unexpected}.")
        if missing:
            errors.append(f"Missing key(s) in state_dict: {missing}.")
    for key in shapes:
        errors.append(
            f"size mismatch for {key}: copying a param with shape {state[key].shape} from "
            f"checkpoint, the shape in current model is {own[key].shape}."
        )
    if errors:
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__} (nothing was "
            "loaded):\n\t" + "\n\t".join(errors)
        )


def clone_pruned(model: nn.Module) -> nn.Module:
    """A deep copy of a (possibly pruned) model, masks and pruning hooks included.

    ``copy.deepcopy`` refuses a pruned model: its ``weight`` is a plain attribute computed by
    the pruning hook (``weight_orig * weight_mask``), a non-leaf tensor. This drops those
    computed attributes, deep-copies, and recomputes them on both models (the original is left
    as it was, even if copying fails).
    """
    hooks = pruning_hooks(model)
    for _, module, hook in hooks:
        if hook._tensor_name in module.__dict__:
            delattr(module, hook._tensor_name)
    try:
        clone = copy.deepcopy(model)
    finally:
        refresh_weights(model)
    refresh_weights(clone)
    return clone
