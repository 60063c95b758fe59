"""Where the bounds leave channel edges open, on the first calibration example of a full-width
timm model, and how far tighter bounds would go.

    python benchmarks/open_edges.py --model efficientnet_b0 --tolerance 1e-2

Traces the model's channel graph on two seeded noise images at 224 x 224 (random weights,
seeded), builds the per-layer edge problems of the first image (measures cut within
``tolerance / 4`` per edge, as ``neural_curvature`` does) and bounds them
(:meth:`EdgeProblem.bounds`, one thread). Per layer it reports the edges left open (interval
wider than the tolerance: each needs an exact solve unless another example rules it out), the
mean support sizes of their two neighbour measures and the median width. For the layer with
the most open edges it solves a sample of them exactly (``--sample``; the network simplex,
timed) and reports how far each side of the interval is from the exact value, and what two
tighter bounds would give on that sample (computed here; the engine now re-costs the shared
plan of every open edge itself, so a run today reports its ``lo`` with the second bound in,
and the stored results, which predate that, without):

* ``lower side``, on ``kappa``'s upper bound: the dual bound maximised over every breakpoint
  ``t`` instead of the three the engine evaluates;
* ``upper side``, on ``kappa``'s lower bound: the shared problem's optimal plan re-costed under
  the edge's own cost ``min(C, A + B)`` (a plan of the edge's problem for ``alpha >= 1/2``),
  instead of ``min(X0, p.A + q.B)``.

With ``--images N`` (N > 1) it then bounds images 2..N the way ``neural_curvature`` does
(each layer's bounds fed to a :class:`~curvprune.transport.MinimumSearch`, whose ceilings screen
the later images' edges; one thread) and records each image's seconds and engine counts
(``later_images``); the noise images are seeded, the first two as above.

Results: ``benchmarks/results/open_edges_<model>_<tolerance>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"resnet50": "resnet50", "efficientnet_b0": "efficientnet_b0",
          "mobilenetv3_large": "mobilenetv3_large_100", "convnext_tiny": "convnext_tiny",
          "vit_small": "vit_small_patch16_224"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="efficientnet_b0")
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--sample", type=int, default=60)
    parser.add_argument("--images", type=int, default=1)
    args = parser.parse_args()

    import ot
    import timm
    import torch

    from curvprune.calibration import scoring_mode
    from curvprune.graphs.channel import (
        ChannelProblems,
        _LayerSets,
        channel_activity,
        needed_distances,
        trace_channels,
    )
    from curvprune.transport import EngineOptions, EngineStats, MinimumSearch
    from curvprune.transport.base import _gather_rows, _weighted_sum
    from curvprune.transport.bounds import _measure_keys, _shared_problems

    torch.manual_seed(0)
    model = timm.create_model(MODELS[args.model], pretrained=False).eval()
    x = torch.randn(max(2, args.images), 3, 224, 224)
    cpu, tol, alpha = torch.device("cpu"), args.tolerance, args.alpha
    with scoring_mode(model):
        graph = trace_channels(model, x[:2], device=cpu)
        sets = _LayerSets(graph)
        problems = ChannelProblems(graph, needed_distances(graph, memory_budget=16 << 30,
                                                           reserve=sets.nbytes()), sets=sets)
        activities = channel_activity(model, x, graph, cpu)
    activity = activities[0]
    options, total, layers = EngineOptions(), EngineStats(), []
    torch.set_num_threads(1)
    start = time.perf_counter()
    for g in range(problems.num_groups):
        problem = problems.edge_problem(g, activity, tol / 2)
        lo, hi = problem.bounds(alpha, tol, stats=total, options=options)
        open_ = torch.nonzero(hi - lo > tol).squeeze(1)
        if open_.numel():
            support = [0 if m is None else float((m.mass[n[open_]] > 0).sum(1).double()
                                                      .mean())
                       for m, n in ((problem.mu, problem.src), (problem.nu, problem.dst))]
            layers.append({"group": g, "edges": int(problem.src.numel()),
                           "open": int(open_.numel()), "support_src": support[0],
                           "support_dst": support[1],
                           "median_width": float((hi - lo)[open_].median())})
    bound_s = time.perf_counter() - start
    layers.sort(key=lambda r: -r["open"])
    record = {"command": "python benchmarks/open_edges.py " + " ".join(sys.argv[1:]),
              "model": args.model, "tolerance": tol, "alpha": alpha, "bounds_s": bound_s,
              "engine": total.as_dict(), "open": sum(r["open"] for r in layers),
              "layers": layers}
    if layers and alpha >= 0.5:
        torch.set_num_threads(2)
        problem = problems.edge_problem(layers[0]["group"], activity, tol / 2)
        lo, hi = problem.bounds(alpha, tol, stats=EngineStats(), options=options)
        e = torch.nonzero(hi - lo > tol).squeeze(1)[:args.sample]
        t0 = time.perf_counter()
        a, b = problem.solve(e, alpha, stats=EngineStats(), options=options, threads=2)
        solve_s = (time.perf_counter() - t0) / e.numel()
        exact, err = 0.5 * (a + b), problem.error[e]
        src, dst, de = problem.src[e], problem.dst[e], problem.length[e]
        mu, nu, tables = problem.mu, problem.nu, problem.distances
        shared = _shared_problems(tables, src, dst, mu, nu, _measure_keys(mu),
                                  _measure_keys(nu), 1 << 22, EngineStats())
        pm, qm = mu.mass[src], nu.mass[dst]
        rows, cols = pm > 0, qm > 0
        a_k = tables.d_kj[mu.table[src].clamp(min=0), dst[:, None]]
        b_m = _gather_rows(tables.d_im, src, nu.table[dst]) - de[:, None]
        f, g = shared.f[shared.pair], shared.g[shared.pair]

        def dual(t: torch.Tensor) -> torch.Tensor:
            return (torch.where(rows, pm * torch.minimum(f + t[:, None], a_k), 0.0).sum(1)
                    + torch.where(cols, qm * torch.minimum(g - t[:, None], b_m), 0.0).sum(1))

        t_row = torch.where(rows, a_k - f, math.inf).amin(1)
        breaks = torch.cat([torch.where(rows, a_k - f, t_row[:, None]),
                            torch.where(cols, g - b_m, t_row[:, None])], 1)
        best = torch.stack([dual(breaks[:, s]) for s in range(breaks.shape[1])]).amax(0)
        hi_all_t = 1.0 - (best - shared.slack[shared.pair]) / de + err
        recost = []
        for s in range(e.numel()):
            r, c = rows[s], cols[s]
            cost = tables.d_km[mu.table[src[s]][r][:, None], nu.table[dst[s]][c][None, :]]
            p, q = pm[s][r].numpy(), qm[s][c].numpy()
            plan = ot.emd(p, q * (p.sum() / q.sum()), cost.numpy())
            own = torch.minimum(cost, a_k[s][r][:, None] + b_m[s][c][None, :]).numpy()
            recost.append(float((plan * own).sum()))
        swap = _weighted_sum(pm, a_k) + _weighted_sum(qm, b_m)
        lo_recost = 1.0 - torch.minimum(torch.tensor(recost, dtype=torch.float64), swap) / de \
            - err
        record["sample"] = {
            "group": layers[0]["group"], "edges": int(e.numel()),
            "exact_solve_s_per_edge_2_threads": solve_s,
            "cut_error": float(err.median()),
            "median_gap_hi_minus_exact": float((hi[e] - exact).median()),
            "median_gap_exact_minus_lo": float((exact - lo[e]).median()),
            "median_gap_hi_all_t": float((hi_all_t - exact).median()),
            "median_gap_lo_recost": float((exact - lo_recost).median()),
            "median_width_now": float((hi[e] - lo[e]).median()),
            "median_width_both": float((hi_all_t - lo_recost).median()),
            "certified_now": int((hi[e] - lo[e] <= tol).sum()),
            "certified_both": int((hi_all_t - lo_recost <= tol).sum()),
        }
    if args.images > 1:
        torch.set_num_threads(1)
        slots = [problems.slots(g) for g in range(problems.num_groups)]
        search = MinimumSearch([s for s, _ in slots], [n for _, n in slots], tolerance=tol)
        record["later_images"] = []
        for index, acts in enumerate(activities[:args.images]):
            t0, counts = time.perf_counter(), EngineStats()
            for g in range(problems.num_groups):
                problem = problems.edge_problem(g, acts, tol / 2)
                lo, hi = problem.bounds(alpha, tol, stats=counts, options=options,
                                        ceiling=search.ceiling(g) if index else None)
                search.add(g, index, lo, hi)
            record["later_images"].append({"image": index + 1,
                                           "s": time.perf_counter() - t0,
                                           "engine": counts.as_dict(),
                                           "open_so_far": search.pending})
            print(record["later_images"][-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"open_edges_{args.model}_{tol:g}.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "layers"}, indent=1))
    for row in layers[:8]:
        print(row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
