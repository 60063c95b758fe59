"""Calibration data and node activities: the accepted forms of a calibration set, the scoring
mode a model runs in, and the activities its forward pass records.

A calibration set is a tensor batch, an ``(inputs, targets)`` pair, or any iterable of those
(a :class:`~torch.utils.data.DataLoader` works as is). A list of single examples without their
batch dimension (``[image, image, ...]`` of shape ``[C, H, W]`` for a model whose first layer is
a ``Conv2d`` or a flatten and a ``Linear``, ``[x, x, ...]`` of shape ``[features]``, or
``[dataset[i] for i in ...]`` pairs of such an example and a scalar target) is stacked into one
batch by :func:`prepare_calibration`, when all the examples have one shape. Every scoring
entry point runs :func:`prepare_calibration` first, which also refuses a model on the ``meta``
device, and reads the batches with :func:`iter_calibration_inputs`, which refuses channels-last
images (``[N, H, W, C]``).

Node activities are recorded with temporary forward pre-hooks while the model runs in eval mode
under ``torch.no_grad()``; hooks, training flags and parameters are restored before returning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from ._checks import (
    check_module,
    model_device,  # the one rule: every parameter on one device
)

__all__ = ["is_single_pair", "iter_calibration_inputs", "model_device", "half_dtype",
           "scoring_mode", "capture_activations", "normalise_activity", "check_model",
           "prepare_calibration", "check_layout"]

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


def check_model(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold no values (the ``meta`` device).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a parameter or buffer on the ``meta`` device.
    """
    check_module(model)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(
                f"the model is on the 'meta' device ({name!r} has a shape but no values), so "
                "it cannot be scored; materialise and load its weights first: "
                "model.to_empty(device='cpu'), then model.load_state_dict(weights)."
            )


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first ``Conv2d`` or ``Linear`` registered in ``model`` (its input layer, in the
    usual case where layers are registered in call order), or ``None``."""
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)


def _is_scalar(target: Any) -> bool:
    return isinstance(target, (int, float)) or (isinstance(target, torch.Tensor)
                                                and target.dim() == 0)


def _single_example(model: nn.Module, x: Any) -> bool:
    """Whether ``x`` is one example without its batch dimension: a vector (a batch needs two
    dimensions); for a model whose first layer is a ``Conv2d``, a 3-d image ``[C, H, W]``
    (which a ``Conv2d`` would read as unbatched); for one whose first layer is a ``Linear``
    (after a flatten), a tensor of exactly ``in_features`` entries whose first dimension is
    not 1 (as a batch of ``x.shape[0]`` examples it could not feed that layer; with a first
    dimension of 1 it is a valid batch of one example, the same graph either way)."""
    if not isinstance(x, torch.Tensor):
        return False
    first = _first_layer(model)
    if x.dim() == 1:
        return True
    if isinstance(first, nn.Conv2d):
        return x.dim() == 3
    return (isinstance(first, nn.Linear) and x.numel() == first.in_features
            and x.shape[0] != 1)


def prepare_calibration(model: nn.Module, calibration: Calibration) -> Calibration:
    """Check ``model`` (:func:`check_model`) and stack a list of single examples into a batch.

    A list or tuple whose items are all single examples without a batch dimension (tensors,
    or ``(example, scalar target)`` pairs as a ``Dataset`` returns them; see
    :func:`_single_example`) of one shape becomes ``torch.stack(examples)``, and one
    ``(example, target)`` pair becomes ``example.unsqueeze(0)``; anything else is returned as
    it is (a tensor batch, pairs, a ``DataLoader``...).

    Raises:
        ValueError: a model on the ``meta`` device; single examples of different shapes.
    """
    check_model(model)
    if not isinstance(calibration, (list, tuple)) or not calibration:
        return calibration
    if is_single_pair(calibration):
        if _single_example(model, calibration[0]):
            return calibration[0].unsqueeze(0)
        return calibration
    examples = []
    for item in calibration:
        if (isinstance(item, (tuple, list)) and len(item) == 2 and _is_scalar(item[1])
                and _single_example(model, item[0])):
            item = item[0]
        if not _single_example(model, item):
            return calibration
        examples.append(item)
    shapes = sorted({tuple(x.shape) for x in examples})
    if len(shapes) > 1:
        raise ValueError(
            f"the calibration list holds single examples of several shapes {shapes[:4]}; one "
            "neural graph needs one shape: resize them to one shape, then torch.stack them."
        )
    return torch.stack(examples)


def check_layout(model: nn.Module, inputs: torch.Tensor, position: int = 0) -> None:
    """Refuse a channels-last image batch ``[N, H, W, C]`` for a model that takes
    ``[N, C, H, W]``: the model's first ``Conv2d`` wants ``C`` input channels, the batch's
    second dimension is not ``C`` and its last one is.

    Raises:
        ValueError: naming the fix (``x.permute(0, 3, 1, 2)``).
    """
    first = _first_layer(model)
    if (inputs.dim() == 4 and isinstance(first, nn.Conv2d)
            and inputs.shape[1] != first.in_channels and inputs.shape[-1] == first.in_channels):
        raise ValueError(
            f"calibration batch {position} has shape {tuple(inputs.shape)}, channels last "
            f"(N, H, W, C), but the model's first Conv2d takes {first.in_channels} channels "
            "first: permute to N,C,H,W with x.permute(0, 3, 1, 2)."
        )


def iter_calibration_inputs(calibration: Calibration,
                            model: nn.Module | None = None) -> Iterator[torch.Tensor]:
    """Yield the input tensors of a calibration set, one batch at a time.

    With ``model``, every batch is checked with :func:`check_layout` (channels-last images).

    Raises:
        TypeError: if ``calibration`` or one of its batches has an unsupported type.
        ValueError: if the calibration set holds no example, or a batch is channels last.
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
        if model is not None:
            check_layout(model, inputs, position)
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
