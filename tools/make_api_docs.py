"""Write docs/api.md from the docstrings of curvprune's public API.

    python tools/make_api_docs.py           # rewrite docs/api.md
    python tools/make_api_docs.py --check   # exit 1 if docs/api.md is out of date

The test suite runs the check, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import curvprune  # noqa: E402
from curvprune import analysis, data, evaluation, models  # noqa: E402
from curvprune.models import zoo  # noqa: E402
from curvprune.pruning import baselines  # noqa: E402

SECTIONS = [
    ("Scoring", curvprune, ["neural_curvature", "EngineOptions", "CurvatureResult",
                            "ImportanceScores",
                            "UntraceableModel", "estimate", "ScoringEstimate"]),
    ("Unstructured pruning (torch.nn.utils.prune)", curvprune, [
        "CurvaturePruning", "curvature_unstructured", "prune_model", "PruningReport",
        "LayerSparsity", "make_permanent", "save_pruned", "load_pruned", "clone_pruned",
        "pruning_hooks", "allocate_like"]),
    ("Structured pruning (Torch-Pruning)", curvprune, [
        "CurvatureImportance", "prune_channels", "ChannelPruningReport"]),
    ("Analysis (curvprune.analysis)", analysis, [
        "nnstd", "nnstd_masks", "NNSTDResult", "relational_measures",
        "relational_measures_masks", "relational_graph", "RelationalResult", "graph_measures",
        "curvature_statistics", "most_negative", "histogram"]),
    ("Baselines (curvprune.pruning.baselines)", baselines, [
        "magnitude", "magnitude_scores", "random_scores", "lamp_scores", "wanda_scores",
        "snip_scores", "prune_per_row"]),
    ("Data, models, evaluation", None, [
        (curvprune, "load_checkpoint"), (data, "fashion_mnist"), (data, "load_dataset"),
        (data, "class_balanced_calibration"),
        (data, "random_calibration"), (models, "create_model"), (zoo, "create"),
        (zoo, "example_input"), (evaluation, "accuracy")]),
]


def _entry(obj, name: str) -> str:
    kind = "class" if inspect.isclass(obj) else "function"
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(...)"
    doc = inspect.getdoc(obj) or "(no docstring)"
    module = getattr(obj, "__module__", "")
    text = [f"### `{name}`", "", f"{kind} `{module}.{name}{signature}`", "", "```text", doc,
            "```", ""]
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not (inspect.isfunction(member) or
                                            isinstance(member, (property, classmethod,
                                                                staticmethod))):
                continue
            function = member.fget if isinstance(member, property) else getattr(
                member, "__func__", member)
            mdoc = inspect.getdoc(function)
            if not mdoc:
                continue
            try:
                msig = "" if isinstance(member, property) else str(inspect.signature(function))
            except (TypeError, ValueError):
                msig = "(...)"
            text += [f"- `{name}.{attr}{msig}`: " + mdoc.split("\n\n")[0].replace("\n", " "),
                     ""]
    return "\n".join(text)


def render() -> str:
    out = ["# API reference", "",
           "Generated from the docstrings by `python tools/make_api_docs.py`; do not edit by "
           "hand. The math of each function is in its docstring; the definitions in "
           "[method.md](method.md) and [channels.md](channels.md).", ""]
    for title, module, names in SECTIONS:
        out += [f"## {title}", ""]
        for item in names:
            mod, name = (module, item) if isinstance(item, str) else item
            out.append(_entry(getattr(mod, name), name))
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    path = ROOT / "docs" / "api.md"
    text = render()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print("docs/api.md is out of date: run python tools/make_api_docs.py")
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
