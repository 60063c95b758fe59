"""The README's third command: ``python -m curvprune.demo`` runs the main job end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvprune import demo

ROOT = Path(__file__).resolve().parent.parent


def test_synthetic_images_are_deterministic_and_learnable_shapes():
    a, b = demo.synthetic_images(64, seed=3), demo.synthetic_images(64, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    images, labels = a.tensors
    assert images.shape == (64, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    assert set(labels.tolist()) <= set(range(10))
    assert not torch.equal(demo.synthetic_images(64, seed=4).tensors[0], images)


@pytest.mark.slow
def test_demo_runs_on_synthetic_data_and_control_collapses(monkeypatch, tmp_path):
    # No Fashion-MNIST files here: the demo must fall back to the embedded synthetic data.
    monkeypatch.setattr(demo, "fashion_mnist",
                        lambda train=True: (_ for _ in ()).throw(FileNotFoundError("none")))
    report = demo.run_demo(amounts=(0.5, 0.9), quiet=True, out=tmp_path / "demo")
    assert report["data"] == "synthetic"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "demo_accuracy.png", "kappa_histograms.png", "model.pt"]
    model = torch.load(tmp_path / "demo" / "model.pt", weights_only=False)
    images, labels = demo.synthetic_images(2000, seed=1).tensors
    with torch.no_grad():  # the saved model is the trained one
        saved = (model(images).argmax(1) == labels).float().mean().item()
    assert saved == pytest.approx(report["dense_accuracy"], abs=1e-6)
    assert report["dense_accuracy"] > 0.5
    for row in report["accuracy"].values():
        assert set(row) == {"curvature", "control", "magnitude"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # Pruning half the weights by curvature keeps most of the accuracy; the control does not.
    assert report["accuracy"][0.5]["curvature"] > report["accuracy"][0.5]["control"]


@pytest.mark.slow
def test_demo_module_runs_as_a_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout, run from another folder
    out = subprocess.run([sys.executable, "-m", "curvprune.demo", "--quiet"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert (tmp_path / "model.pt").is_file()  # the README's `--model model.pt` runs next


def test_demo_writes_model_and_plots(tmp_path):
    """The demo's files from a small scored model: the model saved whole, two PNG plots."""
    import torch.nn as nn

    from curvprune import neural_curvature

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    scores = neural_curvature(model, torch.rand(3, 1, 4, 4))
    report = {"data": "synthetic", "dense_accuracy": 0.9,
              "accuracy": {0.5: {"curvature": 0.8, "control": 0.2, "magnitude": 0.7}}}
    files = demo._write_outputs(tmp_path, model, scores, report)
    assert [Path(f).name for f in files] == ["model.pt", "demo_accuracy.png",
                                              "kappa_histograms.png"]
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(saved(x), model(x))
    for png in files[1:]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_an_unwritable_folder_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        demo.main(["--out", str(blocker / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("curvprune demo: error: cannot write to output folder")
    assert err.count("\n") == 1
