"""Neuron against channel granularity on LeNet-5 (Fashion-MNIST), where both graphs fit.

    python benchmarks/granularity.py                 # 3 seeds, 1 calibration example per class
    python benchmarks/granularity.py --quick --out /tmp/g.json   # CI smoke run (untrained)

For each seed: the LeNet-5 variant of method.md (trained 5 epochs, seeded, cached), one correctly
classified training example per class as calibration, curvature at neuron granularity (the
paper's graph) and at channel granularity (every element of ``W[o, i, ...]`` gets the curvature
of its channel edge ``i -> o``; ties inside a channel block go to the smaller ``|w|``), global
pruning of the highest curvature first at each amount (``neuron``, ``channel``) and the same with
every layer pruned by the amount (``*_layer``), no fine-tuning, test accuracy. Magnitude (global
and per layer) is the reference line. Results: ``benchmarks/results/granularity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXACT, RESULTS, evaluate, trained_model  # noqa: E402
from unstructured import prune_with, write_json  # noqa: E402

from curvprune import make_permanent, neural_curvature  # noqa: E402
from curvprune.baselines import magnitude_scores  # noqa: E402
from curvprune.data import (  # noqa: E402
    class_balanced_calibration,
    fashion_mnist,
    random_calibration,
)
from curvprune.models import create_model  # noqa: E402

AMOUNTS = [0.5, 0.7, 0.8, 0.9, 0.95]
CRITERIA = ["neuron", "channel", "magnitude", "neuron_layer", "channel_layer", "magnitude_layer"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--amounts", type=float, nargs="+", default=AMOUNTS)
    parser.add_argument("--per-class", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "granularity.json")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: an untrained LeNet-5, 2 random calibration images, "
                             "amount 0.5, 500 test images")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.amounts = args.seeds[:1], [0.5]
    torch.set_num_threads(1)
    test, train = fashion_mnist(train=False), fashion_mnist(train=True)
    rows = []
    if args.quick:
        test = torch.utils.data.TensorDataset(*(t[:500] for t in test.tensors))
    for seed in args.seeds:
        if args.quick:
            torch.manual_seed(seed)
            model = create_model("lenet5").eval()
            accuracy = evaluate(model, test)
            calib, _ = random_calibration(train, 2, seed=seed)
        else:
            model, accuracy = trained_model("lenet5", epochs=5, seed=seed, verbose=False)
            calib, _ = class_balanced_calibration(model, train, args.per_class,
                                                  num_classes=10, seed=seed)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        scores, seconds = {}, {}
        for granularity in ("neuron", "channel"):
            start = time.perf_counter()
            result = neural_curvature(model, calib, granularity=granularity, tolerance=EXACT,
                                      threads=os.cpu_count() or 1)
            seconds[granularity] = round(time.perf_counter() - start, 2)
            scores[granularity] = result.importance_scores("positive_first")
        scores["magnitude"] = magnitude_scores(model)
        row = {"seed": seed, "dense_accuracy": accuracy, "scoring_seconds": seconds,
               "accuracy": {}}
        for criterion in CRITERIA:
            base, per_layer = criterion.removesuffix("_layer"), criterion.endswith("_layer")
            row["accuracy"][criterion] = {}
            for amount in args.amounts:
                # "curv_pos": one global ranking by the scores; "curv_pos_layer": per layer
                prune_with(model, "curv_pos_layer" if per_layer else "curv_pos",
                           scores[base], amount)
                row["accuracy"][criterion][f"{amount:g}"] = evaluate(model, test)
                make_permanent(model)
                model.load_state_dict(state)
        scored = neural_curvature(model, calib, granularity="channel", tolerance=EXACT)
        prune_with(model, "curv_pos", scored.importance_scores("positive_first"), 0.5)
        names = {id(m): n for n, m in model.named_modules()}
        row["channel_global_layer_sparsity_at_0.5"] = {
            f"{names[id(m)]}.weight": round(float((m.weight == 0).double().mean()), 3)
            for m in scored.modules.values()}
        make_permanent(model)
        model.load_state_dict(state)
        print(row, flush=True)
        rows.append(row)
    data = {"command": "python benchmarks/granularity.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "amounts": args.amounts, "rows": rows}
    write_json(args.out, data)
    criteria = CRITERIA
    lines = [f"Test accuracy, mean of {len(rows)} seeds:", "",
             "| amount | " + " | ".join(criteria) + " |", "|---" * (len(criteria) + 1) + "|"]
    for amount in args.amounts:
        key = f"{amount:g}"
        means = [sum(r["accuracy"][c][key] for r in rows) / len(rows) for c in criteria]
        lines.append(f"| {key} | " + " | ".join(f"{100 * m:.1f}%" for m in means) + " |")
    times = {g: sum(r["scoring_seconds"][g] for r in rows) / len(rows)
             for g in ("neuron", "channel")}
    lines.append("")
    lines.append(f"Scoring time (mean): neuron {times['neuron']:.1f} s, channel "
                 f"{times['channel']:.1f} s; dense accuracy "
                 f"{100 * sum(r['dense_accuracy'] for r in rows) / len(rows):.1f}%.")
    md = args.out.with_suffix(".md")
    md.write_text(f"Command: `{data['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
