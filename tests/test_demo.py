"""The README's third command: ``python -m curvprune.demo`` runs the main job end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from curvprune import demo


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
    report = demo.run_demo(amounts=(0.5, 0.9), quiet=True)
    assert report["data"] == "synthetic"
    assert report["dense_accuracy"] > 0.5
    for row in report["accuracy"].values():
        assert set(row) == {"curvature", "control", "magnitude"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # Pruning half the weights by curvature keeps most of the accuracy; the control does not.
    assert report["accuracy"][0.5]["curvature"] > report["accuracy"][0.5]["control"]


@pytest.mark.slow
def test_demo_module_runs_as_a_command():
    out = subprocess.run([sys.executable, "-m", "curvprune.demo", "--quiet"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
