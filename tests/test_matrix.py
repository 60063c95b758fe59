"""Coverage matrix: curvature pruning, unstructured and structured, on every zoo architecture.

For each of the 38 reduced-width timm/torchvision architectures of :mod:`curvprune.zoo`:

* unstructured: ``prune_model(..., 0.5, granularity="channel")`` masks exactly half of all
  Conv2d/Linear weights (global ranking), and the model still runs with the right output;
* structured: ``prune_channels`` with :class:`~curvprune.CurvatureImportance` at a channel ratio
  of 0.3 finishes, the model runs with the right output, and every layer has the width that
  Torch-Pruning's own ``GroupMagnitudeImportance`` gives under the same pruner settings (the
  counts depend on the ratio only), with fewer parameters than before.

Architectures the channel tracer cannot follow must fall back with a warning that names them,
and only those listed in :data:`UNTRACEABLE` (with the reason) may.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch_pruning as tp

import curvprune
from curvprune import zoo

pytestmark = pytest.mark.slow

#: Architectures scored by the documented magnitude fallback, and why.
UNTRACEABLE = {
    "torchvision/vit_b_16": "nn.MultiheadAttention runs as one fused function",
    "timm/mixer_s16_224": "token-mixing MLPs are Linear layers over positions, not channels",
}


#: Architectures whose per-layer widths after Torch-Pruning depend on *which* channels are
#: removed, not only on the ratio: GhostNet slices its concatenated ghost features
#: (``out[:, :out_chs]``), so channels chosen inside or outside the slice count differently.
CHOICE_DEPENDENT_WIDTHS = {"timm/ghostnet_100"}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _calibration(name: str) -> torch.Tensor:
    return zoo.example_input(name, batch=2)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_unstructured_half(name):
    model = zoo.create(name)
    x = _calibration(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = curvprune.prune_model(model, x, 0.5, granularity="channel")
    fallback = [w for w in caught if "magnitude" in str(w.message)]
    if name in UNTRACEABLE:
        assert report.fallback is not None and fallback
        assert type(model).__name__ in str(fallback[0].message)
    else:
        assert report.fallback is None and not fallback, [str(w.message) for w in fallback]
        assert report.result.granularity == "channel"
    assert report.pruned == round(0.5 * report.total)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, zoo.ZOO[name].num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_structured_channels(name):
    x = _calibration(name)
    widths = {}
    for kind in ("curvature", "magnitude"):
        model = zoo.create(name)
        importance = (curvprune.CurvatureImportance(x) if kind == "curvature"
                      else tp.importance.GroupMagnitudeImportance(p=2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = curvprune.prune_channels(model, x, 0.3, importance=importance,
                                              ignored_layers=zoo.ignored_layers(name, model))
        if kind == "curvature":
            fallback = [w for w in caught if "magnitude" in str(w.message)]
            assert report.fell_back == (name in UNTRACEABLE)
            assert bool(fallback) == (name in UNTRACEABLE)
            if name not in UNTRACEABLE:
                assert importance.result.granularity == "channel"
        assert report.params_after < report.params_before
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, zoo.ZOO[name].num_classes) and torch.isfinite(out).all()
        widths[kind] = report.widths_after
    if name in CHOICE_DEPENDENT_WIDTHS:
        assert widths["curvature"].keys() == widths["magnitude"].keys()
    else:
        assert widths["curvature"] == widths["magnitude"]
