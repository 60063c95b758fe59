"""Unstructured post-training pruning on Fashion-MNIST: accuracy against sparsity, no fine-tuning.

    python benchmarks/unstructured.py                       # full: LeNet-5 and MLP, 3 seeds
    python benchmarks/unstructured.py --per-class 5         # 5 calibration examples per class
    python benchmarks/unstructured.py --quick --out /tmp/q  # tiny CI run (well under a minute)
    python benchmarks/unstructured.py --models vgg9 --seeds 0 1 2 --name unstructured_vgg9
    python benchmarks/unstructured.py --resume              # add new criteria to kept seeds
    python benchmarks/unstructured.py --criteria magnitude lamp --name unstructured_lamp
    python benchmarks/unstructured.py --models vgg9 --granularity neuron --tolerance 1e-2 \
        --amounts 0 0.5 0.7 0.8 0.9 0.95 --name unstructured_vgg9_neuron

For each model and seed the model is trained (seeded, cached under ``benchmarks/.cache``), a
calibration set of ``--per-class`` correctly classified *training* examples per class is drawn
with the same seed, and every criterion scores the model once; the same scores are then used for
every amount (fraction of all Linear/Conv2d weights removed) and the pruned model is evaluated
on the Fashion-MNIST test set. Criteria:

* ``curv_pos`` / ``curv_neg``: neural curvature, ``importance_scores("positive_first"`` /
  ``"negative_first")``, global (the labels keep their short names: stored results use them);
  neuron granularity for LeNet-5 and the MLP; for VGG-9 ``granularity="auto"`` (channel: its
  neuron graph has 43M edges per example) unless ``--granularity neuron`` is given. The curvature
  is exact (``tolerance=1e-14``) unless ``--tolerance`` says otherwise; with a tolerance the
  ranking uses each weight's interval midpoint (``importance_scores``' default point).
* ``curv_wanda``: the ``"curvature_wanda"`` criterion of ``prune_model`` (issue 13's study),
  ``(2 - kappa) |w| ||X_j||_2`` ranked globally, from the same curvature and Wanda's input norms
  on the same calibration set (:func:`curvprune.pruning.criteria.curvature_wanda_ranks`).
* ``magnitude``: global |w|.  ``random``: seeded uniform scores, global.
* ``lamp``: LAMP (Lee et al., 2021), w_u^2 / sum_{v >= u} w_v^2 within each layer sorted by
  magnitude, ranked globally (:func:`curvprune.baselines.lamp_scores`).
* ``wanda_row``: Wanda, each output row pruned by the fraction (the Wanda paper's group,
  ``prune_per_row``); ``wanda_global``: Wanda scores ranked globally.
* ``snip``: |w dL/dw| on the calibration batch with its labels, global.
* ``curv_pos_layer``, ``curv_neg_layer``, ``magnitude_layer``: every layer pruned by the same
  fraction.
* ``curv_pos_wanda_alloc``, ``magnitude_wanda_alloc``: each layer loses as many weights as under
  ``wanda_global``, chosen within the layer by curvature "positive_first" (or by magnitude, the
  control): :func:`curvprune.allocate_like`.

``--resume`` keeps the (model, seed) results already in the output JSON (written with the same
settings, seeds and criteria aside). A kept seed that lacks some of today's criteria gets only
those computed: the model is retrained from its seed (or loaded from the cache), the curvature is
recomputed only if a missing criterion needs it, and ``magnitude`` is rerun as a check that the
model is the one the kept rows came from (the script stops if its accuracies differ). The seed
records which criteria were added by which command (``criteria_added``).

Results: ``--out`` folder (default ``benchmarks/results``) gets ``unstructured.json`` (raw
accuracies, settings, the command); ``--plots`` folder (default ``docs``) gets
``unstructured_global.png`` and ``unstructured_layer.png`` (written atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, EXACT, RESULTS, evaluate, resumable, trained_model  # noqa: E402
from plots import plot_results  # noqa: E402

from curvprune import (  # noqa: E402
    CurvaturePruning,
    allocate_like,
    make_permanent,
    neural_curvature,
)
from curvprune.baselines import (  # noqa: E402
    lamp_scores,
    magnitude_scores,
    prune_per_row,
    random_scores,
    snip_scores,
    wanda_scores,
)
from curvprune.data import class_balanced_calibration, fashion_mnist  # noqa: E402
from curvprune.models import create_model  # noqa: E402
from curvprune.pruning.criteria import curvature_wanda_ranks  # noqa: E402
from curvprune.training import train_classifier  # noqa: E402

GLOBAL = ["curv_pos", "curv_neg", "curv_wanda", "magnitude", "random", "lamp", "wanda_row",
          "wanda_global", "snip", "curv_pos_wanda_alloc", "magnitude_wanda_alloc"]
LAYER = ["curv_pos_layer", "curv_neg_layer", "magnitude_layer"]
CRITERIA = GLOBAL + LAYER
AMOUNTS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def train_generic(name: str, kwargs: dict, *, epochs: float, seed: int, lr: float = 1e-3,
                  cache: bool = True, verbose: bool = True) -> nn.Module:
    """``create_model(name, **kwargs)`` trained by :func:`curvprune.training.train_classifier`
    (batch 128) for ``epochs`` epochs (fractions allowed: ``round(epochs * 469)`` steps on
    Fashion-MNIST's 60,000 images), seeded, cached by its settings (as ``trained_model``, which
    cannot pass ``kwargs``)."""
    settings = dict(name=name, kwargs=kwargs, epochs=epochs, seed=seed, lr=lr)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"{name}-{key}.pt"
    torch.manual_seed(seed)  # the initial weights too: torch's own start seed varies by process
    model = create_model(name, **kwargs)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()
    torch.manual_seed(seed)
    train = fashion_mnist(train=True)
    steps = int(round(epochs * math.ceil(len(train) / 128)))
    train_classifier(model, train, epochs=None, max_steps=steps, batch_size=128, lr=lr,
                     seed=seed, progress=verbose, desc=f"train {name} seed {seed}")
    if cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model


def build_scores(model: nn.Module, calib: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                 seed: int, progress: bool, granularity: str = "neuron",
                 criteria: list[str] | None = None, tolerance: float = EXACT
                 ) -> tuple[dict, dict]:
    """Every criterion's importance scores (computed once), plus timing and curvature facts;
    only those of ``criteria`` when given (the curvature only if one of them needs it)."""
    wanted = set(CRITERIA if criteria is None else criteria)
    info: dict = {}
    scores: dict = {}
    if wanted & {"curv_pos", "curv_neg", "curv_wanda", "curv_pos_layer", "curv_neg_layer",
                 "curv_pos_wanda_alloc"}:
        start = time.perf_counter()
        result = neural_curvature(model, calib, alpha=alpha, progress=progress,
                                  granularity=granularity, tolerance=tolerance,
                                  threads=os.cpu_count() or 1)
        info["curvature_seconds"] = round(time.perf_counter() - start, 2)
        info["granularity"] = result.granularity
        if tolerance != EXACT:
            info["tolerance"] = tolerance
            info["max_width"] = result.max_width
        live = {n: float(v.float().mean()) for n, v in result.live.items()} \
            if isinstance(result.live, dict) else None
        info["live_fraction"] = live
        pos = result.importance_scores("positive_first")
        neg = result.importance_scores("negative_first")
        scores.update({"curv_pos": pos, "curv_neg": neg, "curv_pos_layer": pos,
                       "curv_neg_layer": neg})
    mag = magnitude_scores(model)
    scores.update({"magnitude": mag, "magnitude_layer": mag, "lamp": lamp_scores(model),
                   "random": random_scores(model, seed=seed)})
    if wanted & {"wanda_row", "wanda_global", "curv_wanda", "curv_pos_wanda_alloc",
                 "magnitude_wanda_alloc"}:
        wanda = wanda_scores(model, calib)
        scores.update({"wanda_row": wanda, "wanda_global": wanda,
                       "magnitude_wanda_alloc": allocate_like(mag, wanda)})
        if "curv_pos" in scores:
            scores["curv_pos_wanda_alloc"] = allocate_like(scores["curv_pos"], wanda)
            by_name = {n: wanda[(result.modules[n], "weight")].detach().to(torch.float64)
                       for n in result.kappa}
            scores["curv_wanda"] = curvature_wanda_ranks(result, by_name)
    if "snip" in wanted:
        scores["snip"] = snip_scores(model, (calib, labels))
    return {c: scores[c] for c in CRITERIA if c in wanted}, info


def prune_with(model: nn.Module, criterion: str, scores: dict, amount: float
               ) -> tuple[float, dict[str, float]]:
    """Prune ``model`` in place by ``criterion`` at ``amount``; return the achieved sparsity,
    overall and per weight (by parameter name)."""
    params = list(scores)
    if amount > 0:
        if criterion in GLOBAL and criterion != "wanda_row":
            prune.global_unstructured(params, pruning_method=CurvaturePruning,
                                      importance_scores=scores, amount=amount)
        elif criterion == "wanda_row":
            for module, name in params:
                prune_per_row(module, scores[(module, name)], amount)
        else:
            for module, name in params:
                CurvaturePruning.apply(module, name, amount=amount, importance_scores=scores)
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    names = {id(m): n for n, m in model.named_modules()}
    per_layer = {f"{names.get(id(m), '?')}.weight": round(float((m.weight == 0).double().mean()),
                                                           4) for m, _ in params}
    return zeros / total, per_layer


def run_seed(model: nn.Module, test, scores: dict, amounts: list[float], *,
             progress: bool) -> tuple[dict, dict, dict]:
    """Prune and evaluate every criterion of ``scores`` at every amount."""
    from tqdm.auto import tqdm

    state = {k: v.clone() for k, v in model.state_dict().items()}
    criteria = list(scores)
    accuracy: dict = {c: {} for c in criteria}
    sparsity: dict = {c: {} for c in criteria}
    layers: dict = {c: {} for c in criteria}
    jobs = [(c, a) for c in criteria for a in amounts]
    for criterion, amount in tqdm(jobs, desc="prune+evaluate", disable=not progress):
        key = f"{amount:g}"
        overall, per_layer = prune_with(model, criterion, scores[criterion], amount)
        sparsity[criterion][key] = round(overall, 6)
        layers[criterion][key] = per_layer
        accuracy[criterion][key] = evaluate(model, test)
        make_permanent(model)
        model.load_state_dict(state)
    return accuracy, sparsity, layers


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "mlp"],
                        choices=["lenet5", "mlp", "vgg9"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--amounts", type=float, nargs="+", default=AMOUNTS)
    parser.add_argument("--per-class", type=int, default=1,
                        help="correctly classified calibration examples per class (paper: 1)")
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--mlp-hidden", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--quick", action="store_true",
                        help="tiny CI run: 1 seed, amounts 0/0.5/0.9, MLP(32) trained 100 steps, "
                             "1000 test examples")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plots", type=Path, default=DOCS)
    parser.add_argument("--name", default="unstructured",
                        help="file stem of the JSON and plots (default unstructured)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for training and evaluation (default 1: "
                             "on a shared 2-core machine 2 threads ran 8x slower; the curvature "
                             "engine's solver threads are separate)")
    parser.add_argument("--granularity", choices=["neuron", "channel"],
                        help="curvature graph for every model (default: neuron for LeNet-5 and "
                             "the MLP, 'auto' for VGG-9, which picks channel)")
    parser.add_argument("--tolerance", type=float, default=EXACT,
                        help=f"curvature interval width (default {EXACT}: exact); the ranking "
                             "uses the interval midpoints")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=CRITERIA,
                        help="run only these criteria (default all; the curvature is computed "
                             "only if one of them needs it)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (model, seed) results already in the output JSON when it "
                             "was written with the same settings (seeds aside); run the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    progress = not args.no_progress
    if args.quick:
        args.seeds, args.amounts, args.per_class = args.seeds[:1], [0.0, 0.5, 0.9], 1
        args.models = ["mlp"]

    test = fashion_mnist(train=False)
    train = fashion_mnist(train=True)
    if args.quick:
        test = torch.utils.data.TensorDataset(test.tensors[0][:1000], test.tensors[1][:1000])
    out_json = args.out / f"{args.name}.json"
    data = {
        "command": "python benchmarks/unstructured.py " + shlex.join(argv if argv is not None
                                                                       else sys.argv[1:]),
        "settings": {
            "dataset": "fashion-mnist", "quick": args.quick, "models": args.models,
            "seeds": args.seeds, "amounts": args.amounts, "per_class": args.per_class,
            "calibration": "per_class correctly classified training examples per class, "
                           "drawn with the seed", "alpha": args.alpha,
            "epochs": None if args.quick else args.epochs,
            "mlp_hidden": [32] if args.quick else args.mlp_hidden,
            "test_examples": len(test), "fine_tuning": False,
            "amount_meaning": "fraction of all Linear/Conv2d weights removed (global), or of "
                              "each layer's weights (*_layer, wanda_row: of each output row)",
            "criteria": [c for c in CRITERIA if c in args.criteria],
        },
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "status": "running",
        "models": {},
    }
    if args.granularity is not None:  # only when given: older files keep resuming
        data["settings"]["granularity"] = args.granularity
    if args.tolerance != EXACT:
        data["settings"]["tolerance"] = args.tolerance
    done: dict = {}
    if args.resume:
        done = resumable(out_json, data["settings"], ignore={"seeds", "models", "criteria"})
        if done:
            old = json.loads(out_json.read_text())
            data["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
            for name in done:  # models of the file that this run does not touch stay as they are
                if name not in args.models:
                    data["models"][name] = old["models"][name]
                    data["settings"]["models"] = data["settings"]["models"] + [name]
    total_start = time.perf_counter()
    for name in args.models:
        entry = data["models"].setdefault(name, {"seeds": {}})
        if name == "vgg9" and not args.quick:
            m_test, m_train = (fashion_mnist(train=False, pad_to=32),
                               fashion_mnist(train=True, pad_to=32))
        else:
            m_test, m_train = test, train
        for seed in args.seeds:
            kept = done.get(name, {}).get(str(seed))
            missing = [c for c in data["settings"]["criteria"]
                       if kept is not None and c not in kept["accuracy"]]
            if kept is not None and not missing:
                print(f"{name} seed {seed}: kept from {out_json} (--resume)", flush=True)
                entry["seeds"][str(seed)] = kept
                continue
            if args.quick:
                model = train_generic("mlp", {"hidden": (32,)}, epochs=100 / 469, seed=seed,
                                      cache=False, verbose=progress)
                accuracy = evaluate(model, m_test)
            elif name == "vgg9":  # Fashion-MNIST padded to 32 x 32 (method.md section 5)
                model, accuracy = trained_model("vgg9", epochs=args.epochs, seed=seed,
                                                pad_to=32, in_channels=1, verbose=progress)
            elif name == "lenet5":
                model, accuracy = trained_model("lenet5", epochs=args.epochs, seed=seed,
                                                verbose=progress)
            else:
                model = train_generic("mlp", {"hidden": tuple(args.mlp_hidden)},
                                      epochs=args.epochs, seed=seed, verbose=progress)
                accuracy = evaluate(model, m_test)
            calib, labels = class_balanced_calibration(model, m_train, args.per_class,
                                                       num_classes=10, seed=seed)
            granularity = args.granularity or ("auto" if name == "vgg9" else "neuron")
            if kept is not None:  # add the missing criteria to the kept seed
                print(f"{name} seed {seed}: kept from {out_json} (--resume); adding "
                      f"{', '.join(missing)}", flush=True)
                stale = (f"--resume: {name} seed {seed} is not the model of {out_json} "
                         "({}); rerun without --resume")
                if accuracy != kept["test_accuracy"]:
                    raise SystemExit(stale.format(f"test accuracy {accuracy} against "
                                                  f"{kept['test_accuracy']}"))
                check = "magnitude" in kept["accuracy"]  # rerun it: the same accuracies?
                scores, _ = build_scores(model, calib, labels, alpha=args.alpha, seed=seed,
                                         progress=progress, granularity=granularity,
                                         criteria=missing + ["magnitude"] * check,
                                         tolerance=args.tolerance)
                acc, sparsity, layers = run_seed(model, m_test, scores, args.amounts,
                                                 progress=progress)
                if check and acc["magnitude"] != kept["accuracy"]["magnitude"]:
                    raise SystemExit(stale.format("magnitude pruning gives other accuracies"))
                for c in missing:
                    kept["accuracy"][c], kept["sparsity"][c] = acc[c], sparsity[c]
                    kept["layer_sparsity"][c] = layers[c]
                    kept.setdefault("criteria_added", {})[c] = data["command"]
                entry["seeds"][str(seed)] = kept
                write_json(out_json, data)
                continue
            print(f"{name} seed {seed}: test accuracy {accuracy:.4f}; scoring "
                  f"{len(calib)} calibration examples", flush=True)
            scores, info = build_scores(model, calib, labels, alpha=args.alpha, seed=seed,
                                        progress=progress, granularity=granularity,
                                        criteria=data["settings"]["criteria"],
                                        tolerance=args.tolerance)
            if "curvature_seconds" in info:
                print(f"  curvature scoring {info['curvature_seconds']} s", flush=True)
            acc, sparsity, layers = run_seed(model, m_test, scores, args.amounts,
                                             progress=progress)
            entry["seeds"][str(seed)] = {"test_accuracy": accuracy, **info, "accuracy": acc,
                                         "sparsity": sparsity, "layer_sparsity": layers}
            write_json(out_json, data)
    chosen = {c for run in data["models"].values() for seed in run["seeds"].values()
              for c in seed["accuracy"]}
    data["settings"]["criteria"] = [c for c in CRITERIA if c in chosen]  # kept ones too
    data["status"] = "complete"
    data["total_seconds"] = round(time.perf_counter() - total_start, 1)
    write_json(out_json, data)
    paths = plot_results(data, args.plots, stem=args.name)
    print(f"wrote {out_json} and {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
