"""estimate(): the structural numbers equal what the engine builds; the CLI command runs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn

from curvprune import ScoringEstimate, estimate, neural_curvature, zoo
from curvprune.cli import main
from curvprune.data import FASHION_MNIST_DIR
from curvprune.errors import UntraceableModel
from curvprune.graphs.channel import (
    channel_distances,
    channel_problem_bytes,
    needed_distances,
    trace_channels,
)
from curvprune.graphs.neuron import NeuronGraph, chain_structure
from curvprune.transport import MinimumSearch

HAVE_FMNIST = any(FASHION_MNIST_DIR.glob("t10k-images-idx3-ubyte*"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")


def small_lenet() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU(),
                          nn.Linear(8, 5))
    with torch.no_grad():  # some zero weights: they are no edges
        model[5].weight[:, :6] = 0
    return model.eval()


def test_neuron_estimate_matches_the_engine():
    model = small_lenet()
    x = torch.randn(3, 1, 11, 11, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    e = estimate(model, [x[:2], x[2:]])  # two batches: all examples are counted
    assert isinstance(e, ScoringEstimate) and e.granularity == "neuron"
    result = neural_curvature(model, x)
    assert e.edges_per_layer == result.edges_per_example
    assert e.edges == sum(result.edges_per_example.values())
    layers, structures = chain_structure(model, x[:1])
    graph = NeuronGraph.build(structures, [la.module.weight.detach().flatten() for la in layers],
                              torch.device("cpu"))
    assert e.nodes == sum(graph.sizes) == 1 * 11 * 11 + 3 * 5 * 5 + 4 * 3 * 3 + 8 + 5
    assert e.edges == sum(layer.src.numel() for layer in graph.layers)
    assert e.distance_bytes == sum(t.numel() * t.element_size()
                                   for t in graph.hop2 + graph.hop3)
    assert e.calibration_examples == 3 and e.fits
    assert e.build_seconds > 0 and e.example_seconds >= 0
    assert e.seconds == pytest.approx(e.build_seconds + 3 * e.example_seconds)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "granularity neuron" in e.summary() and "estimated time" in e.summary()
    assert json.loads(json.dumps(e.as_dict()))["nodes"] == e.nodes


def test_channel_estimate_matches_the_engine():
    model = zoo.create("timm/resnet18")
    x = zoo.example_input("timm/resnet18", 2)
    e = estimate(model, x, measure=False)
    assert e.granularity == "channel"  # auto: not a chain
    assert e.seconds is e.build_seconds is e.example_seconds is None
    assert "estimated time" not in e.summary()
    result = neural_curvature(model, x, granularity="channel")
    graph = result.channel_graph
    assert e.edges_per_layer == result.edges_per_example
    assert e.nodes == graph.num_nodes and e.edges == graph.src.numel()
    # The needed pairs only: 16 bytes each, far below the dense table.
    assert e.distance_bytes == needed_distances(graph).nbytes < channel_distances(graph).numel() * 8
    assert e.calibration_examples == 2
    # The edge problems' tables count against the budget too, as neural_curvature counts them.
    assert e.problem_bytes == channel_problem_bytes(graph) > 0
    assert "edge-problem tables" in e.summary()
    need = e.distance_bytes + e.problem_bytes
    assert estimate(model, x, granularity="channel", memory_budget=need, measure=False).fits
    over = estimate(model, x, granularity="channel", memory_budget=need - 1, measure=False)
    assert not over.fits and "OVER" in over.summary()
    with pytest.raises(ValueError, match="over memory_budget"):
        neural_curvature(model, x, granularity="channel", memory_budget=need - 1)


def test_estimate_over_budget_and_bad_input():
    model = small_lenet()
    x = torch.randn(2, 1, 11, 11)
    e = estimate(model, x, granularity="neuron", memory_budget=16)
    assert not e.fits and e.seconds is None and "exceed memory_budget" in e.notes[0]
    assert "OVER" in e.summary()
    auto = estimate(model, x, memory_budget=16, measure=False)
    assert auto.granularity == "channel"  # auto picks the channel graph when neurons do not fit
    graph = trace_channels(model, x[:1])
    assert auto.nodes == graph.num_nodes
    with pytest.raises(ValueError, match="granularity"):
        estimate(model, x, granularity="neurons")
    with pytest.raises(ValueError, match="alpha"):
        estimate(model, x, alpha=1.0)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        estimate(model, x, threads=0, measure=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        estimate("model", x)
    with pytest.raises(UntraceableModel):
        estimate(zoo.create("timm/mixer_s16_224"), zoo.example_input("timm/mixer_s16_224"),
                 measure=False)
    # node_reduction is checked as neural_curvature checks it, before anything is built
    with pytest.raises(ValueError, match="node_reduction must be one of"):
        estimate(model, x, granularity="channel", node_reduction="median")
    with pytest.raises(ValueError, match="granularity='channel'"):
        estimate(model, x, granularity="neuron", node_reduction="mean")


def _record_scoring_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``neural_curvature`` call that ``estimate`` times."""
    estimate_module = sys.modules["curvprune.estimate"]  # the attribute is the function
    calls: list[dict] = []
    real = estimate_module.neural_curvature

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(estimate_module, "neural_curvature", spy)
    return calls


@pytest.mark.parametrize("granularity, node_reduction, passed", [
    ("channel", "weighted", "weighted"),
    ("channel", None, None),
    ("auto", "mean", None),  # auto picks the neuron graph here: no channel means to certify
])
def test_estimate_times_the_run_it_is_asked_about(granularity, node_reduction, passed,
                                                  monkeypatch):
    # The timed example is scored with the caller's tolerance, threads and node_reduction, so
    # the estimate is of the run that will happen (the node tolerance solves far less).
    calls = _record_scoring_calls(monkeypatch)
    model = small_lenet()
    x = torch.randn(2, 1, 11, 11, generator=torch.Generator().manual_seed(3))
    e = estimate(model, x, granularity=granularity, tolerance=0.05, threads=1,
                 node_reduction=node_reduction)
    assert e.seconds is not None and len(calls) == 1
    assert calls[0]["tolerance"] == 0.05 and calls[0]["threads"] == 1
    assert calls[0]["node_reduction"] == passed


def test_minimum_search_progress_settles_every_open_edge():
    torch.manual_seed(0)
    widx = torch.tensor([0, 0, 1, 1, 1, 2])
    search = MinimumSearch([widx], [3])
    values = torch.rand(4, 6, dtype=torch.float64)
    for x in range(4):
        lo, hi = values[x] - 0.3, values[x] + 0.3
        search.add(0, x, lo, hi)
    total = search.pending
    seen = []
    minima = search.resolve(lambda g, jobs: [values[x][edges] for x, edges in jobs],
                            on_progress=lambda s, t: seen.append((s, t)))[0]
    assert seen and all(t == total for _, t in seen) and seen[-1][0] == total
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
    expected = torch.full((3,), torch.inf, dtype=torch.float64)
    expected.scatter_reduce_(0, widx, values.min(0).values, reduce="amin")
    assert torch.equal(minima, expected)


@needs_fmnist
@pytest.mark.parametrize("model, granularity", [
    ("curvprune:lenet5", "neuron"),  # a chain
    ("zoo:timm/resnet18", "channel"),  # not a chain
])
def test_estimate_command(model, granularity, capsys, tmp_path):
    args = ["estimate", "--model", model, "--calibration", "random", "--no-measure"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"granularity {granularity}" in text and "calibration examples 10" in text
    # a prune command line with the word changed: its pruning options are ignored
    out = tmp_path / "ignored"
    assert main(args + ["--json", "--amount", "0.5", "--scope", "layer", "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["granularity"] == granularity and data["calibration_examples"] == 10
    assert data["seconds"] is None and not out.exists()  # nothing written
    per_layer = sum(data["edges_per_layer"].values())
    # the channel graph also has the merge edges of the residual adds
    assert data["edges"] == per_layer if granularity == "neuron" else data["edges"] > per_layer


@needs_fmnist
def test_estimate_command_measures_and_falls_back(capsys, monkeypatch):
    assert main(["estimate", "--model", "zoo:timm/resnet18", "--calibration", "random",
                 "--json", "--structured"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["granularity"] == "channel" and data["seconds"] > 0
    assert data["seconds"] == pytest.approx(data["build_seconds"]
                                            + 10 * data["example_seconds"])
    # prune's --tolerance and --threads are the estimate's too, and --structured times the
    # channel-mean tolerance that prune --structured uses
    calls = _record_scoring_calls(monkeypatch)
    assert main(["estimate", "--model", "zoo:timm/resnet18", "--calibration", "random",
                 "--json", "--structured", "--tolerance", "0.05", "--threads", "1"]) == 0
    capsys.readouterr()
    assert [(c["tolerance"], c["threads"], c["node_reduction"]) for c in calls] == [
        (0.05, 1, "mean")]
    # an untraceable model: prune falls back to magnitude, so there is nothing to estimate
    assert main(["estimate", "--model", "zoo:timm/mixer_s16_224", "--calibration",
                 "random"]) == 0
    assert "prune would rank the weights by magnitude" in capsys.readouterr().out


@pytest.mark.parametrize("granularity", ["neuron", "channel"])
def test_progress_clock_starts_after_the_graph_build(granularity, monkeypatch):
    # A slow build must not count as the first example's time: the bar's clock (and so its
    # rate and ETA) starts once the graph and its distance tables exist.
    import time

    import tqdm.auto

    import curvprune.curvature as curvature
    import curvprune.graphs.channel as channels

    built = []
    if granularity == "neuron":
        original = NeuronGraph.build.__func__

        def slow_build(cls, *args, **kwargs):
            time.sleep(0.3)
            graph = original(cls, *args, **kwargs)
            built.append(time.time())
            return graph
        monkeypatch.setattr(NeuronGraph, "build", classmethod(slow_build))
    else:
        original_distances = channels.needed_distances

        def slow_distances(graph, **kwargs):
            time.sleep(0.3)
            table = original_distances(graph, **kwargs)
            built.append(time.time())
            return table
        monkeypatch.setattr(channels, "needed_distances", slow_distances)

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def update(self, n=1):
            if self.desc.startswith("curvature") and self.n == 0:
                bars.append((self.start_t, self.total))
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    model = small_lenet()
    x = torch.randn(3, 1, 11, 11, generator=torch.Generator().manual_seed(2))
    reference = neural_curvature(model, [x[:1], x[1:]], granularity=granularity)
    result = curvature.neural_curvature(model, [x[:1], x[1:]], granularity=granularity,
                                        progress=True)
    assert len(built) == 2 and bars and bars[0][1] == 3  # a list of batches is counted
    assert bars[0][0] >= built[1]  # the clock started after the (slow) build
    for name in reference.kappa:
        assert torch.equal(result.kappa[name], reference.kappa[name])
