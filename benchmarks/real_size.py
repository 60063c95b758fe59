"""Structured pruning of a full-width timm model: curvature against Torch-Pruning, time and memory.

    python benchmarks/real_size.py --model resnet50 --images 4 --limit 1200
    python benchmarks/real_size.py --model resnet50 --images 4 --tolerance 1e-3 --limit 1200
    python benchmarks/real_size.py --model tv_resnet18 --images 16 --limit 1200   # unstructured

Each criterion runs in its own process (so that its peak RSS, ``ru_maxrss``, is its own) on the
same model (timm, randomly initialised and seeded: no weights can be downloaded here; time and
memory do not depend on the values) and the same seeded calibration images at 224x224:
``MetaPruner(model, example, importance=..., pruning_ratio=0.3, ignored_layers=[classifier])``
then ``step()``:

* ``magnitude``: Torch-Pruning's ``GroupMagnitudeImportance(p=2)``;
* ``taylor``: ``GroupTaylorImportance`` after one backward pass over the images (a stand-in
  loss, ``logsumexp`` of the logits: no labels needed);
* ``curvature``: ``curvprune.CurvatureImportance(images, tolerance=...)``.

For curvature the phases are timed as they happen (trace, needed distances and their pair
count; in the bounds phase, when the replay of the images ended, ``examples_start_s``, and the
examples bounded so far, ``examples_done`` at ``examples_s``; the exact minima's progress)
and written to the results file while the run goes, so a run stopped by ``--limit`` (seconds,
per criterion) still reports how far it got.
``tv_resnet18`` (torchvision's ``resnet18``) is the unstructured task instead: 50 % of all
conv and linear weights (classifier included) removed by one
``prune.global_unstructured`` call, with scores from

* ``magnitude``: ``prune.L1Unstructured`` (global |w|);
* ``curvature``: ``curvprune.neural_curvature(model, images, granularity="auto",
  tolerance=...)`` and ``curvprune.CurvaturePruning`` with its ``importance_scores()``.

Results: ``benchmarks/results/real_size_<model>_<images>_<tolerance>.json``.
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
          "mobilenetv3_large": "mobilenetv3_large_100", "tv_resnet18": "torchvision resnet18"}
#: The models of the unstructured task (``prune.global_unstructured``); the others are structured.
UNSTRUCTURED = {"tv_resnet18"}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _setup(model_name: str, images: int):
    import timm
    import torch

    torch.manual_seed(0)
    if model_name == "tv_resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None).eval()
    else:
        model = timm.create_model(MODELS[model_name], pretrained=False).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(images, 3, 224, 224, generator=gen)
    return model, x


class _Examples:
    """Stands in for the scoring loop's progress bar: records, per calibration example
    bounded, the examples done and the seconds since the phase began (``examples_done``,
    ``examples_s``), so that a run stopped by ``--limit`` says how far its bounds got."""

    def __init__(self, phase: dict, save, t0: float) -> None:
        self.phase, self.save, self.t0, self.n = phase, save, t0, 0

    def reset(self) -> None:
        self.phase["examples_start_s"] = time.perf_counter() - self.t0

    def update(self, count: int) -> None:
        self.n += count
        self.phase["examples_done"] = self.n
        self.phase["examples_s"] = time.perf_counter() - self.t0
        self.save()


def run_one(args) -> None:
    """One criterion in this process; its record is written to ``args.out`` as it goes."""
    import torch
    import torch_pruning as tp

    from curvprune.pruning.structured import attention_heads, refresh_after_pruning

    torch.set_num_threads(args.threads)
    record: dict = {"criterion": args.criterion, "phases": []}
    out = Path(args.out)

    def save():
        record["peak_rss_gib"] = peak_gib()
        out.write_text(json.dumps(record, indent=1))

    start = time.perf_counter()
    model, x = _setup(args.model, args.images)
    record["setup_s"] = time.perf_counter() - start
    if args.model in UNSTRUCTURED:
        _unstructured(args, model, x, record, start, save)
        return
    classifier = model.get_classifier()
    if args.criterion == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    elif args.criterion == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        import curvprune
        import curvprune.curvature as curvature_module
        import curvprune.graphs.channel as channels

        def timed(name, func):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                phase = {"phase": name, "start_s": t0 - start}
                record["phases"].append(phase)
                save()
                if "on_progress" in k:
                    inner = k["on_progress"]
                    last = [0.0]

                    def progress(settled, total):
                        if inner is not None:
                            inner(settled, total)
                        now = time.perf_counter()
                        if now - last[0] > 5:
                            phase["minima_settled"], phase["minima_total"] = settled, total
                            phase["s"] = now - t0
                            last[0] = now
                            save()
                    k["on_progress"] = progress
                if name == "bounds" and k.get("bar") is None:
                    k["bar"] = _Examples(phase, save, t0)
                value = func(*a, **k)
                phase["s"] = time.perf_counter() - t0
                if name == "trace":
                    phase.update(nodes=value.num_nodes, edges=int(value.src.numel()),
                                 layer_edges=int((value.module >= 0).sum()),
                                 batch=int(value.activity.shape[0]))
                if name == "needed_distances":
                    phase.update(pairs=value.num_pairs, gib=value.nbytes / 2**30)
                if name == "bounds" and k.get("stats") is not None:
                    phase["engine"] = k["stats"].as_dict()
                save()
                return value
            return wrapper

        channels.trace_channels = timed("trace", channels.trace_channels)
        channels.needed_distances = timed("needed_distances", channels.needed_distances)
        # The scoring loop (bounds, then the exact minima) of every calibration example.
        curvature_module._search = timed("bounds", curvature_module._search)
        imp = curvprune.CurvatureImportance(x, tolerance=args.tolerance, threads=args.threads,
                                            memory_budget=8 << 30)
    t0 = time.perf_counter()
    if args.criterion == "taylor":
        model.zero_grad()
        for chunk in x.split(16):
            model(chunk).logsumexp(1).mean().backward()
    # Attention: q/k/v pruned head-consistently, head sizes refreshed after (as prune_channels
    # does, and Torch-Pruning's ViT example); a no-op for models without attention.
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.3,
                                  ignored_layers=[classifier],
                                  num_heads=attention_heads(model))
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    refresh_after_pruning(model, pruner)
    record["prune_s"] = time.perf_counter() - t0
    record["params_before"] = before
    record["params_after"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        record["output_shape"] = list(model(x[:1]).shape)
    if args.criterion == "curvature":
        record["engine"] = imp.result.engine if imp.result is not None else None
        record["fell_back"] = imp.fell_back
    record["finished"] = True
    save()


def _unstructured(args, model, x, record: dict, start: float, save) -> None:
    """The unstructured task (module docstring) in this process, timed as it goes."""
    import torch.nn as nn
    import torch.nn.utils.prune as prune

    import curvprune

    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    before = sum(int(m.weight.numel()) for m, _ in params)
    t0 = time.perf_counter()
    if args.criterion == "magnitude":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
    elif args.criterion == "curvature":
        phase = {"phase": "neural_curvature", "start_s": t0 - start}
        record["phases"].append(phase)
        save()
        result = curvprune.neural_curvature(model, x, granularity="auto",
                                            tolerance=args.tolerance, threads=args.threads,
                                            memory_budget=8 << 30)
        phase.update(s=time.perf_counter() - t0, granularity=result.granularity,
                     engine=result.engine)
        save()
        prune.global_unstructured(params, pruning_method=curvprune.CurvaturePruning,
                                  importance_scores=result.importance_scores(), amount=0.5)
    else:
        raise SystemExit(f"criterion {args.criterion!r} has no unstructured run here; use "
                         "magnitude or curvature.")
    record["prune_s"] = time.perf_counter() - t0
    record["weights"] = before
    record["weights_zero"] = sum(int((m.weight == 0).sum()) for m, _ in params)
    record["finished"] = True
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=1e-14)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=600, help="seconds per criterion")
    parser.add_argument("--criteria", default=None,
                        help="comma-separated (default: magnitude,taylor,curvature; "
                             "magnitude,curvature for tv_resnet18)")
    parser.add_argument("--criterion", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.criterion:
        run_one(args)
        return
    import torch

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"real_size_{args.model}_{args.images}_{args.tolerance:g}.json"
    summary = {"command": "python " + " ".join(sys.argv), "model": MODELS[args.model],
               "task": "unstructured" if args.model in UNSTRUCTURED else "structured",
               "images": args.images, "tolerance": args.tolerance, "threads": args.threads,
               "limit_s": args.limit, "torch": torch.__version__, "cpus": os.cpu_count(),
               "machine": platform.platform(), "load_before": os.getloadavg(), "criteria": {}}
    if args.criteria is None:
        args.criteria = ("magnitude,curvature" if args.model in UNSTRUCTURED
                         else "magnitude,taylor,curvature")
    for criterion in args.criteria.split(","):
        part = path.with_suffix(f".{criterion}.part")
        cmd = [sys.executable, __file__, "--model", args.model, "--images", str(args.images),
               "--tolerance", str(args.tolerance), "--threads", str(args.threads),
               "--criterion", criterion, "--out", str(part)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.limit, capture_output=True, text=True)
            status = ("finished" if proc.returncode == 0 else
                      f"failed (exit status {proc.returncode}"
                      f"{', killed by the system: out of memory?' if proc.returncode == -9 else ''}"
                      f"): {proc.stderr[-500:]}")
        except subprocess.TimeoutExpired:
            status = f"stopped at the {args.limit} s limit"
        record = json.loads(part.read_text()) if part.exists() else {}
        record["status"] = status
        record["wall_s"] = time.perf_counter() - t0
        summary["criteria"][criterion] = record
        part.unlink(missing_ok=True)
        print(criterion, status, f"{record['wall_s']:.1f} s",
              f"peak {record.get('peak_rss_gib', float('nan')):.2f} GiB", flush=True)
    summary["load_after"] = os.getloadavg()
    path.write_text(json.dumps(summary, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
