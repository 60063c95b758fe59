"""Score once, prune many: ``result=`` in prune_model / prune_channels / CurvatureImportance,
binding a result to another instance of the architecture, the scores a report returns, and the
engine options every scoring entry point passes through."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.nn.utils import prune

import curvprune
import curvprune.importance
import curvprune.pruning
from curvprune import (
    CurvatureImportance,
    CurvaturePruning,
    clone_pruned,
    load_pruned,
    neural_curvature,
    prune_channels,
    prune_model,
    save_pruned,
)
from curvprune.allocation import allocate_like
from curvprune.baselines import wanda_scores
from tests.test_pruning import NAMES, inputs, tiny

AMOUNTS = (0.3, 0.5, 0.7)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{weight name: mask}`` of every pruned weight."""
    return {f"{n}.weight": m.weight_mask.clone() for n, m in model.named_modules()
            if hasattr(m, "weight_mask")}


def assert_same_masks(a: nn.Module, b: nn.Module) -> None:
    ma, mb = masks(a), masks(b)
    assert list(ma) == list(mb) == NAMES
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name


def reloaded(model: nn.Module) -> nn.Module:
    """A new instance (other random init) loaded from ``model``'s saved state dict."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = tiny(seed=99)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


class CountingScorer:
    """Stands in for ``neural_curvature`` in a module: counts calls, records options."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, model, calibration, **kwargs):
        self.calls.append(kwargs)
        return neural_curvature(model, calibration, **kwargs)


# ---------------------------------------------------------------------------------------------
# prune_model(..., result=)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope, order", [("global", "positive_first"), ("layer", "positive_first"),
                                          ("global", "negative_first")])
def test_sweep_from_one_result_equals_separate_calls(monkeypatch, scope, order):
    model, x = tiny(), inputs()
    separate = {}
    for amount in AMOUNTS:
        separate[amount] = copy.deepcopy(model)
        prune_model(separate[amount], x, amount, scope=scope, order=order)

    scorer = CountingScorer()
    monkeypatch.setattr(curvprune.pruning.unstructured, "neural_curvature", scorer)
    result = curvprune.pruning.unstructured.neural_curvature(model, x)
    for amount in AMOUNTS:
        swept = copy.deepcopy(model)
        report = prune_model(swept, None, amount, scope=scope, order=order, result=result)
        assert_same_masks(swept, separate[amount])
        assert report.result.modules["3.weight"] is swept[3]
        assert report.newly_pruned == sum(int((m == 0).sum()) for m in masks(swept).values())
    assert len(scorer.calls) == 1  # the sweep itself never scored


def test_result_on_the_scored_model_itself():
    model, x = tiny(), inputs()
    expected = copy.deepcopy(model)
    prune_model(expected, x, 0.5)
    result = neural_curvature(model, x)
    report = prune_model(model, None, 0.5, result=result)
    assert_same_masks(model, expected)
    assert report.result.modules["0.weight"] is model[0]


def test_reusing_a_result_on_a_pruned_model_continues_its_ranking():
    """0.3 then 0.5 of the rest from one result = the first 65 % of that ranking."""
    model, x = tiny(), inputs()
    result = neural_curvature(model, x)
    twice = copy.deepcopy(model)
    prune_model(twice, None, 0.3, result=result)
    prune_model(twice, None, 0.5, result=result)
    once = copy.deepcopy(model)
    total = sum(model.get_submodule(n[:-7]).weight.numel() for n in NAMES)
    first = round(0.3 * total)
    prune_model(once, None, first + round(0.5 * (total - first)), result=result)
    assert_same_masks(twice, once)


@pytest.mark.parametrize("target", ["deepcopy", "state_dict", "torch.load"])
def test_bind_to_a_clone_or_reloaded_model_gives_identical_masks(target):
    model, x = tiny(), inputs()
    result = neural_curvature(model, x)
    reference = copy.deepcopy(model)
    prune_model(reference, None, 0.5, result=result)
    if target == "deepcopy":
        other = copy.deepcopy(model)
    elif target == "state_dict":
        other = reloaded(model)
        assert not torch.equal(tiny(seed=99)[0].weight, model[0].weight)
    else:  # the result itself saved and loaded (it pickles its modules)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        buffer.seek(0)
        result = torch.load(buffer, weights_only=False)
        other = reloaded(model)
    bound = result.bind(other)
    assert all(bound.modules[n] is other.get_submodule(n[:-7]) for n in NAMES)
    for n in NAMES:
        assert torch.equal(bound.kappa[n], result.kappa[n])
        assert torch.equal(bound.live[n], result.live[n])
    assert bound.modules is not result.modules and result.modules["0.weight"] is not other[0]
    prune_model(other, None, 0.5, result=result)
    assert_same_masks(other, reference)


def test_bind_leaves_the_model_unchanged():
    model, x = tiny(), inputs()
    result = neural_curvature(model, x)
    other = reloaded(model)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    result.bind(other)
    after = other.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bind_to_pruned_models():
    """A model under pruning hooks (weight_orig/weight_mask) binds: its clone (deepcopy cannot
    copy it; clone_pruned can) and a fresh model loaded with load_pruned."""
    model, x = tiny(), inputs()
    result = neural_curvature(model, x)
    pruned = copy.deepcopy(model)
    prune_model(pruned, None, 0.3, result=result)
    with pytest.raises(RuntimeError):
        copy.deepcopy(pruned)  # PyTorch: the hook-computed weight is not a leaf
    buffer = io.BytesIO()
    save_pruned(pruned, buffer)
    buffer.seek(0)
    loaded = load_pruned(tiny(seed=5), buffer)
    for other in (clone_pruned(pruned), loaded):
        bound = result.bind(other)
        assert bound.modules["5.weight"] is other[5]
        prune_model(other, None, 0.5, result=result)
        expected = clone_pruned(pruned)
        prune_model(expected, None, 0.5, result=result)
        assert_same_masks(other, expected)


def test_bind_mismatch_names_the_first_parameter():
    model, x = tiny(), inputs()
    result = neural_curvature(model, x)
    shorter = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
                            nn.Linear(27, 6))
    with pytest.raises(ValueError, match=r"has no parameter '5\.weight'"):
        result.bind(shorter)
    wider = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(ValueError, match=r"'3\.weight' has shape \(7, 27\) but was scored "
                                         r"with shape \(6, 27\)"):
        prune_model(wider, None, 0.5, result=result)
    assert not masks(wider)  # refused before anything was pruned

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 6))

    other = tiny()
    other[5] = Fake()
    with pytest.raises(ValueError, match=r"'5\.weight' belongs to a Fake but was scored on a "
                                         r"Linear"):
        result.bind(other)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        result.bind("model")


@pytest.mark.parametrize("calibration, result, allocation, error, message", [
    ("x", "r", "curvature", ValueError, "not both"),
    (None, None, "curvature", ValueError, "calibration is None"),
    (None, "kappa", "curvature", TypeError, "result must be a CurvatureResult"),
    (None, "r", "wanda", ValueError, "needs calibration data for Wanda"),
])
def test_calibration_and_result_errors(calibration, result, allocation, error, message):
    model, x = tiny(), inputs()
    r = neural_curvature(model, x)
    values = {"x": x, "r": r, "kappa": r.kappa, None: None}
    with pytest.raises(error, match=message):
        prune_model(copy.deepcopy(model), values[calibration], 0.5, result=values[result],
                    allocation=allocation)


def test_wanda_allocation_with_a_result_and_report_scores():
    """allocation='wanda' with result= uses the calibration only for Wanda's norms; the
    re-allocated scores come back in the report and prune a copy identically."""
    model, x = tiny(), inputs()
    separate = copy.deepcopy(model)
    report = prune_model(separate, x, 0.5, allocation="wanda")
    result = neural_curvature(model, x)
    swept = copy.deepcopy(model)
    swept_report = prune_model(swept, x, 0.5, allocation="wanda", result=result)
    assert_same_masks(swept, separate)
    modules = [model.get_submodule(n[:-7]) for n in NAMES]
    expected = allocate_like(result.importance_scores(), wanda_scores(model, x, modules))
    for got in (report.scores.by_name(), swept_report.scores.by_name()):
        assert list(got) == NAMES
        for key, name in zip(expected, NAMES):
            assert torch.equal(got[name], expected[key])
    # the returned scores, bound to another copy, prune it the same way
    other = reloaded(model)
    scores = report.scores.bind(other)
    params = [(other.get_submodule(n[:-7]), "weight") for n in NAMES]
    assert list(scores) == params
    prune.global_unstructured(params, pruning_method=CurvaturePruning,
                              importance_scores=scores, amount=0.5)
    assert_same_masks(other, separate)


def test_report_scores_are_the_curvature_ranks():
    model, x = tiny(), inputs()
    result = neural_curvature(model, x)
    report = prune_model(copy.deepcopy(model), None, 0.4, order="negative_first", result=result)
    ranks = result.importance_scores("negative_first").by_name()
    got = report.scores.by_name()
    assert list(got) == NAMES
    assert all(torch.equal(got[n], ranks[n]) for n in NAMES)
    # module-keyed access still works on the report's scores
    bound = report.result.modules["3.weight"]
    assert torch.equal(report.scores[(bound, "weight")], ranks["3.weight"])


def test_importance_scores_bind_mismatch():
    model, x = tiny(), inputs()
    scores = neural_curvature(model, x).importance_scores()
    with pytest.raises(ValueError, match=r"'3\.weight' has shape"):
        scores.bind(nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(27, 5), nn.ReLU(), nn.Linear(5, 4)))
    unnamed = curvprune.ImportanceScores({(model[0], "weight"): torch.zeros(3, 1, 3, 3)})
    with pytest.raises(ValueError, match="has no parameter name"):
        unnamed.by_name()


# ---------------------------------------------------------------------------------------------
# Engine options are passed through by every entry point that scores
# ---------------------------------------------------------------------------------------------

OPTIONS = {"threads": 1, "memory_budget": 1 << 28, "tolerance": 0.0, "device": "cpu",
           "progress": False}


def test_prune_model_passes_engine_options(monkeypatch):
    scorer = CountingScorer()
    monkeypatch.setattr(curvprune.pruning.unstructured, "neural_curvature", scorer)
    prune_model(tiny(), inputs(), 0.5, alpha=0.5, granularity="neuron", **OPTIONS)
    assert len(scorer.calls) == 1
    call = scorer.calls[0]
    assert {k: call[k] for k in OPTIONS} == OPTIONS
    assert call["alpha"] == 0.5 and call["granularity"] == "neuron"


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_prune_channels_and_importance_pass_engine_options(monkeypatch):
    scorer = CountingScorer()
    monkeypatch.setattr(curvprune.importance, "neural_curvature", scorer)
    prune_channels(_chain(), _images(), 0.25, **OPTIONS)
    model = _chain()
    imp = CurvatureImportance(_images(), **OPTIONS)
    tp.pruner.MetaPruner(model, _images()[:1], importance=imp, pruning_ratio=0.25,
                         ignored_layers=[model[6]]).step()
    assert len(scorer.calls) == 2
    for call in scorer.calls:
        assert {k: call[k] for k in OPTIONS} == OPTIONS
        assert call["granularity"] == "channel"


def test_cli_passes_threads(monkeypatch, capsys, tmp_path):
    from curvprune.cli import main
    from curvprune.data import FASHION_MNIST_DIR

    if not any(FASHION_MNIST_DIR.glob("t10k-images-idx3-ubyte*")):
        pytest.skip("dataset-fashion-mnist not installed")
    seen = []

    def stop(model, calibration, **kwargs):
        seen.append(kwargs["threads"])
        raise ValueError("stopped by the test")

    monkeypatch.setattr(curvprune.pruning.unstructured, "neural_curvature", stop)
    code = main(["prune", "--model", "curvprune:mlp", "--calibration", "random", "--amount",
                 "0.3", "--no-eval", "--quiet", "--threads", "3", "--out", str(tmp_path)])
    assert code == 2 and seen == [3]
    assert "stopped by the test" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["prune", "--model", "curvprune:mlp", "--amount", "0.3", "--threads", "0",
              "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "threads must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# prune_channels(..., result=) and CurvatureImportance(None, result=)
# ---------------------------------------------------------------------------------------------


def _same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("global_pruning", [False, True])
def test_prune_channels_sweep_from_one_result(monkeypatch, global_pruning):
    model, x = _chain(), _images(3)
    separate = {}
    for ratio in (0.25, 0.5):
        separate[ratio] = copy.deepcopy(model)
        prune_channels(separate[ratio], x, ratio, global_pruning=global_pruning)
    scorer = CountingScorer()
    monkeypatch.setattr(curvprune.importance, "neural_curvature", scorer)
    result = neural_curvature(model, x, granularity="channel")
    assert result.input_shape == (3, 8, 8)
    for ratio in (0.25, 0.5):
        swept = copy.deepcopy(model)
        report = prune_channels(swept, None, ratio, result=result,
                                global_pruning=global_pruning)
        _same_model(swept, separate[ratio])
        assert report.importance.result.modules["0.weight"] is swept[0]
    assert scorer.calls == []
    assert swept(x).shape == (3, 4)


def test_prune_channels_result_errors():
    model, x = _chain(), _images()
    channel = neural_curvature(model, x, granularity="channel")
    neuron = neural_curvature(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3))
    with pytest.raises(ValueError, match="granularity='channel', not 'neuron'"):
        prune_channels(copy.deepcopy(model), None, 0.3, result=neuron)
    with pytest.raises(ValueError, match="not both"):
        prune_channels(copy.deepcopy(model), x, 0.3, result=channel)
    with pytest.raises(ValueError, match="iterative_steps=2"):
        prune_channels(copy.deepcopy(model), None, 0.3, result=channel, iterative_steps=2)
    with pytest.raises(ValueError, match="do not pass importance"):
        prune_channels(copy.deepcopy(model), None, 0.3, result=channel,
                       importance=tp.importance.MagnitudeImportance())
    with pytest.raises(ValueError, match="calibration is None"):
        prune_channels(copy.deepcopy(model), None, 0.3)
    other = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \(6, 3, 3, 3\)"):
        prune_channels(other, None, 0.3, result=channel)
    with pytest.raises(TypeError, match="CurvatureResult"):
        CurvatureImportance(None, result=channel.kappa)


def test_importance_from_a_result_scores_one_state():
    model, x = _chain(), _images()
    result = neural_curvature(model, x, granularity="channel")
    expected = copy.deepcopy(model)
    imp = CurvatureImportance(x)
    tp.pruner.MetaPruner(expected, x[:1], importance=imp, pruning_ratio=0.25,
                         ignored_layers=[expected[6]], iterative_steps=2).step()
    clone = copy.deepcopy(model)
    imp = CurvatureImportance(None, result=result)
    pruner = tp.pruner.MetaPruner(clone, x[:1], importance=imp, pruning_ratio=0.25,
                                  ignored_layers=[clone[6]], iterative_steps=2)
    pruner.step()
    _same_model(clone, expected)
    with pytest.raises(ValueError, match="scores one state of the model"):
        pruner.step()
