"""Structured (channel) pruning on Fashion-MNIST: curvature against Torch-Pruning's criteria.

    python benchmarks/structured.py                      # 4 zoo models, ratios 0.05 .. 0.3, 3 seeds
    python benchmarks/structured.py --seeds 0 1 2 --resume   # keep the seeds already in the JSON
    python benchmarks/structured.py --models timm/resnet18 --ratios 0.3 --finetune-ratios
    python benchmarks/structured.py --criteria magnitude taylor --resume   # add criteria later
    python benchmarks/structured.py --merge seed0.json seed1.json          # combine runs
    python benchmarks/structured.py --quick --out /tmp/q.json --plot /tmp/q.png   # CI smoke run

Models are reduced-width timm architectures from :mod:`curvprune.models.zoo` (ResNet-18, MobileNetV3
with depthwise convs and squeeze-excitation, ConvNeXt, ViT; at most 64-128 channels, so that
exact channel curvature, training and fine-tuning fit a 2-core CPU), trained on Fashion-MNIST
(padded to 32 x 32, grey repeated to 3 channels; Adam, seeded, cached under benchmarks/.cache).
Calibration: ``--per-class`` correctly classified training examples per class. Each criterion
removes the same fraction of the channels of every prunable group with Torch-Pruning's
``MetaPruner`` (local ranking, classifier kept; ``curvprune.prune_channels``), and the test
accuracy is measured right after pruning (and after a short fine-tune, below):

* ``curvature``: ``curvprune.CurvatureImportance`` (channel importance ``2 - kappa``, a
  channel's curvature the mean of its edges', the default ``reduction="mean"``);
* ``curvature_min`` and ``curvature_weighted``: the same with ``reduction="min"`` (the most
  negative edge) and ``reduction="weighted"`` (the mean weighted by each edge's weight norm):
  the channel edge-combination study. The three are pruned from one scoring of the model
  (``CurvatureImportance(None, result=...)``, which prunes the channels that scoring the
  model again would), whose time is recorded as ``curvature_seconds``;
* ``magnitude``: ``GroupMagnitudeImportance(p=2)``;
* ``taylor``: ``GroupTaylorImportance`` with gradients of the cross-entropy on the calibration
  batch;
* ``random``: ``RandomImportance`` (seeded);
* ``activation``: ``ActivationImportance``: a channel's mean |activation| on the calibration
  batch, read at the inputs of the layers that consume it (one forward pass of the batch inside
  its ``compute_importance`` context; Torch-Pruning sums a Linear's input over examples and
  tokens and averages a conv's over examples and positions);
* ``hessian``: ``GroupHessianImportance`` (Optimal Brain Damage, the sum of w^2 h over a
  channel's weights) with h the diagonal empirical Fisher: the mean over the calibration
  examples of each example's squared gradient of its cross-entropy, placed in ``.grad``.
  Torch-Pruning's own ``accumulate_grad`` (1.6.0) keeps only the last example (it looks its
  buffer up by parameter name, but stores it by parameter), so the benchmark accumulates itself
  (:func:`fisher_diagonal`).

At every ratio of ``--finetune-ratios`` (default: all of ``--ratios``; none when the option is
given without values) each pruned model is also fine-tuned for ``--finetune-steps`` Adam steps
(:func:`curvprune.training.train_classifier`: batch 128, lr 1e-3, seeded shuffled epochs) and
evaluated again. Parameters and MACs come from
``tp.utils.count_ops_and_params``; CPU latency is the median of 50 single-image forward passes
on one thread.

Results: ``benchmarks/results/structured.json`` and ``.md``, and ``docs/structured.png``.
Each seed trains its own models, draws its own calibration set and fine-tunes with its own
stream; the tables give the mean and the min-max over the seeds.

``--criteria`` runs a subset of :data:`CRITERIA` (default: all). ``--resume`` keeps the
(model, seed) results already in ``--out`` (same settings, the criteria aside) and the models
this run does not name; a kept seed that lacks some of the criteria asked for gets only those
run, on the same trained model (the script stops if the dense accuracy differs from the kept
one), and records them under ``criteria_added``. The tables show the criteria that every seed
of a model has.

``--merge A.json B.json ...`` runs nothing: it combines the (model, seed) results of files
written with the same settings (one process per seed, run side by side, each with its own
``--out``) into ``--out``, its tables and ``--plot``; a (model, seed) found in two files is an
error. Give it the settings the files were written with (``--finetune-steps`` ...).

``--quick`` (CI, about a minute on an idle machine): one seed, one untrained model, a random
calibration batch of 5 images, ratio 0.3, 10 fine-tuning steps, 500 test images: it checks
that the script runs, not what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXACT, RESULTS, evaluate, resumable, trained_model  # noqa: E402
from unstructured import write_json  # noqa: E402

import curvprune  # noqa: E402
from curvprune.data import (  # noqa: E402
    class_balanced_calibration,
    fashion_mnist,
    random_calibration,
)
from curvprune.models import zoo  # noqa: E402
from curvprune.training import train_classifier  # noqa: E402

MODELS = ["timm/resnet18", "timm/mobilenetv3_large_100", "timm/convnext_atto",
          "timm/vit_tiny_patch16_224"]
RATIOS = [0.05, 0.1, 0.2, 0.3]
#: Curvature criteria: their channel reduction (``CurvatureImportance(reduction=...)``).
CURVATURE = {"curvature": "mean", "curvature_min": "min", "curvature_weighted": "weighted"}
CRITERIA = [*CURVATURE, "magnitude", "taylor", "activation", "hessian", "random"]
DOCS = Path(__file__).resolve().parent.parent / "docs"
#: How a pruned model is fine-tuned, recorded in the settings so that ``--resume`` does not mix
#: results fine-tuned another way (the committed file predates it: random batches with
#: replacement, drawn per step).
FINETUNE = "curvprune.training.train_classifier: Adam lr 1e-3, batch 128, seeded shuffled epochs"


def latency_ms(model, example: torch.Tensor, runs: int = 50) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(5):
            model(example)
        for _ in range(runs):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def fisher_diagonal(model, calib: torch.Tensor, labels: torch.Tensor) -> None:
    """Set every parameter's ``.grad`` to the mean over the examples of ``calib`` of the squared
    gradient of that example's cross-entropy (one backward pass per example, eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    model.eval()
    for i in range(len(calib)):
        loss = torch.nn.functional.cross_entropy(model(calib[i:i + 1]), labels[i:i + 1])
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t += g.pow(2)
    for p, t in zip(params, total):
        p.grad = t / len(calib)


def prune_and_evaluate(name: str, state: dict, criterion: str, ratio: float, calib, labels,
                       test, seed: int, train=None, finetune_steps: int = 0,
                       curvature: curvprune.CurvatureResult | None = None) -> dict:
    """Prune a fresh copy of the model ``state`` by ``criterion`` at ``ratio``, evaluate it,
    and (``finetune_steps > 0``) fine-tune it and evaluate again. The curvature criteria use
    ``curvature``, the channel scoring of the unpruned model (scored here when ``None``)."""
    model = zoo.create(name)
    model.load_state_dict(state)
    if criterion in CURVATURE:
        if curvature is None:
            importance = curvprune.CurvatureImportance(calib, reduction=CURVATURE[criterion],
                                                       tolerance=EXACT)
        else:
            importance = curvprune.CurvatureImportance(None, result=curvature,
                                                       reduction=CURVATURE[criterion])
    elif criterion == "magnitude":
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    elif criterion == "taylor":
        importance = tp.importance.GroupTaylorImportance()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(calib), labels).backward()
    elif criterion == "activation":
        importance = tp.importance.ActivationImportance()
        with importance.compute_importance(model), torch.no_grad():
            model(calib)  # the hooks keep the last forward's activations: one batch
    elif criterion == "hessian":
        importance = tp.importance.GroupHessianImportance()
        fisher_diagonal(model, calib, labels)
    else:
        torch.manual_seed(seed)
        importance = tp.importance.RandomImportance()
    start = time.perf_counter()
    report = curvprune.prune_channels(model, calib, ratio, importance=importance,
                                      ignored_layers=zoo.ignored_layers(name, model))
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    row = {"accuracy": evaluate(model, test), "params": report.params_after,
           "params_before": report.params_before, "macs": report.macs_after,
           "macs_before": report.macs_before, "seconds": round(seconds, 2),
           "fallback": report.fell_back, "latency_ms": latency_ms(model, calib[:1])}
    if finetune_steps:
        train_classifier(model, train, epochs=None, max_steps=finetune_steps, batch_size=128,
                         lr=1e-3, seed=seed)
        row["accuracy_finetuned"] = evaluate(model, test)
    return row


def _mean_range(values: list[float]) -> str:
    """``mean`` of percentages, with ``(min-max)`` when there is more than one."""
    values = [100 * v for v in values]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def _having(entry: dict, criterion: str) -> dict[str, dict]:
    """``{seed: run}`` of the seeds of ``entry`` that have ``criterion`` (a run interrupted,
    or made before a criterion existed, lacks it)."""
    return {seed: run for seed, run in entry["seeds"].items() if criterion in run["results"]}


def _rows(entry: dict, criterion: str, key: str) -> list[dict]:
    return [run["results"][criterion][key] for run in _having(entry, criterion).values()]


def _criteria(runs: list[dict]) -> list[str]:
    """The criteria of :data:`CRITERIA` that some seed has, in that order."""
    return [c for c in CRITERIA if any(c in run["results"] for run in runs)]


def _cell(entry: dict, criterion: str, key: str, field: str) -> str:
    """Mean (min-max) of ``field`` over the seeds that have ``criterion``, naming those seeds
    when they are not all of the model's."""
    having = _having(entry, criterion)
    text = _mean_range([run["results"][criterion][key][field] for run in having.values()])
    if len(having) < len(entry["seeds"]):
        text += f" [seed {', '.join(having)}]"
    return text


def _ratios(run: dict, criterion: str, key: str) -> list[str]:
    """The ratios (JSON keys, ascending) at which ``run`` has ``key`` for ``criterion``."""
    rows = run["results"][criterion]
    return sorted((r for r in rows if key in rows[r]), key=float)


def plot(data: dict, path: Path) -> None:
    """Accuracy against channel ratio per model (columns), right after pruning (top row) and
    after fine-tuning (bottom row, when some model was fine-tuned): mean over seeds, min-max
    band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in data["models"] if data["models"][m]["seeds"]]
    stages = [("accuracy", "right after pruning"), ("accuracy_finetuned", "after "
              f"{data['settings']['finetune_steps']} fine-tuning steps")]
    stages = [(key, stage) for key, stage in stages  # the fine-tuned row only where tuned
              if any(key in row for m in models for run in data["models"][m]["seeds"].values()
                     for rows in run["results"].values() for row in rows.values())]
    colours = dict(zip(CRITERIA, plt.get_cmap("tab10").colors))
    width = max(6.0, 4.2 * len(models))
    fig, axes = plt.subplots(len(stages), len(models), figsize=(width, 3.3 * len(stages)),
                             squeeze=False)
    for column, name in enumerate(models):
        entry = data["models"][name]
        runs = list(entry["seeds"].values())
        dense = [100 * run["dense_accuracy"] for run in runs]
        for row, (key, stage) in enumerate(stages):
            ax = axes[row][column]
            for criterion in _criteria(runs):
                having = [(d, run) for d, run in zip(dense, runs) if criterion in run["results"]]
                keys = _ratios(having[0][1], criterion, key)
                if not keys or any(_ratios(run, criterion, key) != keys for _, run in having):
                    continue
                x = [0.0] + [float(k) for k in keys]
                per_seed = [[d] + [100 * run["results"][criterion][k][key] for k in keys]
                            for d, run in having]
                mean = [sum(col) / len(col) for col in zip(*per_seed)]
                ax.plot(x, mean, marker="o", ms=3, label=criterion, color=colours[criterion],
                        linestyle="--" if criterion in CURVATURE and criterion != "curvature"
                        else "-")
                if len(per_seed) > 1:
                    ax.fill_between(x, [min(c) for c in zip(*per_seed)],
                                    [max(c) for c in zip(*per_seed)],
                                    color=colours[criterion], alpha=0.12, linewidth=0)
            ax.set_title(f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''}), {stage}",
                         fontsize=8)
            ax.set_xlabel("channel ratio removed per group")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Structured pruning on Fashion-MNIST (mean and min-max over seeds)",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return 100 * sum(values) / len(values)


def markdown(data: dict) -> str:
    """Tables per model: mean accuracy (min-max over seeds) per criterion and ratio right after
    pruning, parameters and MACs left, then the fine-tuned accuracies; last, each curvature
    criterion's lead over magnitude and Taylor (mean points)."""
    lines = []
    gaps = []
    for name, entry in data["models"].items():
        runs = list(entry["seeds"].values())
        if not runs:
            continue
        criteria = _criteria(runs)
        dense = _mean_range([run["dense_accuracy"] for run in runs])
        ratios = [r for r in _ratios(runs[0], criteria[0], "accuracy")
                  if all(r in run["results"][c] for c in criteria
                         for run in _having(entry, c).values())]
        seconds = [run["curvature_seconds"] for run in runs if "curvature_seconds" in run]
        spread = sorted({f"{t:.0f}" for t in (min(seconds), max(seconds))} if seconds else [],
                        key=float)
        scoring = f", curvature scoring {'-'.join(spread)} s" if seconds else ""
        lines += [f"**{name}**, seeds {', '.join(entry['seeds'])} (dense {dense}%{scoring}); "
                  "accuracy % right after pruning, mean (min-max)", "",
                  "| ratio | params left | MACs left | " + " | ".join(criteria) + " |",
                  "|---" * (len(criteria) + 3) + "|"]
        tuned = []
        for key in ratios:
            first = _rows(entry, criteria[0], key)[0]
            left = first["params"] / first["params_before"]
            macs = first["macs"] / first["macs_before"]
            cells = [_cell(entry, c, key, "accuracy") for c in criteria]
            lines.append(f"| {key} | {100 * left:.0f}% | {100 * macs:.0f}% | "
                         + " | ".join(cells) + " |")
            if all("accuracy_finetuned" in r for c in criteria for r in _rows(entry, c, key)):
                tuned.append(f"| {key} | " + " | ".join(
                    _cell(entry, c, key, "accuracy_finetuned") for c in criteria) + " |")
        if tuned:
            steps = data["settings"]["finetune_steps"]
            lines += ["", f"After {steps} fine-tuning steps:", "",
                      "| ratio | " + " | ".join(criteria) + " |",
                      "|---" * (len(criteria) + 1) + "|", *tuned]
        lines.append("")
        for criterion in CURVATURE:
            if criterion not in criteria or not {"magnitude", "taylor"} <= set(criteria):
                continue
            cells = []
            for key in ratios:  # over the seeds that have both criteria
                pair = []
                for other in ("magnitude", "taylor"):
                    both = [run["results"] for run in runs
                            if criterion in run["results"] and other in run["results"]]
                    pair.append(_mean([r[criterion][key]["accuracy"] - r[other][key]["accuracy"]
                                       for r in both]))
                cells.append(" / ".join(f"{d:+.1f}" for d in pair))
            gaps.append((name, criterion, ratios, cells))
    if gaps:
        lines += ["Lead of each curvature criterion over magnitude / Taylor right after pruning "
                  "(points, mean over the seeds that have both; negative: behind):", ""]
        header = None
        for name, criterion, ratios, cells in gaps:
            if header != ratios:
                header = ratios
                lines += ["| model | criterion | " + " | ".join(ratios) + " |",
                          "|---" * (len(ratios) + 2) + "|"]
            lines.append(f"| {name} | {criterion} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings, checked (``--quick`` and the ``--finetune-ratios``
    default applied)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--criteria", nargs="+", default=CRITERIA, choices=CRITERIA,
                        help="the criteria to run (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=2,
                        help="calibration examples per class, for every criterion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training, calibration and fine-tuning seeds (default 0 1 2)")
    parser.add_argument("--finetune-ratios", type=float, nargs="*", default=None,
                        help="the ratios at which each pruned model is also fine-tuned "
                             "(default: every ratio; no values: none)")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "structured.json")
    parser.add_argument("--plot", type=Path, default=DOCS / "structured.png")
    parser.add_argument("--quick", action="store_true", help="tiny CI run (see the docstring)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (model, seed) results already in --out when it was "
                             "written with the same settings; run the rest")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: combine the (model, seed) results of these files "
                             "(written with the same settings, e.g. one process per seed) "
                             "into --out, its tables and --plot")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.ratios, args.seeds = args.models[:1], [0.3], args.seeds[:1]
        args.finetune_ratios, args.finetune_steps = [0.3], 10
    if args.finetune_ratios is None:
        args.finetune_ratios = list(args.ratios)
    if args.finetune_ratios and args.finetune_steps < 1:
        parser.error("--finetune-steps must be at least 1 (give --finetune-ratios without "
                     "values to fine-tune nowhere)")
    unknown = [r for r in args.finetune_ratios if not any(abs(r - q) < 1e-9 for q in args.ratios)]
    if unknown:
        parser.error(f"--finetune-ratios {unknown} are not among --ratios {args.ratios}")
    args.criteria = [c for c in CRITERIA if c in args.criteria]  # one order, no repeats
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.merge:
        _finish(merge(args.merge, args, argv if argv is not None else sys.argv[1:]), args)
        return
    torch.set_num_threads(1)
    test = fashion_mnist(train=False, pad_to=32, channels=3)
    train = fashion_mnist(train=True, pad_to=32, channels=3)
    data = {"command": "python benchmarks/structured.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]), "settings": _settings(args), "models": {}}
    done = {}
    if args.resume:
        done = resumable(args.out, data["settings"], ignore=FREE)
        for name in done:  # models of the file that this run does not touch stay as they are
            if name not in args.models:
                data["models"][name] = {"seeds": done[name]}
    if args.quick:
        test = torch.utils.data.TensorDataset(*(t[:500] for t in test.tensors))
    for name in args.models:
        seeds = data["models"].setdefault(name, {"seeds": {}})["seeds"]
        for seed in args.seeds:
            kept = done.get(name, {}).get(str(seed))
            missing = [c for c in args.criteria
                       if kept is not None and c not in kept["results"]]
            if kept is not None and not missing:
                print(f"{name} seed {seed}: kept from {args.out} (--resume)", flush=True)
                seeds[str(seed)] = kept
                continue
            if args.quick:  # untrained: the smoke run checks the plumbing only
                model = zoo.create(name)
                dense = evaluate(model, test)
                calib, labels = random_calibration(train, 5, seed=seed)
            else:
                model, dense = trained_model(name, epochs=args.epochs, seed=seed, pad_to=32,
                                             in_channels=3)
                calib, labels = class_balanced_calibration(model, train, args.per_class,
                                                           num_classes=10, seed=seed)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            dense_model = zoo.create(name)
            dense_model.load_state_dict(state)
            if kept is not None:  # a kept seed: add the criteria it lacks, same model
                if dense != kept["dense_accuracy"]:
                    raise SystemExit(f"--resume: {name} seed {seed} is not the model of "
                                     f"{args.out} (dense accuracy {dense} against "
                                     f"{kept['dense_accuracy']}); rerun without --resume")
                print(f"{name} seed {seed}: kept from {args.out} (--resume); adding "
                      f"{', '.join(missing)}", flush=True)
                entry = kept
                entry.setdefault("criteria_added", {}).update(
                    {c: data["command"] for c in missing})
            else:
                entry = {"dense_accuracy": dense, "results": {},
                         "dense_latency_ms": latency_ms(dense_model, calib[:1])}
            todo = missing if kept is not None else args.criteria
            curvature = None
            if any(c in CURVATURE for c in todo):  # one scoring for the three reductions
                start = time.perf_counter()
                curvature = curvprune.neural_curvature(dense_model, calib,
                                                       granularity="channel", tolerance=EXACT)
                entry["curvature_seconds"] = round(time.perf_counter() - start, 2)
                print(name, f"seed {seed}: curvature scored in "
                      f"{entry['curvature_seconds']} s", flush=True)
            for criterion in todo:
                entry["results"][criterion] = {}
                for ratio in args.ratios:
                    tune = any(abs(ratio - r) < 1e-9 for r in args.finetune_ratios)
                    row = prune_and_evaluate(name, state, criterion, ratio, calib, labels, test,
                                             seed, train=train,
                                             finetune_steps=args.finetune_steps if tune else 0,
                                             curvature=curvature)
                    entry["results"][criterion][f"{ratio:g}"] = row
                    print(name, f"seed {seed}", criterion, ratio, row, flush=True)
                seeds[str(seed)] = entry
                write_json(args.out, data)  # after every criterion: --resume keeps it
            seeds[str(seed)] = entry
            write_json(args.out, data)
    _finish(data, args)


def _settings(args: argparse.Namespace) -> dict:
    return vars(args) | {"out": str(args.out), "plot": str(args.plot), "finetune": FINETUNE,
                         "merge": None}


#: Settings that may differ between runs whose results are combined (``--resume``, ``--merge``).
FREE = {"seeds", "models", "out", "plot", "resume", "criteria", "merge"}


def merge(paths: list[Path], args: argparse.Namespace, argv: list[str]) -> dict:
    """The benchmark JSON that combines the (model, seed) results of ``paths``, each written
    with the settings of ``args`` (:data:`FREE` aside); a (model, seed) in two files is an
    error."""
    data = {"command": "python benchmarks/structured.py " + shlex.join(argv),
            "settings": _settings(args), "models": {},
        "merged_from": {}}
    for path in paths:
        if not path.exists():
            raise SystemExit(f"--merge: {path} does not exist")
        done = resumable(path, data["settings"], ignore=FREE)
        data["merged_from"][str(path)] = json.loads(path.read_text())["command"]
        for name, seeds in done.items():
            into = data["models"].setdefault(name, {"seeds": {}})["seeds"]
            twice = sorted(set(into) & set(seeds))
            if twice:
                raise SystemExit(f"--merge: {name} seed(s) {', '.join(twice)} are in two of "
                                 "the files; merge each (model, seed) from one file")
            into.update(seeds)
    for entry in data["models"].values():  # seeds in numeric order
        entry["seeds"] = dict(sorted(entry["seeds"].items(), key=lambda kv: int(kv[0])))
    return data


def _finish(data: dict, args: argparse.Namespace) -> None:
    """Write the JSON, its tables (``.md`` beside it) and the plot."""
    write_json(args.out, data)
    text = markdown(data)
    md = args.out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(f"Command: `{data['command']}`\n\n" + text)
    os.replace(tmp, md)
    plot(data, args.plot)
    print(text)


if __name__ == "__main__":
    main()
