"""Time the windowed hop tables of VGG-9's neuron graph, table by table.

    python benchmarks/vgg_tables.py                       # every table
    python benchmarks/vgg_tables.py --tables hop2[0] hop2[6]   # only these (hop2 ones)

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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
