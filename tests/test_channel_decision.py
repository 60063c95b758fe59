"""Decision-exact channel pruning (curvprune.pruning.channel_decision): at any tolerance,
``prune_channels`` removes exactly the channels that ``tolerance=0`` scores remove, and the
certified bounds of ``CurvatureImportance.score_bounds`` contain the exact scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch_pruning as tp
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_channels import RandomNet, _inputs, _perturb, random_nets

from curvprune import CurvatureImportance, neural_curvature, prune_channels
from curvprune.pruning.channel_decision import _straddling, _widened, certified_step
from curvprune.pruning.structured import classifier_layers

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _prunable(spec: dict) -> dict:
    """The random nets without the blocks Torch-Pruning itself cannot prune: ``window`` (it
    prunes the Linear and the reshape breaks) and ``grouped`` (its channel groups do not
    divide the widths the random net draws)."""
    blocks = [b for b in spec["blocks"] if b not in ("window", "grouped")] or ["conv"]
    return {**spec, "blocks": blocks, "widths": spec["widths"][:len(blocks) + 1]}


nets = random_nets().map(_prunable)


def _net(spec: dict) -> tuple[torch.nn.Module, torch.Tensor, float]:
    spec = dict(spec)
    zero, alpha = spec.pop("zero"), spec.pop("alpha")
    model = RandomNet(**spec).eval()
    _perturb(model, seed=spec["seed"], zero_fraction=zero)  # zero weights, a dead channel
    return model, _inputs((3, 4, 4), batch=3, seed=spec["seed"]), alpha


def _prune(spec, ratio, tolerance, result=None, **kwargs):
    """Prune a fresh copy of the spec's net (scored now, or by ``result``); the report and its
    parameters afterwards."""
    model, x, alpha = _net(spec)
    if result is None:
        report = prune_channels(model, x, ratio, alpha=alpha, tolerance=tolerance, **kwargs)
    else:
        report = prune_channels(model, None, ratio, result=result,
                                example_inputs=x[:1], **kwargs)
    return report, {n: p.detach().clone() for n, p in model.named_parameters()}


def _score(spec, tolerance):
    model, x, alpha = _net(spec)
    return neural_curvature(model, x, alpha=alpha, granularity="channel", tolerance=tolerance)


def _assert_same_pruning(want, got, label):
    (r0, p0), (r1, p1) = want, got
    assert r1.removed == r0.removed, f"{label}: removed channels differ"
    assert r1.widths_after == r0.widths_after, label
    assert set(p0) == set(p1)
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{label}: {name} differs"


@settings(max_examples=12, **_SETTINGS)
@given(spec=nets, global_pruning=st.booleans(),
       tolerance=st.sampled_from([0.05, 0.5, 2.0]))
def test_decision_exact_channels_equal_exact_channels(spec, global_pruning, tolerance):
    """At several ratios the removed channels (Torch-Pruning's history, element for element)
    and the pruned weights are those of ``tolerance=0``, on random channel DAGs with zero
    weights and a dead channel, per group and global. Scored once per tolerance (score once,
    prune many: the coarse result is refined in place from ratio to ratio)."""
    exact, coarse = _score(spec, 0.0), _score(spec, tolerance)
    refined = []
    for ratio in (0.2, 0.4, 0.6):
        want = _prune(spec, ratio, None, result=exact, global_pruning=global_pruning)
        got = _prune(spec, ratio, None, result=coarse, global_pruning=global_pruning)
        _assert_same_pruning(want, got, f"ratio {ratio}")
        report = got[0]
        assert report.tolerance == tolerance and want[0].tolerance == 0.0
        assert want[0].refined == 0 and want[0].refine_rounds == 0  # exact: nothing to solve
        assert report.refine_rounds <= report.refined_edges
        refined.append(report.refined_edges)
    note(f"refined edges {refined}")


@settings(max_examples=6, **_SETTINGS)
@given(spec=nets, global_pruning=st.booleans())
def test_iterative_steps_are_decision_exact_too(spec, global_pruning):
    """Every step of an iterative schedule rescores the pruned model and is certified."""
    want = _prune(spec, 0.5, 0.0, global_pruning=global_pruning, iterative_steps=2)
    got = _prune(spec, 0.5, 0.5, global_pruning=global_pruning, iterative_steps=2)
    _assert_same_pruning(want, got, "two steps")


def _pruner(model, x, importance, **kwargs):
    return tp.pruner.MetaPruner(model, x[:1], importance=importance,
                                ignored_layers=classifier_layers(model), **kwargs)


@settings(max_examples=8, **_SETTINGS)
@given(spec=nets, reduction=st.sampled_from(["mean", "min", "weighted"]),
       normalizer=st.sampled_from(["mean", None, "max", "standarization"]),
       group_reduction=st.sampled_from(["mean", "max", "prod"]),
       global_pruning=st.booleans())
def test_certified_step_with_other_importance_settings(spec, reduction, normalizer,
                                                       group_reduction, global_pruning):
    """``certified_step`` on a user's MetaPruner: the three channel reductions, monotone and
    non-monotone group reductions and normalisers (these are refined until exact)."""
    removed = []
    for tolerance in (0.0, 0.5):
        model, x, alpha = _net(spec)
        imp = CurvatureImportance(x, alpha=alpha, reduction=reduction, normalizer=normalizer,
                                  group_reduction=group_reduction, tolerance=tolerance)
        pruner = _pruner(model, x, imp, pruning_ratio=0.4, global_pruning=global_pruning)
        refinement = certified_step(pruner)
        # A selection that does not match the documented rules (e.g. a group Torch-Pruning
        # declines, which prunes fewer than its count) is made exact by solving every edge.
        note(f"tolerance {tolerance}: {refinement}")
        removed.append(pruner.pruning_history())
    assert removed[0] == removed[1]


@settings(max_examples=8, **_SETTINGS)
@given(spec=nets, reduction=st.sampled_from(["mean", "min", "weighted"]),
       normalizer=st.sampled_from(["mean", None, "sum", "max"]),
       tolerance=st.sampled_from([0.05, 0.5, 2.0]))
def test_score_bounds_contain_the_exact_scores(spec, reduction, normalizer, tolerance):
    """The bounds from a tolerance run's edge intervals contain every group score of the
    ``tolerance=0`` run (the proof of CurvatureImportance's docstring, checked)."""
    model, x, alpha = _net(spec)
    exact = neural_curvature(model, x, alpha=alpha, granularity="channel", tolerance=0.0)
    coarse = neural_curvature(model, x, alpha=alpha, granularity="channel",
                              tolerance=tolerance)
    scores = {}
    for name, result in (("exact", exact), ("coarse", coarse)):
        imp = CurvatureImportance(None, result=result, reduction=reduction,
                                  normalizer=normalizer)
        dg = tp.DependencyGraph().build_dependency(model, x[:1])
        scores[name] = [(g, imp(g)) for g in dg.get_all_groups(
            ignored_layers=classifier_layers(model), root_module_types=[torch.nn.Conv2d,
                                                                        torch.nn.Linear])]
    # Widened by ROUNDING where not solved exactly: then they hold for the exact run's values.
    edge_lo, edge_hi = _widened(coarse, torch.zeros_like(coarse.edge_kappa_lo, dtype=torch.bool))
    for (group, mid), (_, want) in zip(scores["coarse"], scores["exact"]):
        bounds = imp.score_bounds(group, edge_lo, edge_hi)
        if mid is None:
            assert want is None and bounds is None
            continue
        lo, hi = bounds
        assert torch.all(lo <= mid) and torch.all(mid <= hi)
        assert torch.all(lo <= want) and torch.all(want <= hi)
        exact_bounds = imp.score_bounds(group, exact.edge_kappa_lo, exact.edge_kappa_hi)
        assert torch.equal(exact_bounds[0], exact_bounds[1])  # exact inputs: one value


def test_straddling_rules():
    """The certificate of one scope (module docstring of channel_decision)."""
    v = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pruned = torch.tensor([True, True, False, False])
    # Separated: nothing straddles.
    a, b = v - 0.01, v + 0.01
    out, ok = _straddling(a, b, v, pruned, local=True, n=None)
    assert ok and not out.any()
    # Overlap across the boundary: the two entries next to it straddle.
    a, b = v - 0.06, v + 0.06
    out, ok = _straddling(a, b, v, pruned, local=True, n=None)
    assert ok and out.tolist() == [False, True, True, False]
    # Exact near-tie at the boundary, locally: the whole scope must be exact.
    v2 = torch.tensor([0.1, 0.3, 0.3, 0.4])
    a, b = v2.clone(), v2.clone()
    a[0], b[3] = 0.05, 0.45
    out, ok = _straddling(a, b, v2, pruned, local=True, n=None)
    assert ok and out.tolist() == [True, False, False, True]
    # Globally a threshold prunes every tie: a selection splitting a tie is inconsistent.
    out, ok = _straddling(v2, v2, v2, pruned, local=False, n=2)
    assert not ok
    # Global ties at the threshold beyond n: the inexact tie must be solved.
    v3 = torch.tensor([0.1, 0.3, 0.3, 0.4])
    p3 = torch.tensor([True, True, True, False])
    a, b = v3.clone(), v3.clone()
    a[1], b[1] = 0.29, 0.31
    out, ok = _straddling(a, b, v3, p3, local=False, n=2)
    assert ok and out.tolist() == [False, True, False, False]
    # A selection that is not the lowest scores is refused.
    _, ok = _straddling(v, v, v, torch.tensor([False, False, True, True]), local=True, n=None)
    assert not ok


def test_round_to_solves_every_edge_and_stays_exact():
    """A selection rule outside the certificate (``round_to``): every edge is solved."""
    spec = dict(blocks=["conv", "residual"], widths=[4, 5, 4], act="relu", head_hidden=4,
                pool="avg", seed=5, zero=0.3, alpha=0.9)
    want = _prune(spec, 0.5, 0.0, round_to=2)
    got = _prune(spec, 0.5, 2.0, round_to=2)
    _assert_same_pruning(want, got, "round_to=2")
    edges = int((_score(spec, 2.0).channel_graph.module >= 0).sum())
    if got[0].refine_rounds:  # everything unsolved was solved, in one round
        assert got[0].refine_rounds == 1 and got[0].refined_edges <= edges


def test_report_counts_the_refinement():
    """A coarse tolerance leaves scores across the threshold: the report counts what was
    solved, and the summary says so."""
    spec = dict(blocks=["conv", "residual", "concat"], widths=[4, 5, 4, 3], act="relu",
                head_hidden=4, pool="avg", seed=3, zero=0.3, alpha=0.9)
    report, _ = _prune(spec, 0.5, 0.5)
    assert report.refined > 0 and report.refined_edges > 0 and report.refine_rounds >= 1
    assert "decision-exact:" in report.summary()
    assert report.removed and all(isinstance(i, int) for _, _, idx in report.removed
                                  for i in idx)


@pytest.mark.parametrize("tolerance, error", [(-1.0, ValueError), (math.nan, ValueError),
                                              (math.inf, ValueError), ("0.1", TypeError),
                                              (True, TypeError)])
def test_bad_tolerance_is_refused_before_work(tolerance, error):
    model, x, _ = _net(dict(blocks=["conv"], widths=[3, 3], act="relu", head_hidden=0,
                            pool="avg", seed=0, zero=0.0, alpha=0.9))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match="tolerance"):
        prune_channels(model, x, 0.5, tolerance=tolerance)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
