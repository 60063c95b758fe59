"""Where a full-width model's bounds go, layer by layer: each bounding job of the scoring loop.

    python benchmarks/layer_jobs.py --model convnext_tiny --images 4

Runs ``CurvatureImportance(images, tolerance=...)`` in a ``MetaPruner(..., pruning_ratio=0.3)``
step on the model and seeded noise images of ``benchmarks/real_size.py`` (the same setup, with
``--images`` images, 2 threads) and times every job of the scoring loop: per layer (group) and
image, building its edge problem (``ChannelProblems.edge_problem``) and bounding it
(``EdgeProblem.bounds``, without the edge-by-edge tightening), with the job's engine counts
(shared problems, screened, certified). The jobs run on the pool as in a real run, so a layer
whose job is much longer than the others shows up here, and so does a thread left idle beside
it (compare ``jobs_s`` with twice the bounds phase's wall time, ``search_s``).

Prints the layers by their time on the later images (the first image has no ceilings to
screen with) and writes ``benchmarks/results/layer_jobs_<model>_<images>.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from real_size import MODELS, UNSTRUCTURED

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnext_tiny",
                        choices=sorted(set(MODELS) - UNSTRUCTURED))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--top", type=int, default=12, help="layers printed")
    args = parser.parse_args()
    if args.images < 2:
        parser.error(f"--images must be at least 2 (later images are screened), got "
                     f"{args.images}")

    import torch
    import torch_pruning as tp
    from real_size import _setup

    import curvprune
    import curvprune.curvature as curvature_module
    from curvprune.graphs.base import EdgeProblem
    from curvprune.graphs.channel import ChannelProblems
    from curvprune.pruning.structured import attention_heads

    torch.set_num_threads(2)
    model, x = _setup(args.model, args.images)
    jobs, phase, current = [], {}, threading.local()
    start = time.perf_counter()
    build, bounds, search = (ChannelProblems.edge_problem, EdgeProblem.bounds,
                             curvature_module._search)

    def timed_build(self, group, activity, cut_tol):
        t0 = time.perf_counter()
        problem = build(self, group, activity, cut_tol)
        current.job = {"group": group, "edges": int(problem.src.numel()),
                       "build_s": time.perf_counter() - t0}
        return problem

    def timed_bounds(self, *a, **k):
        t0 = time.perf_counter()
        out = bounds(self, *a, **k)
        job = getattr(current, "job", None)
        if k.get("tighten") is False and job is not None:  # a job of the scoring loop
            stats = k["stats"].as_dict()
            job.update(bounds_s=time.perf_counter() - t0,
                       end_s=time.perf_counter() - start,
                       **{key: stats[key] for key in ("shared_problems", "screened",
                                                      "certified")})
            jobs.append(job)
            current.job = None
        return out

    def timed_search(*a, **k):
        t0 = time.perf_counter()
        out = search(*a, **k)
        phase["search_s"] = time.perf_counter() - t0
        return out

    ChannelProblems.edge_problem, EdgeProblem.bounds = timed_build, timed_bounds
    curvature_module._search = timed_search
    try:
        imp = curvprune.CurvatureImportance(x, tolerance=args.tolerance, threads=2,
                                            memory_budget=8 << 30)
        pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.3,
                                      ignored_layers=[model.get_classifier()],
                                      num_heads=attention_heads(model))
        pruner.step()
    finally:
        ChannelProblems.edge_problem, EdgeProblem.bounds = build, bounds
        curvature_module._search = search

    per_group = collections.defaultdict(list)
    for job in jobs:  # in the order they ended; each group's jobs in image order
        per_group[job["group"]].append(job)
    layers = []
    for group, runs in per_group.items():
        later = runs[1:]
        layers.append({
            "group": group, "edges": runs[0]["edges"],
            "first_s": runs[0]["build_s"] + runs[0]["bounds_s"],
            "later_mean_s": sum(r["build_s"] + r["bounds_s"] for r in later) / len(later),
            "first_shared_problems": runs[0]["shared_problems"],
            "later_shared_problems": [r["shared_problems"] for r in later],
        })
    layers.sort(key=lambda r: -r["later_mean_s"])
    record = {"command": "python benchmarks/layer_jobs.py " + " ".join(sys.argv[1:]),
              "model": MODELS[args.model], "images": args.images,
              "tolerance": args.tolerance, "total_s": time.perf_counter() - start,
              "search_s": phase.get("search_s"),
              "jobs_s": sum(j["build_s"] + j["bounds_s"] for j in jobs),
              "layers": layers, "jobs": jobs}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"layer_jobs_{args.model}_{args.images}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    print(f"bounds phase {record['search_s']:.1f} s wall on 2 threads; the jobs "
          f"{record['jobs_s']:.1f} s in all")
    print("group | edges | first image (s) | later images, mean (s) | shared problems "
          "(first / later)")
    for row in layers[:args.top]:
        print(f"{row['group']} | {row['edges']:,} | {row['first_s']:.2f} | "
              f"{row['later_mean_s']:.2f} | {row['first_shared_problems']:,} / "
              f"{row['later_shared_problems']}")
    print("wrote", out)


if __name__ == "__main__":
    main()
