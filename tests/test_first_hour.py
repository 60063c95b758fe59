"""A new user's first hour: a light import, the demo's files, quiet logs, one default scope."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_does_not_load_timm_torch_pruning_or_plotting():
    """``import curvprune`` loads none of the heavy optional parts; the lazy public names still
    resolve (and load Torch-Pruning then). One subprocess: a fresh interpreter."""
    code = ("import sys, curvprune\n"
            "heavy = ['timm', 'torch_pruning', 'torchvision', 'matplotlib', 'networkx', 'ot']\n"
            "print(','.join(m for m in heavy if m in sys.modules) or 'none')\n"
            "from curvprune import CurvatureImportance, prune_channels\n"
            "assert 'CurvatureImportance' in dir(curvprune)\n"
            "assert all(hasattr(curvprune, n) for n in curvprune.__all__)\n"
            "print(CurvatureImportance.__module__, 'torch_pruning' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    loaded, lazy = out.stdout.splitlines()
    assert loaded == "none", f"import curvprune loaded {loaded}"
    assert lazy.split() == ["curvprune.importance", "True"]


def test_progress_bar_does_not_flood_a_log(capsys):
    """stderr is not a terminal under capsys: the bar writes its first and last states only
    (one line per 30 s at most), not one frame per example and per exact solve."""
    import torch
    import torch.nn as nn

    import curvprune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16),
                          nn.ReLU(), nn.Linear(16, 10)).eval()
    result = curvprune.neural_curvature(model, torch.randn(8, 1, 8, 8), progress=True)
    err = capsys.readouterr().err
    frames = [f for f in err.split("\r") if f.strip()]
    assert result.engine["solved"] > 10  # many solves, each used to redraw the bar
    assert 1 <= len(frames) <= 3, frames
    assert "8/8" in frames[-1]
