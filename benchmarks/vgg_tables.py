"""Time the windowed hop tables of VGG-9's neuron graph, table by table.

    python benchmarks/vgg_tables.py                       # every table
    python benchmarks/vgg_tables.py --tables hop2[0] hop2[6]   # only these (hop2 ones)
    python benchmarks/vgg_tables.py --kernels             # every table from the kernels

With ``--kernels`` the tables are built as :meth:`~curvprune.graphs.neuron.NeuronGraph.build` builds
them now (:mod:`curvprune._conv_hops`: offsets per class of border rows and columns, blocked
min-plus products), each line with the min-plus operations actually run, wall and CPU seconds.

Builds what :meth:`curvprune.graphs.neuron.NeuronGraph.build` builds for ``create_model("vgg9",
in_channels=1)`` (random init; the tables' sizes and work do not depend on the weights' values
unless some are zero), printing for each ``L -> L+2`` and ``L -> L+3`` table its layout, its
bytes, its min-plus operations (first-hop edges times the next table's window) and its time,
as JSON lines, so that a run cut short still shows the rate.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curvprune.graphs import neuron as engine  # noqa: E402
from curvprune.graphs.neuron import chain_structure  # noqa: E402
from curvprune.models import create_model  # noqa: E402


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=None,
                        help="only these tables, e.g. hop2[0] (hop3[L] needs hop2[L+1])")
    parser.add_argument("--kernels", action="store_true",
                        help="build from the kernels (curvprune._conv_hops), as the engine does")
    args = parser.parse_args()
    if args.kernels:
        kernel_tables()
        return
    wanted = None if args.tables is None else set(args.tables)
    torch.manual_seed(0)
    model = create_model("vgg9", in_channels=1).eval()
    start = time.perf_counter()
    layers, structures = chain_structure(model, torch.zeros(1, 1, 32, 32))
    weights = [la.module.weight.detach().flatten() for la in layers]
    sizes = [structures[0].n_in] + [s.n_out for s in structures]
    two, three = engine._hop_layouts(structures)
    shapes = engine._node_shapes(structures)
    print(json.dumps({"structure_s": time.perf_counter() - start, "sizes": sizes,
                      "load_average": os.getloadavg()}), flush=True)
    ones = [engine._layout(engine._one_hop_box(structures[L + 1], shapes[L + 2]), shapes[L + 2])
            for L in range(len(structures) - 1)]
    kept = []
    for s, w in zip(structures, weights):
        value = w.to(torch.float64)[s.widx]
        keep = value != 0
        kept.append(engine._WeightedEdges(s.src[keep], s.dst[keep], s.widx[keep],
                                  1.0 / value[keep].abs()))
    del structures
    n = len(kept)
    hop2: dict[int, engine.HopTable] = {}

    def report(kind, L, table, ops, seconds):
        print(json.dumps({"table": f"{kind}[{L}]", "target": table.layout.target,
                          "window": table.layout.window, "dense": table.layout.full,
                          "bytes": table.numel() * 8, "min_plus_ops": ops, "seconds": seconds,
                          "ops_per_s": ops / seconds if seconds else None,
                          "peak_rss_gib": resource.getrusage(
                              resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          "load_average": os.getloadavg()[0]}), flush=True)

    # The order of NeuronGraph.build: every hop2 (from the last), then every hop3.
    for L in reversed(range(n - 1)):
        if wanted is not None and f"hop2[{L}]" not in wanted and f"hop3[{L - 1}]" not in wanted:
            continue
        start = time.perf_counter()
        rest = engine.HopTable.of_edges(kept[L + 1], sizes[L + 1], ones[L])
        hop2[L] = engine.HopTable.compose(kept[L], sizes[L], rest, two[L])
        report("hop2", L, hop2[L], kept[L].src.numel() * rest.layout.width,
               time.perf_counter() - start)
    for L in reversed(range(n - 2)):
        if wanted is not None and f"hop3[{L}]" not in wanted:
            continue
        start = time.perf_counter()
        table = engine.HopTable.compose(kept[L], sizes[L], hop2[L + 1], three[L])
        report("hop3", L, table, kept[L].src.numel() * hop2[L + 1].layout.width,
               time.perf_counter() - start)


def kernel_tables() -> None:
    """Every table of VGG-9 through NeuronGraph.build (the kernel path), timed one by one."""
    from curvprune import _conv_hops

    torch.manual_seed(0)
    model = create_model("vgg9", in_channels=1).eval()
    layers, structures = chain_structure(model, torch.zeros(1, 1, 32, 32))
    ops = [0]
    min_plus, table = _conv_hops.min_plus, _conv_hops.ConvHops.table

    def counted(a, b):
        ops[0] += b.shape[0] * a.shape[-2] * b.shape[1] * b.shape[2]
        return min_plus(a, b)

    def timed(self, L, hops, layout, rest):
        ops[0], wall, cpu = 0, time.perf_counter(), time.process_time()
        out = table(self, L, hops, layout, rest)
        print(json.dumps({"table": f"hop{hops}[{L}]", "from_kernels": out is not None,
                          "min_plus_ops": ops[0], "seconds": time.perf_counter() - wall,
                          "cpu_seconds": time.process_time() - cpu,
                          "peak_rss_gib": resource.getrusage(
                              resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          "load_average": os.getloadavg()[0]}), flush=True)
        return out

    _conv_hops.min_plus, _conv_hops.ConvHops.table = counted, timed
    wall, cpu = time.perf_counter(), time.process_time()
    graph = engine.NeuronGraph.build(structures, [la.module.weight.detach().flatten()
                                                  for la in layers], torch.device("cpu"))
    print(json.dumps({"build_s": time.perf_counter() - wall,
                      "build_cpu_s": time.process_time() - cpu,
                      "hop_table_bytes": sum(t.numel() * 8 for t in graph.hop2 + graph.hop3)}))


if __name__ == "__main__":
    main()
