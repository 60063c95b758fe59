r"""The quality study of issue 13: which curvature criterion keeps the most accuracy, one variable
at a time, against magnitude, global Wanda, LAMP and SNIP (unstructured, no fine-tuning).

    python benchmarks/study.py                          # development models: LeNet-5, MLP(256, 128)
    python benchmarks/study.py --heldout --name study_heldout   # held-out: CNN and MLP(128, 64, 32)
    python benchmarks/study.py --quick --out /tmp/q --plots /tmp/q   # tiny CI run (~1 minute)

For each model and seed the model is trained exactly as ``benchmarks/unstructured.py`` trains it
(Adam, lr 1e-3, batch 128, 5 epochs, seeded, cached under ``benchmarks/.cache`` or
``$CURVPRUNE_CACHE``). A pool of correctly classified training examples is drawn by
:func:`curvprune.data.class_balanced_calibration` with the seed and put in round-robin class
order, so that its first 10 examples are exactly the paper's calibration set (one per class) of
``unstructured.py`` and every prefix is class-balanced; calibration size ``N`` means the first
``N`` examples of the pool.

The curvature is computed **one example at a time** (``neural_curvature(model, x[i:i+1])``,
alpha 0.9, the engine unchanged), giving per weight and example :math:`\kappa_e` (the minimum over
the weight's positions, dead edges 1.0, as the engine defines it) and whether the weight has a
live edge on that example. Everything else is aggregated here, offline (cached per example, so a
larger ``--sizes`` only scores the new examples):

* ``curv_min@N``: the paper's criterion, :math:`\kappa = \min_{e \le N} \kappa_e`; weights with
  no live edge on the ``N`` examples rank as 2 (pruned right after zero weights: the *dead-edge
  rule*), then the highest :math:`\kappa` first, ties to the smaller :math:`|w|`. At ``N = 10``
  this is ``curv_pos`` of ``unstructured.py`` (same model, same examples).
* ``curv_nodead@N``: the same without the dead-edge rule: a weight dead on every example keeps
  its value :math:`\kappa = 1` and is ranked among the live weights by it.
* ``curv_mean@N``, ``curv_q10@N``, ``curv_q25@N``, ``curv_median@N``: the mean or a low quantile
  (``torch.quantile``, linear interpolation) of :math:`\kappa_e` over the examples instead of the
  minimum (dead edges still 1.0, the dead-edge rule on).
* ``curv_mag@N``: :math:`(2 - \kappa)\,|w|` and ``curv_wanda@N``: :math:`(2 - \kappa)\,|w|\,
  \lVert X_j \rVert_2` (Wanda's score, input norms on the same ``N`` examples), with
  :math:`\kappa` the paper's value (2 for a dead weight, so its score is 0). Why this form: see
  ``docs/benchmarks.md``, "The quality study".
* ``magnitude``, ``lamp``, ``wanda_global@N``, ``snip@N`` (:mod:`curvprune.baselines`).

Every criterion is a global ranking of all ``Linear``/``Conv2d`` weights: the ``round(f * n)``
lowest scores are zeroed (the selection of :class:`curvprune.CurvaturePruning`), and the model is
evaluated on the 10,000 Fashion-MNIST test images, no fine-tuning; then the weights are restored.

``--criteria curv_min curv_wanda ...`` evaluates only those criterion families (names without
``@N``); the curvature is computed all the same.

Results: ``--out``/``{name}.json`` (every seed, criterion and amount, the command and the
settings), ``--out``/``{name}.md`` (the tables: mean over seeds, min-max in brackets; with more
than one size also a calibration-size table and the dead-edge facts per size) and the plot
``--plots``/``{name}.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, EXACT, RESULTS, evaluate, trained_model  # noqa: E402
from unstructured import write_json  # noqa: E402

from curvprune import CurvaturePruning, neural_curvature  # noqa: E402
from curvprune.baselines import lamp_scores, magnitude_scores, snip_scores, wanda_scores  # noqa: E402
from curvprune.data import class_balanced_calibration, fashion_mnist  # noqa: E402
from curvprune.models import create_model  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
AGGREGATIONS = {"min": None, "mean": None, "q10": 0.10, "q25": 0.25, "median": 0.50}
#: every criterion's name without its calibration size ``@N`` (what ``--criteria`` selects)
FAMILIES = ["magnitude", "lamp", "wanda_global", "snip", "curv_min", "curv_nodead", "curv_mean",
            "curv_q10", "curv_q25", "curv_median", "curv_mag", "curv_wanda"]


def heldout_cnn() -> nn.Module:
    """The held-out CNN (not tuned on): conv 1->8 k5 s2, conv 8->16 k3 s2, FC 400-64-10, ReLU."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(400, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


#: name -> (how it is built, for the cache key and the docs)
MODELS = {
    "lenet5": "create_model('lenet5') (the paper's LeNet-5)",
    "mlp": "create_model('mlp', hidden=(256, 128))",
    "cnn_heldout": "conv 1->8 k5 s2, conv 8->16 k3 s2, FC 400-64-10 (benchmarks/study.py)",
    "mlp_heldout": "create_model('mlp', hidden=(128, 64, 32))",
    "mlp_quick": "create_model('mlp', hidden=(32,)), 100 training steps",
}


def build(name: str) -> nn.Module:
    if name == "cnn_heldout":
        return heldout_cnn()
    hidden = {"mlp": (256, 128), "mlp_heldout": (128, 64, 32), "mlp_quick": (32,)}[name]
    return create_model("mlp", hidden=hidden)


def train(name: str, *, seed: int, epochs: float, verbose: bool) -> tuple[nn.Module, str]:
    """The model ``name`` trained as ``benchmarks/unstructured.py`` trains its models (Adam, lr
    1e-3, batch 128, seeded initialisation and batch order), cached; returns it (eval mode) and
    its cache key."""
    if name == "lenet5":  # the very checkpoints of unstructured.py
        model, _ = trained_model("lenet5", epochs=int(epochs), seed=seed, verbose=verbose)
        return model, f"lenet5-{epochs}-{seed}"
    if name == "mlp":  # train_generic's cache key, so the same checkpoints as unstructured.py
        settings = dict(name="mlp", kwargs={"hidden": (256, 128)}, epochs=epochs, seed=seed,
                        lr=1e-3)
    else:
        settings = dict(name=name, build=MODELS[name], epochs=epochs, seed=seed, lr=1e-3)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"{settings['name']}-{key}.pt"
    torch.manual_seed(seed)  # the initial weights too: torch's own start seed varies by process
    model = build(name)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval(), key
    torch.manual_seed(seed)
    images, labels = fashion_mnist(train=True).tensors
    generator = torch.Generator().manual_seed(seed)
    per_epoch = (len(labels) + 127) // 128
    steps = int(round(epochs * per_epoch))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for step in range(steps):  # the loop of unstructured.train_generic
        if step % per_epoch == 0:
            order = torch.randperm(len(labels), generator=generator)
        idx = order[(step % per_epoch) * 128:(step % per_epoch + 1) * 128]
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images[idx]), labels[idx]).backward()
        optimiser.step()
    model.eval()
    if name != "mlp_quick":
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    if verbose:
        print(f"trained {name} seed {seed} in {time.perf_counter() - start:.0f} s", flush=True)
    return model, key


def calibration_pool(model: nn.Module, train_set, size: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` correctly classified training examples in round-robin class order: the first 10
    are ``class_balanced_calibration(model, train, 1, seed=seed)`` exactly."""
    per_class = -(-size // 10)
    x, y = class_balanced_calibration(model, train_set, per_class, num_classes=10, seed=seed)
    order = [c * per_class + k for k in range(per_class) for c in range(10)][:size]
    return x[order], y[order]


def per_example_curvature(model: nn.Module, x: torch.Tensor, cache: Path | None, *,
                          alpha: float, verbose: bool) -> tuple[dict, dict, list[float]]:
    """``kappa[name]`` (examples x weight shape, float64) and ``live[name]`` (bool) from one
    ``neural_curvature`` call per example; cached in ``cache`` (new examples appended, the file
    rewritten at most once a minute and after the last one)."""
    stored: dict = {"kappa": [], "live": [], "seconds": []}
    if cache is not None and cache.exists():
        stored = torch.load(cache)
    saved = time.perf_counter()
    for i in range(len(stored["kappa"]), len(x)):
        start = time.perf_counter()
        result = neural_curvature(model, x[i:i + 1], alpha=alpha, tolerance=EXACT,
                                  threads=os.cpu_count() or 1)
        stored["seconds"].append(time.perf_counter() - start)
        stored["kappa"].append({n: k.cpu() for n, k in result.kappa.items()})
        stored["live"].append({n: v.cpu() for n, v in result.live.items()})
        # the whole file is rewritten: at most once a minute (and after the last example), so
        # that hundreds of examples do not write it hundreds of times
        if cache is not None and (i == len(x) - 1 or time.perf_counter() - saved >= 60):
            saved = time.perf_counter()
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save(stored, tmp)
            tmp.replace(cache)
        if verbose:
            print(f"  example {i}: {stored['seconds'][-1]:.1f} s", flush=True)
    n = len(x)
    names = list(stored["kappa"][0])
    kappa = {k: torch.stack([e[k] for e in stored["kappa"][:n]]) for k in names}
    live = {k: torch.stack([e[k] for e in stored["live"][:n]]) for k in names}
    return kappa, live, stored["seconds"][:n]


def aggregate(kappa: torch.Tensor, live: torch.Tensor, how: str, dead_rule: bool = True
              ) -> torch.Tensor:
    """A weight's curvature value from its per-example values ``kappa`` (examples first): the
    minimum (the paper), mean or a quantile over the examples; with the dead-edge rule a weight
    with no live edge on any example gets 2. Zero weights (``+inf`` on every example) stay
    ``+inf``."""
    zero = torch.isinf(kappa).all(0)
    finite = torch.where(torch.isinf(kappa), torch.ones_like(kappa), kappa)
    if how == "min":
        value = kappa.amin(0)
    elif how == "mean":
        value = finite.mean(0)
    else:
        value = torch.quantile(finite, AGGREGATIONS[how], dim=0)
    if dead_rule:
        value = torch.where(live.any(0), value, torch.full_like(value, 2.0))
    return torch.where(zero, torch.full_like(value, torch.inf), value)


def ranks(keys: dict[str, torch.Tensor], magnitude: dict[str, torch.Tensor]
          ) -> dict[str, torch.Tensor]:
    """Scores (float64 ranks, higher = keep) of the ranking by ``keys`` ascending (smaller =
    pruned first), ties to the smaller ``|w|``, then position: the ordering rule of
    :meth:`curvprune.CurvatureResult.pruning_order`."""
    names = list(keys)
    flat_k = torch.cat([keys[n].reshape(-1) for n in names])
    flat_w = torch.cat([magnitude[n].reshape(-1) for n in names])
    perm = torch.argsort(flat_w, stable=True)
    perm = perm[torch.argsort(flat_k[perm], stable=True)]
    out = torch.empty(perm.numel(), dtype=torch.float64)
    out[perm] = torch.arange(perm.numel(), dtype=torch.float64)
    result, start = {}, 0
    for n in names:
        size = keys[n].numel()
        result[n] = out[start:start + size].view(keys[n].shape)
        start += size
    return result


def curvature_keys(value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sort keys of the paper's order "positive_first": zero weights first, then the highest
    value."""
    return {n: torch.where(torch.isinf(v), torch.full_like(v, -torch.inf), -v)
            for n, v in value.items()}


def combined(value: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
    """``(2 - kappa) * base`` (zero weights 0): higher = keep."""
    return {n: torch.where(torch.isinf(v), torch.zeros_like(v), (2.0 - v) * base[n])
            for n, v in value.items()}


def prune_and_evaluate(model: nn.Module, scores: dict[str, torch.Tensor], amount: float,
                       test) -> float:
    """Zero the ``round(amount * n)`` lowest scores over all weights (one global ranking, the
    selection of ``CurvaturePruning``), evaluate, restore the weights."""
    modules = dict(model.named_modules())
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])
    mask = CurvaturePruning(amount).compute_mask(flat, torch.ones_like(flat))
    saved = {}
    with torch.no_grad():
        start = 0
        for n in names:
            weight = modules[n.rsplit(".", 1)[0]].weight
            saved[n] = weight.detach().clone()
            part = mask[start:start + weight.numel()].view(weight.shape)
            weight.mul_(part.to(weight.dtype))
            start += weight.numel()
    try:
        return evaluate(model, test)
    finally:
        with torch.no_grad():
            for n in names:
                modules[n.rsplit(".", 1)[0]].weight.copy_(saved[n])


def by_name(scores) -> dict[str, torch.Tensor]:
    return {n: s.detach().to(torch.float64).cpu() for n, s in scores.by_name().items()}


def criteria_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kappa: dict, live: dict,
                 sizes: list[int], baseline_sizes: list[int]) -> tuple[dict, dict]:
    """Every criterion's scores ``{criterion: {weight name: scores}}`` and facts per size."""
    magnitude = by_name(magnitude_scores(model))
    out: dict = {"magnitude": magnitude, "lamp": by_name(lamp_scores(model))}
    facts: dict = {}
    for n in baseline_sizes:
        out[f"wanda_global@{n}"] = by_name(wanda_scores(model, x[:n]))
        out[f"snip@{n}"] = by_name(snip_scores(model, (x[:n], y[:n])))
    for n in sizes:
        k = {w: v[:n] for w, v in kappa.items()}
        a = {w: v[:n] for w, v in live.items()}
        total = sum(v.numel() for v in magnitude.values())
        dead = sum(int((~a[w].any(0)).sum()) for w in k)
        paper = {w: aggregate(k[w], a[w], "min") for w in k}
        facts[str(n)] = {
            "dead_fraction": round(dead / total, 4),
            # dead on these N examples but live on one of all the examples scored
            "dead_but_live_later": round(sum(int((~a[w].any(0) & live[w].any(0)).sum())
                                             for w in k) / total, 4),
            # live weights whose value is >= 1, the dead edges' value (without the dead-edge
            # rule dead weights rank among these)
            "live_kappa_at_least_1": round(sum(int((a[w].any(0) & (paper[w] >= 1)
                                                    & ~torch.isinf(paper[w])).sum())
                                               for w in k) / total, 4),
            "dead_masks": {w: ~a[w].any(0) for w in k}}
        out[f"curv_min@{n}"] = ranks(curvature_keys(paper), magnitude)
        out[f"curv_nodead@{n}"] = ranks(
            curvature_keys({w: aggregate(k[w], a[w], "min", dead_rule=False) for w in k}),
            magnitude)
        for how in ("mean", "q10", "q25", "median"):
            value = {w: aggregate(k[w], a[w], how) for w in k}
            out[f"curv_{how}@{n}"] = ranks(curvature_keys(value), magnitude)
        wanda = by_name(wanda_scores(model, x[:n]))
        # higher = keep; ties (dead weights, all 0) to the smaller |w| like every ranking here
        out[f"curv_mag@{n}"] = ranks(combined(paper, magnitude), magnitude)
        out[f"curv_wanda@{n}"] = ranks(combined(paper, wanda), magnitude)
    return out, facts


def table(data: dict, model: str, criteria: list[str], amounts: list[float]) -> str:
    seeds = data["models"][model]["seeds"]
    dense = [s["test_accuracy"] for s in seeds.values()]
    lines = [f"**{model}** ({MODELS[model]}), seeds {', '.join(seeds)}; dense "
             f"{100 * sum(dense) / len(dense):.1f} % ({100 * min(dense):.1f}-"
             f"{100 * max(dense):.1f}); test accuracy %, mean (min-max) over seeds", "",
             "| criterion | " + " | ".join(f"{100 * a:g} %" for a in amounts) + " |",
             "|---|" + "---|" * len(amounts)]
    for c in criteria:
        if not all(c in s["accuracy"] for s in seeds.values()):
            continue
        cells = []
        for a in amounts:
            v = [100 * s["accuracy"][c][f"{a:g}"] for s in seeds.values()]
            cells.append(f"{sum(v) / len(v):.1f} ({min(v):.1f}-{max(v):.1f})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal(data: dict, model: str, criterion: str, amounts: list[float], size: int) -> str:
    """Issue 13's goal for ``criterion`` on ``model``: the margin of its mean over the best mean
    of magnitude, global Wanda, LAMP and SNIP (at the same calibration size), and its worst
    per-seed difference to global magnitude (the goal: at least -2 points)."""
    seeds = list(data["models"][model]["seeds"].values())
    baselines = ["magnitude", f"wanda_global@{size}", "lamp", f"snip@{size}"]
    lines = [f"{model}, `{criterion}` against the baselines at {size} images:", "",
             "| sparsity | " + criterion + " | best baseline | margin | worst seed vs magnitude |",
             "|---|---|---|---|---|"]

    def mean(c: str, key: str) -> float:
        return sum(100 * s["accuracy"][c][key] for s in seeds) / len(seeds)

    for a in amounts:
        key = f"{a:g}"
        best = max(baselines, key=lambda c: mean(c, key))
        worst = min(100 * (s["accuracy"][criterion][key] - s["accuracy"]["magnitude"][key])
                    for s in seeds)
        lines.append(f"| {100 * a:g} % | {mean(criterion, key):.1f} | {best} "
                     f"{mean(best, key):.1f} | {mean(criterion, key) - mean(best, key):+.1f} | "
                     f"{worst:+.1f} |")
    return "\n".join(lines)


def size_table(data: dict, model: str, amounts: list[float]) -> str:
    """The calibration-size view of ``model``'s results: one row per criterion family and
    sparsity, one column per calibration size (mean over seeds, min-max in brackets; ``-`` where
    the family was not evaluated at that size)."""
    seeds = list(data["models"][model]["seeds"].values())
    sizes = data["settings"]["sizes"]
    present = set.intersection(*(set(s["accuracy"]) for s in seeds))
    families = [f for f in FAMILIES if any(c.split("@")[0] == f for c in present)]
    lines = [f"**{model}**, calibration size (images): test accuracy %, mean (min-max) over "
             f"seeds {', '.join(data['models'][model]['seeds'])}", "",
             "| criterion | sparsity | " + " | ".join(str(n) for n in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for family in families:
        for a in amounts:
            cells = []
            for n in sizes:
                c = family if family in ("magnitude", "lamp") else f"{family}@{n}"
                if c not in present:
                    cells.append("-")
                    continue
                v = [100 * s["accuracy"][c][f"{a:g}"] for s in seeds]
                cells.append(f"{sum(v) / len(v):.1f} ({min(v):.1f}-{max(v):.1f})")
            lines.append(f"| {family} | {100 * a:g} % | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dead_table(data: dict, model: str) -> str:
    """Per calibration size: the share of weights dead on all ``N`` images (the dead-edge rule
    prunes them first), of those live on a later image of the pool, of live weights with
    ``kappa >= 1``, and the accuracy with exactly the dead weights removed (mean, min-max)."""
    seeds = list(data["models"][model]["seeds"].values())
    dense = [100 * s["test_accuracy"] for s in seeds]

    def cell(values: list[float], digits: int = 1) -> str:
        return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}-" \
               f"{max(values):.{digits}f})"

    lines = [f"**{model}**, the dead-edge rule by calibration size (mean (min-max) over seeds; "
             f"dense {cell(dense, 2)} %)", "",
             "| images | dead on all N, % of weights | dead at N, live on a later image, % | "
             "live with kappa >= 1, % | accuracy with the dead removed, % |",
             "|---|---|---|---|---|"]
    for n in data["settings"]["sizes"]:
        facts = [s["per_size"][str(n)] for s in seeds]
        lines.append(f"| {n} | {cell([100 * f['dead_fraction'] for f in facts])} | "
                     f"{cell([100 * f['dead_but_live_later'] for f in facts])} | "
                     f"{cell([100 * f['live_kappa_at_least_1'] for f in facts])} | "
                     f"{cell([100 * f['dead_removed_accuracy'] for f in facts], 2)} |")
    return "\n".join(lines)


SIDE_BY_SIDE = ["curv_wanda@10", "curv_min@10", "magnitude", "lamp", "wanda_global@10", "snip@10",
                "curv_wanda@32", "curv_min@32", "wanda_global@32", "snip@32"]


def side_by_side(paths: list[Path]) -> str:
    """One row per criterion, one column per model of the given result files: the mean accuracy
    at each amount (``70 / 80 / 90``), the best of each column's amount in bold."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    columns = [(run, m) for run in runs for m in run["models"] if run["models"][m]["seeds"]]
    amounts = runs[0]["settings"]["amounts"]

    def mean(run: dict, model: str, c: str, a: float) -> float | None:
        seeds = run["models"][model]["seeds"].values()
        if not all(c in s["accuracy"] for s in seeds):
            return None
        return sum(100 * s["accuracy"][c][f"{a:g}"] for s in seeds) / len(seeds)

    best = {(id(r), m, a): max(v for c in SIDE_BY_SIDE if (v := mean(r, m, c, a)) is not None)
            for r, m in columns for a in amounts}
    head = " / ".join(f"{100 * a:g}" for a in amounts)
    lines = ["| criterion | " + " | ".join(f"{m} ({head} %)" for _, m in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for c in SIDE_BY_SIDE:
        cells = []
        for r, m in columns:
            values = [mean(r, m, c, a) for a in amounts]
            cells.append("n/a" if None in values else " / ".join(
                f"**{v:.1f}**" if round(v, 1) == round(best[(id(r), m, a)], 1) else f"{v:.1f}"
                for v, a in zip(values, amounts)))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STUDIES = {  # plot panels: title -> criteria (with {n} the size, {s} the largest size)
    "calibration size (min, paper)": ["curv_min@{each}"],
    "aggregation over examples ({s} images)": ["curv_min@{s}", "curv_mean@{s}", "curv_q10@{s}",
                                              "curv_q25@{s}", "curv_median@{s}"],
    "dead-edge rule": ["curv_min@{each}", "curv_nodead@{each}"],
    "combined and baselines ({b} images)": ["curv_min@{b}", "curv_mag@{b}", "curv_wanda@{b}",
                                            "magnitude", "lamp", "wanda_global@{b}", "snip@{b}"],
}


def expand(pattern: str, sizes: list[int], base: int) -> list[str]:
    if "{each}" in pattern:
        return [pattern.replace("{each}", str(n)) for n in sizes]
    return [pattern.replace("{s}", str(max(sizes))).replace("{b}", str(base))]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = data["settings"]
    models = [m for m in data["models"] if data["models"][m]["seeds"]]
    amounts = settings["amounts"]
    sizes, base = settings["sizes"], settings["sizes"][0]
    fig, axes = plt.subplots(len(models), len(STUDIES), figsize=(4.6 * len(STUDIES),
                                                                  3.6 * len(models)),
                             squeeze=False)
    for row, model in zip(axes, models):
        seeds = data["models"][model]["seeds"].values()
        for ax, (title, patterns) in zip(row, STUDIES.items()):
            for c in [c for p in patterns for c in expand(p, sizes, base)]:
                if not all(c in s["accuracy"] for s in seeds):
                    continue
                v = torch.tensor([[100 * s["accuracy"][c][f"{a:g}"] for a in amounts]
                                  for s in seeds])
                x = [100 * a for a in amounts]
                line = ax.plot(x, v.mean(0), marker="o", label=c,
                               ls="--" if "nodead" in c else "-")[0]
                ax.fill_between(x, v.amin(0), v.amax(0), alpha=0.12, color=line.get_color())
            ax.set_title(f"{model}: " + title.format(s=max(sizes), b=base), fontsize=9)
            ax.set_xlabel("sparsity %")
            ax.set_ylabel("test accuracy %")
            ax.axhline(10, ls=":", color="grey")
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("tmp_" + path.name)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--heldout", action="store_true",
                        help="the held-out models (cnn_heldout, mlp_heldout) instead of "
                             "lenet5 and mlp")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 32],
                        help="calibration sizes (prefixes of the round-robin pool; default "
                             "10 32); the first is also the baselines' size")
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--name", default="study")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plots", type=Path, default=DOCS)
    parser.add_argument("--criteria", nargs="+", metavar="FAMILY",
                        help="evaluate only these criteria (names without '@N', e.g. curv_min "
                             "curv_nodead curv_wanda magnitude lamp wanda_global snip; default "
                             "all)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="tiny CI run: MLP(32) trained 100 steps, seed 0, sizes 2 4, "
                             "amounts 0.5 0.9, 1000 test images")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--side-by-side", nargs="+", type=Path, metavar="JSON",
                        help="print the key criteria of these result files side by side "
                             "(markdown) and exit")
    args = parser.parse_args(argv)
    if args.side_by_side:
        print(side_by_side(args.side_by_side))
        return
    torch.set_num_threads(args.torch_threads)
    if args.quick:
        args.models, args.seeds, args.sizes, args.amounts = ["mlp_quick"], [0], [2, 4], [0.5, 0.9]
    elif args.models is None:
        args.models = ["cnn_heldout", "mlp_heldout"] if args.heldout else ["lenet5", "mlp"]
    if args.criteria:
        unknown = sorted(set(args.criteria) - set(FAMILIES))
        if unknown:
            parser.error(f"unknown --criteria {unknown}; choose from {', '.join(FAMILIES)}")
    sizes = sorted(set(args.sizes))
    baseline_sizes = sorted({sizes[0], sizes[-1]})
    test, train_set = fashion_mnist(train=False), fashion_mnist(train=True)
    if args.quick:
        test = torch.utils.data.TensorDataset(test.tensors[0][:1000], test.tensors[1][:1000])
    out_json = args.out / f"{args.name}.json"
    data = {
        "command": ("python benchmarks/study.py " + shlex.join(argv if argv is not None
                                                                 else sys.argv[1:])).rstrip(),
        "settings": {"models": {m: MODELS[m] for m in args.models}, "seeds": args.seeds,
                     "amounts": args.amounts, "sizes": sizes, "baseline_sizes": baseline_sizes,
                     "criteria": args.criteria or FAMILIES,
                     "alpha": args.alpha, "epochs": 100 / 469 if args.quick else args.epochs,
                     "test_examples": len(test), "fine_tuning": False, "quick": args.quick,
                     "calibration": "first N of a round-robin class-ordered pool of correctly "
                                    "classified training examples drawn with the seed"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count()},
        "status": "running", "models": {},
    }
    start_all = time.perf_counter()
    for name in args.models:
        entry = data["models"].setdefault(name, {"seeds": {}})
        for seed in args.seeds:
            epochs = 100 / 469 if args.quick else args.epochs
            model, key = train(name, seed=seed, epochs=epochs, verbose=args.verbose)
            accuracy = evaluate(model, test)
            x, y = calibration_pool(model, train_set, sizes[-1], seed)
            cache = None if args.quick else \
                CACHE / "study" / f"{name}-{key}-{args.alpha:g}-{seed}-kappa.pt"
            print(f"{name} seed {seed}: dense {accuracy:.4f}; curvature of {len(x)} examples, "
                  "one at a time", flush=True)
            kappa, live, seconds = per_example_curvature(model, x, cache, alpha=args.alpha,
                                                         verbose=args.verbose)
            scores, facts = criteria_for(model, x, y, kappa, live, sizes, baseline_sizes)
            for fact in facts.values():  # accuracy with exactly the dead weights removed
                dead = fact.pop("dead_masks")
                count = sum(int(m.sum()) for m in dead.values())
                fact["dead_removed_accuracy"] = prune_and_evaluate(
                    model, {w: (~m).to(torch.float64) for w, m in dead.items()}, count, test)
            if args.criteria:
                scores = {c: s for c, s in scores.items() if c.split("@")[0] in args.criteria}
            results: dict = {}
            for criterion, s in scores.items():
                results[criterion] = {f"{a:g}": prune_and_evaluate(model, s, a, test)
                                      for a in args.amounts}
            entry["seeds"][str(seed)] = {
                "test_accuracy": accuracy, "seconds_per_example": [round(t, 2) for t in seconds],
                "per_size": facts, "accuracy": results}
            print(f"  {sum(seconds):.0f} s of curvature; "
                  f"curv_min@{sizes[0]} {results[f'curv_min@{sizes[0]}']}", flush=True)
            write_json(out_json, data)
    data["status"] = "complete"
    data["total_seconds"] = round(time.perf_counter() - start_all, 1)
    write_json(out_json, data)
    criteria = list(next(iter(next(iter(data["models"].values()))["seeds"].values()))["accuracy"])
    md = [f"Command: `{data['command']}`", ""]
    for name in data["models"]:
        md += [table(data, name, criteria, args.amounts), ""]
    if len(sizes) > 1:
        for name in data["models"]:
            md += [size_table(data, name, args.amounts), "", dead_table(data, name), ""]
    for name in data["models"]:
        for size in baseline_sizes:
            for c in (f"curv_min@{size}", f"curv_wanda@{size}"):
                if {c, "magnitude", "lamp", f"wanda_global@{size}", f"snip@{size}"} <= set(
                        criteria):
                    md += [goal(data, name, c, args.amounts, size), ""]
    (args.out / f"{args.name}.md").write_text("\n".join(md))
    plot(data, args.plots / f"{args.name}.png")
    print(f"wrote {out_json}, {args.out / (args.name + '.md')}, "
          f"{args.plots / (args.name + '.png')}")


if __name__ == "__main__":
    main()
