"""Peak memory of each phase of channel scoring, on a full-width timm model.

    python benchmarks/channel_memory.py --model resnet50 --images 4
    python benchmarks/channel_memory.py --model resnet50 --images 16 --upto replay

Runs the phases of ``neural_curvature(granularity="channel")`` one after the other in this
process, as ``curvprune.curvature._channel_curvature`` runs them, on a timm model (random init,
seeded; memory does not depend on the values) and ``--images`` seeded noise images at
``--size``: the trace of the first ``TRACE_EXAMPLES`` (2) examples, the replay of the whole
batch (every example's activities), the needed distances, the edge problems' index tables and
distance blocks (``ChannelProblems``), and the first example's edge problems, one per layer,
each built and bounded (``EdgeProblem.bounds``, at ``--tolerance``) and dropped. Before each
phase the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``, Linux), so each phase's
peak is its own: the resident memory of everything held so far plus the phase's temporaries.
``--upto replay`` stops after the replay (the later phases do not depend on the number of
images). Results: ``benchmarks/results/channel_memory_<model>_<images>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"resnet50": "resnet50", "vit_small": "vit_small_patch16_224",
          "convnext_tiny": "convnext_tiny", "efficientnet_b0": "efficientnet_b0",
          "mobilenetv3_large": "mobilenetv3_large_100", "resnet18": "resnet18",
          "resnet26": "resnet26"}
GIB = 2**30


def _status() -> dict[str, float]:
    """Current and peak resident memory (GiB) of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024 / GIB
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--upto", default="problems", choices=["replay", "problems"])
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="of the first example's bounds (default 1e-2)")
    args = parser.parse_args()

    import timm
    import torch

    from curvprune.calibration import scoring_mode
    from curvprune.curvature import TRACE_EXAMPLES
    from curvprune.graphs.channel import (
        ChannelProblems,
        channel_activity,
        channel_problem_bytes,
        needed_distances,
        trace_channels,
    )
    from curvprune.transport import EngineOptions, EngineStats

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(MODELS[args.model], pretrained=False).eval()
    x = torch.randn(args.images, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(1))
    record = {"command": "python " + " ".join(sys.argv), "model": MODELS[args.model],
              "images": args.images, "size": args.size, "threads": args.threads,
              "tolerance": args.tolerance,
              "torch": torch.__version__, "machine": platform.platform(),
              "load_before": os.getloadavg(), "phases": []}
    path = RESULTS / f"channel_memory_{args.model}_{args.images}.json"

    def phase(name, func):
        _reset_peak()
        before = _status()["VmRSS"]
        start = time.perf_counter()
        value = func()
        now = _status()
        record["phases"].append({"phase": name, "s": round(time.perf_counter() - start, 1),
                                 "rss_before_gib": round(before, 2),
                                 "peak_gib": round(now["VmHWM"], 2),
                                 "rss_after_gib": round(now["VmRSS"], 2)})
        print(record["phases"][-1], flush=True)
        return value

    with scoring_mode(model):
        graph = phase("trace", lambda: trace_channels(model, x[:TRACE_EXAMPLES]))
        record.update(nodes=graph.num_nodes, edges=int(graph.src.numel()),
                      replay=graph.replay is not None)
        if graph.replay is not None:
            record["replay_record_mib"] = sum(m[2].numel() * m[2].element_size()
                                              for m in graph.replay["measures"]) / 2**20
        activity = phase("replay", lambda: channel_activity(model, x, graph))
        record["activity_mib"] = activity.numel() * activity.element_size() / 2**20
        if args.upto == "problems":
            reserve = channel_problem_bytes(graph)
            record["channel_problem_gib"] = reserve / GIB
            distances = phase("needed_distances",
                              lambda: needed_distances(graph, reserve=reserve))
            record.update(pairs=distances.num_pairs, distances_gib=distances.nbytes / GIB)
            problems = phase("problems", lambda: ChannelProblems(graph, distances))
            record["problem_tables_gib"] = sum(
                t.numel() * t.element_size() for block in problems.blocks
                for t in (block.d_kj, block.d_im, block.d_km)) / GIB
            record["layers"] = problems.num_groups
            del distances  # as the scoring loop does: the blocks hold what the layers read

            def first_example():
                stats, options, largest = EngineStats(), EngineOptions(), 0
                for g in range(problems.num_groups):
                    problem = problems.edge_problem(g, activity[0], args.tolerance / 2)
                    largest = max(largest, problem.nbytes)
                    problem.bounds(0.9, args.tolerance, stats=stats, options=options)
                record["first_example"] = {"engine": stats.as_dict(),
                                           "largest_problem_mib": largest / 2**20}

            phase("first example's problems and bounds", first_example)
    record["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
