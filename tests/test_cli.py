"""The ``curvprune`` command: every subcommand, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from curvprune.cli import main
from curvprune.data import FASHION_MNIST_DIR
from curvprune.models import create_model
from curvprune.training import train_classifier

HAVE_FMNIST = any(FASHION_MNIST_DIR.glob("t10k-images-idx3-ubyte*"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def small_model_path(tmp_path_factory):
    """A small MLP trained briefly on Fashion-MNIST, saved whole (as users do)."""
    from curvprune.data import fashion_mnist

    torch.manual_seed(0)
    model = create_model("mlp", hidden=(24, 12))
    data = fashion_mnist(train=True)
    train_classifier(model, data, batch_size=256, lr=1e-3, seed=0, max_steps=151)
    path = tmp_path_factory.mktemp("model") / "mlp.pt"
    torch.save(model.eval(), path)
    return path


def run_main(args, capsys):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(main(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_cli_order_accepts_the_old_spelling_with_a_warning(capsys):
    from curvprune.cli import build_parser

    base = ["prune", "--model", "curvprune:lenet5", "--out", "unused", "--amount", "0.5",
            "--order"]
    for old, new in (("pos", "positive_first"), ("neg", "negative_first")):
        assert build_parser().parse_args(base + [old]).order == new
        err = capsys.readouterr().err
        assert f"warning: order='{old}' is deprecated; use order='{new}'" in err
        assert build_parser().parse_args(base + [new]).order == new
        assert capsys.readouterr().err == ""
    assert build_parser().parse_args(base[:-1]).order == "positive_first"
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["highest"])
    assert "invalid choice: 'highest'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["prune", "--model", "curvprune:nosuchnet", "--amount", "0.5"], "unknown curvprune model"),
    (["prune", "--model", "timm:nosuchnet_xyz", "--amount", "0.5"], "unknown timm model"),
    (["prune", "--model", "nowhere/model.pt", "--amount", "0.5"], "model file not found"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--data",
      "imagefolder:/nonexistent/folder"], "data not found"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "1.5"], "amount must be in [0, 1]"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "half"], "amount must be a number"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--structured", "--order",
      "negative_first"], "--order negative_first is for unstructured"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--structured",
      "--granularity", "neuron"], "channel granularity"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "1", "--structured"],
     "channel ratio"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.3", "--structured",
      "--allocation", "wanda"], "--allocation is for unstructured"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--tolerance", "-1"],
     "tolerance must be a finite number >= 0"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--tolerance", "nan"],
     "tolerance must be a finite number >= 0"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--tolerance", "inf"],
     "tolerance must be a finite number >= 0"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.5", "--tolerance", "tight"],
     "tolerance must be a number"),
    (["prune", "--model", "curvprune:lenet5", "--amount", "0.3", "--structured",
      "--tolerance", "0.01"], "--tolerance (decision-exact pruning) is for unstructured"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    code, out, err = run_main(args + ["--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("curvprune: error:")


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_main(["prune", "--model", "curvprune:lenet5", "--amount", "0.5",
                             "--out", str(blocker / "out")], capsys)
    assert code == 2 and "cannot write to output folder" in err


def test_missing_subcommand_and_arguments(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2 and "curvprune: error:" in err
    code, _, err = run_main(["prune", "--amount", "0.5"], capsys)
    assert code == 2 and "--model" in err


@needs_fmnist
def test_prune_writes_model_report_and_plots(small_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(["prune", "--model", str(small_model_path), "--amount", "0.6",
                             "--eval-limit", "1000", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "kappa_histograms.png", "model.pt", "report.json", "sparsity.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["overall_sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert 0 <= report["accuracy_after"] <= 1 and 0 <= report["accuracy_before"] <= 1
    assert report["calibration_examples"] == 10
    pruned = torch.load(out / "model.pt", weights_only=False)
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert not any(hasattr(m, "weight_mask") for m in pruned.modules())  # permanent
    zero = sum(int((w == 0).sum()) for w in weights)
    assert zero / sum(w.numel() for w in weights) == pytest.approx(0.6, abs=1e-4)
    for png in ("sparsity.png", "kappa_histograms.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fmnist
def test_prune_with_tolerance_is_decision_exact(small_model_path, tmp_path, capsys):
    """--tolerance: the report says how much was refined, and the saved model's zeros are
    those of the exact run (--tolerance 0)."""
    runs = {}
    for tolerance in ("0", "0.5"):
        out = tmp_path / tolerance
        code, _, err = run_main(["prune", "--model", str(small_model_path), "--amount", "0.7",
                                 "--tolerance", tolerance, "--granularity", "neuron",
                                 "--no-eval", "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        model = torch.load(out / "model.pt", weights_only=False)
        runs[tolerance] = (report, [m.weight == 0 for m in model.modules()
                                    if isinstance(m, nn.Linear)])
    exact, coarse = runs["0"][0], runs["0.5"][0]
    assert exact["tolerance"] == 0 and exact["max_interval_width"] == 0
    assert exact["refined_weights"] == 0 and exact["refine_rounds"] == 0
    assert coarse["tolerance"] == 0.5 and 0 < coarse["max_interval_width"] <= 0.5
    assert coarse["refined_weights"] >= coarse["refine_rounds"] >= 0
    for a, b in zip(runs["0"][1], runs["0.5"][1]):
        assert torch.equal(a, b)


@needs_fmnist
def test_prune_with_wanda_allocation(small_model_path, tmp_path, capsys):
    """--allocation wanda: every layer loses what global Wanda would remove from it."""
    from curvprune.baselines import wanda_scores

    runs = {}
    for allocation in ("curvature", "wanda"):
        out = tmp_path / allocation
        code, _, err = run_main(["prune", "--model", str(small_model_path), "--amount", "0.7",
                                 "--allocation", allocation, "--no-eval", "--out", str(out),
                                 "--quiet"], capsys)
        assert code == 0, err
        runs[allocation] = json.loads((out / "report.json").read_text())
    report = runs["wanda"]
    assert report["settings"]["allocation"] == "wanda"
    assert report["overall_sparsity"] == pytest.approx(0.7, abs=1e-4)
    from curvprune.cli import _prepare, build_parser  # the calibration the command used

    args = build_parser().parse_args(["prune", "--model", str(small_model_path), "--amount",
                                      "0.7", "--out", str(tmp_path / "again")])
    model, _, calib, _ = _prepare(args)
    budget = wanda_scores(model, calib)
    flat = torch.cat([v.flatten() for v in budget.values()])
    cut = torch.sort(flat).values[round(0.7 * flat.numel()) - 1]
    expected = [int((v <= cut).sum()) for v in budget.values()]
    assert [layer["pruned"] for layer in report["layers"]] == expected
    assert expected != [layer["pruned"] for layer in runs["curvature"]["layers"]]


@needs_fmnist
def test_structured_prune_removes_channels(small_model_path, tmp_path, capsys):
    out = tmp_path / "channels"
    code, _, err = run_main(["prune", "--model", str(small_model_path), "--amount", "0.25",
                             "--structured", "--eval-limit", "500", "--out", str(out),
                             "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["structured"] and not report["fallback"]
    assert report["params_after"] < report["params_before"]
    pruned = torch.load(out / "model.pt", weights_only=False)
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 10  # the classifier keeps its outputs
    widths = {k: tuple(v) for k, v in report["widths_after"].items()}
    assert [widths[k] for k in sorted(widths)] == [
        (m.in_features, m.out_features) for m in linears]
    assert all(w[1] < report["widths_before"][k][1] for k, w in widths.items()
               if k != sorted(widths)[-1])
    x = torch.zeros(2, 1, 28, 28)
    assert pruned(x).shape == (2, 10)


@needs_fmnist
@pytest.mark.parametrize("structured", [False, True])
def test_prune_a_timm_model(structured, tmp_path, capsys):
    out = tmp_path / "timm"
    args = ["prune", "--model", "zoo:timm/resnet18", "--data", "fashion-mnist", "--calibration",
            "random", "--amount", "0.3", "--eval-limit", "200", "--out", str(out), "--quiet"]
    code, _, err = run_main(args + (["--structured"] if structured else []), capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_examples"] == 10 and not report["fallback"]
    pruned = torch.load(out / "model.pt", weights_only=False)
    assert pruned(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    if structured:
        assert report["params_after"] < report["params_before"]
    else:
        assert report["granularity"] == "channel"  # auto: not a chain
        assert report["overall_sparsity"] == pytest.approx(0.3, abs=1e-4)
        for png in ("sparsity.png", "kappa_histograms.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fmnist
def test_analyze_writes_statistics_and_bottlenecks(small_model_path, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, _, err = run_main(["analyze", "--model", str(small_model_path), "--top", "3",
                             "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    data = json.loads((out / "analysis.json").read_text())
    assert [s["name"] for s in data["statistics"]] == ["1.weight", "3.weight", "5.weight"]
    assert set(data["bottlenecks"]) == {"1.weight", "3.weight", "5.weight"}
    for b in data["bottlenecks"].values():
        assert len(b["kappa"]) == 3 and b["kappa"] == sorted(b["kappa"])
    assert "relational-graph measures" in data["relational"]["summary"]
    assert (out / "kappa_histograms.png").exists()


@needs_fmnist
def test_untrained_model_gets_a_clear_calibration_error(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "untrained.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval(), path)
    code, _, err = run_main(["prune", "--model", str(path), "--amount", "0.5",
                             "--calibration-per-class", "500", "--out",
                             str(tmp_path / "o")], capsys)
    assert code == 2 and "calibration" in err


def test_console_script_runs_this_checkout():
    """``curvprune`` as installed runs ``curvprune.cli:main``; run this checkout's module the
    same way (not whatever ``curvprune`` is first on PATH, which may be another install)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    code = ("import sys, curvprune, curvprune.cli; print(curvprune.__file__, file=sys.stderr); "
            "sys.argv[0] = 'curvprune'; raise SystemExit(curvprune.cli.main())")
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    assert Path(out.stderr.strip().splitlines()[-1]).resolve() == (
        root / "curvprune" / "__init__.py").resolve()
    for command in ("demo", "prune", "analyze"):
        assert command in out.stdout
    assert 'curvprune = "curvprune.cli:main"' in (root / "pyproject.toml").read_text()


@needs_fmnist
def test_structured_default_scope_is_prune_channels_default(small_model_path, tmp_path, capsys):
    """``--structured`` without ``--scope`` prunes as ``prune_channels`` does by default (every
    group loses the ratio), not by one global ranking."""
    import inspect

    from curvprune.cli import _prepare, build_parser
    from curvprune.structured import prune_channels

    assert inspect.signature(prune_channels).parameters["global_pruning"].default is False
    argv = ["prune", "--model", str(small_model_path), "--amount", "0.3", "--structured",
            "--no-eval", "--quiet"]
    code, _, err = run_main(argv + ["--out", str(tmp_path / "cli")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["settings"]["scope"] == "layer"
    model, _, calibration, _ = _prepare(build_parser().parse_args(
        argv + ["--out", str(tmp_path / "api")]))
    api = prune_channels(model, calibration, 0.3)
    assert {k: list(v) for k, v in api.widths_after.items()} == report["widths_after"]
    hidden = [k for k in sorted(report["widths_before"])][:-1]  # the classifier is kept
    for k in hidden:  # every group keeps 70 % of its channels (Torch-Pruning rounds down)
        before, after = report["widths_before"][k][1], report["widths_after"][k][1]
        assert 0 <= 0.7 * before - after < 1, (k, before, after)
    # unstructured pruning keeps the global default of prune_model
    code, _, err = run_main(["prune", "--model", str(small_model_path), "--amount", "0.3",
                             "--no-eval", "--quiet", "--out", str(tmp_path / "u")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "u" / "report.json").read_text())["settings"]["scope"] == \
        "global"
