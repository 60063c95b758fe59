"""Time the channel graph's needed distances alone on a full-width timm model.

    python benchmarks/distances.py --model resnet50
    python benchmarks/distances.py --model resnet50 --dijkstra --limit 1500

Traces the channel graph of the timm model (random init, seeded: the distances depend on the
weights' structure only through the edge lengths, and their cost not at all) on one seeded image
at ``--size`` (224 by default; the graph is the same at any size the model accepts), then times
:func:`curvprune.graphs.channel.needed_distances` with ``--threads`` torch threads. ``--check``
sources drawn at random (seeded) are checked bitwise against SciPy's Dijkstra (each in its id
window, as the all-pairs table reads them) on every needed pair. ``--dijkstra`` also times the
previous implementation (Dijkstra per source window, the path still used for graphs whose node
ids are not a topological order) in a child process stopped at ``--limit`` seconds.
Results: ``benchmarks/results/distances_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"resnet50": "resnet50", "vit_small": "vit_small_patch16_224",
          "convnext_tiny": "convnext_tiny", "efficientnet_b0": "efficientnet_b0",
          "mobilenetv3_large": "mobilenetv3_large_100"}


def _graph(model_name: str, size: int):
    import timm
    import torch

    from curvprune.calibration import scoring_mode
    from curvprune.graphs.channel import trace_channels

    torch.manual_seed(0)
    model = timm.create_model(MODELS[model_name], pretrained=False).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with scoring_mode(model):
        return trace_channels(model, x)


def _check(graph, needed, count: int) -> dict:
    """Bitwise comparison with SciPy's Dijkstra on every needed pair of ``count`` sources."""
    import numpy as np
    import scipy.sparse.csgraph
    import torch

    from curvprune.graphs.channel import _needed_structure

    adjacency, pattern = _needed_structure(graph)
    sources = np.nonzero(np.diff(pattern.indptr))[0]
    chosen = np.sort(np.random.default_rng(0).choice(sources, min(count, sources.size),
                                                     replace=False))
    pairs = 0
    for s in chosen.tolist():
        targets = pattern.indices[pattern.indptr[s]:pattern.indptr[s + 1]]
        top = int(targets.max())
        window = adjacency[s:top + 1, s:top + 1]
        dist = scipy.sparse.csgraph.dijkstra(window, directed=True, indices=[0])[0]
        expected = torch.from_numpy(dist[targets - s])
        got = needed[torch.full((targets.size,), s), torch.from_numpy(targets.astype(np.int64))]
        if not torch.equal(got, expected):
            return {"sources": len(chosen), "pairs": pairs, "bitwise_equal": False, "source": s}
        pairs += targets.size
    return {"sources": len(chosen), "pairs": pairs, "bitwise_equal": True}


def _dijkstra_child(args) -> None:
    import torch

    from curvprune.graphs.channel import needed_distances

    torch.set_num_threads(args.threads)
    graph = _graph(args.model, args.size)
    start = time.perf_counter()
    needed_distances(graph, _by_levels=False)
    print(json.dumps({"s": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", type=int, default=64, help="sources checked bitwise")
    parser.add_argument("--dijkstra", action="store_true", help="also time the Dijkstra path")
    parser.add_argument("--limit", type=int, default=1500, help="seconds for --dijkstra")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _dijkstra_child(args)
        return
    import torch

    from curvprune.graphs.channel import needed_distances

    torch.set_num_threads(args.threads)
    record: dict = {"command": "python " + " ".join(sys.argv), "model": MODELS[args.model],
                    "size": args.size, "threads": args.threads, "torch": torch.__version__,
                    "cpus": os.cpu_count(), "machine": platform.platform(),
                    "load_before": os.getloadavg()}
    start = time.perf_counter()
    graph = _graph(args.model, args.size)
    record.update(trace_s=time.perf_counter() - start, nodes=graph.num_nodes,
                  edges=int(graph.src.numel()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    needed = needed_distances(graph)
    record.update(distances_s=time.perf_counter() - start, pairs=needed.num_pairs,
                  distances_gib=needed.nbytes / 2**30, peak_rss_before_gib=rss,
                  peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  load_after=os.getloadavg())
    print(f"{MODELS[args.model]}: {graph.num_nodes} nodes, {needed.num_pairs} pairs, "
          f"distances {record['distances_s']:.1f} s, peak {record['peak_rss_gib']:.2f} GiB",
          flush=True)
    if args.check:
        record["check"] = _check(graph, needed, args.check)
        print("check", record["check"], flush=True)
    if args.dijkstra:
        del needed, graph
        cmd = [sys.executable, __file__, "--model", args.model, "--size", str(args.size),
               "--threads", str(args.threads), "--child"]
        try:
            proc = subprocess.run(cmd, timeout=args.limit, capture_output=True, text=True)
            record["dijkstra"] = (json.loads(proc.stdout.strip().splitlines()[-1])
                                  if proc.returncode == 0 else {"failed": proc.stderr[-500:]})
        except subprocess.TimeoutExpired:
            record["dijkstra"] = {"stopped_at_limit_s": args.limit}
        print("dijkstra", record["dijkstra"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"distances_{args.model}.json"
    path.write_text(json.dumps(record, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
