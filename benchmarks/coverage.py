"""Coverage of "any model": which timm and torchvision models the channel tracer follows.

    python benchmarks/coverage.py             # every timm family + every torchvision classifier
    python benchmarks/coverage.py --quick     # a handful of models (the CI smoke test)

For one model of every timm architecture family (a family is a module of ``timm.models``; its
model is the registered variant with the fewest parameters, counted on the ``meta`` device among
the variants whose names suggest a small model) and for every torchvision classification model
(``torchvision.models.list_models(module=torchvision.models)``), randomly initialised
(``pretrained=False``), the structure is traced with :func:`curvprune.graphs.channel.trace_channels`
on **one** seeded input of ``--size`` x ``--size`` pixels (64 by default), or of the model's
default input size when the model rejects the small one. Each model gets one of

* ``traced``: the channel graph was built (nodes, edges, traced Conv2d/Linear layers);
* ``untraceable``: the tracer met functions it cannot follow (listed: the fallback reason);
* ``model_error``: the model itself fails on both input sizes (without the tracer);
* ``tracer_error``: the model runs, but tracing raised something other than
  ``UntraceableModel`` (a tracer bug);
* ``too_large`` / ``too_slow``: skipped, over ``--max-params`` parameters, or over ``--timeout``
  seconds (model creation, plain forward and trace together).

Every model runs in a worker process (``--workers``, 2 by default, each single-threaded;
restarted after a timeout or a crash).
Results: ``benchmarks/results/coverage.json`` and ``coverage.md`` (the table), summarised in
docs/channels.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"

# Name fragments of small variants, best first (a family's candidates are counted on meta).
SMALL = ("pico", "nano", "femto", "atto", "zepto", "micro", "xxs", "xs", "tiny", "mini",
         "small", "lite", "light", "050", "035", "_t", "_s", "t_", "s_", "b0", "10", "18")
MAX_CANDIDATES = 4
QUICK = [("timm", "resnet", "resnet10t"), ("timm", "vision_transformer", "vit_tiny_patch16_224"),
         ("timm", "convnext", "convnext_atto"), ("torchvision", "mobilenet_v3_small",
                                                 "mobilenet_v3_small")]


def _small_score(name: str) -> tuple[int, int, str]:
    for rank, fragment in enumerate(SMALL):
        if fragment in name:
            return rank, len(name), name
    return len(SMALL), len(name), name


def timm_jobs() -> list[dict]:
    import timm

    jobs = []
    for family in timm.list_modules():
        names = timm.list_models(module=family)
        if not names:
            continue
        candidates = sorted(names, key=_small_score)[:MAX_CANDIDATES]
        jobs.append({"source": "timm", "family": family, "candidates": candidates})
    return jobs


def torchvision_jobs() -> list[dict]:
    import torchvision

    return [{"source": "torchvision", "family": name, "candidates": [name]}
            for name in torchvision.models.list_models(module=torchvision.models)]


# --------------------------------------------------------------------------------------------
# The worker: one model per request
# --------------------------------------------------------------------------------------------


def _create(source: str, name: str, meta: bool):
    import torch

    if source == "timm":
        import timm

        build = lambda: timm.create_model(name, pretrained=False)  # noqa: E731
    else:
        import torchvision

        build = lambda: torchvision.models.get_model(name, weights=None)  # noqa: E731
    if meta:
        with torch.device("meta"):
            return build()
    torch.manual_seed(0)
    return build()


def _default_size(source: str, name: str, model) -> int:
    if source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224)
        return int(size[-1])
    return 299 if "inception" in name else 224


def _message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def run_job(job: dict, size: int, max_params: float) -> dict:
    import torch

    from curvprune.calibration import scoring_mode
    from curvprune.errors import UntraceableModel
    from curvprune.graphs.channel import trace_channels

    torch.set_num_threads(1)
    start = time.perf_counter()
    counts = {}
    for name in job["candidates"]:
        try:
            model = _create(job["source"], name, meta=True)
            counts[name] = sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - a variant that cannot be built on meta
            continue
    if counts:
        name = min(counts, key=lambda n: (counts[n], n))
    else:
        name = job["candidates"][0]
    entry = {"source": job["source"], "family": job["family"], "model": name,
             "params": counts.get(name)}
    if entry["params"] is not None and entry["params"] > max_params:
        entry.update(status="too_large",
                     reason=f"{entry['params'] / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M")
        return entry
    try:
        model = _create(job["source"], name, meta=False)
    except Exception as exc:  # noqa: BLE001
        entry.update(status="model_error", reason="creation failed: " + _message(exc))
        return entry
    entry["params"] = sum(p.numel() for p in model.parameters())
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    entry["conv_linear_modules"] = layers
    errors = []
    x = None
    for s in dict.fromkeys([size, _default_size(job["source"], name, model)]):
        generator = torch.Generator().manual_seed(0)
        candidate = torch.randn(1, 3, s, s, generator=generator)
        try:
            with scoring_mode(model):
                model(candidate)
            x = candidate
            entry["input"] = [1, 3, s, s]
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{s}x{s}: {_message(exc)}")
    if x is None:
        entry.update(status="model_error", reason="; ".join(errors))
        return entry
    t0 = time.perf_counter()
    try:
        with scoring_mode(model):
            graph = trace_channels(model, x)
    except UntraceableModel as exc:
        entry.update(status="untraceable", functions=list(exc.functions), reason=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001
        entry.update(status="tracer_error", reason=_message(exc),
                     where=traceback.format_exc(limit=-3)[-600:])
    else:
        entry.update(status="traced", nodes=graph.num_nodes, edges=int(graph.src.numel()),
                     layers=len(graph.modules))
    entry["trace_s"] = round(time.perf_counter() - t0, 2)
    entry["total_s"] = round(time.perf_counter() - start, 2)
    return entry


def _worker(requests, replies, size: int, max_params: float) -> None:
    import queue
    import warnings

    warnings.filterwarnings("ignore")
    import timm  # noqa: F401 - imported before the first model's clock starts
    import torchvision  # noqa: F401

    import curvprune.graphs.channel  # noqa: F401

    parent = os.getppid()
    replies.put("ready")
    while True:
        try:
            job = requests.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the sweep was stopped: do not linger
                return
            continue
        if job is None:
            return
        try:
            replies.put(run_job(job, size, max_params))
        except BaseException as exc:  # noqa: BLE001 - report and go on
            replies.put({"status": "tracer_error", "reason": _message(exc)})


class Worker:
    """One worker process, restarted after a timeout or a crash."""

    def __init__(self, size: int, max_params: float):
        self.context = mp.get_context("spawn")
        self.args = (size, max_params)
        self.process = None
        self.job = None

    def start(self) -> None:
        self.requests, self.replies = self.context.Queue(), self.context.Queue()
        self.process = self.context.Process(target=_worker, daemon=True,
                                            args=(self.requests, self.replies) + self.args)
        self.process.start()
        if self.replies.get(timeout=600) != "ready":
            raise RuntimeError("the coverage worker did not start")

    def submit(self, job: dict, timeout: float) -> None:
        if self.process is None or not self.process.is_alive():
            self.start()
        self.job, self.deadline = job, time.monotonic() + timeout
        self.timeout = timeout
        self.requests.put(job)

    def poll(self) -> dict | None:
        """The finished job's entry, or None while it runs."""
        import queue

        try:
            return self.replies.get(timeout=0.2)
        except queue.Empty:
            pass
        if not self.process.is_alive():
            self.process = None
            return {"status": "tracer_error",
                    "reason": "the worker died (out of memory or a crash)"}
        if time.monotonic() > self.deadline:
            self.stop()
            return {"status": "too_slow", "reason": f"over {self.timeout:.0f} s"}
        return None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.requests.put(None)
            self.process.join(timeout=10)
        self.stop()


def sweep(jobs: list[dict], workers: int, timeout: float, size: int, max_params: float):
    """Run every job on ``workers`` worker processes; yields ``(index, entry)`` as they end."""
    pool = [Worker(size, max_params) for _ in range(min(workers, len(jobs)))]
    pending = list(enumerate(jobs))
    busy: dict[int, int] = {}
    try:
        while pending or busy:
            for w, worker in enumerate(pool):
                if w not in busy and pending:
                    index, job = pending.pop(0)
                    worker.submit(job, timeout)
                    busy[w] = index
            for w in list(busy):
                entry = pool[w].poll()
                if entry is not None:
                    index = busy.pop(w)
                    job = jobs[index]
                    yield index, {"source": job["source"], "family": job["family"],
                                  "model": job["candidates"][0], **entry}
    finally:
        for worker in pool:
            worker.close()


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


# Failures the tracer names after a layer: grouped under one key (the layer names vary).
_LAYER_FAILURES = ("reads no traced channel", "called twice (a shared layer)",
                   "mixes positions (tokens), not channels", "mixes calibration examples")


def _function_key(function: str) -> str:
    """The blocking function without its details: ``view (RuntimeError)`` -> ``view``."""
    for failure in _LAYER_FAILURES:
        if function.endswith(failure):
            return "a layer " + failure
    return re.sub(r"\s*\(.*\)$", "", function)


def summarise(entries: list[dict]) -> dict:
    summary = {}
    for source in ("timm", "torchvision", "all"):
        chosen = [e for e in entries if source in ("all", e["source"])]
        summary[source] = dict(Counter(e["status"] for e in chosen), total=len(chosen))
    blockers, alone = Counter(), Counter()
    for e in entries:
        if e["status"] == "untraceable":
            keys = {_function_key(f) for f in e["functions"]}
            for f in keys:
                blockers[f] += 1
            # "a layer reads no traced channel" follows from an earlier failure: not counted
            # when another function is named.
            primary = keys - {"a layer reads no traced channel"} or keys
            if len(primary) == 1:
                alone[next(iter(primary))] += 1
    summary["blocking_functions"] = dict(blockers.most_common())
    summary["sole_blocker"] = dict(alone.most_common())
    return summary


def markdown(data: dict) -> str:
    s = data["summary"]
    lines = [
        "# Channel tracer coverage", "",
        f"Command: `{data['command']}`  ",
        f"torch {data['versions']['torch']}, timm {data['versions']['timm']}, torchvision "
        f"{data['versions']['torchvision']}; {data['wall_s']:.0f} s wall.", "",
        "| models | traced | untraceable | model error | tracer error | too large | too slow "
        "| total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for source in ("timm", "torchvision", "all"):
        c = s[source]
        lines.append(f"| {source} | {c.get('traced', 0)} | {c.get('untraceable', 0)} | "
                     f"{c.get('model_error', 0)} | {c.get('tracer_error', 0)} | "
                     f"{c.get('too_large', 0)} | {c.get('too_slow', 0)} | {c['total']} |")
    lines += ["", "Functions that stop the tracer: models each is named for (and for how many "
              "it is the only one named, besides layers left without a traced input):", ""]
    if s["blocking_functions"]:
        lines += [f"- `{f}`: {n} ({s['sole_blocker'].get(f, 0)} alone)"
                  for f, n in s["blocking_functions"].items()]
    else:
        lines.append("- none")
    lines += ["", "| source | family | model | params (M) | input | status | detail |",
              "|---|---|---|---|---|---|---|"]
    for e in data["models"]:
        params = f"{e['params'] / 1e6:.1f}" if e.get("params") is not None else ""
        size = "x".join(map(str, e["input"][2:])) if e.get("input") else ""
        if e["status"] == "traced":
            detail = (f"{e['nodes']} nodes, {e['edges']} edges, {e['layers']}/"
                      f"{e['conv_linear_modules']} layers, {e['trace_s']} s")
        elif e["status"] == "untraceable":
            keys = dict.fromkeys(_function_key(f) for f in e["functions"])
            detail = ", ".join(f"`{f}`" for f in keys)
        else:
            detail = e.get("reason", "").replace("|", "/")[:160]
        lines.append(f"| {e['source']} | {e['family']} | {e['model']} | {params} | {size} | "
                     f"{e['status']} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of models (CI)")
    parser.add_argument("--source", choices=["timm", "torchvision", "both"], default="both")
    parser.add_argument("--families", nargs="*", default=None,
                        help="only these timm families / torchvision models")
    parser.add_argument("--size", type=int, default=64, help="input height and width (64)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per model: creation, forward and trace (60)")
    parser.add_argument("--max-params", type=float, default=100e6,
                        help="skip models with more parameters (100e6)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes, one model each at a time (2)")
    parser.add_argument("--models-from", type=Path, default=None,
                        help="trace the models an earlier results JSON picked (no meta count)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, default=None,
                        help="only rewrite the summary and table of this results JSON")
    args = parser.parse_args(argv)
    if args.report is not None:
        data = json.loads(args.report.read_text())
        data["summary"] = summarise(data["models"])
        args.report.write_text(json.dumps(data, indent=1) + "\n")
        args.report.with_suffix(".md").write_text(markdown(data))
        return 0

    import timm
    import torch
    import torchvision

    if args.quick:
        jobs = [{"source": s, "family": f, "candidates": [m]} for s, f, m in QUICK]
    else:
        jobs = []
        if args.source in ("timm", "both"):
            jobs += timm_jobs()
        if args.source in ("torchvision", "both"):
            jobs += torchvision_jobs()
    if args.models_from is not None:
        picked = {(e["source"], e["family"]): e["model"]
                  for e in json.loads(args.models_from.read_text())["models"]}
        jobs = [dict(j, candidates=[picked[(j["source"], j["family"])]])
                if (j["source"], j["family"]) in picked else j for j in jobs]
    if args.families:
        jobs = [j for j in jobs if j["family"] in args.families]
    command = "python benchmarks/coverage.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    entries: list[dict | None] = [None] * len(jobs)
    for done, (index, entry) in enumerate(sweep(jobs, args.workers, args.timeout, args.size,
                                                args.max_params)):
        entries[index] = entry
        detail = sorted({_function_key(f) for f in entry.get("functions", [])}) or entry.get(
            "reason", "")
        print(f"[{done + 1}/{len(jobs)}] {entry['source']} {entry['family']} "
              f"{entry['model']}: {entry['status']} {detail}", flush=True)
    data = {
        "command": command,
        "settings": {"quick": args.quick, "size": args.size, "timeout_s": args.timeout,
                     "max_params": args.max_params, "workers": args.workers,
                     "threads_per_worker": 1},
        "versions": {"torch": torch.__version__, "timm": timm.__version__,
                     "torchvision": torchvision.__version__, "python": platform.python_version()},
        "wall_s": round(time.perf_counter() - start, 1),
        "status": "complete",
        "summary": summarise(entries),
        "models": entries,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "coverage_quick" if args.quick else "coverage"
    for suffix, text in ((".json", json.dumps(data, indent=1) + "\n"), (".md", markdown(data))):
        path = args.out / (stem + suffix)
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(markdown(data).split("\n| source |")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
