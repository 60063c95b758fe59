"""CurvatureImportance with Torch-Pruning pruners."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import curvprune
from curvprune.structured import _widths as layer_widths
from tests.test_channels import MODELS, Spectral, _inputs


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_prunes_the_channels_of_highest_curvature():
    model = _chain()
    x = _inputs((3, 8, 8))
    imp = curvprune.CurvatureImportance(x)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.25,
                                  ignored_layers=[model[6]])
    old = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    pruner.step()
    result = imp.result
    assert result is not None and result.granularity == "channel" and not imp.fell_back
    node_kappa, graph = result.node_kappa(), result.channel_graph
    # In a chain every coupled layer of a group maps to the same channel node, so the channels
    # kept are the 6 of lowest node curvature (the 2 most positive are removed).
    keep = []
    for k in range(2):
        start = graph.module_outputs[k]
        keep.append(torch.argsort(node_kappa[start:start + 8])[:6].sort().values)
    assert torch.equal(model[0].weight.detach(), old[0][keep[0]])
    assert torch.equal(model[2].weight.detach(), old[1][keep[1]][:, keep[0]])
    assert model(x).shape == (2, 4)


def test_importance_is_two_minus_node_kappa_normalised():
    model = _chain()
    x = _inputs((3, 8, 8))
    imp = curvprune.CurvatureImportance(x, normalizer=None)
    graph_dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph_dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    scores = imp(group)
    start = imp.result.channel_graph.module_outputs[0]
    expected = (2.0 - imp.result.node_kappa()[start:start + 8]).float()
    assert torch.allclose(scores, expected, atol=1e-6)
    assert (scores > 0).all()


def test_node_reductions_against_the_weights():
    """Each reduction of ``node_kappa`` recomputed by hand for the hidden channels of a conv
    chain: the edges of node ``(conv k, channel o)`` are ``u -> o`` with weight
    ``W_k[o, u]`` and ``o -> o'`` with weight ``W_{k+1}[o', o]`` (the norm over the kernel);
    ``weighted`` weighs each edge's curvature by that norm, computed from the weights here,
    not from the graph's lengths."""
    model = _chain()
    x = _inputs((3, 8, 8))
    result = curvprune.neural_curvature(model, x, granularity="channel")
    graph = result.channel_graph
    kappa = {(int(a), int(b)): float(k) for a, b, k, m in zip(
        graph.src, graph.dst, result.edge_kappa, graph.module) if m >= 0}
    out0, out1 = graph.module_outputs[0], graph.module_outputs[1]
    inputs = [int(i) for i in torch.nonzero(graph.inputs).flatten()]
    w0, w1 = model[0].weight.detach().double(), model[2].weight.detach().double()
    got = {r: result.node_kappa(r) for r in ("mean", "min", "weighted")}
    differs = False
    for o in range(8):
        v = out0 + o
        edges = [((u, v), w0[o, c].norm()) for c, u in enumerate(inputs)]
        edges += [((v, out1 + p), w1[p, o].norm()) for p in range(8)]
        ks = torch.tensor([kappa[e] for e, _ in edges], dtype=torch.float64)
        ws = torch.stack([w for _, w in edges])
        assert got["mean"][v].item() == pytest.approx(ks.mean().item(), abs=1e-12)
        assert got["min"][v].item() == ks.min().item()
        want = (ws * ks).sum() / ws.sum()
        assert got["weighted"][v].item() == pytest.approx(want.item(), abs=1e-12)
        differs |= abs(got["weighted"][v].item() - got["mean"][v].item()) > 1e-6
    assert differs  # the weights matter on this model
    scores = curvprune.CurvatureImportance(None, result=result, reduction="weighted",
                                           normalizer=None)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    expected = (2.0 - got["weighted"][out0:out0 + 8]).float()
    assert torch.allclose(scores(group), expected, atol=1e-6)


def test_recomputed_at_every_iterative_step():
    model = MODELS["residual"][0]()
    x = _inputs((3, 8, 8))
    imp = curvprune.CurvatureImportance(x)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, iterative_steps=2,
                                  ignored_layers=[model.fc])
    seen = []
    for _ in range(2):
        pruner.step()
        seen.append((imp.result, imp.result.channel_graph.num_nodes))
    assert seen[0][0] is not seen[1][0]
    assert seen[1][1] < seen[0][1]
    assert model(x).shape == (2, 4)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_global_pruning_and_round_to(global_pruning):
    x = _inputs((3, 8, 8))
    widths = {}
    for name, importance in [("curvature", curvprune.CurvatureImportance(x)),
                             ("magnitude", tp.importance.GroupMagnitudeImportance(p=2))]:
        model = MODELS["dense"][0]()
        base = tp.utils.count_ops_and_params(model, x)[1]
        pruner = tp.pruner.MetaPruner(model, x, importance=importance, pruning_ratio=0.3,
                                      global_pruning=global_pruning, round_to=2,
                                      ignored_layers=[model.fc])
        pruner.step()
        assert tp.utils.count_ops_and_params(model, x)[1] < base
        assert model(x).shape == (2, 3)
        widths[name] = layer_widths(model)
    if not global_pruning:  # per-layer counts depend on the ratio only: Torch-Pruning's own
        assert widths["curvature"] == widths["magnitude"]


def test_fallback_to_magnitude_with_a_warning():
    torch.manual_seed(0)
    model = Spectral()
    x = _inputs((3, 8, 8))
    imp = curvprune.CurvatureImportance(x)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    with pytest.warns(UserWarning, match="Spectral.*magnitude"):
        pruner.step()
    assert imp.fell_back and model.conv.out_channels == 2
    strict = curvprune.CurvatureImportance(x, fallback="error")
    group = tp.DependencyGraph().build_dependency(model, example_inputs=x).get_pruning_group(
        model.conv, tp.prune_conv_out_channels, idxs=[0, 1])
    with pytest.raises(curvprune.UntraceableModel):
        strict(group)


def test_bad_options():
    with pytest.raises(ValueError, match="reduction.*weighted"):
        curvprune.CurvatureImportance(torch.zeros(1, 3, 8, 8), reduction="median")
    with pytest.raises(ValueError, match="fallback"):
        curvprune.CurvatureImportance(torch.zeros(1, 3, 8, 8), fallback="ignore")
    with pytest.raises(ValueError, match="calibration"):
        curvprune.CurvatureImportance(None)
    with pytest.raises(ValueError, match="alpha"):
        curvprune.CurvatureImportance(torch.zeros(1, 3, 8, 8), alpha=1.0)


def test_iterative_vit_pruning_refreshes_heads_between_steps():
    from curvprune import zoo

    name = "timm/vit_tiny_patch16_224"
    model = zoo.create(name)
    x = zoo.example_input(name, batch=2)
    heads = [m.num_heads for m in model.modules() if hasattr(m, "qkv")]
    report = curvprune.prune_channels(model, x, 0.5, iterative_steps=2)
    assert report.steps == 2 and report.params_after < report.params_before
    assert not report.fell_back
    for m in model.modules():
        if hasattr(m, "qkv"):
            assert m.head_dim * m.num_heads * 3 == m.qkv.out_features
    assert [m.num_heads for m in model.modules() if hasattr(m, "qkv")] == heads
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_prune_channels_refuses_masked_models_and_bad_ratios():
    model = _chain()
    x = _inputs((3, 8, 8))
    with pytest.raises(ValueError, match="ratio"):
        curvprune.prune_channels(model, x, 1.0)
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match="make_permanent"):
        curvprune.prune_channels(model, x, 0.3)
