"""Argument checks, choice lists and the model-device rule that several modules share, in one place.

Public within the package (no leading underscore), not part of ``curvprune``'s API: each check
raises a one-line ``TypeError``/``ValueError`` naming the fix.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

#: ``order=``: what is pruned first. ``"positive_first"`` prunes the most positive curvature
#: first (the paper's method), ``"negative_first"`` the most negative first (the paper's control).
ORDERS = ("positive_first", "negative_first")
#: The original spellings (``order="pos"|"neg"``), still accepted by :func:`check_order` with a
#: ``DeprecationWarning``.
DEPRECATED_ORDERS = {"pos": "positive_first", "neg": "negative_first"}
#: ``reduction=``: how a node's curvature combines its edges' (``mean``, ``min``, or
#: ``weighted``: the mean weighted by each edge's weight norm).
REDUCTIONS = ("mean", "min", "weighted")
#: ``scope=``: one ranking over all weights (``global``) or every weight by the amount (``layer``).
SCOPES = ("global", "layer")
#: ``allocation=``: which criterion sets how much of each weight a global pruning removes.
ALLOCATIONS = ("curvature", "wanda", "magnitude")
#: ``granularity=``: the neuron graph (chains), the channel graph (any model) or the first that
#: fits.
GRANULARITIES = ("neuron", "channel", "auto")


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; else a ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        listed = " or ".join(repr(c) for c in choices) if len(choices) <= 2 else list(choices)
        raise ValueError(f"{name} must be {'one of ' if len(choices) > 2 else ''}{listed}, "
                         f"not {value!r}.")
    return value


def check_node_reduction(node_reduction: Any, granularity: str) -> str | None:
    """``node_reduction`` (``None`` or one of :data:`REDUCTIONS`) for a run at
    ``granularity``; a ``ValueError`` for an unknown one, or for any with ``"neuron"``."""
    if node_reduction is None:
        return None
    check_choice(node_reduction, "node_reduction", REDUCTIONS)
    if granularity == "neuron":
        raise ValueError("node_reduction applies to channel curvature: pass "
                         "granularity='channel' (or 'auto'), or drop node_reduction.")
    return node_reduction


def check_order(order: Any, stacklevel: int = 3) -> str:
    """``order`` as one of :data:`ORDERS`: the one place the old spellings ``"pos"``/``"neg"``
    map to ``"positive_first"``/``"negative_first"`` (with a ``DeprecationWarning`` naming the
    new value, attributed ``stacklevel`` frames up: the caller's caller by default)."""
    if isinstance(order, str) and order in DEPRECATED_ORDERS:
        new = DEPRECATED_ORDERS[order]
        warnings.warn(f"order={order!r} is deprecated; use order={new!r} (the same ranking).",
                      DeprecationWarning, stacklevel=stacklevel)
        return new
    return check_choice(order, "order", ORDERS)


def check_module(model: Any, name: str = "model") -> nn.Module:
    """``model`` if it is an ``nn.Module``; else a ``TypeError`` naming what it is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, not {type(model).__name__}.")
    return model


def check_threads(threads: Any) -> int | None:
    """``threads`` (CPU threads for the transport solves) if ``None`` or a positive int."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}.")
    return threads


def check_alpha(alpha: float) -> float:
    """``alpha`` (the idleness of the neighbour measures) as a float in [0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in [0, 1), not {type(alpha).__name__}.")
    alpha = float(alpha)
    if not (0.0 <= alpha < 1.0):
        raise ValueError(f"alpha must be in [0, 1) (the idleness of the measures); got {alpha}.")
    return alpha


def model_device(model: nn.Module) -> torch.device:
    """The one device holding every parameter of ``model`` (the CPU for a model without any).

    Raises:
        ValueError: the parameters are on several devices.
    """
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are on several devices ({sorted(map(str, devices))}); "
            "move the model to one device first."
        )
    return devices.pop() if devices else torch.device("cpu")


def describe_module(module: Any) -> str:
    """``Linear(in_features=..., ...)``: a module as a user recognises it in an error message."""
    if isinstance(module, nn.Module):
        extra = module.extra_repr()
        if len(extra) > 80:
            extra = extra[:77] + "..."
        return f"{type(module).__name__}({extra})"
    return repr(module)


def missing_score_message(label: str, known: list[str] | None = None) -> str:
    """The one message for a parameter without an importance score (never replaced by its raw
    weight values, unlike ``torch.nn.utils.prune``'s default)."""
    cover = ""
    if known is not None:
        if len(known) > 12:
            known = known[:12] + [f"... ({len(known) - 12} more)"]
        cover = (f"; the scores cover {known}. Score it (neural_curvature sees Linear/Conv2d "
                 "weights of the chain) or leave it out of the parameters to prune")
    return (f"no importance score for parameter {label}{cover}: a missing score is never "
            "replaced by the raw weight values.")


def check_score(score: Any, target: torch.Tensor, label: str) -> None:
    """Check that ``score`` can rank the entries of ``target``.

    Raises:
        TypeError: ``score`` is not a tensor.
        ValueError: a shape or device different from ``target``'s, or a NaN score.
    """
    if not isinstance(score, torch.Tensor):
        raise TypeError(
            f"the importance score of {label} must be a tensor, not {type(score).__name__}."
        )
    if score.shape != target.shape:
        raise ValueError(
            f"the importance score of {label} has shape {tuple(score.shape)} but the "
            f"parameter has shape {tuple(target.shape)}; rescore the model after changing it."
        )
    if score.device != target.device:
        raise ValueError(
            f"the importance score of {label} is on {score.device} but the parameter is on "
            f"{target.device}; move the model (or the scores) to one device."
        )
    if score.is_floating_point() and bool(torch.isnan(score).any()):
        raise ValueError(f"the importance score of {label} contains NaN.")


def check_channel_result(result: Any) -> None:
    """A precomputed result must be a channel-granularity :class:`CurvatureResult`."""
    from .result import CurvatureResult  # result imports this module

    if not isinstance(result, CurvatureResult):
        raise TypeError(f"result must be a CurvatureResult (from neural_curvature), not "
                        f"{type(result).__name__}.")
    if result.granularity != "channel" or result.channel_graph is None:
        raise ValueError(
            f"channel pruning needs a result of granularity='channel', not "
            f"{result.granularity!r}: neural_curvature(model, calibration, "
            "granularity='channel')."
        )
