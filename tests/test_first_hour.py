"""A new user's first hour: a light import, the demo's files, quiet logs, one default scope."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    frames = [f.strip() for f in err.replace("\n", "\r").split("\r") if f.strip()]
    assert result.engine["solved"] > 10  # many solves, each used to redraw the bar
    # Two bars, the examples' and the exact minima's: each writes its first and last states
    # (and the examples' bar once more when its clock restarts after the graph build).
    examples = [f for f in frames if f.startswith("curvature")]
    minima = [f for f in frames if f.startswith("exact minima")]
    assert len(examples) + len(minima) == len(frames), frames
    assert 1 <= len(examples) <= 3 and 1 <= len(minima) <= 2, frames
    assert "8/8" in examples[-1]


def _half_ok(model, x) -> bool:
    try:
        model(x)
    except RuntimeError:  # some CPU builds lack a half-precision kernel
        return False
    return True


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("granularity", ["neuron", "channel"])
def test_float32_calibration_is_cast_to_a_half_model(dtype, granularity):
    """docs/channels.md: half models are scored as they are. float32 calibration data is cast to
    the model's dtype: the same curvature as data given in that dtype, the model unchanged."""
    import torch
    import torch.nn as nn

    import curvprune

    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 6),
                          nn.ReLU(), nn.Linear(6, 4)).eval().to(dtype)
    x = torch.rand(3, 1, 6, 6)
    if not _half_ok(model, x.to(dtype)):
        pytest.skip(f"{dtype} Conv2d/Linear not available on this CPU build")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cast = curvprune.neural_curvature(model, x, granularity=granularity)
    given = curvprune.neural_curvature(model, x.to(dtype), granularity=granularity)
    assert set(cast.kappa) == set(given.kappa) == {"0.weight", "3.weight", "5.weight"}
    for name, kappa in cast.kappa.items():
        assert kappa.dtype == torch.float64
        assert torch.equal(kappa, given.kappa[name]), name
    after = model.state_dict()
    assert all(after[k].dtype == dtype and torch.equal(after[k], v) for k, v in before.items())
    # a DataLoader of float32 (inputs, targets) pairs too
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(3)),
                                         batch_size=2)
    looped = curvprune.neural_curvature(model, loader, granularity=granularity)
    assert all(torch.equal(looped.kappa[n], k) for n, k in given.kappa.items())


def test_prune_model_on_a_bfloat16_model_with_float32_data():
    import torch
    import torch.nn as nn

    import curvprune

    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval().to(torch.bfloat16)
    x = torch.rand(4, 1, 4, 4)
    if not _half_ok(model, x.to(torch.bfloat16)):
        pytest.skip("bfloat16 Linear not available on this CPU build")
    report = curvprune.prune_model(model, x, 0.5)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.02)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_readme_metapruner_snippet_runs_as_written_on_a_timm_vit():
    """The README's Torch-Pruning snippet, exec'd exactly as written, on a reduced timm ViT."""
    import torch

    import curvprune
    from curvprune import zoo

    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (snippet,) = [b for b in blocks if "MetaPruner" in b]
    name = "timm/vit_tiny_patch16_224"
    model = zoo.create(name)
    example_inputs = zoo.example_input(name, batch=2)
    calibration = example_inputs
    params = sum(p.numel() for p in model.parameters())
    scope = {"curvprune": curvprune, "model": model, "example_inputs": example_inputs,
             "calibration": calibration}
    exec(compile(snippet, "README.md (MetaPruner snippet)", "exec"), scope)  # noqa: S102
    assert not scope["imp"].fell_back and scope["imp"].result is not None
    assert sum(p.numel() for p in model.parameters()) < params
    for m in model.modules():
        if hasattr(m, "qkv"):
            assert m.head_dim * m.num_heads * 3 == m.qkv.out_features
    with torch.no_grad():
        assert model(example_inputs).shape == (2, 10)


def test_hypothesis_profiles_dev_by_default_ci_under_ci(monkeypatch):
    import conftest
    from hypothesis import settings

    for env, want in [({}, "dev"), ({"CI": "true"}, "ci"), ({"CI": "false"}, "dev"),
                      ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
                      ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev")]:
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert conftest._profile_name() == want, env
    current = settings.get_current_profile_name()
    try:
        settings.load_profile("ci")
        assert settings.default.max_examples == 100
        assert [conftest.profile_examples(n) for n in (600, 30)] == [600, 30]
        settings.load_profile("dev")
        assert settings.default.max_examples == 10
        assert [conftest.profile_examples(n) for n in (600, 30)] == [60, 5]
    finally:
        settings.load_profile(current)
