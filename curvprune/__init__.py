"""curvprune: post-training pruning of PyTorch models by neural graph curvature."""

from .allocation import allocate_like
from .analysis import (
    NNSTDResult,
    curvature_statistics,
    most_negative,
    nnstd,
    nnstd_masks,
    relational_measures,
)
from .channels import UntraceableModel
from .checkpoint import load_checkpoint
from .curvature import neural_curvature
from .estimate import ScoringEstimate, estimate
from .importance import CurvatureImportance
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
from .result import CurvatureResult, ImportanceScores
from .structured import ChannelPruningReport, prune_channels

__version__ = "0.1.0"

__all__ = [
    "neural_curvature",
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
