"""Scoring time of the fast engine against the per-edge reference, with identical kappa.

    python benchmarks/engine_speed.py                  # LeNet-5, 10 examples, full reference
    python benchmarks/engine_speed.py --reference sample   # reference extrapolated from edges

The LeNet-5 variant (method.md section 5) is trained on Fashion-MNIST (5 epochs, seeded, cached
under benchmarks/.cache). The calibration set is one correctly classified test example per class.
With ``--reference full`` the reference scores the same 10 examples and the script checks that
the two agree on every weight (max |difference|, and +inf on the same weights). Results go to
``benchmarks/results/engine_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, trained_model  # noqa: E402

from curvprune import neural_curvature  # noqa: E402
from curvprune.data import class_balanced_calibration, fashion_mnist  # noqa: E402
from curvprune.reference import reference_curvature, time_reference_per_edge  # noqa: E402


def compare(kappa: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    worst, inf_mismatch = 0.0, 0
    for name, ref in reference.items():
        got = kappa[name].detach().cpu()
        inf_mismatch += int((torch.isinf(got) != torch.isinf(ref)).sum())
        finite = torch.isfinite(ref) & torch.isfinite(got)
        if finite.any():
            worst = max(worst, float((got[finite] - ref[finite]).abs().max()))
    return {"max_abs_diff": worst, "inf_mismatch": inf_mismatch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", choices=["full", "sample"], default="full")
    parser.add_argument("--examples-per-class", type=int, default=1)
    parser.add_argument("--sample-edges", type=int, default=3000)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_speed.json")
    args = parser.parse_args()

    model, accuracy = trained_model("lenet5", epochs=5)
    calib, _ = class_balanced_calibration(model, fashion_mnist(train=False),
                                          args.examples_per_class)
    print(f"lenet5 test accuracy {accuracy:.4f}; {len(calib)} calibration examples")

    start = time.perf_counter()
    result = neural_curvature(model, calib, alpha=args.alpha, progress=True)
    engine_s = time.perf_counter() - start
    edges = sum(result.edges_per_example.values())
    print(f"engine: {engine_s:.1f} s ({result.engine})")

    row = {
        "model": "lenet5", "examples": len(calib), "edges_per_example": edges,
        "alpha": args.alpha, "engine_s": engine_s, "engine_stats": result.engine,
        "test_accuracy": accuracy,
    }
    if args.reference == "full":
        start = time.perf_counter()
        reference = reference_curvature(model, calib, alpha=args.alpha)
        row["reference_s"] = time.perf_counter() - start
        row["reference_kind"] = "measured"
        row.update(compare(result.kappa, reference))
    else:
        per_edge, total = time_reference_per_edge(model, calib, alpha=args.alpha,
                                                  sample=args.sample_edges)
        row["reference_s"] = per_edge * total * len(calib)
        row["reference_kind"] = f"extrapolated from {args.sample_edges} sampled edges"
    row["speedup"] = row["reference_s"] / engine_s
    print(json.dumps(row, indent=2))

    report = {
        "command": "python benchmarks/engine_speed.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "rows": [row],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    md = args.out.with_suffix(".md")
    lines = [
        f"Command: `{report['command']}` ({os.cpu_count()} CPU cores, torch {torch.__version__})",
        "",
        "| model | examples | edges/example | engine (s) | reference (s) | speed-up "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    diff = row.get("max_abs_diff")
    lines.append(
        f"| {row['model']} | {row['examples']} | {edges:,} | {engine_s:.1f} | "
        f"{row['reference_s']:.1f} ({row['reference_kind']}) | {row['speedup']:.1f}x | "
        f"{'n/a' if diff is None else f'{diff:.1e}'} |"
    )
    tmp = md.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
