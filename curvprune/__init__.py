"""curvprune: post-training pruning of PyTorch models by neural graph curvature."""

from .curvature import neural_curvature
from .result import CurvatureResult

__version__ = "0.1.0"

__all__ = ["neural_curvature", "CurvatureResult", "__version__"]
