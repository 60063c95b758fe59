r"""Structured (channel) pruning through Torch-Pruning, with curvature or any other importance.

:func:`prune_channels` is the one-call entry point, the structured counterpart of
:func:`~curvprune.prune_model`: it builds a Torch-Pruning ``MetaPruner`` with
:class:`~curvprune.CurvatureImportance` (or the importance you pass), keeps the classifier,
passes the attention heads of timm models, runs the pruning steps and fixes the bookkeeping that
Torch-Pruning leaves stale in timm modules (attention head sizes, MetaFormer scale shapes). The
helpers it uses are public for users who drive their own pruner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .._checks import check_module
from ..calibration import (
    check_model,
    half_dtype,
    iter_calibration_inputs,
    model_device,
    prepare_calibration,
)
from ..curvature import TOLERANCE
from ..result import CurvatureResult

# Torch-Pruning (and the timm it imports) is loaded by prune_channels, not at import time:
# ``import curvprune`` stays light.

__all__ = ["prune_channels", "ChannelPruningReport", "attention_heads", "refresh_attention",
           "refresh_after_pruning", "classifier_layers"]


def _attention_modules(model: nn.Module):
    """Yield ``(attention module, qkv Linear, num_heads)`` for the attention kinds in the zoo."""
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        heads = getattr(m, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(heads, int):
            yield m, qkv, heads


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{qkv Linear: num_heads}`` for every multi-head attention in ``model``.

    Pass it as Torch-Pruning's ``num_heads=`` so that the fused q/k/v projection is pruned
    head-consistently. Covers timm's ``Attention`` (ViT, DeiT, MobileViT, hybrid ViT), timm's
    Swin ``WindowAttention`` and PiT attention (all have ``.qkv`` and ``.num_heads``) and
    ``nn.MultiheadAttention`` (keyed by the module itself, as Torch-Pruning expects).
    """
    heads: dict[nn.Module, int] = {}
    for _, qkv, n in _attention_modules(model):
        heads[qkv] = n
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
    return heads


def refresh_attention(model: nn.Module, pruner=None) -> None:
    """Update head bookkeeping after Torch-Pruning has pruned attention projections.

    timm attention modules reshape the qkv output with their stored ``num_heads`` and
    ``head_dim`` (and ``attn_dim``), which Torch-Pruning does not change when it removes rows of
    ``qkv``. As in Torch-Pruning's ``examples/transformers/prune_timm_vit.py``: ``num_heads`` is
    taken from ``pruner.num_heads`` (unchanged with ``prune_num_heads=False``) and
    ``head_dim = qkv.out_features // (3 * num_heads)``; ``attn_dim`` follows. The softmax
    ``scale`` is left as it was: the weights were trained with it, and changing it would change
    the function of the channels that remain. ``nn.MultiheadAttention`` is updated by
    Torch-Pruning itself.
    """
    for m, qkv, heads in _attention_modules(model):
        if pruner is not None and qkv in getattr(pruner, "num_heads", {}):
            heads = pruner.num_heads[qkv]
        head_dim = qkv.out_features // (3 * heads)
        m.num_heads = heads
        if hasattr(m, "head_dim"):
            m.head_dim = head_dim
        if hasattr(m, "attn_dim"):
            m.attn_dim = heads * head_dim


def refresh_after_pruning(model: nn.Module, pruner=None) -> None:
    """Fix every stored size that Torch-Pruning leaves stale, so the pruned model runs.

    :func:`refresh_attention`, plus timm MetaFormer's ``Scale`` (layer/residual scale), which
    views its parameter with a shape recorded at construction.
    """
    refresh_attention(model, pruner)
    for m in model.modules():
        shape = getattr(m, "shape", None)
        scale = getattr(m, "scale", None)
        if isinstance(shape, tuple) and isinstance(scale, nn.Parameter) and scale.dim() == 1:
            m.shape = (scale.numel(), *shape[1:])


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The final classification layer(s) of a zoo model.

    timm models report theirs through ``get_classifier()`` (a pair for DeiT-distilled); for the
    torchvision ones it is the last ``Linear``/``Conv2d`` registered.
    """
    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
    else:
        heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
    out = []
    for h in heads:
        if isinstance(h, (nn.Linear, nn.Conv2d)):
            out.append(h)
        else:  # a wrapper (e.g. timm ClassifierHead): its last layer
            out += [m for m in h.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1:]
    return out


@dataclass
class ChannelPruningReport:
    """What :func:`prune_channels` did.

    Attributes:
        params_before, params_after: parameter counts.
        macs_before, macs_after: multiply-accumulates of one example (Torch-Pruning's counter).
        widths_before, widths_after: ``{module name: (in, out)}`` channels of every Conv2d/Linear.
        steps: pruning steps run.
        importance: the importance object (``CurvatureImportance`` exposes ``.result`` and
            ``.fell_back``).
    """

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    widths_before: dict[str, tuple[int, int]]
    widths_after: dict[str, tuple[int, int]]
    steps: int
    importance: object

    @property
    def fell_back(self) -> bool:
        """Whether the importance used its magnitude fallback (an untraceable model)."""
        return bool(getattr(self.importance, "fell_back", False))

    def summary(self) -> str:
        """One line: parameters and MACs before and after, steps, fallback."""
        return (f"parameters {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_after / max(1, self.params_before):.1%}), MACs "
                f"{self.macs_before:,.0f} -> {self.macs_after:,.0f} "
                f"({self.macs_after / max(1.0, self.macs_before):.1%}) in {self.steps} step(s)"
                + (" [magnitude fallback]" if self.fell_back else ""))


def _widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
    return out


def prune_channels(
    model: nn.Module,
    calibration,
    ratio: float,
    *,
    importance=None,
    global_pruning: bool = False,
    iterative_steps: int = 1,
    round_to: int | None = None,
    ignored_layers: list[nn.Module] | None = None,
    example_inputs: torch.Tensor | None = None,
    alpha: float = 0.9,
    result: CurvatureResult | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    threads: int | None = None,
    memory_budget: int | None = None,
    tolerance: float = TOLERANCE,
    **pruner_kwargs,
) -> ChannelPruningReport:
    r"""Remove a fraction ``ratio`` of the channels of ``model`` in place, by channel curvature.

    Score once, prune many: ``prune_channels(model, None, ratio, result=r)`` with
    ``r = neural_curvature(model, calibration, granularity="channel")`` does not score; ``r``
    is bound to ``model`` by parameter name (:meth:`~curvprune.CurvatureResult.bind`), so it
    can come from an unpruned copy (``copy.deepcopy(model)`` before each ratio) and gives
    the channels that scoring that copy would.

    Args:
        model: any model Torch-Pruning's dependency graph handles (timm, torchvision...). It must
            not carry ``torch.nn.utils.prune`` masks (call :func:`~curvprune.make_permanent`).
        calibration: calibration data for :class:`~curvprune.CurvatureImportance` (a tensor
            batch, an ``(inputs, targets)`` pair or a ``DataLoader``).
        ratio: Torch-Pruning's ``pruning_ratio`` in ``[0, 1)``: the fraction of the channels of
            each group (``global_pruning=False``) or of all groups together to remove.
        importance: a Torch-Pruning importance to use instead of curvature (for comparisons).
        global_pruning, iterative_steps, round_to: as Torch-Pruning's ``MetaPruner``.
        ignored_layers: layers whose output channels are kept; default: the classifier
            (:func:`classifier_layers`).
        example_inputs: one input batch for Torch-Pruning's tracing; default: the first
            calibration example.
        alpha: idleness for :class:`~curvprune.CurvatureImportance`.
        result: a channel-granularity :class:`~curvprune.CurvatureResult` of this architecture
            to prune by instead of scoring (pass ``calibration=None``; one step only). Without
            calibration, ``example_inputs`` defaults to a zero batch of one example of the
            shape that was scored (``result.input_shape``), in the model's dtype.
        device, progress, threads, memory_budget, tolerance: passed unchanged to
            :func:`~curvprune.neural_curvature` through :class:`~curvprune.CurvatureImportance`.
            Channels are ranked by the midpoint of their curvature intervals; unlike
            :func:`~curvprune.prune_model`, the selection is not made decision-exact (Torch-Pruning
            normalises and ranks group scores itself), so pass ``tolerance=0`` for the exact
            ranking.
        **pruner_kwargs: passed on to ``MetaPruner`` (e.g. ``prune_num_heads=True``).

    Returns:
        A :class:`ChannelPruningReport`.

    Raises:
        ValueError: a ratio outside ``[0, 1)``, a model with pruning masks, bad calibration
            (channels-last images, a model on the ``meta`` device...), both or neither of
            ``calibration`` and ``result``, a result of neuron granularity or one that does
            not bind to ``model``, ``result`` with ``importance`` or ``iterative_steps > 1``.
        TypeError: a model that is not an ``nn.Module``.
    """
    import torch_pruning as tp

    from ..importance import CurvatureImportance

    check_module(model)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a number in [0, 1); got {ratio!r}.")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) \
            or iterative_steps < 1:
        raise ValueError(f"iterative_steps must be a positive integer; got {iterative_steps!r}.")
    if any(name.endswith("_orig") for name, _ in model.named_parameters()):
        raise ValueError("the model carries torch.nn.utils.prune masks; Torch-Pruning cannot "
                         "copy it. Call curvprune.make_permanent(model) first.")
    check_model(model)
    if result is not None:
        _check_result_call(model, calibration, result, importance, iterative_steps)
    elif calibration is None and importance is None:
        raise ValueError("calibration is None: pass calibration data to score the channels, or "
                         "result=neural_curvature(model, calibration, granularity='channel').")
    if calibration is not None:
        calibration = prepare_calibration(model, calibration)
    if example_inputs is None:
        if calibration is not None:
            example_inputs = next(iter(iter_calibration_inputs(calibration, model)))[:1]
        elif result is not None and result.input_shape is not None:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                         torch.float32)
            example_inputs = torch.zeros((1, *result.input_shape), dtype=dtype)
        else:
            raise ValueError("pass example_inputs= (one input batch for Torch-Pruning's "
                             "tracing): there is no calibration to take it from.")
    example_inputs = example_inputs.to(model_device(model), half_dtype(model)
                                       if example_inputs.is_floating_point() else None)
    if importance is None:
        importance = CurvatureImportance(
            calibration, alpha=alpha, device=device, progress=progress, threads=threads,
            memory_budget=memory_budget, tolerance=tolerance, result=result)
    if ignored_layers is None:
        ignored_layers = classifier_layers(model)
    training = model.training
    model.eval()
    try:
        macs_before, params_before = tp.utils.count_ops_and_params(model, example_inputs)
        widths_before = _widths(model)
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, importance=importance, pruning_ratio=ratio,
            global_pruning=global_pruning, iterative_steps=iterative_steps, round_to=round_to,
            ignored_layers=ignored_layers,
            num_heads=pruner_kwargs.pop("num_heads", attention_heads(model)),
            prune_num_heads=pruner_kwargs.pop("prune_num_heads", False),
            prune_head_dims=pruner_kwargs.pop("prune_head_dims", True),
            **pruner_kwargs,
        )
        for _ in range(iterative_steps):
            pruner.step()
            refresh_after_pruning(model, pruner)
        macs_after, params_after = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(training)
    return ChannelPruningReport(
        params_before=int(params_before), params_after=int(params_after),
        macs_before=float(macs_before), macs_after=float(macs_after),
        widths_before=widths_before, widths_after=_widths(model), steps=iterative_steps,
        importance=importance)


def _check_result_call(model, calibration, result, importance, iterative_steps) -> None:
    """``prune_channels(..., result=r)``: no calibration or importance besides it, one step,
    a channel result that binds to ``model`` (checked here, before Torch-Pruning's tracing)."""
    from .._checks import check_channel_result

    check_channel_result(result)
    if calibration is not None:
        raise ValueError("pass calibration (to score the channels now) or result= (scores "
                         "computed before), not both: prune_channels(model, None, ratio, "
                         "result=result).")
    if importance is not None:
        raise ValueError("result= sets the importance (CurvatureImportance(None, result=...)); "
                         "do not pass importance= too.")
    if iterative_steps != 1:
        raise ValueError(f"a result scores one state of the model, so it prunes in one step, "
                         f"not iterative_steps={iterative_steps}; pass calibration to rescore "
                         "every step.")
    result.bind(model)
