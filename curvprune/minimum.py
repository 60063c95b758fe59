"""Deprecated path of the minimum search, kept so old imports work (with a
``DeprecationWarning``): it is :mod:`curvprune.transport.minimum` now."""

from ._moved import moved

__getattr__, __dir__ = moved(__name__, {"MinimumSearch": "curvprune.transport.minimum"})
