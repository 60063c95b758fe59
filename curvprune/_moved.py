"""Old module paths whose names moved: a module ``__getattr__`` that finds each name in its new
home and warns once per use (``DeprecationWarning``) naming that home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for the old module ``old``: ``homes`` maps each public name
    to the module that now holds it."""

    def getattr_(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        home = homes[name]
        warnings.warn(f"{old}.{name} moved to {home}.{name}; {old} is a deprecated alias.",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), name)

    def dir_() -> list[str]:
        return sorted(homes)

    return getattr_, dir_
