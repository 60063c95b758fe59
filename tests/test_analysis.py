"""Tests of curvprune.analysis: NNSTD, relational-graph measures and curvature statistics.

NNSTD is checked on cases with known answers (identical, disjoint, permuted networks, a case
computed by hand), against a brute-force reference written here independently (exact fractions,
every permutation, every tie), and by property tests (symmetry, d(a, a) = 0, range). The graph
measures are checked against networkx on the same graphs, built here independently from the
weights. Curvature statistics are checked on a CurvatureResult whose kappa is set by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import profile_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from torch.nn.utils import prune

from curvprune import neural_curvature
from curvprune.analysis import (
    connectivity_masks,
    curvature_statistics,
    graph_measures,
    histogram,
    most_negative,
    nnstd,
    nnstd_masks,
    relational_graph,
    relational_measures,
    relational_measures_masks,
)

FAST = settings(max_examples=profile_examples(60), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# Helpers: masks, pruned models, permutations
# --------------------------------------------------------------------------------------------


def distinct_rows(rng: np.random.Generator, n_rows: int, shape: tuple[int, ...],
                  p: float = 0.5) -> np.ndarray:
    """``[n_rows, *shape]`` random bool with pairwise different, non-empty rows whose in-unit
    sets (any over the trailing kernel dimensions) are pairwise different too."""
    for _ in range(10_000):
        mask = rng.random((n_rows, *shape)) < p
        units = mask.reshape(n_rows, shape[0], -1).any(axis=2)
        if units.any(axis=1).all() and len({r.tobytes() for r in units}) == n_rows:
            return mask
    raise AssertionError("could not draw distinct rows")


def pruned_copy(model: nn.Module, masks: dict[str, np.ndarray]) -> nn.Module:
    """Prune ``model`` in place with ``torch.nn.utils.prune.custom_from_mask``."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        prune.custom_from_mask(modules[name.removesuffix(".weight")], "weight",
                               torch.as_tensor(mask))
    return model


def conv_net(seed: int = 0) -> nn.Sequential:
    """conv 3->5 k3 (6x6 -> 4x4), conv 5->6 k3 (-> 2x2), flatten, FC 24-7-4."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 6, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(24, 7), nn.ReLU(), nn.Linear(7, 4),
    )


CONV_NAMES = ["0.weight", "2.weight", "5.weight", "7.weight"]


def conv_net_masks(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "0.weight": distinct_rows(rng, 5, (3, 3, 3), 0.08),
        "2.weight": distinct_rows(rng, 6, (5, 3, 3), 0.05),
        "5.weight": distinct_rows(rng, 7, (24,)),
        "7.weight": rng.random((4, 7)) < 0.5,
    }


def permuted_conv_net(model: nn.Sequential, p1, p2, p3) -> nn.Sequential:
    """The same function with conv1's channels, conv2's channels and the hidden FC units
    relabelled: new unit j is old unit p[j]."""
    out = conv_net()
    hw = 4
    feats = (torch.as_tensor(p2)[:, None] * hw + torch.arange(hw)[None, :]).reshape(-1)
    with torch.no_grad():
        c1, c2, f1, f2 = (model[i] for i in (0, 2, 5, 7))
        out[0].weight.copy_(c1.weight[p1])
        out[0].bias.copy_(c1.bias[p1])
        out[2].weight.copy_(c2.weight[p2][:, p1])
        out[2].bias.copy_(c2.bias[p2])
        out[5].weight.copy_(f1.weight[p3][:, feats])
        out[5].bias.copy_(f1.bias[p3])
        out[7].weight.copy_(f2.weight[:, p3])
        out[7].bias.copy_(f2.bias)
    return out


def random_masks(rng: np.random.Generator, widths: list[int], p: float) -> dict[str, np.ndarray]:
    return {f"l{k}.weight": rng.random((widths[k + 1], widths[k])) < p
            for k in range(len(widths) - 1)}


# --------------------------------------------------------------------------------------------
# A brute-force NNSTD reference (Linear chains): exact fractions, all optimal matchings
# --------------------------------------------------------------------------------------------


def ref_delta(a: frozenset, b: frozenset) -> Fraction:
    if not a and not b:
        return Fraction(0)
    return Fraction(len(a - b) + len(b - a), len(a | b))


def ref_outcomes(ma: list[np.ndarray], mb: list[np.ndarray]) -> set[tuple[Fraction, ...]]:
    """Every tuple of layer distances Liu et al.'s procedure can give, over all optimal
    matchings that keep the most units i <-> i (the library's tie rule)."""

    def sets(mask, perm=None):
        n_in = mask.shape[1]
        rows = [frozenset(np.flatnonzero(r).tolist()) for r in mask]
        if perm is None:
            return rows
        return [frozenset(i for i in range(n_in) if perm[i] in s) for s in rows]

    def rec(k, perm):
        if k == len(ma):
            return {()}
        a, b = sets(ma[k]), sets(mb[k], perm)
        n = len(a)
        costs = {s: sum(ref_delta(a[i], b[s[i]]) for i in range(n))
                 for s in itertools.permutations(range(n))}
        best = min(costs.values())
        optimal = [s for s, c in costs.items() if c == best]
        most = max(sum(i == j for i, j in enumerate(s)) for s in optimal)
        out = set()
        for s in optimal:
            if sum(i == j for i, j in enumerate(s)) == most:
                out |= {(best / n, *rest) for rest in rec(k + 1, s)}
        return out

    return rec(0, None)


def close_to_one_of(values: tuple[float, ...], outcomes: set[tuple[Fraction, ...]]) -> bool:
    return any(all(abs(v - float(o)) < 1e-9 for v, o in zip(values, out)) for out in outcomes)


# --------------------------------------------------------------------------------------------
# NNSTD: known answers
# --------------------------------------------------------------------------------------------


def test_hand_computed_case_and_carry_direction():
    # Layer 1 (4 inputs, 3 units). a: {0,1}, {1,2}, {3};  b: {3}, {0,1}, {1,2,3}.
    # delta(a_i, b_j):  a0: 1, 0, 3/4;  a1: 1, 2/3, 1/3;  a2: 0, 1, 2/3.
    # Best matching a0-b1, a1-b2, a2-b0: cost 0 + 1/3 + 0, layer distance 1/9.
    # Layer 2 (3 inputs, 2 units). a: {0,1}, {2};  b (raw rows): {1,2}, {0}.
    # Carrying: row i of b' is row sigma(i) of b, sigma = (1, 2, 0), so b's set S becomes
    # {i : sigma(i) in S}: {1,2} -> {0,1}, {0} -> {2}: equal to a's, distance 0.
    # Not carrying (or carrying the inverse) gives 1/2.
    a = {"l1": np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], bool),
         "l2": np.array([[1, 1, 0], [0, 0, 1]], bool)}
    b = {"l1": np.array([[0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 1]], bool),
         "l2": np.array([[0, 1, 1], [1, 0, 0]], bool)}
    r = nnstd_masks(a, b)
    assert r.distances == pytest.approx({"l1": 1 / 9, "l2": 0.0}, abs=1e-15)
    assert r.mean == pytest.approx(1 / 18, abs=1e-15)
    assert r.matchings["l1"].tolist() == [1, 2, 0]
    assert r.carried == {"l1": False, "l2": True} and r.notes == {}
    loose = nnstd_masks(a, b, carry=False)
    assert loose.distances == pytest.approx({"l1": 1 / 9, "l2": 0.5}, abs=1e-15)
    # the reference agrees, and the other direction gives the inverse matching
    assert close_to_one_of(tuple(r.distances.values()), ref_outcomes(list(a.values()),
                                                                      list(b.values())))
    back = nnstd_masks(b, a)
    assert back.distances == r.distances
    assert back.matchings["l1"].tolist() == [2, 0, 1]


@pytest.mark.parametrize("conv_mode", ["channel", "kernel"])
def test_identical_networks_are_at_distance_zero(conv_mode):
    masks = conv_net_masks(1)
    a = pruned_copy(conv_net(0), masks)
    b = pruned_copy(conv_net(5), masks)  # other weight values, same connectivity
    r = nnstd(a, b, conv_mode=conv_mode)
    assert list(r.distances) == CONV_NAMES
    assert all(d == 0 for d in r.distances.values()) and r.mean == 0
    assert all(r.carried[n] for n in CONV_NAMES[1:])
    assert all(np.array_equal(r.matchings[n], np.arange(len(r.matchings[n])))
               for n in CONV_NAMES)


def test_dense_identical_networks_keep_the_identity():
    # Every unit has the same input set: every matching is optimal; the identity is kept, so
    # later layers are compared unit for unit and the distance is 0.
    rng = np.random.default_rng(0)
    a = random_masks(rng, [4, 6, 5, 3], 1.0)
    a["l2.weight"] = rng.random((3, 5)) < 0.5
    r = nnstd_masks(a, {k: v.copy() for k, v in a.items()})
    assert r.mean == 0
    assert r.matchings["l0.weight"].tolist() == list(range(6))


def test_ties_keep_the_most_units_in_place():
    # 40 units on 3 inputs: many units share an input set, so the optimum is far from unique.
    # Among optimal matchings the library keeps the most units i <-> i; the reference solves
    # the lexicographic problem exactly in integers (every delta here is a multiple of 1/6).
    rng = np.random.default_rng(0)
    a = rng.random((40, 3)) < 0.5
    b = a ^ (rng.random((40, 3)) < 0.1)
    r = nnstd_masks({"l": a}, {"l": b})
    sets_a = [frozenset(np.flatnonzero(x).tolist()) for x in a]
    sets_b = [frozenset(np.flatnonzero(x).tolist()) for x in b]
    sixths = np.array([[int(ref_delta(x, y) * 6) for y in sets_b] for x in sets_a])
    lexicographic = sixths * 41 + (1 - np.eye(40, dtype=int))
    rows, cols = linear_sum_assignment(lexicographic)
    assert r.distances["l"] == pytest.approx(sixths[rows, cols].sum() / 6 / 40, abs=1e-15)
    assert (r.matchings["l"] == np.arange(40)).sum() == (cols == rows).sum()


def test_disjoint_connectivity_is_at_distance_one():
    # Layer 1: every unit of a reads even inputs only, every unit of b odd inputs only.
    # Layer 2: a's units read everything, b's nothing (disjoint whatever the carried matching).
    rng = np.random.default_rng(2)
    even = np.zeros((5, 8), bool)
    odd = np.zeros((5, 8), bool)
    even[:, ::2] = rng.random((5, 4)) < 0.6
    odd[:, 1::2] = rng.random((5, 4)) < 0.6
    even[:, 0] = odd[:, 1] = True
    a = {"l0.weight": even, "l1.weight": np.ones((3, 5), bool)}
    b = {"l0.weight": odd, "l1.weight": np.zeros((3, 5), bool)}
    r = nnstd_masks(a, b)
    assert r.distances == {"l0.weight": 1.0, "l1.weight": 1.0} and r.mean == 1.0


def test_conv_modes_differ_on_kernel_positions():
    # Same in-channels, disjoint kernel positions: 0 at channel level, 1 at kernel level.
    a = np.zeros((2, 3, 2, 2), bool)
    b = np.zeros((2, 3, 2, 2), bool)
    a[:, :, 0, 0] = True
    b[:, :, 1, 1] = True
    assert nnstd_masks({"c": a}, {"c": b}, conv_mode="channel").mean == 0
    assert nnstd_masks({"c": a}, {"c": b}, conv_mode="kernel").mean == 1


@pytest.mark.parametrize("conv_mode", ["channel", "kernel"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuted_conv_network_is_at_distance_zero(conv_mode, seed):
    gen = torch.Generator().manual_seed(seed)
    p1, p2, p3 = (torch.randperm(n, generator=gen) for n in (5, 6, 7))
    masks = conv_net_masks(seed)
    a = pruned_copy(conv_net(seed), masks)
    b = permuted_conv_net(a, p1, p2, p3)  # plain weights with the zeros of the pruned model
    x = torch.randn(3, 3, 6, 6, generator=gen)
    torch.testing.assert_close(b(x), a(x))  # the test's permutation keeps the function
    r = nnstd(a, b, conv_mode=conv_mode)
    assert r.distances == dict.fromkeys(CONV_NAMES, 0.0)
    for name, p in zip(CONV_NAMES, (p1, p2, p3)):
        assert r.matchings[name].tolist() == torch.argsort(p).tolist()
    assert r.carried == {"0.weight": False, "2.weight": True, "5.weight": True,
                         "7.weight": True}
    # without carrying, the relabelled inputs of the later layers look different
    loose = nnstd(a, b, conv_mode=conv_mode, carry=False)
    assert loose.distances["0.weight"] == 0
    assert all(loose.distances[n] > 0 for n in CONV_NAMES[1:])


@FAST
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(2, 4),
       width=st.integers(3, 8))
def test_permuted_mlp_is_at_distance_zero(seed, depth, width):
    rng = np.random.default_rng(seed)
    # at most 7 units on at least 3 inputs: 7 distinct non-empty input sets exist
    widths = [width] + [int(rng.integers(3, 8)) for _ in range(depth)]
    a = {f"l{k}.weight": distinct_rows(rng, widths[k + 1], (widths[k],))
         for k in range(depth)}
    perms = [rng.permutation(w) for w in widths[1:-1]]
    b = {}
    for k in range(depth):
        w = a[f"l{k}.weight"]
        if k < depth - 1:
            w = w[perms[k]]
        if k > 0:
            w = w[:, perms[k - 1]]
        b[f"l{k}.weight"] = w
    r = nnstd_masks(a, b)
    assert all(d == 0 for d in r.distances.values())
    for k, p in enumerate(perms):
        assert r.matchings[f"l{k}.weight"].tolist() == np.argsort(p).tolist()


def test_grouped_conv_within_group_permutation():
    # conv 3->4, then a grouped conv (groups=2) 4->4: permuting conv1's channels within each
    # group keeps the grouped structure; the carried matching makes the distance 0.
    rng = np.random.default_rng(3)
    m1 = distinct_rows(rng, 4, (3, 2, 2), 0.3)
    m2 = np.zeros((4, 2, 2, 2), bool)  # in-group channel sets {0}, {0,1} | {1}, {0,1}
    for unit, channels in enumerate([[0], [0, 1], [1], [0, 1]]):
        m2[unit, channels] = True
    p = np.array([1, 0, 3, 2])  # swaps inside group 0 ({0,1}) and group 1 ({2,3})
    a = {"c1": m1, "c2": m2}
    b = {"c1": m1[p], "c2": m2[:, [1, 0]]}  # in-group index i of every unit is now p(i)
    r = nnstd_masks(a, b, groups={"c2": 2})
    assert r.distances == {"c1": 0.0, "c2": 0.0}
    assert nnstd_masks(a, b, groups={"c2": 2}, carry=False).distances["c2"] > 0


def test_flatten_that_cannot_be_expanded_is_not_carried():
    rng = np.random.default_rng(4)
    a = {"c": rng.random((3, 1, 2, 2)) < 0.5, "f": rng.random((4, 10)) < 0.5}
    r = nnstd_masks(a, {k: v.copy() for k, v in a.items()})
    assert r.carried == {"c": False, "f": False}
    assert "not a multiple of the 3 channels" in r.notes["f"]
    assert r.mean == 0


def test_nnstd_reads_pruning_masks_not_stale_weights():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    prune.random_unstructured(a[0], "weight", amount=0.5)
    masks = connectivity_masks(a)
    assert list(masks) == ["0.weight", "2.weight"]
    assert torch.equal(masks["0.weight"], a[0].weight_mask.bool())
    with torch.no_grad():
        a[0].weight_mask.fill_(1)  # no forward pass yet: a[0].weight still has the zeros
        a[0].weight_orig[0, 0] = 0
    expected = torch.ones(3, 4, dtype=torch.bool)
    expected[0, 0] = False
    assert torch.equal(connectivity_masks(a)["0.weight"], expected)
    b = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    # b is dense: unit 0 of a lacks one of 4 inputs (1/4), units 1, 2 are full (0)
    assert nnstd(a, b).distances["0.weight"] == pytest.approx(1 / 12, abs=1e-15)


def test_architecture_mismatch_names_the_layer():
    rng = np.random.default_rng(5)
    a = random_masks(rng, [4, 3, 2], 0.5)
    b = {k: v.copy() for k, v in a.items()}
    b["l1.weight"] = np.ones((2, 4), bool)
    with pytest.raises(ValueError, match="'l1.weight'.*shape"):
        nnstd_masks(a, b)
    with pytest.raises(ValueError, match="'l1.weight'.*'other'"):
        nnstd_masks(a, {"l0.weight": a["l0.weight"], "other": a["l1.weight"]})
    with pytest.raises(ValueError, match="depth.*'l1.weight'"):
        nnstd_masks(a, {"l0.weight": a["l0.weight"]})
    with pytest.raises(ValueError, match="conv_mode"):
        nnstd_masks(a, a, conv_mode="kernels")
    with pytest.raises(ValueError, match="'0.weight'.*shape"):
        nnstd(nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(5, 3)))
    c = {"c": np.ones((4, 2, 1, 1), bool)}
    with pytest.raises(ValueError, match=r"groups\['c'\] = 3"):
        nnstd_masks(c, c, groups={"c": 3})


# --------------------------------------------------------------------------------------------
# NNSTD: properties
# --------------------------------------------------------------------------------------------


@st.composite
def mask_pairs(draw, conv: bool):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p_a, p_b = draw(st.sampled_from([0.1, 0.3, 0.5, 0.8, 1.0])), draw(
        st.sampled_from([0.0, 0.3, 0.5, 0.9]))
    if conv:
        c0, c1, c2 = (int(rng.integers(1, 4)) for _ in range(3))
        k = int(rng.integers(1, 3))
        hw = int(rng.integers(1, 3))
        shapes = {"c1": (c1, c0, k, k), "c2": (c2, c1, k, k), "f": (3, c2 * hw)}
    else:
        widths = [int(rng.integers(1, 6)) for _ in range(draw(st.integers(2, 4)))]
        shapes = {f"l{i}": (widths[i + 1], widths[i]) for i in range(len(widths) - 1)}
    a = {n: rng.random(s) < p_a for n, s in shapes.items()}
    b = {n: rng.random(s) < p_b for n, s in shapes.items()}
    if draw(st.booleans()):  # b close to a: a few flips
        b = {n: m ^ (rng.random(m.shape) < 0.15) for n, m in a.items()}
    return a, b


@FAST
@given(pair=mask_pairs(conv=False))
def test_nnstd_linear_properties_and_reference(pair):
    a, b = pair
    ab, ba = nnstd_masks(a, b), nnstd_masks(b, a)
    assert ab.distances == ba.distances and ab.mean == ba.mean  # exact symmetry
    for name, m in ab.matchings.items():
        assert np.array_equal(ba.matchings[name][m], np.arange(len(m)))  # inverse matchings
    assert all(0 <= d <= 1 for d in ab.distances.values())
    assert nnstd_masks(a, a).mean == 0 and nnstd_masks(b, b).mean == 0
    # a value the brute-force procedure can produce (in one of the two orders)
    outcomes = ref_outcomes(list(a.values()), list(b.values()))
    outcomes |= ref_outcomes(list(b.values()), list(a.values()))
    assert close_to_one_of(tuple(ab.distances.values()), outcomes)


@FAST
@given(pair=mask_pairs(conv=True), conv_mode=st.sampled_from(["channel", "kernel"]))
def test_nnstd_conv_properties(pair, conv_mode):
    a, b = pair
    ab, ba = nnstd_masks(a, b, conv_mode=conv_mode), nnstd_masks(b, a, conv_mode=conv_mode)
    assert ab.distances == ba.distances
    for name, m in ab.matchings.items():
        assert np.array_equal(ba.matchings[name][m], np.arange(len(m)))
    assert all(0 <= d <= 1 for d in ab.distances.values())
    assert nnstd_masks(a, a, conv_mode=conv_mode).mean == 0
    assert ab.carried == {"c1": False, "c2": True, "f": True}


# --------------------------------------------------------------------------------------------
# Graph measures against networkx
# --------------------------------------------------------------------------------------------


def nx_measures(g: nx.Graph) -> tuple[float, float, bool, int]:
    component = max(nx.connected_components(g), key=len)
    sub = g.subgraph(component)
    return (nx.average_clustering(g), nx.average_shortest_path_length(sub),
            nx.is_connected(g), len(component))


@pytest.mark.parametrize("method", ["bfs", "matmul"])
@pytest.mark.parametrize("n,p,seed", [(30, 0.3, 0), (40, 0.05, 1), (25, 0.6, 2), (60, 0.03, 3),
                                      (12, 0.0, 4), (50, 0.15, 5), (200, 0.009, 7)])
def test_graph_measures_match_networkx(method, n, p, seed):
    rng = np.random.default_rng(seed)
    adj = rng.random((n, n)) < p  # not symmetric, with self-loops: both must be handled
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from((int(u), int(v)) for u, v in zip(*np.nonzero(adj)) if u != v)
    got = graph_measures(adj, method=method)
    c, length, connected, size = nx_measures(g)
    assert got.nodes == n and got.edges == g.number_of_edges()
    assert got.clustering == pytest.approx(c, abs=1e-12)
    assert got.path_length == pytest.approx(length, abs=1e-12)
    assert got.connected == connected and got.largest_component == size
    assert got.components == nx.number_connected_components(g)


@pytest.mark.parametrize("method", ["bfs", "matmul"])
def test_graph_measures_sparse_graph_with_triangles(method):
    # 120 random triangles on 400 nodes: density < 2% (the sparse code paths), C well above 0
    rng = np.random.default_rng(8)
    g = nx.Graph()
    g.add_nodes_from(range(400))
    for u, v, w in rng.integers(0, 400, size=(120, 3)).tolist():
        g.add_edges_from([(u, v), (v, w), (u, w)])
    g.remove_edges_from(nx.selfloop_edges(g))
    got = graph_measures(nx.to_scipy_sparse_array(g, nodelist=range(400)), method=method)
    c, length, connected, size = nx_measures(g)
    assert c > 0.1 and not connected
    assert got.clustering == pytest.approx(c, abs=1e-12)
    assert got.path_length == pytest.approx(length, abs=1e-12)
    assert got.largest_component == size


def test_graph_measures_disconnected_ties_and_bipartite():
    # a path 0-1-2 (L = 4/3) and a triangle 3-4-5 (L = 1): equal sizes, the lowest node wins
    g = nx.Graph([(0, 1), (1, 2), (3, 4), (4, 5), (3, 5)])
    got = graph_measures(nx.to_scipy_sparse_array(g, nodelist=range(6)))
    assert got.path_length == pytest.approx(4 / 3) and not got.connected
    assert got.largest_component == 3 and got.components == 2
    assert got.clustering == pytest.approx(nx.average_clustering(g)) == pytest.approx(0.5)
    # a random bipartite layer: C = 0 in both
    rng = np.random.default_rng(7)
    block = rng.random((9, 6)) < 0.5
    adj = np.zeros((15, 15), bool)
    adj[:9, 9:] = block
    g = nx.from_numpy_array((adj | adj.T).astype(int))
    got = graph_measures(adj)
    assert graph_measures(torch.as_tensor(adj)) == got == graph_measures(adj.T.astype(float))
    assert got.clustering == 0 == nx.average_clustering(g)
    assert got.path_length == pytest.approx(nx_measures(g)[1])


# --------------------------------------------------------------------------------------------
# Relational measures of pruned networks
# --------------------------------------------------------------------------------------------


def tiny_conv(seed: int = 0) -> nn.Sequential:
    """conv 2->3 k2 (4x4 -> 3x3), flatten, FC 27-4-2."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4),
                         nn.ReLU(), nn.Linear(4, 2))


# --------------------------------------------------------------------------------------------
# Relational graphs (You et al. 2020) of pruned networks
# --------------------------------------------------------------------------------------------


def nx_relational(connected: np.ndarray, n: int) -> nx.Graph:
    """The relational graph by its definition, written out with loops: input channel i of an
    [out, in] matrix is in node i * n // n_in, output channel o in node o * n // n_out."""
    n_out, n_in = connected.shape
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for o in range(n_out):
        for i in range(n_in):
            a, b = i * n // n_in, o * n // n_out
            if connected[o, i] and a != b:
                g.add_edge(a, b)
    return g


def assert_measures(got, g: nx.Graph) -> None:
    c, length, connected, size = nx_measures(g)
    assert got.nodes == g.number_of_nodes() and got.edges == g.number_of_edges()
    assert got.clustering == pytest.approx(c, abs=1e-12)
    assert got.path_length == pytest.approx(length, abs=1e-12)
    assert got.connected == connected and got.largest_component == size


def test_relational_graph_hand_made_equal_widths():
    # 4 channels in and out: weights 0->1, 1->2, 2->3, 3->0, 0->2, and the self-update 1->1.
    w = np.zeros((4, 4), bool)  # [out, in]
    for i, o in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 1)]:
        w[o, i] = True
    g = nx.Graph([(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)])  # two triangles: 012, 023
    adj = relational_graph(w, nodes=None)
    assert adj.shape == (4, 4) and adj.diagonal().sum() == 0
    assert {(int(a), int(b)) for a, b in zip(*adj.nonzero())} == \
        set(g.edges) | {(b, a) for a, b in g.edges}
    got = graph_measures(adj)
    assert_measures(got, g)
    assert got.clustering == pytest.approx(nx.average_clustering(g)) and got.clustering > 0.8
    assert graph_measures(relational_graph(torch.as_tensor(w), None)) == got


def test_relational_graph_hand_made_different_widths():
    # 3 inputs, 6 outputs, 3 nodes: input i is node i, outputs {0,1}, {2,3}, {4,5} are nodes
    # 0, 1, 2. Weights: in 0 -> out 3 (node 0 ~ 1), in 1 -> out 5 (1 ~ 2), in 2 -> out 1
    # (2 ~ 0), in 1 -> out 2 (node 1 to itself: no edge).
    w = np.zeros((6, 3), bool)
    for i, o in [(0, 3), (1, 5), (2, 1), (1, 2)]:
        w[o, i] = True
    got = graph_measures(relational_graph(w, nodes=64))  # capped at the narrower width, 3
    assert_measures(got, nx.Graph([(0, 1), (1, 2), (2, 0)]))
    assert got.clustering == 1.0
    # Grouped coarser: 2 nodes; inputs {0, 1} -> node 0, {2} -> node 1 (i * 2 // 3).
    coarse = nx_relational(w, 2)
    assert set(coarse.edges) == {(0, 1)}
    assert_measures(graph_measures(relational_graph(w, nodes=2)), coarse)
    with pytest.raises(ValueError, match="nodes must be a positive integer"):
        relational_graph(w, nodes=0)
    with pytest.raises(ValueError, match=r"\[out, in\] matrix"):
        relational_graph(np.ones((2, 2, 3)), nodes=None)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nodes", [None, 3, 5])
def test_relational_measures_match_networkx(seed, nodes):
    model = tiny_conv(seed)
    gen = torch.Generator().manual_seed(seed)
    pruned_copy(model, {
        "0.weight": (torch.rand(3, 2, 2, 2, generator=gen) < 0.4).numpy(),
        "3.weight": (torch.rand(4, 27, generator=gen) < 0.3).numpy(),
    })
    with torch.no_grad():
        model[5].weight[0, 1:] = 0
        w0 = (model[0].weight_orig * model[0].weight_mask).ne(0).flatten(2).any(2).numpy()
        w3 = (model[3].weight_orig * model[3].weight_mask).ne(0).numpy()
        w5 = model[5].weight.ne(0).numpy()
    got = relational_measures(model, nodes=nodes)
    assert list(got.layers) == ["0.weight", "3.weight", "5.weight"]
    units = {"0.weight": w0, "3.weight": w3, "5.weight": w5}
    for name, w in units.items():
        n = min(w.shape) if nodes is None else min(nodes, *w.shape)
        assert_measures(got.layers[name].pruned, nx_relational(w, n))
        assert_measures(got.layers[name].dense, nx.complete_graph(n))
        assert got.layers[name].dense.path_length == 1.0
        assert got.layers[name].dense.clustering == (1.0 if n >= 3 else 0.0)  # degree < 2: 0
    if nodes is None:  # node counts 2, 4, 2: no shared node set
        assert got.network is None and "different node counts" in got.notes["network"]
    else:  # layers with at least `nodes` channels on both sides share one node set
        members = [w for w in units.values() if min(w.shape) >= nodes]
        if members:
            union = nx.compose_all([nx_relational(w, nodes) for w in members])
            assert_measures(got.network.pruned, union)
            left_out = {name for name, w in units.items() if min(w.shape) < nodes}
            assert left_out == set(got.notes)
        else:
            assert got.network is None and "no layer has" in got.notes["network"]
    assert "relational-graph measures" in got.summary()


def test_relational_grouped_conv_and_pruning_moves_c_and_l():
    conv = np.ones((4, 1, 3, 3), bool)  # depthwise 4 -> 4: only self-updates
    got = relational_measures_masks({"c": conv}, groups={"c": 4}, nodes=None)
    assert got.layers["c"].dense.edges == 0 and got.layers["c"].dense.components == 4
    grouped = np.ones((4, 2, 1, 1), bool)  # groups=2: channels {0,1} and {2,3}
    got = relational_measures_masks({"g": grouped}, groups={"g": 2}, nodes=None)
    assert_measures(got.layers["g"].dense, nx.Graph([(0, 1), (2, 3)]))
    # a pruned 8-wide layer: a ring plus chords has C > 0 and L > 1, the dense one C = L = 1
    ring = np.zeros((8, 8), bool)
    for i in range(8):
        ring[(i + 1) % 8, i] = ring[(i + 2) % 8, i] = True
    got = relational_measures_masks({"r": ring}, nodes=None)
    expected = nx.circulant_graph(8, [1, 2])
    assert_measures(got.layers["r"].pruned, expected)
    assert 0 < got.layers["r"].pruned.clustering < 1 < got.layers["r"].pruned.path_length
    assert got.network is not None and got.network.pruned == got.layers["r"].pruned


def test_relational_disconnected_layer_is_flagged():
    masks = {"a": np.ones((3, 3), bool)}
    masks["a"][:, 2] = False
    masks["a"][2, :] = False  # channel 2 (node 2) sends and receives nothing
    got = relational_measures_masks(masks, nodes=None)
    a = got.layers["a"].pruned
    assert not a.connected and a.largest_component == 2 and a.components == 2
    assert a.path_length == 1.0 and "largest component 2" in got.summary()


def test_relational_measures_on_a_non_chain_model():
    from curvprune import zoo

    model = zoo.create("timm/resnet18")
    got = relational_measures(model, nodes=16)
    convs = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(got.layers) == convs  # the residual branches' 1x1 downsample convs too
    assert got.network is not None and got.network.dense.clustering == 1.0
    # the 3-channel stem and the 10-class head are narrower than 16 nodes: left out, noted
    assert set(got.notes) == {"conv1.weight", "fc.weight"}
    assert got.layers["conv1.weight"].pruned.nodes == 3
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        relational_measures(nn.ReLU())


def test_nnstd_linear_reshaped_into_conv_channels():
    # FC 3 -> 8 whose outputs are reshaped to 2 channels x 2 x 2, then a 1x1 conv 2 -> 2.
    fc = np.zeros((8, 3), bool)
    fc[0, 0] = True
    fc[6, 2] = True
    conv = np.ones((2, 2, 1, 1), bool)
    r = nnstd_masks({"f": fc, "c": conv}, {"f": fc, "c": conv})
    assert not r.carried["c"] and "do not match the 8 outputs" in r.notes["c"]


# --------------------------------------------------------------------------------------------
# Curvature statistics
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored():
    """A real CurvatureResult of a tiny conv/FC chain (conv 1->3 k3 s2 on 7x7, FC 27-6-4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        model[3].weight.view(-1)[::5] = 0
    return neural_curvature(model, torch.randn(3, 1, 7, 7))


@pytest.fixture
def handmade(scored):
    """``scored`` with the last layer's kappa set by hand: 4 live weights (-1, 2, 0, 1 at flat
    indices 3, 5, 8, 20), 10 zero weights, 10 dead ones; one more negative tie at index 9."""
    kappa = torch.full((4, 6), math.inf, dtype=torch.float64)
    live = torch.zeros(4, 6, dtype=torch.bool)
    flat_k, flat_l = kappa.view(-1), live.view(-1)
    flat_k[10:20] = 1.0  # dead
    for i, v in {3: -1.0, 5: 2.0, 8: 0.0, 20: 1.0, 9: -1.0}.items():
        flat_k[i], flat_l[i] = v, True
    return dataclasses.replace(scored, kappa={**scored.kappa, "5.weight": kappa},
                               live={**scored.live, "5.weight": live})


def test_curvature_statistics_by_hand(handmade):
    rows = {r.name: r for r in curvature_statistics(handmade, quantiles=(0.0, 0.25, 0.5, 1.0))}
    r = rows["5.weight"]
    # live values: -1 (x2), 0, 1, 2
    assert (r.weights, r.live, r.zero, r.dead) == (24, 5, 9, 10)
    assert r.mean == pytest.approx(0.2)
    assert r.std == pytest.approx(math.sqrt((1.2**2 * 2 + 0.2**2 + 0.8**2 + 1.8**2) / 5))
    assert r.quantiles == pytest.approx({0.0: -1.0, 0.25: -1.0, 0.5: 0.0, 1.0: 2.0})
    assert (r.kappa_min, r.kappa_median, r.kappa_max) == (-1.0, 0.0, 2.0)
    assert r.negative == 2 and r.negative_share == pytest.approx(0.4)
    with pytest.raises(ValueError, match="quantiles"):
        curvature_statistics(handmade, quantiles=(1.5,))


def test_curvature_statistics_agree_with_layer_summaries(scored):
    rows = curvature_statistics(scored)
    summaries = scored.layer_summaries()
    assert [r.name for r in rows] == [s.name for s in summaries] == list(scored.kappa)
    for r, s in zip(rows, summaries):
        assert (r.weights, r.zero, r.dead, r.live) == (s.weights, s.zero, s.dead, s.live)
        values = scored.kappa[r.name][scored.live[r.name]].numpy()
        assert r.mean == pytest.approx(values.mean())
        assert r.kappa_median == s.kappa_median  # torch.median: the lower middle value
        assert r.quantiles[0.5] == pytest.approx(np.quantile(values, 0.5))  # interpolated
        assert r.kappa_min == s.kappa_min == values.min()
        assert r.negative == int((values < 0).sum())
    assert rows[1].zero == 33  # the zeroed FC weights (every fifth of 162)


def test_most_negative(handmade):
    got = most_negative(handmade, 3)["5.weight"]
    assert got.flat.tolist() == [3, 9, 8]  # -1, -1 (tie: lower index first), 0
    assert got.kappa.tolist() == [-1.0, -1.0, 0.0]
    assert got.index.tolist() == [[0, 3], [1, 3], [1, 2]]
    assert most_negative(handmade, 100)["5.weight"].flat.tolist() == [3, 9, 8, 20, 5]
    assert most_negative(handmade, 3, negative_only=True)["5.weight"].flat.tolist() == [3, 9]
    assert most_negative(handmade, 0)["5.weight"].index.shape == (0, 2)
    conv = most_negative(handmade, 2)["0.weight"]
    k = handmade.kappa["0.weight"]
    for idx, value in zip(conv.index, conv.kappa):
        assert k[tuple(idx)] == value
    live = k[handmade.live["0.weight"]]
    assert conv.kappa.tolist() == sorted(live.tolist())[:2]
    with pytest.raises(ValueError, match="k must"):
        most_negative(handmade, -1)


def test_histogram(handmade):
    hists = histogram(handmade, bins=4)
    edges = hists["5.weight"].edges
    all_live = np.concatenate([handmade.kappa[n][handmade.live[n]].numpy() for n in hists])
    assert edges[0] == all_live.min() and edges[-1] == all_live.max()
    for name, h in hists.items():
        assert np.array_equal(h.edges, edges)  # shared edges
        assert h.counts.sum() == h.live == int(handmade.live[name].sum())
    assert (hists["5.weight"].zero, hists["5.weight"].dead) == (9, 10)
    own = histogram(handmade, bins=[-1.0, 0.0, 1.0, 2.0], shared=False)["5.weight"]
    assert own.counts.tolist() == [2, 1, 2]  # [-1, 0), [0, 1), [1, 2]
    alone = histogram(handmade, bins=3, shared=False)["5.weight"]
    assert alone.edges.tolist() == [-1.0, 0.0, 1.0, 2.0]
