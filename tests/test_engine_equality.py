"""The fast engine (``neural_curvature``) equals the slow per-edge oracle (``reference_curvature``).

Every weight of random chain networks is compared to 1e-6 (absolute), with ``+inf`` (no edge)
matching ``+inf`` exactly. The networks cover conv and linear chains, strides, paddings (including
``'same'``), dilation, groups, non-square kernels, zero weights (random, whole rows, whole columns,
whole layers), dead units (negative biases, a layer dead on one example), tanh/sigmoid/leaky
activations, eval-mode BatchNorm with non-trivial running statistics and several alphas. A
hypothesis failure prints a :class:`conftest.NetSpec`: ``conftest.build(spec)`` reproduces it.

The example counts (1,850 random networks per CI run, fresh ones each run) are sized so
that the whole CI run stays under 30 minutes on 2 cores on a slow day: the reference solves
every edge with ``ot.emd2`` and is most of the time here. They were cut from 2,900 on
2026-12-04, after a CI run took 41 minutes; the tests' strategies are unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import alphas, assert_kappa_equal, build, net_specs, profile_examples
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from curvprune import neural_curvature
from curvprune.calibration import (
    capture_activations,
    normalise_activity,
    scoring_mode,
)
from curvprune.graphs.neuron import trace_chain
from curvprune.reference import reference_curvature
from curvprune.transport import EngineOptions
from curvprune.transport.base import CERTIFY_TOL

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

ATOL = 1e-6
#: The tolerance these tests score at: intervals a few ulps wide, exact in practice (the
#: library's default tolerance is wider; tolerance 0 has tests of its own).
EXACT = CERTIFY_TOL
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_against_reference(model: nn.Module, calibration, alpha: float, context: str = "",
                            options: EngineOptions | None = None):
    """Score with both and compare every weight; return the engine's result."""
    result = neural_curvature(model, calibration, alpha=alpha, options=options,
                              tolerance=EXACT)
    expected = reference_curvature(model, calibration, alpha=alpha)
    if currently_in_test_context():
        note(f"engine stats: {result.engine}")
    assert_kappa_equal(result.kappa, expected, atol=ATOL, context=f"{context} alpha={alpha}")
    return result


def activities(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Normalised activities of every node layer (``[batch, nodes]`` each)."""
    modules = [layer.module for layer in trace_chain(model)]
    with scoring_mode(model):
        values, _, _ = capture_activations(model, modules, inputs)
    return [normalise_activity(v) for v in values]


# --------------------------------------------------------------------------------------------
# Random networks
# --------------------------------------------------------------------------------------------


@settings(max_examples=profile_examples(400), **_SETTINGS)
@given(spec=net_specs(max_examples=3), alpha=alphas)
def test_random_chains_match_reference(spec, alpha):
    model, x = build(spec)
    check_against_reference(model, x, alpha, repr(spec))


@settings(max_examples=profile_examples(200), **_SETTINGS)
@given(spec=net_specs(conv=True, max_convs=3, max_linears=1, max_examples=2),
       alpha=st.sampled_from([0.0, 0.5, 0.9]))
def test_conv_chains_match_reference(spec, alpha):
    """Stacks of up to three convs (strides, paddings incl. 'same', dilation, groups)."""
    model, x = build(spec)
    check_against_reference(model, x, alpha, repr(spec))


@settings(max_examples=profile_examples(250), **_SETTINGS)
@given(
    spec=net_specs(max_convs=2, max_linears=4, min_layers=3, max_examples=2,
                   shifts=(0.0, 0.0, -0.3), activations=("relu", "tanh", "leaky_relu", "none"),
                   zero_modes=("none", "none", "random", "rows", "cols")),
    alpha=alphas,
)
def test_deep_live_chains_match_reference(spec, alpha):
    """At least three layers and few dead units, so that many edges have two non-trivial measures
    (the engine's shared problems, certificates, full swaps and exact solves)."""
    model, x = build(spec)
    check_against_reference(model, x, alpha, repr(spec))


@settings(max_examples=profile_examples(100), **_SETTINGS)
@given(spec=net_specs(max_examples=2, activations=("tanh",), batchnorm=True,
                      shifts=(0.0,), min_layers=2))
def test_tanh_chains_match_reference(spec):
    """Tanh networks: negative activations, activity is |h|."""
    model, x = build(spec)
    check_against_reference(model, x, 0.9, repr(spec))


@settings(max_examples=profile_examples(100), **_SETTINGS)
@given(spec=net_specs(max_examples=2, min_layers=2, shifts=(0.0, -0.3)))
def test_kappa_does_not_depend_on_alpha_above_half(spec):
    """method.md "Observed": for alpha >= 0.5 kappa is the same for every alpha, in the engine and
    in the reference (which solves the full transport problem with its two alpha atoms)."""
    model, x = build(spec)
    engine = {a: neural_curvature(model, x, alpha=a, tolerance=EXACT).kappa
              for a in (0.5, 0.7, 0.9)}
    reference = {a: reference_curvature(model, x, alpha=a) for a in (0.5, 0.7, 0.9)}
    for a in (0.7, 0.9):
        assert_kappa_equal(engine[a], engine[0.5], atol=1e-9, context=f"engine {a} vs 0.5")
        assert_kappa_equal(reference[a], reference[0.5], atol=1e-9,
                           context=f"reference {a} vs 0.5")
    for a in (0.5, 0.7, 0.9):
        assert_kappa_equal(engine[a], reference[a], atol=ATOL, context=f"alpha={a}")


@pytest.mark.slow
@settings(max_examples=profile_examples(400), **_SETTINGS)
@given(spec=net_specs(max_nodes=120, max_convs=3, max_linears=4, max_width=16, max_examples=3),
       alpha=alphas)
def test_bigger_random_chains_match_reference(spec, alpha):
    model, x = build(spec)
    check_against_reference(model, x, alpha, repr(spec))


@pytest.mark.slow
@settings(max_examples=profile_examples(300), **_SETTINGS)
@given(
    spec=net_specs(max_nodes=90, max_convs=3, max_linears=4, max_width=12, min_layers=4,
                   max_examples=3, shifts=(0.0, 0.0, -0.3),
                   zero_modes=("none", "none", "random", "rows", "cols")),
    alpha=alphas,
)
def test_bigger_deep_chains_match_reference(spec, alpha):
    model, x = build(spec)
    check_against_reference(model, x, alpha, repr(spec))


# --------------------------------------------------------------------------------------------
# Hand-built networks for the special cases
# --------------------------------------------------------------------------------------------


def _mlp(*widths: int, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        layers.append(nn.Linear(widths[k], widths[k + 1]))
        if k < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).eval()


def _small_lenet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=1, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 8), nn.ReLU(),
        nn.Linear(8, 5),
    ).eval()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_lenet_matches_reference(alpha, seed):
    model = _small_lenet(seed)
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.3]))
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    result = check_against_reference(model, x, alpha)
    # The branch and bound really skips edges here (conv weights have many positions and
    # there are three examples), and the counts add up to every edge-example (a tightened
    # one is also counted as solved or ruled out; every solved one was tightened first).
    stats = result.engine
    assert stats["ruled_out"] > 0
    solved = stats["solved"] + stats["full_swap"]
    assert solved <= stats["tightened"] <= solved + stats["ruled_out"]
    assert sum(v for k, v in stats.items() if k not in ("shared_problems", "tightened")) == 3 * sum(
        result.edges_per_example.values())


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_single_linear_layer(alpha):
    """One Linear: i is an input and j an output, both measures are point masses, W1 = d and
    kappa = 0 on every nonzero weight (+inf on zero weights)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[0, 1] = 0
        model[0].weight[2] = 0
    x = torch.randn(2, 5)
    result = check_against_reference(model, x, alpha)
    kappa, weight = result.kappa["0.weight"], model[0].weight
    assert torch.equal(torch.isinf(kappa), weight == 0)
    assert (kappa[weight != 0] == 0).all()
    assert torch.equal(result.live["0.weight"], weight != 0)


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_single_conv_layer(alpha):
    """One Conv2d: every edge is a point-mass pair; kappa = 0 where the weight has an edge.
    With padding 2 and a 1x1 input only the kernel centre touches data: the rest is +inf."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    result = check_against_reference(model, torch.randn(2, 2, 4, 4), alpha)
    assert (result.kappa["0.weight"] == 0).all()
    model = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2))
    result = check_against_reference(model, torch.randn(1, 1, 1, 1), alpha)
    kappa = result.kappa["0.weight"]
    centre = torch.zeros_like(kappa, dtype=torch.bool)
    centre[:, :, 2, 2] = True
    assert (kappa[centre] == 0).all()
    assert torch.isposinf(kappa[~centre]).all()
    assert torch.equal(result.live["0.weight"], centre)


@pytest.mark.parametrize("module", [nn.Linear(3, 2), nn.Conv2d(1, 2, 3)],
                         ids=["Linear", "Conv2d"])
def test_bare_layer_as_model(module):
    x = torch.randn(2, 3) if isinstance(module, nn.Linear) else torch.randn(2, 1, 4, 4)
    result = neural_curvature(module, x)
    # One layer: both ends are boundary nodes, so every edge has point masses and kappa 0.
    assert (result.kappa["weight"] == 0).all()
    assert_kappa_equal(result.kappa, reference_curvature(module, x))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_two_layer_model(alpha, seed):
    """Two layers: each edge has one point-mass side (the closed forms of the engine)."""
    model = _mlp(4, 6, 3, seed=seed)
    with torch.no_grad():
        model[0].weight[1, :2] = 0
        model[2].weight[:, 3] = 0
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    check_against_reference(model, x, alpha)


def _fallback_model(small: tuple[float, ...]) -> tuple[nn.Sequential, torch.Tensor]:
    """Layers 1 and 2 each have one huge unit (activity 1), one minimal unit (activity 0) and
    units of activity ``small``; the huge unit is cut off from some neighbourhoods by zero
    weights, so those neighbourhoods hold only small-activity units."""
    model = nn.Sequential(
        nn.Linear(3, 5), nn.ReLU(),
        nn.Linear(5, 5), nn.ReLU(),
        nn.Linear(5, 3),
    ).eval()
    gen = torch.Generator().manual_seed(0)
    base, top = 1.0, 1001.0  # activity a <=> |h| = base + a * (top - base)
    with torch.no_grad():
        for k in (0, 2, 4):
            lin = model[k]
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) + 0.5) * 1e-6)
        levels = torch.tensor([top, base] + [base + a * (top - base) for a in small])
        model[0].bias.copy_(levels)
        model[2].bias.copy_(levels)
        model[4].bias.copy_(torch.tensor([0.5, 2.0, 1.0]))
        # Units 2.. of layer 2 do not read the huge unit 0 of layer 1 (mu fallback) and units
        # 2.. of layer 1 do not feed the huge unit 0 of layer 2 (nu fallback).
        model[2].weight[2:, 0] = 0
        model[2].weight[0, 2:] = 0
        # Larger weights into the checked units, so kappa is not trivially tiny.
        model[2].weight[2:, 2:] = torch.tensor([[0.7, -1.2, 0.4], [1.1, 0.3, -0.9],
                                                [-0.5, 0.8, 1.3]])
    x = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]])
    return model, x


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("small", [(0.01, 0.02, 0.03), (0.02, 0.05, 0.03), (0.05, 0.08, 0.2)])
def test_uniform_fallback_of_measures(alpha, small):
    """Neighbourhoods whose active units all have activity below ~0.0367: exp(-1/a^2)
    underflows to 0 in float64 and the neighbour mass is spread uniformly."""
    model, x = _fallback_model(small)
    acts = activities(model, x)
    a1 = acts[1][0]
    assert a1[0] == 1 and a1[1] == 0
    assert torch.allclose(a1[2:], torch.tensor(small, dtype=torch.float64), atol=1e-6)
    weights = torch.exp(-1.0 / a1[2:] ** 2)
    if max(small) <= 0.03:  # the fallback is really hit (else: proportional, tiny weights)
        assert (weights == 0).all()
    check_against_reference(model, x, alpha, f"small={small}")


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_whole_layer_dead_on_one_example(alpha):
    """Example 2 switches every unit of layer 1 off (negative biases, zero input): all of layer
    1 has activity 0 on it, while example 1 keeps it alive."""
    model = _mlp(4, 6, 5, 3, seed=5)
    with torch.no_grad():
        model[0].bias.copy_(-torch.linspace(0.1, 0.5, 6))
        model[0].weight.abs_()
    x = torch.stack([torch.full((4,), 2.0), torch.zeros(4)])
    acts = activities(model, x)
    assert (acts[1][1] == 0).all() and (acts[1][0] > 0).any()
    check_against_reference(model, x, alpha)
    # On the dead example alone every edge touching layer 1 is dead (kappa 1, not live).
    only_dead = check_against_reference(model, x[1:], alpha)
    for name in ("0.weight", "2.weight"):
        assert (only_dead.kappa[name] == 1).all()
        assert not only_dead.live[name].any()


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_layer_with_constant_magnitude(alpha):
    """|h| is the same on every unit of layer 1 (h = +-s): min-max normalisation has no
    contrast, every unit gets activity 0 and every edge touching the layer is dead."""
    model = _mlp(3, 4, 5, 2, act=nn.Tanh, seed=6)
    with torch.no_grad():
        row = torch.tensor([0.4, -0.3, 0.8])
        model[0].weight.copy_(torch.stack([row, -row, row, -row]))
        model[0].bias.zero_()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(6))
    acts = activities(model, x)
    assert (acts[1] == 0).all()
    result = check_against_reference(model, x, alpha)
    for name in ("0.weight", "2.weight"):
        assert (result.kappa[name] == 1).all() and not result.live[name].any()
    # The last layer's edges start in layer 2: live exactly where that unit is active.
    alive = (acts[2] > 0).any(dim=0)
    assert torch.equal(result.live["4.weight"], alive.expand(2, -1))


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_single_unit_layer(alpha):
    """A one-unit hidden layer is its own min and max: always dead."""
    model = _mlp(4, 1, 3, seed=7)
    result = check_against_reference(model, torch.randn(3, 4), alpha)
    for name in ("0.weight", "2.weight"):
        assert (result.kappa[name] == 1).all() and not result.live[name].any()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_relu_with_negative_biases(alpha):
    """Many dead ReLU units (exactly 0) in a conv -> linear chain."""
    model = _small_lenet(8)
    with torch.no_grad():
        model[3].bias.sub_(0.4)
        model[6].bias.sub_(0.3)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(8))
    acts = activities(model, x)
    assert (acts[2] == 0).sum() > 2 and (acts[3] == 0).sum() > 2
    check_against_reference(model, x, alpha)


def test_float64_model_matches_reference():
    model = _small_lenet(9).double()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    check_against_reference(model, x, 0.9)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_all_zero_layer(alpha):
    """A layer whose weights are all zero has no edge: its kappa is +inf everywhere, and the
    layers next to it lose their neighbours (point-mass measures)."""
    model = _mlp(4, 5, 5, 3, seed=10)
    with torch.no_grad():
        model[2].weight.zero_()
    result = check_against_reference(model, torch.randn(2, 4), alpha)
    assert torch.isposinf(result.kappa["2.weight"]).all()
    assert not result.live["2.weight"].any()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_tied_weights_and_inputs(alpha):
    """Equal |w| everywhere and integer inputs: many equal path lengths and equal activities,
    hence degenerate transport problems (several optimal plans)."""
    model = _mlp(4, 5, 4, 4, 3, seed=11)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for k in (0, 2, 4, 6):
            w = model[k].weight
            w.copy_(torch.where(torch.rand(w.shape, generator=gen) < 0.5, -1.0, 1.0))
            model[k].bias.zero_()
    x = torch.tensor([[1.0, 2.0, 0.0, 1.0], [2.0, 2.0, 1.0, 0.0]])
    check_against_reference(model, x, alpha)


@settings(max_examples=profile_examples(100), **_SETTINGS)
@given(
    spec=net_specs(max_convs=2, max_linears=3, min_layers=3, max_examples=2,
                   shifts=(0.0, 0.0, -0.3), zero_modes=("none", "random", "rows", "cols")),
    alpha=alphas,
    block=st.integers(1, 40),
    max_block=st.integers(1, 40),
    cache=st.sampled_from([0, 1 << 29]),
)
def test_tiny_chunks_match_reference(spec, alpha, block, max_block, cache):
    """The engine's vectorised work runs in chunks of ``block`` entries (and the min-plus
    products in chunks of ``max_block``); chunk boundaries must not change kappa. Tiny chunks
    put boundaries everywhere on small networks. With no problem cache every solve round
    rebuilds its edge problems, which must not change kappa either."""
    model, x = build(spec)
    options = EngineOptions(block=block, min_plus_block=max_block, problem_cache_bytes=cache)
    check_against_reference(model, x, alpha, repr(spec), options=options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=profile_examples(60), **_SETTINGS)
@given(spec=net_specs(max_examples=2), alpha=alphas, model_on_gpu=st.booleans())
def test_cuda_engine_matches_reference(spec, alpha, model_on_gpu):
    """The engine on the GPU (model on the GPU, or on the CPU with ``device='cuda'``)."""
    model, x = build(spec)
    expected = reference_curvature(model, x, alpha=alpha)
    if model_on_gpu:
        model, x = model.cuda(), x.cuda()
    result = neural_curvature(model, x, alpha=alpha, device="cuda")
    for name, kappa in result.kappa.items():
        assert kappa.device == result.modules[name].weight.device
    assert_kappa_equal(result.kappa, expected, atol=ATOL, context=repr(spec))


@pytest.mark.parametrize("alpha, tolerance", [(0.3, EXACT), (0.9, EXACT), (0.9, 0.01)])
def test_threads_do_not_change_kappa(monkeypatch, alpha, tolerance):
    """Bounds, tightening and the search's solves run on pools with several threads (a round's
    examples one a thread); every value and count is the single thread's."""
    import curvprune.curvature as engine

    pooled = []
    in_order = engine._in_order

    def spy(threads, func, jobs):
        pooled.append((func.__name__, len(jobs)))
        return in_order(threads, func, jobs)

    monkeypatch.setattr(engine, "_in_order", spy)
    model = _mlp(6, 8, 8, 8, 3, act=nn.Tanh, seed=13)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(13))
    one = neural_curvature(model, x, alpha=alpha, threads=1, tolerance=tolerance)
    assert one.engine.get("solved", 1) > 0  # the exact solver really runs
    assert not pooled
    for threads in (2, 5):
        other = neural_curvature(model, x, alpha=alpha, threads=threads, tolerance=tolerance)
        assert_kappa_equal(other.kappa, one.kappa, atol=0.0, context=f"threads={threads}")
        assert_kappa_equal(other.kappa_lo, one.kappa_lo, atol=0.0, context=f"threads={threads}")
        assert_kappa_equal(other.kappa_hi, one.kappa_hi, atol=0.0, context=f"threads={threads}")
        assert other.engine == one.engine
    # the solves of several examples at once really ran on the pool
    assert any(name == "solve_one" and jobs > 1 for name, jobs in pooled)
    reference = reference_curvature(model, x, alpha=alpha)
    for name, ref in reference.items():  # exact, or an interval of width <= tolerance
        lo, hi = one.kappa_lo[name], one.kappa_hi[name]
        assert torch.all(lo <= ref + ATOL) and torch.all(ref <= hi + ATOL)
        assert torch.all(hi - lo <= tolerance + ATOL)
    if tolerance == EXACT:
        assert_kappa_equal(one.kappa, reference, atol=ATOL)


def test_certificate_tolerance_zero_still_exact():
    """``certify_tol=0`` sends every uncertified edge to the exact solver; same kappa."""
    model = _mlp(5, 6, 6, 6, 3, act=nn.Tanh, seed=12)
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(12))
    expected = reference_curvature(model, x, alpha=0.3)
    result = neural_curvature(model, x, alpha=0.3, certify_tol=0.0)
    assert_kappa_equal(result.kappa, expected, atol=ATOL)
    assert not any(math.isnan(v) for v in result.engine.values())
