"""The benchmark script's --quick mode end to end (CI): JSON complete, plots written.

The smoke runs train and score real models for a minute or more each: they carry the ``slow``
marker (CI runs them; ``pytest -m "not slow"`` skips them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import benchmark_module

import curvprune

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "unstructured.py"


def _has_fashion_mnist() -> bool:
    from curvprune.data import FASHION_MNIST_DIR

    return any((FASHION_MNIST_DIR / f"t10k-images-idx3-ubyte{s}").exists() for s in ("", ".gz"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
def test_unstructured_quick(tmp_path):
    out, plots = tmp_path / "out", tmp_path / "plots"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out),
         "--plots", str(plots)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "unstructured.json").read_text())
    assert data["status"] == "complete" and data["settings"]["quick"] is True
    assert "--quick" in data["command"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from unstructured import CRITERIA
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert set(CRITERIA) >= {"curv_pos", "curv_neg", "magnitude", "random", "lamp", "wanda_row",
                             "wanda_global", "snip", "curv_pos_layer", "curv_neg_layer",
                             "magnitude_layer"}
    seeds = data["models"]["mlp"]["seeds"]
    assert list(seeds) == ["0"]
    entry = seeds["0"]
    assert set(entry["accuracy"]) == set(CRITERIA)
    for criterion in CRITERIA:
        accuracy = entry["accuracy"][criterion]
        assert set(accuracy) == {"0", "0.5", "0.9"}, criterion
        assert all(0.0 <= v <= 1.0 for v in accuracy.values())
        assert accuracy["0"] == pytest.approx(entry["test_accuracy"])  # nothing pruned at 0
        sparsity = entry["sparsity"][criterion]
        assert sparsity["0"] < 0.01 and sparsity["0.5"] == pytest.approx(0.5, abs=0.02)
        assert sparsity["0.9"] == pytest.approx(0.9, abs=0.02)
    for group in ("global", "layer", "allocation"):
        png = plots / f"unstructured_{group}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(plots.glob("*.tmp*")) and not list(out.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
def test_unstructured_resume_adds_only_the_missing_criteria(tmp_path):
    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out),
             "--plots", str(tmp_path / "plots"), *extra],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)

    full, partial = tmp_path / "full", tmp_path / "partial"
    done = run(full, "--criteria", "magnitude", "lamp", "wanda_global")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads((full / "unstructured.json").read_text())
    assert reference["settings"]["criteria"] == ["magnitude", "lamp", "wanda_global"]
    # the same file without LAMP, as written before LAMP existed
    older = json.loads(json.dumps(reference))
    seed = older["models"]["mlp"]["seeds"]["0"]
    for key in ("accuracy", "sparsity", "layer_sparsity"):
        del seed[key]["lamp"]
    older["settings"]["criteria"].remove("lamp")
    partial.mkdir()
    (partial / "unstructured.json").write_text(json.dumps(older))
    done = run(partial, "--resume", "--criteria", "magnitude", "lamp", "wanda_global")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adding lamp" in done.stdout
    resumed = json.loads((partial / "unstructured.json").read_text())
    seed = resumed["models"]["mlp"]["seeds"]["0"]
    want = reference["models"]["mlp"]["seeds"]["0"]
    for key in ("accuracy", "sparsity", "layer_sparsity"):
        assert seed[key] == want[key]  # retrained, rescored: the same rows
    assert set(seed["criteria_added"]) == {"lamp"} and "--resume" in seed["criteria_added"]["lamp"]
    assert resumed["settings"]["criteria"] == ["magnitude", "lamp", "wanda_global"]
    assert resumed["earlier_commands"] == [reference["command"]]
    # kept rows from another model are refused, not mixed in
    older["models"]["mlp"]["seeds"]["0"]["test_accuracy"] = 0.5
    (partial / "unstructured.json").write_text(json.dumps(older))
    done = run(partial, "--resume", "--criteria", "magnitude", "lamp", "wanda_global")
    assert done.returncode != 0 and "is not the model" in done.stderr


@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
def test_structured_quick(tmp_path):
    out, plot = tmp_path / "structured.json", tmp_path / "structured.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "structured.py"), "--quick", "--out",
         str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    (model,) = data["models"].values()
    (entry,) = model["seeds"].values()
    assert set(entry["results"]) == {"curvature", "curvature_min", "curvature_weighted",
                                     "magnitude", "taylor", "random", "activation", "hessian"}
    assert entry["curvature_seconds"] > 0  # one scoring for the three reductions
    for rows in entry["results"].values():
        row = rows["0.3"]
        assert row["params"] < row["params_before"] and row["macs"] < row["macs_before"]
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy_finetuned"] <= 1
        assert row["latency_ms"] > 0
    # every criterion removes the same channels count per group: same parameter count
    assert len({rows["0.3"]["params"] for rows in entry["results"].values()}) == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.with_suffix(".md").read_text()
    assert "After 10 fine-tuning steps" in text and "| timm/resnet18 | curvature_min |" in text


def _structured_module():
    return benchmark_module("structured")


@pytest.mark.slow  # four channel scorings of a zoo model: about a minute of CPU
def test_structured_curvature_reductions_use_one_scoring(monkeypatch):
    """The three curvature criteria pruned from one scoring remove the channels that a fresh
    ``CurvatureImportance(calibration, reduction=...)`` removes; the reductions differ."""
    structured = _structured_module()
    from curvprune.models import zoo

    name = "timm/vit_tiny_patch16_224"  # the cheapest zoo model to score
    torch.manual_seed(0)
    model = zoo.create(name)
    state = model.state_dict()
    calib = torch.randn(2, 3, 32, 32)
    result = curvprune.neural_curvature(model, calib, granularity="channel")
    removed = {}
    original = curvprune.prune_channels

    def recording(model, *args, **kwargs):
        report = original(model, *args, **kwargs)
        removed[key] = report.removed
        return report

    monkeypatch.setattr(structured.curvprune, "prune_channels", recording)
    test = torch.utils.data.TensorDataset(calib, torch.zeros(2, dtype=torch.long))
    for criterion in structured.CURVATURE:
        for curvature in (None, result):
            key = (criterion, curvature is None)
            structured.prune_and_evaluate(name, state, criterion, 0.3, calib, None, test, 0,
                                          curvature=curvature)
        assert removed[(criterion, True)] == removed[(criterion, False)]
    assert removed[("curvature", True)] != removed[("curvature_min", True)]
    assert removed[("curvature", True)] != removed[("curvature_weighted", True)]


def test_structured_options_are_checked(capsys):
    structured = _structured_module()
    with pytest.raises(SystemExit):
        structured.main(["--ratios", "0.1", "--finetune-ratios", "0.2"])
    assert "not among --ratios" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        structured.main(["--criteria", "curvature_median"])
    assert "invalid choice" in capsys.readouterr().err


def _fake_run(structured, seed: int, criteria, acc: dict) -> dict:
    """A (model, seed) entry as the structured benchmark writes it, with accuracies ``acc``
    (per criterion) at ratio 0.1."""
    row = {"params": 80, "params_before": 100, "macs": 70.0, "macs_before": 100.0,
           "seconds": 0.1, "fallback": False, "latency_ms": 1.0}
    return {"dense_accuracy": 0.9, "dense_latency_ms": 1.0, "curvature_seconds": 2.0 + seed,
            "results": {c: {"0.1": row | {"accuracy": acc[c], "accuracy_finetuned": 0.85}}
                        for c in criteria}}


def test_structured_merge_combines_seeds(tmp_path, capsys):
    """``--merge`` puts the seeds of several files side by side (mean and min-max), refuses
    a (model, seed) found twice and files of other settings; a seed that lacks a criterion
    (an interrupted run) is named in that criterion's cells."""
    structured = _structured_module()
    common = ["--ratios", "0.1", "--finetune-steps", "100"]
    model = "timm/convnext_atto"
    acc = [{"curvature": 0.5, "magnitude": 0.4, "taylor": 0.7},
           {"curvature": 0.7, "magnitude": 0.6, "taylor": 0.6}]
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"seed{seed}.json"
        args = structured.parse([*common, "--seeds", str(seed), "--out", str(path)])
        criteria = ["curvature", "magnitude", "taylor"] if seed == 0 else ["curvature",
                                                                           "magnitude"]
        path.write_text(json.dumps({
            "command": f"seed {seed}", "settings": structured._settings(args),
            "models": {model: {"seeds": {str(seed): _fake_run(structured, seed, criteria,
                                                             acc[seed])}}}}))
        paths.append(path)
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    structured.main(["--merge", *map(str, paths), "--out", str(out), "--plot", str(png),
                     *common])
    data = json.loads(out.read_text())
    assert list(data["models"][model]["seeds"]) == ["0", "1"]
    assert data["merged_from"] == {str(paths[0]): "seed 0", str(paths[1]): "seed 1"}
    text = out.with_suffix(".md").read_text()
    # curvature 50 / 70, magnitude 40 / 60, taylor only seed 0 (70)
    assert "| 0.1 | 80% | 70% | 60.0 (50.0-70.0) | 50.0 (40.0-60.0) | 70.0 [seed 0] |" in text
    assert "After 100 fine-tuning steps" in text
    # lead over magnitude on both seeds (+10), over Taylor on seed 0 only (-20)
    assert f"| {model} | curvature | +10.0 / -20.0 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="in two of the files"):
        structured.main(["--merge", str(paths[0]), str(paths[0]), "--out", str(out),
                         "--plot", str(png), *common])
    with pytest.raises(SystemExit, match="other settings"):
        structured.main(["--merge", *map(str, paths), "--out", str(out), "--plot", str(png),
                         "--ratios", "0.1", "--finetune-steps", "50"])


@pytest.mark.slow
@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
def test_granularity_quick(tmp_path):
    out = tmp_path / "granularity.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "granularity.py"), "--quick", "--out",
         str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert set(row["accuracy"]) == {"neuron", "channel", "magnitude", "neuron_layer",
                                    "channel_layer", "magnitude_layer"}
    assert set(row["scoring_seconds"]) == {"neuron", "channel"}
    assert all(0 <= v["0.5"] <= 1 for v in row["accuracy"].values())


def test_resume_keeps_matching_runs_and_refuses_other_settings(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import resumable
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    path = tmp_path / "run.json"
    assert resumable(path, {"alpha": 0.9}, ignore={"seeds"}) == {}  # nothing to resume
    path.write_text(json.dumps({"settings": {"alpha": 0.9, "seeds": [0]},
                                "models": {"lenet5": {"seeds": {"0": {"accuracy": 1}}}}}))
    kept = resumable(path, {"alpha": 0.9, "seeds": [0, 1, 2]}, ignore={"seeds"})
    assert kept == {"lenet5": {"0": {"accuracy": 1}}}
    with pytest.raises(SystemExit, match="other settings \\(alpha\\)"):
        resumable(path, {"alpha": 0.5, "seeds": [0]}, ignore={"seeds"})


@pytest.mark.slow
def test_coverage_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "coverage.py"), "--quick", "--out",
         str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "coverage_quick.json").read_text())
    assert data["status"] == "complete" and data["settings"]["quick"] is True
    models = {e["model"]: e for e in data["models"]}
    assert set(models) == {"resnet10t", "vit_tiny_patch16_224", "convnext_atto",
                           "mobilenet_v3_small"}
    for entry in models.values():  # every model of the quick set is followed
        assert entry["status"] == "traced", entry
        assert 0 < entry["layers"] <= entry["conv_linear_modules"]
        assert entry["edges"] > 0 and entry["nodes"] > entry["layers"]
    assert data["summary"]["all"] == {"traced": 4, "total": 4}
    table = (tmp_path / "coverage_quick.md").read_text()
    assert "| all | 4 | 0 | 0 | 0 | 0 | 0 | 4 |" in table


STUDY = ROOT / "benchmarks" / "study.py"


def _study_module():
    return benchmark_module("study")


def test_study_min_of_single_examples_is_the_batch_curvature():
    """The study scores one example at a time and aggregates offline: the minimum over the
    examples with the dead-edge rule must be the engine's value on the whole batch (to the
    rounding of a batched against a one-example forward pass: float64 here, where that is a few
    ulps; in float32 it is about 1e-7), and the study's ranking of the batch values must be the
    engine's ranking."""
    import torch
    import torch.nn as nn

    from curvprune import neural_curvature

    study = _study_module()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 6), nn.ReLU(), nn.Linear(6, 4)).eval().double()
    x = torch.randn(4, 1, 7, 7, generator=torch.Generator().manual_seed(4)).double()
    batch = neural_curvature(model, x, tolerance=0.0)
    singles = [neural_curvature(model, x[i:i + 1], tolerance=0.0) for i in range(len(x))]
    values = batch.rank_values()
    magnitude = {n: m.weight.detach().abs().double() for n, m in batch.modules.items()}
    mins = {}
    for name in batch.kappa:
        kappa = torch.stack([r.kappa[name] for r in singles])
        live = torch.stack([r.live[name] for r in singles])
        assert torch.equal(live.any(0), batch.live[name])
        mins[name] = study.aggregate(kappa, live, "min")
        torch.testing.assert_close(mins[name], values[name], rtol=0, atol=1e-14)
        assert torch.equal(mins[name] == 2, values[name] == 2)  # the same dead weights
    assert any((~batch.live[n]).any() for n in batch.live)  # the dead-edge rule is exercised
    ranks = study.ranks(study.curvature_keys(values), magnitude)
    for name, order in batch.pruning_order("positive_first").items():
        assert torch.equal(ranks[name], order.double()), name


def test_study_size_and_dead_tables():
    """The calibration-size tables of ``study.md``: one cell per family, amount and size with the
    mean and min-max over seeds, ``-`` where a family was not evaluated at a size, and the
    dead-edge facts per size in percent."""
    study = _study_module()

    def seed(acc_min10: float, acc_min100: float, dead10: float) -> dict:
        return {"test_accuracy": 0.9,
                "accuracy": {"magnitude": {"0.5": 0.8}, "curv_min@10": {"0.5": acc_min10},
                             "curv_min@100": {"0.5": acc_min100},
                             "wanda_global@10": {"0.5": 0.7}},
                "per_size": {"10": {"dead_fraction": dead10, "dead_but_live_later": 0.02,
                                    "live_kappa_at_least_1": 0.1,
                                    "dead_removed_accuracy": 0.85},
                             "100": {"dead_fraction": 0.1, "dead_but_live_later": 0.0,
                                     "live_kappa_at_least_1": 0.1,
                                     "dead_removed_accuracy": 0.9}}}

    data = {"settings": {"sizes": [10, 100]},
            "models": {"m": {"seeds": {"0": seed(0.5, 0.6, 0.3), "1": seed(0.7, 0.8, 0.2)}}}}
    sizes = study.size_table(data, "m", [0.5]).splitlines()
    assert "| magnitude | 50 % | 80.0 (80.0-80.0) | 80.0 (80.0-80.0) |" in sizes
    assert "| wanda_global | 50 % | 70.0 (70.0-70.0) | - |" in sizes
    assert "| curv_min | 50 % | 60.0 (50.0-70.0) | 70.0 (60.0-80.0) |" in sizes
    assert not any(line.startswith("| snip") for line in sizes)  # not evaluated: no row
    dead = study.dead_table(data, "m").splitlines()
    assert "| 10 | 25.0 (20.0-30.0) | 2.0 (2.0-2.0) | 10.0 (10.0-10.0) | 85.00 (85.00-85.00) |" \
        in dead
    assert dead[-1].startswith("| 100 | 10.0 (10.0-10.0) | 0.0 ")


def test_study_rejects_unknown_criteria(capsys):
    study = _study_module()
    with pytest.raises(SystemExit) as stop:
        study.main(["--criteria", "curv_min", "curv_best"])
    assert stop.value.code == 2
    assert "unknown --criteria ['curv_best']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
def test_study_quick(tmp_path):
    done = subprocess.run(
        [sys.executable, str(STUDY), "--quick", "--out", str(tmp_path), "--plots",
         str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "study.json").read_text())
    assert data["status"] == "complete" and "--quick" in data["command"]
    entry = data["models"]["mlp_quick"]["seeds"]["0"]
    expected = {"magnitude", "lamp", "wanda_global@2", "snip@2", "wanda_global@4", "snip@4"}
    for n in (2, 4):
        expected |= {f"curv_{v}@{n}" for v in ("min", "nodead", "mean", "q10", "q25",
                                                 "median", "mag", "wanda")}
    assert set(entry["accuracy"]) == expected
    for accuracy in entry["accuracy"].values():
        assert set(accuracy) == {"0.5", "0.9"}
        assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    for fact in entry["per_size"].values():
        assert 0 <= fact["dead_fraction"] <= 1 and 0 <= fact["dead_removed_accuracy"] <= 1
    md = (tmp_path / "study.md").read_text()
    assert "curv_wanda@2" in md
    assert "**mlp_quick**, calibration size (images)" in md and "| curv_min | 90 % |" in md
    assert "**mlp_quick**, the dead-edge rule by calibration size" in md
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                  if 'if __name__ == "__main__"' in p.read_text())


def test_every_benchmark_script_starts():
    """Each benchmark script imports what it needs and parses ``--help`` (one process for all):
    a script whose import broke when a module moved fails here, not in front of a user."""
    code = (
        "import runpy, sys\n"
        "sys.path.insert(0, {bench!r})\n"
        "failed = []\n"
        "for name in {names!r}:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_path({bench!r} + '/' + name, run_name='__main__')\n"
        "    except SystemExit as stop:\n"
        "        if stop.code not in (0, None):\n"
        "            failed.append((name, stop.code))\n"
        "    except Exception as error:\n"
        "        failed.append((name, repr(error)))\n"
        "print(failed)\n"
        "sys.exit(1 if failed else 0)\n"
    ).format(bench=str(ROOT / "benchmarks"), names=_SCRIPTS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert len(_SCRIPTS) >= 8
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_unstructured_curv_wanda_is_the_library_criterion():
    """The benchmark's ``curv_wanda`` row ranks exactly as ``curvature_wanda_scores`` (the
    ``prune_model(criterion="curvature_wanda")`` scores) on the same curvature options, and a
    run at a tolerance records it with the widest interval it got."""
    unstructured = benchmark_module("unstructured")
    from curvprune.pruning.criteria import curvature_wanda_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    calib, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    for tolerance in (unstructured.EXACT, 0.05):
        scores, info = unstructured.build_scores(
            model, calib, labels, alpha=0.9, seed=0, progress=False,
            criteria=["curv_wanda", "curv_pos"], tolerance=tolerance)
        want = curvature_wanda_scores(model, calib, alpha=0.9, tolerance=tolerance,
                                      threads=os.cpu_count() or 1)
        assert set(scores) == {"curv_pos", "curv_wanda"}
        assert set(scores["curv_wanda"]) == set(want)
        for key, value in want.items():
            assert torch.equal(scores["curv_wanda"][key], value)
        assert not all(torch.equal(scores["curv_wanda"][k], scores["curv_pos"][k])
                       for k in want)  # Wanda's factor changes the order
        if tolerance == unstructured.EXACT:
            assert "tolerance" not in info
        else:
            assert info["tolerance"] == tolerance and 0 <= info["max_width"] <= tolerance


@pytest.mark.slow
def test_channel_fidelity_node_means_row():
    """``channel_fidelity.py --node-means``: scored as ``CurvatureImportance`` does by default
    (the tolerance on each channel's mean), the decision-exact step still removes exactly the
    channels of exact curvature, at every ratio and both scopes, and every channel mean's
    interval is within the tolerance (its per-edge intervals need not be)."""
    fidelity = benchmark_module("channel_fidelity")
    row = fidelity.run_model("timm/vit_tiny_patch16_224", 1, [1e-2], node_means=True)
    (entry,) = row["tolerances"]
    assert entry["node_reduction"] == "mean"
    assert 0 < entry["max_node_width"] <= 1e-2
    runs = entry["runs"]
    assert len(runs) == len(fidelity.RATIOS) * len(fidelity.SCOPES)
    assert all(r["decision_identical"] and r["decision_differing"] == 0 for r in runs)
    assert all(r["channels_removed"] > 0 for r in runs)
    assert "0.01 (channel means)" in fidelity.table([row], "cmd")
