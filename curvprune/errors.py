"""The library's own exceptions (and the command line's ``UsageError``), importable without the
graph tracers that raise them."""

from __future__ import annotations

__all__ = ["UntraceableModel", "UsageError"]


class UntraceableModel(ValueError):
    """The channel tracer met functions it cannot follow (``functions`` lists them)."""

    def __init__(self, message: str, functions: list[str]):
        super().__init__(message)
        self.functions = functions


class UsageError(Exception):
    """A problem with the command line (``curvprune``, ``python -m curvprune.demo``): reported
    in one line, exit status 2."""
