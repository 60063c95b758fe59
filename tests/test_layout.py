"""The engine's layout: the kernels import no graph, POT is imported in one place, the old
module paths are deprecated aliases of the new homes, and the engine's options are checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import curvprune
from curvprune.transport import EngineOptions, EngineStats

PACKAGE = Path(curvprune.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_transport_imports_no_graph():
    for path in sorted((PACKAGE / "transport").glob("*.py")):
        graphs = sorted(n for n in _imports(path) if n.startswith("curvprune.graphs")
                        or n.startswith("curvprune.curvature"))
        assert not graphs, f"{path.name} imports {graphs}"


def test_pot_is_imported_by_the_solver_only():
    """The engine reaches POT through ``transport/solver.py`` only; the reference (the
    independent oracle) calls ``ot.emd2`` itself, on purpose."""
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                       if any(n == "ot" or n.startswith("ot.") for n in _imports(p)))
    assert importers == ["reference.py", "transport/solver.py"], importers


@pytest.mark.parametrize("old, name, new", [
    ("curvprune.engine", "NeuronGraph", "curvprune.graphs.neuron"),
    ("curvprune.engine", "bound_edges", "curvprune.transport"),
    ("curvprune.engine", "EngineStats", "curvprune.transport"),
    ("curvprune.channels", "ChannelGraph", "curvprune.graphs.channel"),
    ("curvprune.channels", "UntraceableModel", "curvprune.errors"),
    ("curvprune.minimum", "MinimumSearch", "curvprune.transport.minimum"),
])
def test_old_paths_are_deprecated_aliases(old, name, new):
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{name} moved to {new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_engine_stats_bounded_is_a_deprecated_name_of_ruled_out():
    stats = EngineStats(ruled_out=7)
    with pytest.warns(DeprecationWarning, match="ruled_out"):
        assert stats.bounded == 7
    assert "bounded" not in stats.as_dict() and stats.as_dict()["ruled_out"] == 7


@pytest.mark.parametrize("kwargs", [dict(block=0), dict(block=1.5), dict(min_plus_block=True),
                                    dict(window_fraction=1.5), dict(window_fraction="0.5"),
                                    dict(problem_cache_bytes=-1)])
def test_bad_engine_options_are_refused(kwargs):
    with pytest.raises(ValueError, match="EngineOptions"):
        EngineOptions(**kwargs)


def test_options_must_be_engine_options():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(TypeError, match="EngineOptions"):
        curvprune.neural_curvature(model, torch.randn(2, 3), options={"block": 4})
