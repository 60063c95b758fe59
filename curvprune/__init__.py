"""curvprune: post-training pruning of PyTorch models by neural graph curvature.

``import curvprune`` loads torch, NumPy, SciPy and POT only. Torch-Pruning (which imports timm)
is loaded the first time :class:`CurvatureImportance` is used, or by :func:`prune_channels`.
"""

from typing import Any

from .analysis import (
    NNSTDResult,
    curvature_statistics,
    most_negative,
    nnstd,
    nnstd_masks,
    relational_measures,
)
from .checkpoint import load_checkpoint
from .curvature import neural_curvature
from .errors import UntraceableModel
from .estimate import ScoringEstimate, estimate
from .pruning import (
    CurvaturePruning,
    LayerSparsity,
    PruningReport,
    clone_pruned,
    curvature_unstructured,
    load_pruned,
    make_permanent,
    prune_model,
    pruning_hooks,
    save_pruned,
)
from .pruning.allocation import allocate_like
from .pruning.structured import ChannelPruningReport, prune_channels
from .result import CurvatureResult, ImportanceScores
from .transport import EngineOptions

__version__ = "0.1.0"

_LAZY = {"CurvatureImportance": "importance"}  # name -> submodule, imported on first use


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "neural_curvature",
    "EngineOptions",
    "estimate",
    "ScoringEstimate",
    "CurvatureImportance",
    "prune_channels",
    "ChannelPruningReport",
    "UntraceableModel",
    "CurvatureResult",
    "ImportanceScores",
    "CurvaturePruning",
    "curvature_unstructured",
    "prune_model",
    "PruningReport",
    "LayerSparsity",
    "pruning_hooks",
    "make_permanent",
    "save_pruned",
    "load_pruned",
    "clone_pruned",
    "load_checkpoint",
    "allocate_like",
    "nnstd",
    "nnstd_masks",
    "NNSTDResult",
    "relational_measures",
    "curvature_statistics",
    "most_negative",
    "__version__",
]
