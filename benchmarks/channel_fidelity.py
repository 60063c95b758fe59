"""Fidelity of structured pruning at a tolerance: the removed channels against exact curvature.

    python benchmarks/channel_fidelity.py                  # the zoo models below, 4 images
    python benchmarks/channel_fidelity.py --models timm/resnet18 --images 2
    python benchmarks/channel_fidelity.py --images 2 --node-means --tolerances 1e-3 1e-2 \
        --out benchmarks/results/channel_fidelity_node_means

For each reduced-width zoo model (:mod:`curvprune.models.zoo`, deterministic random weights;
seeded standard-normal calibration images, ``zoo.example_input``) at channel granularity:

* exact: ``neural_curvature(..., granularity="channel", tolerance=0)``, then for every channel
  ratio 0.1 .. 0.5, per group and global (``global_pruning=True``), the channels
  ``prune_channels(copy, None, ratio, result=exact)`` removes (Torch-Pruning's pruning
  history, element for element);
* at each tolerance (``--tolerances``: 1e-3, the default 1e-2, and 1e-14), one scoring (with
  ``--node-means``: ``node_reduction="mean"``, the tolerance spent on each channel's mean
  curvature, as ``CurvatureImportance`` and hence ``prune_channels`` score by default; without
  it, on each weight's interval), then at every ratio and
  scope, on the ``MetaPruner`` that ``prune_channels(copy, None, ratio, result=r)`` builds: the
  *midpoint* ranking (a plain ``pruner.step()``: what ``prune_channels`` did before it was made
  decision-exact) and the *decision-exact* step (``certified_step(pruner)``, what
  ``prune_channels`` runs now, from a fresh copy of the tolerance's scores so that its
  refinement is its own), against the exact channels: identical or not, the channels that
  differ, the channel edges and weights solved exactly, and the time of the two steps.

Results: ``benchmarks/results/channel_fidelity.json`` and ``.md`` (the table of
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curvprune import CurvatureImportance, neural_curvature, prune_channels  # noqa: E402
from curvprune.curvature import TOLERANCE  # noqa: E402
from curvprune.models import zoo  # noqa: E402
from curvprune.pruning.channel_decision import certified_step  # noqa: E402
from curvprune.pruning.structured import attention_heads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["timm/resnet18", "timm/mobilenetv3_large_100", "timm/convnext_atto",
          "timm/vit_tiny_patch16_224"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5]
TOLERANCES = list(dict.fromkeys([1e-3, TOLERANCE, 1e-14]))  # TOLERANCE: the default, 1e-2
SCOPES = {"group": False, "global": True}


def fresh_scores(result):
    """A copy of ``result`` whose values refinement can change without touching ``result``."""
    def clone(d):
        return {k: v.clone() for k, v in d.items()}
    return dataclasses.replace(
        result, kappa=clone(result.kappa), kappa_lo=clone(result.kappa_lo),
        kappa_hi=clone(result.kappa_hi), edge_kappa=result.edge_kappa.clone(),
        edge_kappa_lo=result.edge_kappa_lo.clone(), edge_kappa_hi=result.edge_kappa_hi.clone(),
        refined=0)


def history(pairs) -> dict:
    return {(str(n), bool(out)): set(int(i) for i in idx) for n, out, idx in pairs}


def differing(a: dict, b: dict) -> int:
    """Channels removed by one and not the other."""
    return sum(len(a.get(k, set()) ^ b.get(k, set())) for k in set(a) | set(b))


def pruner_for(name, model, x, result, ratio, global_pruning):
    """The ``MetaPruner`` that ``prune_channels(model, None, ratio, result=result)`` builds."""
    return tp.pruner.MetaPruner(
        model, x[:1], importance=CurvatureImportance(None, result=result), pruning_ratio=ratio,
        global_pruning=global_pruning, ignored_layers=zoo.ignored_layers(name, model),
        num_heads=attention_heads(model), prune_num_heads=False, prune_head_dims=True)


def run_model(name: str, images: int, tolerances: list[float] = TOLERANCES,
              node_means: bool = False) -> dict:
    base = zoo.create(name)
    x = zoo.example_input(name, batch=images)
    start = time.perf_counter()
    exact = neural_curvature(base, x, granularity="channel", tolerance=0.0)
    row = {"model": name, "images": images, "exact_seconds": time.perf_counter() - start,
           "edges": int((exact.channel_graph.module >= 0).sum()), "tolerances": []}
    want = {}
    for scope, flag in SCOPES.items():
        for ratio in RATIOS:
            model = copy.deepcopy(base)
            report = prune_channels(model, None, ratio, result=exact, global_pruning=flag,
                                    example_inputs=x[:1],
                                    ignored_layers=zoo.ignored_layers(name, model))
            want[scope, ratio] = history(report.removed)
    for tolerance in tolerances:
        start = time.perf_counter()
        scores = neural_curvature(base, x, granularity="channel", tolerance=tolerance,
                                  node_reduction="mean" if node_means else None)
        entry = {"tolerance": tolerance, "node_reduction": "mean" if node_means else None,
                 "seconds": time.perf_counter() - start, "max_width": scores.max_width,
                 "max_node_width": scores.max_node_width("mean"), "runs": []}
        for scope, flag in SCOPES.items():
            for ratio in RATIOS:
                pruner = pruner_for(name, copy.deepcopy(base), x, scores, ratio, flag)
                t0 = time.perf_counter()
                pruner.step()  # the midpoints' selection
                t1 = time.perf_counter()
                mid = history(pruner.pruning_history())
                pruner = pruner_for(name, copy.deepcopy(base), x, fresh_scores(scores), ratio,
                                    flag)
                t2 = time.perf_counter()
                refinement = certified_step(pruner)  # prune_channels' decision-exact step
                t3 = time.perf_counter()
                got = history(pruner.pruning_history())
                ref = want[scope, ratio]
                entry["runs"].append({
                    "scope": scope, "ratio": ratio,
                    "channels_removed": sum(len(v) for v in ref.values()),
                    "midpoint_identical": mid == ref, "midpoint_differing": differing(mid, ref),
                    "decision_identical": got == ref, "decision_differing": differing(got, ref),
                    "refined_edges": refinement.edges, "refined_weights": refinement.weights,
                    "refine_rounds": refinement.rounds, "everything": refinement.everything,
                    "midpoint_step_seconds": t1 - t0, "decision_step_seconds": t3 - t2})
        row["tolerances"].append(entry)
        print(f"{name} tolerance {tolerance:g}: scored in {entry['seconds']:.1f} s, decision "
              f"identical {all(r['decision_identical'] for r in entry['runs'])}", flush=True)
    return row


def _same(run: dict, mode: str) -> str:
    return "Y" if run[f"{mode}_identical"] else f"N ({run[f'{mode}_differing']})"


def table(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for row in rows:
        lines += [f"**{row['model']}**, {row['images']} images, {row['edges']} channel edges; "
                  f"exact scoring {row['exact_seconds']:.1f} s. Per ratio 0.1 / 0.2 / 0.3 / "
                  "0.4 / 0.5: identical to exact (Y/N, or the number of channels that "
                  "differ), channel edges solved exactly, extra time of the decision-exact "
                  "step over the midpoint step (s: dry run, bounds, solves).", "",
                  "| tolerance | scoring (s) | largest width (edge / channel mean) | scope | "
                  "midpoints | decision-exact | edges solved | extra (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in row["tolerances"]:
            for scope in SCOPES:
                runs = [r for r in entry["runs"] if r["scope"] == scope]
                mid = " / ".join(_same(r, "midpoint") for r in runs)
                dec = " / ".join(_same(r, "decision") for r in runs)
                edges = " / ".join(str(r["refined_edges"]) for r in runs)
                extra = " / ".join(f"{r['decision_step_seconds'] - r['midpoint_step_seconds']:.1f}"
                                   for r in runs)
                node = entry.get("max_node_width")
                width = f"{entry['max_width']:.2g}" + ("" if node is None else f" / {node:.2g}")
                mode = " (channel means)" if entry.get("node_reduction") else ""
                lines.append(f"| {entry['tolerance']:g}{mode} | {entry['seconds']:.1f} | "
                             f"{width} | {scope} | {mid} | {dec} | {edges} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tolerances", type=float, nargs="+", default=TOLERANCES)
    parser.add_argument("--node-means", action="store_true",
                        help="score as CurvatureImportance does by default: the tolerance on "
                             "each channel's mean curvature (node_reduction='mean')")
    parser.add_argument("--out", default=str(RESULTS / "channel_fidelity"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    command = "python benchmarks/channel_fidelity.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    load = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:  # written after every model: a partial run keeps what it did
        rows.append(run_model(name, args.images, args.tolerances, args.node_means))
        data = {"command": command.strip(), "load_before": load,
                "load_after": os.getloadavg(), "threads": torch.get_num_threads(),
                "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(table(rows, command.strip()) + "\n")
    print(table(rows, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
