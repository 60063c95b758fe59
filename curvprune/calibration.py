"""Calibration data and node activities.

A calibration set is a tensor batch, an ``(inputs, targets)`` pair, or any iterable of those
(a :class:`~torch.utils.data.DataLoader` works as is). Node activities are recorded with
temporary forward pre-hooks while the model runs in eval mode under ``torch.no_grad()``; hooks,
training flags and parameters are restored before returning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

__all__ = ["is_single_pair", "iter_calibration_inputs", "model_device", "half_dtype",
           "scoring_mode", "capture_activations",
           "normalise_activity"]

Calibration = Any  # torch.Tensor | tuple | Iterable[torch.Tensor | tuple]


def _batch_inputs(batch: Any, position: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        raise TypeError(
            f"calibration batch {position} is a dict; pass a tensor or an (inputs, targets) pair."
        )
    raise TypeError(
        f"calibration batch {position} is a {type(batch).__name__}; each batch must be a tensor "
        "or an (inputs, targets) pair whose first element is a tensor."
    )


def is_single_pair(calibration: Any) -> bool:
    """Whether ``calibration`` is one ``(inputs, targets)`` batch rather than a list of batches.

    A tuple of two items whose first is a tensor is a pair. A list ``[a, b]`` whose first item
    is a tensor is a pair unless ``b`` looks like another input batch: a tuple or list (a
    batch), or a tensor with as many dimensions as ``a`` and either the same per-example shape
    or at least three dimensions (an image batch of another size). So ``[x, y]`` from a
    DataLoader is a pair whether ``y`` holds class indices or one-hot rows, and ``[x1, x2]``
    is two batches.
    """
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2
            and isinstance(calibration[0], torch.Tensor)):
        return False
    if isinstance(calibration, tuple):
        return True
    first, second = calibration
    if isinstance(second, (tuple, list)):
        return False  # [x1, (x2, y2)]: two batches
    if not isinstance(second, torch.Tensor) or second.dim() != first.dim():
        return True
    return not (second.dim() >= 3 or tuple(second.shape[1:]) == tuple(first.shape[1:]))


def iter_calibration_inputs(calibration: Calibration) -> Iterator[torch.Tensor]:
    """Yield the input tensors of a calibration set, one batch at a time.

    Raises:
        TypeError: if ``calibration`` or one of its batches has an unsupported type.
        ValueError: if the calibration set holds no example.
    """
    if isinstance(calibration, torch.Tensor) or is_single_pair(calibration):
        batches: Iterable[Any] = [calibration]
    elif isinstance(calibration, dict):
        raise TypeError(
            "calibration is a dict; pass a tensor, an (inputs, targets) pair or an iterable of "
            "batches (a DataLoader works)."
        )
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        batches = calibration
    else:
        raise TypeError(
            f"calibration must be a tensor, an (inputs, targets) pair or an iterable of batches "
            f"(a DataLoader works), not {type(calibration).__name__}."
        )
    total = 0
    for position, batch in enumerate(batches):
        inputs = _batch_inputs(batch, position)
        if inputs.dim() < 2:
            raise ValueError(
                f"calibration batch {position} has shape {tuple(inputs.shape)}; a batch needs "
                "a first dimension that indexes examples and at least one more (e.g. "
                "[N, features] or [N, C, H, W]): add the example dimension with unsqueeze(0)."
            )
        if inputs.shape[0] == 0:
            continue
        total += inputs.shape[0]
        yield inputs
    if total == 0:
        raise ValueError("the calibration set is empty: give at least one example.")


def half_dtype(model: nn.Module) -> torch.dtype | None:
    """``torch.float16`` or ``torch.bfloat16`` when every floating parameter of ``model`` has that
    dtype (a half-precision model), else ``None``. Calibration data for such a model is cast to
    its dtype (rounded as the model itself would see it in half precision)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:
        dtype = dtypes.pop()
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode without autograd, restoring every module's training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def capture_activations(
    model: nn.Module, modules: list[nn.Module], inputs: torch.Tensor
) -> tuple[list[torch.Tensor], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Run ``inputs`` through ``model`` and return the raw node values of every node layer.

    Returns ``(values, in_shapes, out_shapes)``. ``values`` has one ``[batch, nodes]`` float64
    tensor per node layer: ``values[0]`` is the model input, ``values[l]`` (``0 < l < n``) the
    input of ``modules[l]``, and ``values[n]`` the model output. ``in_shapes[l]`` and
    ``out_shapes[l]`` are the per-example input and output shapes of ``modules[l]``. Call it
    inside :func:`scoring_mode`.
    """
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, tuple[int, ...]] = {}
    handles = []

    def make_hooks(position: int):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            if position in seen_in:
                raise ValueError(
                    f"layer {position} ran twice in one forward pass; a shared layer is not a "
                    "chain."
                )
            seen_in[position] = args[0]

        def post_hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            seen_out[position] = tuple(output.shape[1:])

        return pre_hook, post_hook

    for position, module in enumerate(modules):
        pre_hook, post_hook = make_hooks(position)
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        try:
            output = model(inputs)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(
                f"the model rejects calibration inputs of shape {tuple(inputs.shape)} and "
                f"dtype {inputs.dtype}: {exc}"
            ) from exc
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; expected one tensor.")
    missing = [i for i in range(len(modules)) if i not in seen_in]
    if missing:
        raise ValueError(f"layers {missing} did not run in the forward pass.")
    batch = inputs.shape[0]
    for i, module in enumerate(modules):
        seen = seen_in[i]
        batched = seen.dim() == (4 if isinstance(module, nn.Conv2d) else 2)
        if not batched or seen.shape[0] != batch:
            raise ValueError(
                f"layer {i} ({type(module).__name__}) received an input of shape "
                f"{tuple(seen.shape)} for a calibration batch of {batch} example(s) of shape "
                f"{tuple(inputs.shape[1:])}; it must see one row per example ([N, features] for "
                "Linear, [N, C, H, W] for Conv2d). Is the example dimension missing?"
            )
    if output.dim() < 1 or output.shape[0] != batch:
        raise ValueError(
            f"the model's output has shape {tuple(output.shape)} for a calibration batch of "
            f"{batch} example(s); its first dimension must index the examples."
        )
    if inputs[0].numel() != seen_in[0][0].numel():
        raise ValueError(
            "node layer 0 is the model input, but the first layer does not read a reshape of "
            "it; put operations that change the input inside a separate preprocessing step."
        )
    raw = [inputs] + [seen_in[i] for i in range(1, len(modules))] + [output]
    values = [t.detach().flatten(1).to(torch.float64) for t in raw]
    for layer, v in enumerate(values):
        if not torch.isfinite(v).all():
            where = "the calibration inputs" if layer == 0 else f"node layer {layer}"
            raise ValueError(f"{where} contain NaN or Inf; check the data and the model.")
    in_shapes = [tuple(seen_in[i].shape[1:]) for i in range(len(modules))]
    out_shapes = [seen_out[i] for i in range(len(modules))]
    return values, in_shapes, out_shapes


def normalise_activity(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalise ``|h|`` per example over the whole layer: ``[batch, nodes] -> [0, 1]``.

    ``a_u = (|h_u| - min |h|) / (max |h| - min |h|)``. A layer whose ``|h|`` is constant on an
    example has no contrast: every node gets activity 0 (dead) on that example.
    """
    magnitude = values.abs()
    low = magnitude.min(dim=1, keepdim=True).values
    span = magnitude.max(dim=1, keepdim=True).values - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (magnitude - low) / safe, torch.zeros_like(magnitude))
