"""Scoring time of the fast engine against the per-edge reference, with identical kappa.

    python benchmarks/engine_speed.py                  # LeNet-5, 10 examples, full reference
    python benchmarks/engine_speed.py --reference sample   # reference extrapolated from edges
    python benchmarks/engine_speed.py --reference stored   # reuse the stored reference time
    python benchmarks/engine_speed.py --models vgg9        # the VGG-9 row (see below)

The LeNet-5 variant (method.md section 5) is trained on Fashion-MNIST (5 epochs, seeded, cached
under benchmarks/.cache). The calibration set is one correctly classified test example per class.
With ``--reference full`` the reference scores the same 10 examples and the script checks that
the two agree on every weight (max |difference|, and +inf on the same weights); it keeps the
reference's kappa in ``benchmarks/.cache``. ``--reference stored`` does not rerun the ~450 s
reference: the row quotes the stored row's measured time (``reference_kind: stored``) and
compares against the kept kappa when there is one (else ``max_abs_diff`` is null). The row
records the engine's CPU time and the machine's load average, since the machine is shared. The
engine scores the examples ``--engine-runs`` times (default 3, each run's wall time recorded
in ``engine_runs_s``); the row's engine time is the median run's (an even count: the faster of
the middle two), so one run slowed by the shared machine does not set the speed-up.

VGG-9 (``create_model("vgg9", in_channels=1)``, trained 5 epochs on Fashion-MNIST padded to 32 x
32, ~37M edges per example): the reference is timed on ``--vgg-sample-edges`` sampled edges of one
example and extrapolated. The engine's hop tables and the min-plus products that fill them are
counted (bytes and operations, dense and windowed: :class:`curvprune.graphs.neuron.HopTable`);
``--vgg-engine`` runs the engine on that row's model. ``--vgg-run`` (with ``--vgg-examples N`` and
``--vgg-tolerance T``) runs ``neural_curvature(granularity="neuron")`` on a random-init VGG-9 (seed
``--vgg-seed``) with the first N Fashion-MNIST test images padded to 32, and records the time of
each phase (graph build, bounds and their shared problems, exact solves), the peak RSS and the
engine's counts under the vgg9 row's ``engine_runs``; ``--render-only`` rewrites the table from the
JSON. ``benchmarks/vgg_tables.py`` times the hop tables one by one.

Curvature intervals (``--tolerance-study 1e-6 1e-3 1e-2``, engine only): LeNet-5 is scored at
the default tolerance (``curvprune.curvature.TOLERANCE``, recorded; 1e-14 in runs stored
before it became 0.01), at ``tolerance=0`` (the exact baseline) and at each tolerance;
each row has the scoring time, the largest interval width, whether the midpoints prune the same
set as exact curvature at ``--amounts`` (global, order "positive_first"; else the fraction of
the exact pruned set shared), and the decision-exact refinement
(``curvprune.decision.decide_exactly``, as ``prune_model`` runs it): its time, the weights it
solved, and that its pruned set equals the exact one. The ~450 s reference is not rerun: the
stored LeNet-5 row's time is quoted. The study is written under ``"tolerance_study"`` (the
model rows are kept), with the machine's load average before and after, since the machine is
shared.

    python benchmarks/engine_speed.py --tolerance-study 1e-6 1e-3 1e-2

Rows are merged into ``benchmarks/results/engine_speed.json`` by model (a run of one model keeps
the other's row) and the table is rewritten in ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, EXACT, RESULTS, trained_model  # noqa: E402

from curvprune import neural_curvature  # noqa: E402
from curvprune.data import class_balanced_calibration, fashion_mnist  # noqa: E402
from curvprune.decision import decide_exactly  # noqa: E402
from curvprune.graphs.neuron import chain_structure, hop_table_bytes  # noqa: E402
from curvprune.pruning.unstructured import _decide  # noqa: E402
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


def engine_tables(model, example: torch.Tensor) -> dict:
    """Bytes of the engine's dense hop tables (``L -> L+2`` and ``L -> L+3``, float64) and the
    scalar operations of the min-plus products that fill them (one row of the target layer per
    edge of the first hop), from the layer sizes and structural edge counts."""
    _, structures = chain_structure(model, example)
    sizes = [structures[0].n_in] + [s.n_out for s in structures]
    edges = [s.src.numel() for s in structures]
    n = len(edges)
    ops = sum(edges[L] * sizes[L + 2] for L in range(n - 1)) + \
        sum(edges[L] * sizes[L + 3] for L in range(n - 2))
    # Windowed tables (engine.HopTable): each first-hop edge adds one window of the next table.
    from curvprune.graphs.neuron import _hop_layouts, _layout, _node_shapes, _one_hop_box

    two, three = _hop_layouts(structures)
    shapes = _node_shapes(structures)
    one = [_layout(_one_hop_box(structures[L + 1], shapes[L + 2]), shapes[L + 2])
           for L in range(n - 1)]
    windowed = sum(edges[L] * one[L].width for L in range(n - 1)) + \
        sum(edges[L] * two[L + 1].width for L in range(n - 2))
    return {"hop_table_bytes": hop_table_bytes(sizes), "min_plus_ops": ops,
            "windowed_hop_table_bytes": hop_table_bytes(structures),
            "windowed_min_plus_ops": windowed, "edges_per_example": sum(edges)}


def _pruned(result, amount: float) -> dict[str, torch.Tensor]:
    """The entries a global "positive_first" pruning by ``amount`` removes, by the result's
    midpoints."""
    names = list(result.kappa)
    pruned, _ = _decide(result.importance_scores("positive_first"), None, result.modules, names,
                        "global", amount)
    return pruned


def _decide_fn(amount: float):
    def decide(result):
        names = list(result.kappa)
        return _decide(result.importance_scores("positive_first"), None, result.modules, names,
                       "global", amount)
    return decide


def _fresh(result):
    """A copy of ``result`` whose values ``refine`` can change without touching the original."""
    clone = {k: v.clone() for k, v in result.kappa.items()}
    return dataclasses.replace(
        result, kappa=clone, kappa_lo={k: v.clone() for k, v in result.kappa_lo.items()},
        kappa_hi={k: v.clone() for k, v in result.kappa_hi.items()}, refined=0)


def tolerance_study(args, stored: dict | None) -> dict:
    """The ``--tolerance-study`` entry (module docstring)."""
    load_before = os.getloadavg()
    model, accuracy = trained_model("lenet5", epochs=5)
    calib, _ = class_balanced_calibration(model, fashion_mnist(train=False),
                                          args.examples_per_class)
    start = time.perf_counter()
    default = neural_curvature(model, calib, alpha=args.alpha)
    default_s = time.perf_counter() - start
    start = time.perf_counter()
    exact = neural_curvature(model, calib, alpha=args.alpha, tolerance=0.0)
    exact_s = time.perf_counter() - start
    print(f"default {default_s:.1f} s, exact {exact_s:.1f} s")
    study = {
        "model": "lenet5", "examples": len(calib), "alpha": args.alpha,
        "test_accuracy": accuracy, "default_tolerance": default.tolerance,
        "default_s": default_s, "default_stats": default.engine,
        "default_max_width": default.max_width, "exact_s": exact_s,
        "exact_stats": exact.engine, "amounts": args.amounts,
        "rows": tolerance_rows(model, calib, args, exact),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    if stored is not None:
        study["reference_s_stored"] = stored.get("reference_s")
        study["reference_note"] = ("the stored lenet5 row's reference time (another run, "
                                   "not rerun)")
    return study


def tolerance_rows(model, calib, args, exact) -> list[dict]:
    """Scoring at each tolerance against the exact (``tolerance=0``) result ``exact``."""
    want = {a: _pruned(exact, a) for a in args.amounts}
    rows = []
    for tolerance in args.tolerances:
        start = time.perf_counter()
        result = neural_curvature(model, calib, alpha=args.alpha, tolerance=tolerance)
        seconds = time.perf_counter() - start
        row = {"tolerance": tolerance, "engine_s": seconds, "max_width": result.max_width,
               "engine_stats": result.engine, "amounts": {}}
        for amount in args.amounts:
            got = _pruned(result, amount)
            total = sum(int(m.sum()) for m in want[amount].values())
            shared = sum(int((got[n] & want[amount][n]).sum()) for n in got)
            copy = _fresh(result)
            start = time.perf_counter()
            decided, refined, rounds = decide_exactly(copy, "positive_first", _decide_fn(amount))
            refine_s = time.perf_counter() - start
            row["amounts"][str(amount)] = {
                "midpoints_identical": all(torch.equal(got[n], want[amount][n]) for n in got),
                "midpoints_shared": shared / total if total else 1.0,
                "refine_s": refine_s, "refined_weights": refined, "refine_rounds": rounds,
                "decision_exact_s": seconds + refine_s,
                "decision_equals_exact": all(torch.equal(decided[n], want[amount][n])
                                             for n in decided),
            }
        print(json.dumps(row, indent=2))
        rows.append(row)
    return rows


#: The per-edge reference's kappa of the LeNet-5 row (written by ``--reference full``, read by
#: ``--reference stored``).
REFERENCE_KAPPA = CACHE / "engine_speed_lenet5_reference.pt"


def lenet_row(args, stored: dict | None = None) -> dict:
    model, accuracy = trained_model("lenet5", epochs=5)
    calib, _ = class_balanced_calibration(model, fashion_mnist(train=False),
                                          args.examples_per_class)
    print(f"lenet5 test accuracy {accuracy:.4f}; {len(calib)} calibration examples")
    load_before = os.getloadavg()
    runs = []  # (wall, CPU) of each engine run; the median run's wall time is the row's
    for _ in range(args.engine_runs):
        start, cpu = time.perf_counter(), time.process_time()
        result = neural_curvature(model, calib, alpha=args.alpha, progress=True, tolerance=EXACT)
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
        print(f"engine: {runs[-1][0]:.1f} s, CPU {runs[-1][1]:.1f} s ({result.engine})")
    engine_s, engine_cpu_s = sorted(runs)[(len(runs) - 1) // 2]
    row = {
        "model": "lenet5", "examples": len(calib),
        "edges_per_example": sum(result.edges_per_example.values()),
        "alpha": args.alpha, "engine_s": engine_s, "engine_cpu_s": engine_cpu_s,
        "engine_runs_s": [wall for wall, _ in runs],
        "engine_stats": result.engine, "test_accuracy": accuracy,
        "threads": torch.get_num_threads(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if args.reference == "full":
        start = time.perf_counter()
        reference = reference_curvature(model, calib, alpha=args.alpha)
        row["reference_s"] = time.perf_counter() - start
        row["reference_kind"] = "measured"
        row.update(compare(result.kappa, reference))
        torch.save(reference, REFERENCE_KAPPA)
    elif args.reference == "stored":
        if stored is None or stored.get("reference_kind") not in ("measured", "stored"):
            raise SystemExit("--reference stored needs a lenet5 row with a measured reference "
                             f"time in {args.out}; run --reference full once")
        row["reference_s"] = stored["reference_s"]
        row["reference_kind"] = "stored"
        row["reference_command"] = stored.get("reference_command", stored.get("command"))
        if REFERENCE_KAPPA.exists():
            row.update(compare(result.kappa, torch.load(REFERENCE_KAPPA)))
        else:  # runs from before the reference's kappa was kept are not compared here
            row["max_abs_diff"] = None
            row["reference_note"] = (f"not compared: benchmarks/.cache/{REFERENCE_KAPPA.name} "
                                     "is written by --reference full")
    else:
        per_edge, total = time_reference_per_edge(model, calib, alpha=args.alpha,
                                                  sample=args.sample_edges)
        row["reference_s"] = per_edge * total * len(calib)
        row["reference_kind"] = f"extrapolated from {args.sample_edges} sampled edges"
    row["speedup"] = row["reference_s"] / engine_s
    return row


def vgg_row(args) -> dict:
    model, accuracy = trained_model("vgg9", epochs=5, seed=0, pad_to=32, in_channels=1)
    calib, _ = class_balanced_calibration(model, fashion_mnist(train=False, pad_to=32), 1)
    example = calib[:1]
    row = {"model": "vgg9", "examples": 1, "alpha": args.alpha, "test_accuracy": accuracy,
           **engine_tables(model, example)}
    print(f"vgg9 test accuracy {accuracy:.4f}; {row['edges_per_example']:,} edges; hop tables "
          f"{row['hop_table_bytes'] / 2**30:.1f} GiB, min-plus {row['min_plus_ops']:.2e} ops")
    start = time.perf_counter()
    per_edge, total = time_reference_per_edge(model, example, alpha=args.alpha,
                                              sample=args.vgg_sample_edges)
    row["reference_sample_s"] = time.perf_counter() - start
    row["reference_s"] = per_edge * total
    row["reference_kind"] = f"extrapolated from {args.vgg_sample_edges} sampled edges"
    if args.vgg_engine:
        start = time.perf_counter()
        result = neural_curvature(model, example, alpha=args.alpha, granularity="neuron",
                                  memory_budget=row["hop_table_bytes"] + (1 << 30),
                                  progress=True)
        row["engine_s"] = time.perf_counter() - start
        row["engine_stats"] = result.engine
        row["speedup"] = row["reference_s"] / row["engine_s"]
    else:
        row["engine_s"] = None
        row["engine_note"] = "not run on the CPU (--vgg-engine runs it)"
    return row


def vgg_engine_run(args) -> dict:
    """One ``--vgg-run`` (module docstring): ``neural_curvature`` on VGG-9 at neuron
    granularity, with the time of each phase and the process's peak RSS."""
    import resource

    from curvprune.graphs.base import EdgeProblem, SolveSet
    from curvprune.graphs.neuron import NeuronGraph
    from curvprune.models import create_model

    load_before = os.getloadavg()
    torch.manual_seed(args.vgg_seed)  # random init (BatchNorm at its initial statistics)
    model = create_model("vgg9", in_channels=1).eval()
    test = fashion_mnist(train=False, pad_to=32)
    calib = torch.stack([test[k][0] for k in range(args.vgg_examples)])
    import curvprune.transport.bounds as engine_module

    phases = {"graph_build_s": 0.0, "bound_s": 0.0, "shared_problems_s": 0.0, "solve_s": 0.0}
    ends = {"graph_build_s": 0.0, "bound_s": 0.0}  # wall clock of each phase's last call
    clock = time.perf_counter()

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[key] += time.perf_counter() - start
                if key in ends:
                    ends[key] = max(ends[key], time.perf_counter())
                edges = a[1].numel() if key == "shared_problems_s" else ""
                print(f"[{time.perf_counter() - clock:7.1f} s] {key[:-2]} "
                      f"+{time.perf_counter() - start:.1f} s {edges}", flush=True)
        return wrapper

    engine_module._shared_bounds = timed(engine_module._shared_bounds, "shared_problems_s")

    build = NeuronGraph.__dict__["build"].__func__
    NeuronGraph.build = classmethod(timed(build, "graph_build_s"))
    EdgeProblem.bounds = timed(EdgeProblem.bounds, "bound_s")
    SolveSet.solve = timed(SolveSet.solve, "solve_s")
    kwargs = {} if args.vgg_tolerance is None else {"tolerance": args.vgg_tolerance}
    tables = engine_tables(model, calib[:1])
    print(json.dumps(tables), flush=True)
    start = time.perf_counter()
    result = neural_curvature(model, calib, alpha=args.alpha, granularity="neuron",
                              memory_budget=16 << 30, progress=True, **kwargs)
    end = time.perf_counter()
    total = end - start
    run = {"init": f"random (torch.manual_seed({args.vgg_seed}))", "examples": len(calib),
           "tolerance": result.tolerance, "engine_s": total, **phases,
           # Wall clock: the bounds run on a pool (their per-call seconds add up over
           # threads, and include the shared problems), the minima after the last bound.
           "build_end_s": ends["graph_build_s"] - start, "bounds_end_s": ends["bound_s"] - start,
           "minima_s": end - ends["bound_s"],
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "hop_table_bytes": tables["windowed_hop_table_bytes"],
           "min_plus_ops": tables["windowed_min_plus_ops"],
           **{k: v for k, v in tables.items() if k.startswith("windowed_")},
           "max_width": result.max_width, "engine_stats": result.engine,
           "threads": torch.get_num_threads(), "load_average_before": load_before,
           "load_average_after": os.getloadavg()}
    print(json.dumps(run, indent=2))
    return run


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | examples | edges/example | engine (s) | reference (s) | speed-up "
             "| max abs diff |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        diff = row.get("max_abs_diff")
        if row.get("engine_s") is None and "windowed_hop_table_bytes" in row:
            engine = (f"not run here: hop tables {row['hop_table_bytes'] / 2**30:.1f} GiB dense"
                      f" / {row['windowed_hop_table_bytes'] / 2**30:.1f} GiB windowed, min-plus "
                      f"{row['min_plus_ops']:.1e} / {row['windowed_min_plus_ops']:.1e} "
                      "operations (see --vgg-run)")
            speedup = "n/a"
        elif row.get("engine_s") is None:
            engine = (f"not run: hop tables {row['hop_table_bytes'] / 2**30:.1f} GiB, "
                      f"min-plus {row['min_plus_ops']:.1e} operations")
            speedup = "n/a"
        else:
            engine, speedup = f"{row['engine_s']:.1f}", f"{row['speedup']:.1f}x"
            if "load_average_before" in row:  # the machine is shared: its load, and CPU time
                runs = row.get("engine_runs_s", [])
                median = (f"median of {len(runs)} runs: "
                          f"{' / '.join(f'{r:.1f}' for r in runs)} s; " if len(runs) > 1 else "")
                engine += (f" ({median}CPU {row['engine_cpu_s']:.1f} s; load average "
                           f"{row['load_average_before'][0]:.1f} on {os.cpu_count()} cores)")
        lines.append(
            f"| {row['model']} | {row['examples']} | {row['edges_per_example']:,} | {engine} | "
            f"{row['reference_s']:.3g} ({row['reference_kind']}) | {speedup} | "
            f"{'n/a' if diff is None else f'{diff:.1e}'} |")
    return lines


def vgg_runs_table(row: dict) -> list[str]:
    """The ``--vgg-run`` rows: VGG-9 at neuron granularity, phases, memory and counts."""
    runs = row.get("engine_runs", [])
    if not runs:
        return []
    lines = ["VGG-9 at neuron granularity (`--vgg-run`; random-init weights, Fashion-MNIST test "
             "images padded to 32; target: under 600 s and 8 GiB on 2 CPU cores):", "",
             "| examples | tolerance | total (s) | structure and graph build (s, wall) | bounds "
             "of every example done at (s, wall) | exact minima (s, wall; of it in solves) "
             "| peak RSS (GiB) | hop tables (GiB) | engine counts | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        counts = ", ".join(f"{k} {v:,}" for k, v in r["engine_stats"].items() if v)
        # Runs stored before the tolerance was recorded ran at the then default, 1e-14.
        tol = "default (1e-14)" if r["tolerance"] is None else f"{r['tolerance']:g}"
        lines.append(
            f"| {r['examples']} | {tol} | {r['engine_s']:.0f} | {r['build_end_s']:.0f} | "
            f"{r['bounds_end_s']:.0f} | {r['minima_s']:.0f} ({r['solve_s']:.0f}) | "
            f"{r['peak_rss_gib']:.1f} | {r['hop_table_bytes'] / 2**30:.2f} | {counts} | "
            f"{r['load_average_before'][0]:.1f}/{r['load_average_after'][0]:.1f} |")
    return lines


def tolerance_table(study: dict) -> list[str]:
    """The ``--tolerance-study`` table (see the module docstring)."""
    amounts = [str(a) for a in study["amounts"]]
    pct = "/".join(f"{float(a) * 100:.0f}" for a in amounts)
    load = "/".join(f"{x:.1f}" for x in study["load_average_before"][:1]
                    + study["load_average_after"][:1])
    reference = study.get("reference_s_stored")
    lines = [f"Curvature intervals: `{study['command'].strip()}`. LeNet-5 (test accuracy "
             f"{study['test_accuracy']:.4f}), {study['examples']} examples, in one run: "
             f"default tolerance ({study.get('default_tolerance', 1e-14):g}) "
             f"{study['default_s']:.1f} s, tolerance 0 (exact) "
             f"{study['exact_s']:.1f} s; load average {load} (before/after) on "
             f"{os.cpu_count()} cores"
             + (f"; the reference is not rerun (stored: {reference:.0f} s, another run)"
                if reference else "")
             + f". Pruned sets: global, order positive_first, at {pct} % sparsity.", "",
             f"| tolerance | scoring (s) | largest width | midpoints prune the exact set "
             f"({pct} %) | decision-exact: weights refined ({pct} %) | decision-exact time "
             f"(s, {pct} %) | equals exact |",
             "|---|---|---|---|---|---|---|"]
    for t in study["rows"]:
        per = [t["amounts"][a] for a in amounts]
        same = " / ".join("yes" if p["midpoints_identical"] else
                          f"{100 * p['midpoints_shared']:.2f} %" for p in per)
        refined = " / ".join(str(p["refined_weights"]) for p in per)
        times = " / ".join(f"{p['decision_exact_s']:.1f}" for p in per)
        equal = "yes" if all(p["decision_equals_exact"] for p in per) else "NO"
        lines.append(f"| {t['tolerance']:g} | {t['engine_s']:.1f} | {t['max_width']:.1e} | "
                     f"{same} | {refined} | {times} | {equal} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["lenet5", "vgg9"], default=["lenet5"])
    parser.add_argument("--reference", choices=["full", "sample", "stored"], default="full",
                        help="full: time the per-edge reference on the same examples and "
                             "compare every kappa; sample: extrapolate its time from sampled "
                             "edges; stored: reuse the stored lenet5 row's measured time (and "
                             "its kappa, when a full run kept it)")
    parser.add_argument("--tolerance-study", dest="tolerances", nargs="+", type=float,
                        default=None, help="only the engine at these tolerances (LeNet-5)")
    parser.add_argument("--amounts", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    parser.add_argument("--engine-runs", type=int, default=3,
                        help="LeNet-5 engine runs; the row's time is the median run's")
    parser.add_argument("--examples-per-class", type=int, default=1)
    parser.add_argument("--sample-edges", type=int, default=3000)
    parser.add_argument("--vgg-sample-edges", type=int, default=40)
    parser.add_argument("--vgg-engine", action="store_true",
                        help="also run the engine on VGG-9 (needs the hop tables' memory)")
    parser.add_argument("--vgg-run", action="store_true",
                        help="one engine run on a random-init VGG-9 (--vgg-examples, "
                             "--vgg-tolerance), added to the vgg9 row's engine_runs")
    parser.add_argument("--vgg-examples", type=int, default=1)
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite the .md table from the stored JSON")
    parser.add_argument("--vgg-tolerance", type=float, default=None,
                        help="the engine's tolerance (default: neural_curvature's)")
    parser.add_argument("--vgg-seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_speed.json")
    args = parser.parse_args()

    command = "python benchmarks/engine_speed.py " + " ".join(sys.argv[1:])
    old = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {row["model"]: row for row in old["rows"]}
    study = old.get("tolerance_study")
    if args.engine_runs < 1:
        parser.error(f"--engine-runs must be at least 1, got {args.engine_runs}")
    if args.vgg_run and "vgg9" not in rows:  # checked before minutes of work, not after
        parser.error(f"--vgg-run adds its run to the vgg9 row of --out, and {args.out} has "
                     "none: use the default --out, or write the row there first with "
                     "--models vgg9 --out ...")
    if args.render_only:
        pass
    elif args.vgg_run:
        run = vgg_engine_run(args)
        run["command"] = command
        runs = [r for r in rows["vgg9"].get("engine_runs", [])
                if (r["examples"], r["tolerance"], r["init"])
                != (run["examples"], run["tolerance"], run["init"])]
        rows["vgg9"].update({k: v for k, v in run.items() if k.startswith("windowed_")})
        rows["vgg9"]["engine_runs"] = sorted(runs + [run], key=lambda r: (
            r["examples"], -1.0 if r["tolerance"] is None else r["tolerance"]))
    elif args.tolerances is not None:
        study = tolerance_study(args, rows.get("lenet5"))
        study["command"] = command
    else:
        for name in args.models:
            row = lenet_row(args, rows.get("lenet5")) if name == "lenet5" else vgg_row(args)
            row["command"] = command
            print(json.dumps(row, indent=2))
            rows[name] = row
    ordered = [rows[m] for m in ("lenet5", "vgg9") if m in rows]
    for row in ordered:  # rows from before commands were recorded per row
        row.setdefault("command", old.get("command", command))
    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "rows": ordered,
    }
    if study is not None:
        report["tolerance_study"] = study
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    commands = sorted({row["command"] for row in ordered})
    lines = [f"Commands: {', '.join(f'`{c.strip()}`' for c in commands)} ({os.cpu_count()} CPU "
             f"cores, torch {torch.__version__})", "", *table(ordered)]
    if "vgg9" in rows:
        extra = vgg_runs_table(rows["vgg9"])
        lines += ["", *extra] if extra else []
    if study is not None:
        lines += ["", *tolerance_table(study)]
    md = args.out.with_suffix(".md")
    tmp = md.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(md)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
