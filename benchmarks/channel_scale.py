"""Channel-level curvature at ImageNet scale: time and memory against Torch-Pruning's criteria.

    python benchmarks/channel_scale.py                      # resnet50, vit_small, convnext_tiny
    python benchmarks/channel_scale.py --models resnet50 --images 64

For each model (timm, randomly initialised: no weights can be downloaded here; time and memory do
not depend on the values) at 224x224 with ``--images`` calibration images (seeded noise):

* Torch-Pruning's ``GroupMagnitudeImportance`` and ``GroupTaylorImportance`` (one backward pass
  over the calibration images) on every group of the dependency graph: wall time;
* curvprune's channel graph: tracing time on the whole calibration batch, nodes and edges, the
  memory of the all-pairs distance table, Dijkstra time (measured from a sample of sources and
  scaled to all nodes), and the exact transport time per (edge, example), measured on a random
  sample of layer edges (one exact ``ot.emd2`` per edge, on the edge's real measures with random
  costs: what an exact solver must do for an edge that no closed form or certificate resolves),
  scaled to all edges and examples.

Everything beyond the tracing is an *extrapolation* from samples and is labelled so: the full
computation does not fit the 10-minute, 8 GB budget on 2 CPU cores by orders of magnitude, which
is the finding. Peak memory is the process's maximum resident set size (``ru_maxrss``).
Results: ``benchmarks/results/channel_scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import ot
import scipy.sparse
import scipy.sparse.csgraph
import timm
import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curvprune.calibration import scoring_mode  # noqa: E402
from curvprune.graphs.channel import trace_channels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"resnet50": "resnet50", "vit_small": "vit_small_patch16_224",
          "convnext_tiny": "convnext_tiny"}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def torch_pruning_times(model, images: torch.Tensor) -> dict:
    out = {}
    example = images[:1]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(dg.get_all_groups(ignored_layers=[model.get_classifier()],
                                    root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))
    start = time.perf_counter()
    magnitude = tp.importance.GroupMagnitudeImportance(p=2)
    for group in groups:
        magnitude(group)
    out["magnitude_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model.zero_grad()
    for chunk in images.split(16):
        model(chunk).logsumexp(1).mean().backward()  # a stand-in loss: no labels needed
    taylor = tp.importance.GroupTaylorImportance()
    for group in groups:
        taylor(group)
    out["taylor_s"] = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    out["groups"] = len(groups)
    return out


def curvature_estimate(model, images: torch.Tensor, *, sample_edges: int, sample_sources: int,
                       alpha: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with scoring_mode(model):
        for chunk in images.split(16):  # as a DataLoader of batch 16 would be traced
            graph = trace_channels(model, chunk)
    trace_s = time.perf_counter() - start
    n = graph.num_nodes
    src, dst = graph.src.numpy(), graph.dst.numpy()
    layer = np.nonzero(graph.module.numpy() >= 0)[0]
    adjacency = scipy.sparse.csr_matrix((graph.length.numpy(), (src, dst)), shape=(n, n))
    incoming = adjacency.tocsc()
    # Dijkstra from a sample of sources, scaled to every node.
    sources = rng.choice(n, size=min(sample_sources, n), replace=False)
    start = time.perf_counter()
    scipy.sparse.csgraph.dijkstra(adjacency, directed=True, indices=sources)
    dijkstra_s = (time.perf_counter() - start) / len(sources) * n
    # Exact transport on a sample of layer edges (example 0): the measures are the real ones;
    # the costs are drawn at random, because exact distances for them would need Dijkstra from
    # every in-neighbour of every sampled edge (thousands of sources: itself the blocker above).
    # The network simplex's time depends on the problem's size far more than on its costs.
    chosen = rng.choice(layer, size=min(sample_edges, len(layer)), replace=False)
    acts = graph.activity[0].numpy()
    from curvprune.reference import _measure

    sizes = []
    start = time.perf_counter()
    for e in chosen:
        i, j = int(src[e]), int(dst[e])
        k_nodes = incoming.indices[incoming.indptr[i]:incoming.indptr[i + 1]].tolist()
        m_nodes = adjacency.indices[adjacency.indptr[j]:adjacency.indptr[j + 1]].tolist()
        _, mu = _measure(i, k_nodes, acts, alpha, bool(graph.inputs[i]))
        _, nu = _measure(j, m_nodes, acts, alpha, bool(graph.outputs[j]))
        cost = rng.uniform(1.0, 10.0, size=(len(mu), len(nu)))
        ot.emd2(np.array(mu), np.array(nu), cost, numItermax=10_000_000)
        sizes.append(len(mu) * len(nu))
    per_edge_s = (time.perf_counter() - start) / len(chosen)
    examples = images.shape[0]
    return {
        "nodes": n, "layer_edges": int(len(layer)), "trace_s": trace_s,
        "trace_examples": examples,
        "distance_table_gib": 8 * n * n / 2**30,
        "dijkstra_all_pairs_s_extrapolated": dijkstra_s,
        "sampled_edges": int(len(chosen)),
        "median_problem_cells": float(np.median(sizes)),
        "exact_ot_s_per_edge_example": per_edge_s,
        "exact_all_edges_s_extrapolated": per_edge_s * len(layer) * examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sample-edges", type=int, default=200)
    parser.add_argument("--sample-sources", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "channel_scale.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rows = []
    for key in args.models:
        model = timm.create_model(MODELS[key], num_classes=1000).eval()
        images = torch.randn(args.images, 3, 224, 224)
        row = {"model": key, "timm_name": MODELS[key], "images": args.images,
               "parameters": sum(p.numel() for p in model.parameters())}
        row.update(torch_pruning_times(model, images))
        row.update(curvature_estimate(model, images, sample_edges=args.sample_edges,
                                      sample_sources=args.sample_sources, alpha=args.alpha,
                                      seed=args.seed))
        row["peak_rss_gib_so_far"] = peak_gib()
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
        del model, images
    meta = {"command": "python benchmarks/channel_scale.py " + " ".join(sys.argv[1:]),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(args.out)
    lines = [
        "| model | params | calib. images | TP magnitude | TP Taylor | channel nodes | layer "
        "edges | trace | distance table | Dijkstra (extrap.) | exact OT per edge-example | "
        "exact, all edges (extrap.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['images']} | "
            f"{r['magnitude_s']:.2f} s | {r['taylor_s']:.1f} s | {r['nodes']} | "
            f"{r['layer_edges'] / 1e6:.1f}M | {r['trace_s']:.1f} s | "
            f"{r['distance_table_gib']:.1f} GiB | "
            f"{r['dijkstra_all_pairs_s_extrapolated'] / 60:.0f} min | "
            f"{r['exact_ot_s_per_edge_example'] * 1e3:.1f} ms | "
            f"{r['exact_all_edges_s_extrapolated'] / 86400:.0f} days |")
    md = args.out.with_suffix(".md")
    md.write_text(f"Command: `{meta['command']}` ({meta['cores']} cores, torch "
                  f"{meta['torch']}, {meta['torch_threads']} threads)\n\n" + "\n".join(lines)
                  + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
