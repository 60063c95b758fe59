"""Every CLI command on its fallback path and on a non-chain model (issue 14, item 2).

The fallback model is the zoo's MLP-Mixer, whose token-mixing MLPs the channel tracer cannot
follow (unstructured and structured pruning rank it by magnitude); the non-chain model is the
zoo's reduced ResNet-18. ``prune`` and ``prune --structured`` on the ResNet are in
``test_cli.py::test_prune_a_timm_model``; ``estimate`` in ``test_estimate.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from curvprune import demo
from curvprune.cli import main
from curvprune.data import FASHION_MNIST_DIR

HAVE_FMNIST = any(FASHION_MNIST_DIR.glob("t10k-images-idx3-ubyte*"))
pytestmark = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")

MIXER = ["--model", "zoo:timm/mixer_s16_224", "--data", "fashion-mnist", "--calibration",
         "random"]
RESNET = ["--model", "zoo:timm/resnet18", "--data", "fashion-mnist", "--calibration", "random"]


@pytest.mark.filterwarnings("ignore:prune_model.*magnitude")
def test_prune_magnitude_fallback_writes_everything_but_the_kappa_plot(tmp_path, capsys):
    # The command, which wrote the model and then crashed in the histogram step.
    out = tmp_path / "X"
    out.mkdir()
    (out / "kappa_histograms.png").write_bytes(b"stale plot of an earlier run")
    code = main(["prune", *MIXER, "--amount", "0.3", "--no-eval", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["fallback"].startswith("magnitude: the channel tracer cannot follow")
    assert report["granularity"] is None and report["scoring_seconds"] is None
    assert report["files"] == ["model.pt", "report.json", "sparsity.png"]
    assert report["overall_sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert not (out / "kappa_histograms.png").exists()  # no curvature, no (stale) plot
    assert (out / "sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert "note: no kappa_histograms.png: the weights were ranked by magnitude" in captured.out
    pruned = torch.load(out / "model.pt", weights_only=False)
    assert pruned(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.filterwarnings("ignore:CurvatureImportance.*magnitude")
def test_structured_prune_magnitude_fallback(tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["prune", *MIXER, "--structured", "--amount", "0.3", "--no-eval", "--quiet",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["fallback"] is True and report["params_after"] < report["params_before"]


def test_analyze_a_non_chain_model(tmp_path, capsys):
    # The second command, which crashed in the relational measures.
    out = tmp_path / "A"
    code = main(["analyze", *RESNET, "--nodes", "16", "--amount", "0.95", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "not provided yet" not in captured.out + captured.err
    data = json.loads((out / "analysis.json").read_text())
    names = [s["name"] for s in data["statistics"]]
    assert "layer1.0.downsample.0.weight" in names  # the residual branch is scored
    relational = data["relational"]
    assert list(relational["layers"]) == names  # every conv/linear has its relational graph
    assert relational["network"]["dense"]["clustering"] == 1.0
    assert set(relational["notes"]) == {"conv1.weight", "fc.weight"}  # narrower than 16
    pruned = data["relational_pruned"]["0.95"]
    assert set(pruned["layers"]) == set(names)
    # 95 % of the weights gone: some relational graphs lose edges
    assert any(row["pruned"]["edges"] < row["dense"]["edges"]
               for row in pruned["layers"].values())
    assert "after pruning 95% of the scored weights" in captured.out
    assert (out / "kappa_histograms.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_an_untraceable_model_reports_the_graph_measures(tmp_path, capsys):
    out = tmp_path / "m"
    (out).mkdir()
    (out / "kappa_histograms.png").write_bytes(b"stale")
    code = main(["analyze", *MIXER, "--amount", "0.5", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((out / "analysis.json").read_text())
    assert data["statistics"] is None and data["bottlenecks"] is None
    assert data["notes"][0].startswith("no curvature statistics: the channel tracer cannot")
    assert "no relational measures at --amount 0.5" in data["notes"][1]
    assert "blocks.0.mlp_tokens.fc1.weight" in data["relational"]["layers"]
    assert data["relational_pruned"] == {}
    assert not (out / "kappa_histograms.png").exists()
    assert "note: no curvature statistics" in captured.out


@pytest.mark.slow
def test_demo_command_on_its_fallback_data(monkeypatch, capsys):
    # No Fashion-MNIST: the demo falls back to its embedded synthetic images. (The demo trains
    # its own MLP and takes no --model, so it has no non-chain case.)
    monkeypatch.setattr(demo, "fashion_mnist",
                        lambda train=True: (_ for _ in ()).throw(FileNotFoundError("none")))
    assert main(["demo", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_analyze_a_pruned_model_reports_its_relational_graphs(tmp_path, capsys):
    from dataclasses import asdict

    import torch.nn as nn
    from torch.nn.utils import prune

    from curvprune import make_permanent
    from curvprune.analysis import relational_measures

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 24), nn.ReLU(), nn.Linear(24, 12),
                          nn.ReLU(), nn.Linear(12, 10)).eval()
    prune.global_unstructured([(model[1], "weight"), (model[3], "weight")],
                              pruning_method=prune.RandomUnstructured, amount=0.9)
    make_permanent(model)
    path = tmp_path / "pruned.pt"
    torch.save(model, path)
    code = main(["analyze", "--model", str(path), "--calibration", "random", "--nodes", "none",
                 "--quiet", "--out", str(tmp_path / "a")])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "a" / "analysis.json").read_text())
    expected = relational_measures(model, nodes=None)
    for name, row in expected.layers.items():
        got = data["relational"]["layers"][name]
        assert got["pruned"] == pytest.approx(asdict(row.pruned))
        assert got["dense"] == pytest.approx(asdict(row.dense))
    hidden = data["relational"]["layers"]["3.weight"]  # 24 -> 12: 12 nodes
    assert hidden["pruned"]["edges"] < hidden["dense"]["edges"] == 12 * 11 // 2
    assert hidden["pruned"]["clustering"] < 1.0
