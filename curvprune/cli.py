"""The ``curvprune`` command: ``demo``, ``prune``, ``analyze`` and ``estimate``.

Every output file is written to a temporary name and renamed into place, so an interrupted run
never leaves a half-written file. Bad input (an unknown model, a missing data path, an amount out
of range, an unwritable output folder) prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._checks import ALLOCATIONS, GRANULARITIES, ORDERS, SCOPES, check_order
from .errors import UsageError
from .outputs import atomic_write, output_dir, write_json
from .plots import plot_kappa_histograms, plot_sparsity

__all__ = ["main", "load_model", "UsageError"]


def load_model(spec: str, *, num_classes: int | None = 10, in_channels: int | None = None,
               checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Deprecated: use :func:`curvprune.models.create_model`, which takes the same specs.

    ``create_model(spec, ...)`` with its ``ValueError`` reported as the command line's one-line
    ``UsageError``.
    """
    import warnings

    warnings.warn("curvprune.cli.load_model is deprecated; use curvprune.models.create_model",
                  DeprecationWarning, stacklevel=2)
    return _create_model(spec, num_classes=num_classes, in_channels=in_channels,
                         checkpoint=checkpoint)


def _create_model(spec: str, *, num_classes: int | None, in_channels: int | None = None,
                  checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """``create_model`` for the command line: a ``ValueError`` becomes a ``UsageError``."""
    from .models import create_model

    if spec.startswith("zoo:") and num_classes == 10:
        num_classes = None  # a zoo entry has 10 classes already
    try:
        return create_model(spec, num_classes=num_classes, in_channels=in_channels,
                            checkpoint=checkpoint)
    except ValueError as exc:
        raise UsageError(str(exc).replace("(num_classes)", "(--num-classes)")) from exc


def _load_data(spec: str, train: bool):
    from .data import load_dataset

    try:
        return load_dataset(spec, train=train)
    except FileNotFoundError as exc:
        raise UsageError(f"data not found for {spec!r}: {exc}") from exc
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _match_input(model: nn.Module, dataset):
    """Grey images for an RGB model: repeat the channel and pad to at least 32 x 32.

    Fashion-MNIST and MNIST are 1 x 28 x 28; timm/torchvision models take 3 channels. When the
    model's first Conv2d wants 3 input channels and the data has 1, the grey channel is repeated
    and the images are zero-padded to 32 x 32 (the smallest size every zoo model accepts).
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    tensors = getattr(dataset, "tensors", None)
    if first is None or tensors is None or tensors[0].dim() != 4:
        return dataset
    images = tensors[0]
    if images.shape[1] == 1 and first.in_channels == 3:
        pad = max(0, 32 - images.shape[-1])
        images = nn.functional.pad(images, (pad // 2, pad - pad // 2) * 2)
        images = images.expand(-1, 3, -1, -1).contiguous()
        return torch.utils.data.TensorDataset(images, *tensors[1:])
    return dataset


def _parsed(name: str, convert: Callable[[str], Any], kind: str, valid: Callable[[Any], bool],
            expected: str, none: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` (``'none'`` -> ``None`` when ``none``), refused
    with ``"{name} must be {kind}"`` when it does not convert and ``"{name} must be
    {expected}"`` when ``valid`` rejects it."""
    def parse(text: str) -> Any:
        if none and text.lower() == "none":
            return None
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


_threads = _parsed("threads", int, "an integer", lambda v: v >= 1, "at least 1")
_amount = _parsed("amount", float, "a number", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_nodes = _parsed("nodes", int, "a positive integer or 'none'", lambda v: v >= 1,
                 "a positive integer", none=True)
_tolerance = _parsed("tolerance", float, "a number", lambda v: 0 <= v < float("inf"),
                     "a finite number >= 0")


def _order(text: str) -> str:
    """``--order``: the old ``pos``/``neg`` map (through :func:`check_order`) to the new names,
    with the deprecation written to stderr; anything else is left to argparse's choices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            order = check_order(text)
        except ValueError:
            return text
    for warning in caught:
        sys.stderr.write(f"curvprune: warning: {warning.message}\n")
    return order


def _calibration(model, dataset, per_class: int, seed: int, kind: str = "correct"):
    from .data import class_balanced_calibration, random_calibration

    try:
        if kind == "random":
            return random_calibration(dataset, min(len(dataset), 10 * per_class), seed=seed)
        return class_balanced_calibration(model, dataset, per_class, seed=seed)
    except ValueError as exc:
        raise UsageError(f"calibration: {exc} (is the model trained on this data?)") from exc


def _common(sub: argparse.ArgumentParser, out_required: bool = True) -> None:
    sub.add_argument("--model", required=True,
                     help="PATH.pt (a saved model), lenet5 or curvprune:NAME, timm:NAME, "
                          "torchvision:NAME, zoo:NAME (see curvprune.models.create_model)")
    sub.add_argument("--checkpoint", "--weights", dest="checkpoint", metavar="PATH",
                     help="trained weights to load into the model before scoring: a state "
                          "dict saved with torch.save(model.state_dict(), PATH), plain or "
                          "wrapped under 'state_dict'/'model'")
    sub.add_argument("--num-classes", type=int, default=None, metavar="N",
                     help="classes of a timm:/torchvision:/curvprune: architecture (default: "
                          "the data's); match the checkpoint's classifier")
    sub.add_argument("--data", default="fashion-mnist",
                     help="fashion-mnist, mnist:DIR, cifar10:DIR, cifar100:DIR, imagefolder:DIR")
    sub.add_argument("--calibration-per-class", type=int, default=1)
    sub.add_argument("--calibration", choices=["correct", "random"], default="correct",
                     help="correct: the paper's k correctly classified examples per class; "
                          "random: a plain random batch of 10 k examples (no trained model "
                          "needed)")
    sub.add_argument("--alpha", type=float, default=0.9)
    sub.add_argument("--granularity", choices=GRANULARITIES, default="auto",
                     help="neuron (the paper's graph, chains only), channel (any model) or auto "
                          "(neuron when it fits, else channel)")
    sub.add_argument("--device", default=None)
    sub.add_argument("--threads", type=_threads, default=None,
                     help="CPU threads for the curvature engine: bounds, tightening and exact "
                          "solves (default: all of torch's threads)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", required=out_required,
                     help="output folder (created if missing)" if out_required else
                     "accepted and ignored (nothing is written)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars or tables")


def _data_classes(dataset) -> int:
    """Number of classes of a dataset: ``.classes`` (CIFAR, ImageFolder) or the largest label
    plus one (the ``TensorDataset`` of Fashion-MNIST and MNIST)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) > 1 and tensors[1].numel():
        return int(tensors[1].max()) + 1
    return 10


def _prepare(args, write: bool = True) -> tuple[nn.Module, Any, Any, Path | None]:
    out = output_dir(args.out) if write else None
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError("--num-classes must be at least 1")
    test = _load_data(args.data, train=False)
    num_classes = args.num_classes or _data_classes(test)
    model = _create_model(args.model, num_classes=num_classes, checkpoint=args.checkpoint)
    if args.device:
        from .curvature import resolve_device

        try:
            model.to(resolve_device(args.device, model))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if args.calibration_per_class < 1:
        raise UsageError("--calibration-per-class must be at least 1")
    test = _match_input(model, test)
    calibration, _ = _calibration(model, test, args.calibration_per_class, args.seed,
                                  args.calibration)
    return model, test, calibration, out


def _cmd_prune(args) -> dict:
    from .pruning import make_permanent, prune_model

    if args.scope is None:  # the API's defaults: prune_model global, prune_channels per group
        args.scope = "layer" if args.structured else "global"
    if args.structured:
        if args.order != "positive_first":
            raise UsageError("--structured ranks channels by curvature importance (bottlenecks "
                             "kept); --order negative_first is for unstructured pruning only.")
        if args.granularity == "neuron":
            raise UsageError("--structured uses channel granularity; drop --granularity neuron.")
        if args.amount >= 1:
            raise UsageError("--structured --amount is the channel ratio, in [0, 1).")
        if args.allocation != "curvature":
            raise UsageError("--allocation is for unstructured pruning; --structured removes "
                             "the same channel ratio from every group.")
        if args.criterion != "curvature":
            raise UsageError("--criterion is for unstructured pruning; --structured ranks "
                             "channels by curvature importance.")
        return _cmd_prune_channels(args)

    def prune(model: nn.Module, calibration: Any):
        report = prune_model(model, calibration, args.amount, scope=args.scope,
                             order=args.order, alpha=args.alpha, granularity=args.granularity,
                             progress=not args.quiet, allocation=args.allocation,
                             threads=args.threads, tolerance=args.tolerance,
                             criterion=args.criterion)
        make_permanent(model)
        return report

    model, calibration, out, report, before, after, start = _evaluated_pruning(args, prune)
    data = {
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "overall_sparsity": report.overall_sparsity,
        "layers": [{"name": r.name, "pruned": r.pruned, "total": r.total,
                    "sparsity": r.sparsity} for r in report.layers.values()],
        "accuracy_before": before, "accuracy_after": after,
        "calibration_examples": len(calibration),
        "granularity": report.result.granularity if report.result is not None else None,
        "fallback": report.fallback,
        "scoring_seconds": report.result.seconds if report.result is not None else None,
        "tolerance": report.tolerance,
        "max_interval_width": report.result.max_width if report.result is not None else None,
        "refined_weights": report.refined,
        "refine_rounds": report.refine_rounds,
        "seconds": time.perf_counter() - start,
    }
    files = ["model.pt", "report.json", "sparsity.png"]
    if report.result is not None:
        files.append("kappa_histograms.png")
    data["files"] = files
    atomic_write(out / "model.pt", lambda tmp: torch.save(model, tmp))
    write_json(out / "report.json", data)
    plot_sparsity(report, out / "sparsity.png")
    if report.result is not None:
        plot_kappa_histograms(report.result, out / "kappa_histograms.png")
    else:  # no curvature to plot: leave no stale plot of an earlier run beside this report
        (out / "kappa_histograms.png").unlink(missing_ok=True)
    if report.result is None and not args.quiet:
        print(f"note: no kappa_histograms.png: the weights were ranked by {report.fallback}")
    _print_done(args, report.summary(), before, after, out, ", ".join(files))
    return data


def _evaluated_pruning(args, prune: Callable[[nn.Module, Any], Any]) -> tuple:
    """The body both kinds of ``prune`` share: build the model and data (:func:`_prepare`),
    measure test accuracy, run ``prune(model, calibration)`` (its ``ValueError``/``TypeError``
    as a ``UsageError``), measure again. Returns ``(model, calibration, out, report, before,
    after, start)``; the accuracies are ``None`` with ``--no-eval``."""
    from .evaluation import accuracy

    model, test, calibration, out = _prepare(args)
    start = time.perf_counter()
    before = None if args.no_eval else accuracy(model, test, limit=args.eval_limit)
    try:
        report = prune(model, calibration)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    after = None if args.no_eval else accuracy(model, test, limit=args.eval_limit)
    return model, calibration, out, report, before, after, start


def _print_done(args, summary: str, before, after, out: Path, files: str) -> None:
    if args.quiet:
        return
    print(summary)
    if before is not None:
        print(f"accuracy {before:.4f} -> {after:.4f}")
    print(f"wrote {out}/{files}")


def _zoo_ignored_layers(spec: str, model: nn.Module) -> list[nn.Module] | None:
    """For a ``zoo:NAME`` model, the layers its registry entry keeps unpruned (the classifier
    and the residual streams Torch-Pruning's tracer misreads: see
    :func:`curvprune.models.zoo.ignored_layers`); ``None`` (prune_channels' default) otherwise."""
    kind, _, name = spec.partition(":")
    if kind != "zoo":
        return None
    from .models import zoo

    return zoo.ignored_layers(name, model)


def _cmd_prune_channels(args) -> dict:
    from .pruning.structured import prune_channels

    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}

    def prune(model: nn.Module, calibration: Any):
        return prune_channels(model, calibration, args.amount, alpha=args.alpha,
                              global_pruning=args.scope == "global", threads=args.threads,
                              ignored_layers=_zoo_ignored_layers(args.model, model),
                              **tolerance)

    model, calibration, out, report, before, after, start = _evaluated_pruning(args, prune)
    result = report.importance.result
    data = {
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "structured": True,
        "params_before": report.params_before, "params_after": report.params_after,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "widths_before": report.widths_before, "widths_after": report.widths_after,
        "fallback": report.fell_back,
        "accuracy_before": before, "accuracy_after": after,
        "calibration_examples": len(calibration),
        "scoring_seconds": result.seconds if result is not None else None,
        "tolerance": report.tolerance,
        "max_interval_width": result.max_width if result is not None else None,
        "refined_weights": report.refined,
        "refined_channel_edges": report.refined_edges,
        "refine_rounds": report.refine_rounds,
        "seconds": time.perf_counter() - start,
    }
    atomic_write(out / "model.pt", lambda tmp: torch.save(model, tmp))
    write_json(out / "report.json", json.loads(json.dumps(data, default=_jsonable)))
    _print_done(args, report.summary(), before, after, out, "model.pt, report.json")
    return data


def _cmd_analyze(args) -> dict:
    from dataclasses import asdict

    from .analysis import curvature_statistics, most_negative, relational_measures
    from .curvature import neural_curvature
    from .errors import UntraceableModel

    model, _, calibration, out = _prepare(args)
    notes = []
    try:
        result = neural_curvature(model, calibration, alpha=args.alpha,
                                  granularity=args.granularity, progress=not args.quiet,
                                  threads=args.threads)
    except UntraceableModel as exc:  # the graph measures need no curvature: report them
        result = None
        notes.append(f"no curvature statistics: {exc}")
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    try:
        relational = relational_measures(model, nodes=args.nodes)
    except ValueError as exc:
        raise UsageError(f"relational measures: {exc}") from exc
    data = {
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "statistics": None if result is None else
        [asdict(s) for s in curvature_statistics(result)],
        "bottlenecks": None if result is None else
        {name: asdict(b) for name, b in most_negative(result, args.top).items()},
        "relational": _relational_json(relational),
        "relational_pruned": {},
        "seconds": None if result is None else result.seconds,
        "notes": notes,
    }
    summaries = [relational.summary()]
    for amount in args.amount or []:
        if result is None:
            notes.append(f"no relational measures at --amount {amount}: no curvature ranking")
            continue
        pruned = _relational_at_amount(result, amount, args.nodes)
        data["relational_pruned"][str(amount)] = _relational_json(pruned)
        summaries.append(f"after pruning {amount:.0%} of the scored weights by curvature "
                         f"(order positive_first, global):\n{pruned.summary()}")
    files = ["analysis.json"]
    if result is not None:
        plot_kappa_histograms(result, out / "kappa_histograms.png")
        files.append("kappa_histograms.png")
    else:
        (out / "kappa_histograms.png").unlink(missing_ok=True)
    write_json(out / "analysis.json", json.loads(json.dumps(data, default=_jsonable)))
    if not args.quiet:
        if result is not None:
            print(result.summary())
        print("\n".join(summaries))
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {out}/{', '.join(files)}")
    return data


def _relational_json(relational) -> dict:
    """The relational measures as JSON: per-layer and network measures, notes and the table."""
    from dataclasses import asdict

    return {"nodes": relational.nodes,
            "layers": {name: {"pruned": asdict(r.pruned), "dense": asdict(r.dense)}
                       for name, r in relational.layers.items()},
            "network": None if relational.network is None else
            {"pruned": asdict(relational.network.pruned),
             "dense": asdict(relational.network.dense)},
            "notes": relational.notes, "summary": relational.summary()}


def _relational_at_amount(result, amount: float, nodes: int | None):
    """Relational measures of the masks a global curvature pruning (order positive_first) of
    ``amount`` of the scored weights leaves: the first ``round(amount * N)`` weights of
    :meth:`CurvatureResult.pruning_order` go (zero weights first, as in ``prune_model``)."""
    from .analysis import relational_measures_masks

    ranks = result.pruning_order("positive_first")
    total = sum(r.numel() for r in ranks.values())
    cut = round(amount * total)
    masks = {name: (r >= cut).cpu() for name, r in ranks.items()}
    groups = {name: result.modules[name].groups for name in ranks
              if isinstance(result.modules[name], nn.Conv2d)}
    return relational_measures_masks(masks, nodes=nodes, groups=groups)


def _cmd_estimate(args) -> dict:
    from .estimate import estimate

    model, _, calibration, _ = _prepare(args, write=False)
    granularity = "channel" if args.structured else args.granularity
    if args.structured and args.granularity == "neuron":
        raise UsageError("--structured uses channel granularity; drop --granularity neuron.")
    from .errors import UntraceableModel

    try:
        result = estimate(model, calibration, granularity=granularity, alpha=args.alpha,
                          device=args.device, tolerance=args.tolerance, threads=args.threads,
                          measure=not args.no_measure,
                          node_reduction="mean" if args.structured else None)
    except UntraceableModel as exc:  # prune falls back to magnitude: nothing to score
        data = {"fallback": f"magnitude: {exc}"}
        print(json.dumps(data, indent=2) if args.json else
              f"no curvature scoring: {exc}; prune would rank the weights by magnitude |w| "
              "(no scoring cost) and analyze would report the graph measures only")
        return data
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    data = result.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(result.summary())
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _cmd_demo(args) -> dict:
    from .demo import run_demo

    return run_demo(seed=args.seed, quiet=args.quiet, out=args.out)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"curvprune: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="curvprune", description="Prune PyTorch models by neural curvature.")
    subs = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = subs.add_parser("demo", help="the main job on an embedded default (no arguments)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--out", default=".",
                      help="folder for model.pt (the trained model), demo_accuracy.png and "
                           "kappa_histograms.png (default: the current folder)")
    demo.set_defaults(func=_cmd_demo)
    prune = subs.add_parser("prune", help="score, prune, evaluate and save a model")
    _common(prune)
    prune.add_argument("--amount", type=_amount, required=True,
                       help="fraction of the weights to remove, in [0, 1]")
    prune.add_argument("--scope", choices=SCOPES, default=None,
                       help="global: one ranking of all weights (default, as prune_model); "
                            "layer: every layer loses --amount. With --structured: layer (the "
                            "default, as prune_channels) removes the ratio from every group, "
                            "global ranks all groups together")
    prune.add_argument("--order", type=_order, choices=ORDERS, default="positive_first",
                       help="what is pruned first: positive_first (the most positive curvature, "
                            "the paper's method; default) or negative_first (the most negative, "
                            "the paper's control); the old pos/neg still work, with a warning")
    prune.add_argument("--allocation", choices=ALLOCATIONS,
                       default="curvature",
                       help="with --scope global: how much of each layer goes (curvature: one "
                            "global ranking, the paper; wanda/magnitude: that criterion's "
                            "per-layer amounts, curvature's order within each layer)")
    prune.add_argument("--criterion", choices=["curvature", "curvature_wanda"],
                       default="curvature",
                       help="what ranks the weights: curvature (default, the paper: kappa "
                            "alone) or curvature_wanda (keep the largest (2 - kappa) |w| ||x||, "
                            "curvature times Wanda's score; see docs/benchmarks.md, the "
                            "quality study)")
    prune.add_argument("--structured", action="store_true",
                       help="remove whole channels through Torch-Pruning (CurvatureImportance); "
                            "--amount is then the channel ratio of every group (--scope global "
                            "ranks all groups together)")
    prune.add_argument("--tolerance", type=_tolerance, default=None,
                       help="width of the certified curvature intervals (default 0.01; 1e-14 "
                            "is exact in practice, 0 exact); the pruned set is always the exact "
                            "one: weights "
                            "(with --structured: channel edges) whose interval straddles the "
                            "threshold are solved exactly (report.json: refined_weights)")
    prune.add_argument("--no-eval", action="store_true", help="skip the accuracy evaluation")
    prune.add_argument("--eval-limit", type=int, default=None,
                       help="evaluate on at most this many test examples")
    prune.set_defaults(func=_cmd_prune)
    analyze = subs.add_parser("analyze", help="curvature statistics, bottlenecks, plots, "
                                              "graph measures")
    _common(analyze)
    analyze.add_argument("--top", type=int, default=10, help="bottlenecks listed per layer")
    analyze.add_argument("--nodes", type=_nodes, default=64,
                         help="node count of the relational graphs (You et al. 2020; default "
                              "64, 'none' for one node per channel of a layer's narrower side)")
    analyze.add_argument("--amount", type=_amount, action="append",
                         help="also report the relational measures after a global curvature "
                              "pruning of this fraction of the weights (repeatable)")
    analyze.set_defaults(func=_cmd_analyze)
    _add_estimate(subs)
    return parser


def _add_estimate(subs) -> None:
    estimate = subs.add_parser(
        "estimate", help="graph size, memory and time of scoring, before running it",
        description="Print what scoring would cost (the model and data arguments of prune; "
                    "its pruning options are accepted and ignored, so a prune command line "
                    "works with the word changed). Nothing is written.")
    _common(estimate, out_required=False)
    estimate.add_argument("--structured", action="store_true",
                          help="estimate for prune --structured (channel granularity)")
    estimate.add_argument("--json", action="store_true", help="print the numbers as JSON")
    estimate.add_argument("--no-measure", action="store_true",
                          help="skip the timing (graph size and memory only)")
    estimate.add_argument("--tolerance", type=_tolerance, default=None,
                          help="the tolerance prune would use (default 0.01); the timed "
                               "example is scored at it")
    for flag, kwargs in [("--amount", {}), ("--scope", {}), ("--order", {}),
                         ("--allocation", {}), ("--criterion", {}), ("--eval-limit", {}),
                         ("--no-eval", {"action": "store_true"})]:
        estimate.add_argument(flag, help=argparse.SUPPRESS, **kwargs)
    estimate.set_defaults(func=_cmd_estimate)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``curvprune`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as exc:
        sys.stderr.write(f"curvprune: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
