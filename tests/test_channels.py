"""Channel granularity: the traced graph, engine == reference, per-weight scores, fallbacks."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import curvprune
from curvprune.calibration import scoring_mode
from curvprune.curvature import channel_edge_bounds
from curvprune.errors import UntraceableModel
from curvprune.graphs import _channel_distances
from curvprune.graphs.channel import (
    ChannelGraph,
    ChannelProblems,
    NodeSet,
    channel_activity,
    channel_distances,
    needed_distance_bytes,
    needed_distances,
    trace_channels,
)
from curvprune.reference import channel_reference_curvature

# --------------------------------------------------------------------------------------------
# Small models covering every traced construct
# --------------------------------------------------------------------------------------------


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> flatten (16 features per channel) -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.c2 = nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 6)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    """A basic residual block (add) with a downsampling projection, pooling and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 1, stride=2)
        self.c = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        x = F.relu(self.down(x) + self.c(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Dense(nn.Module):
    """DenseNet-style concatenation: each conv reads the concatenation of all earlier maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.g1 = nn.Conv2d(4, 3, 3, padding=1)
        self.g2 = nn.Conv2d(7, 3, 3, padding=1)
        self.trans = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([x, F.relu(self.g1(x))], 1)
        x = torch.cat([x, F.relu(self.g2(x))], 1)
        x = F.avg_pool2d(F.relu(self.trans(x)), 2)
        return self.fc(x.mean((2, 3)))


class Mobile(nn.Module):
    """Inverted residual: expand, depthwise, squeeze-excitation gate (mul), grouped project."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se_reduce = nn.Conv2d(8, 2, 1)
        self.se_expand = nn.Conv2d(2, 8, 1)
        self.project = nn.Conv2d(8, 4, 1, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        h = F.relu6(self.expand(x))
        h = F.silu(self.dw(h))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        h = self.project(h * gate)
        x = x + h
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


class Windows(nn.Module):
    """Swin-style windows: tokens regrouped so that a Linear's first dim is not the batch;
    ShuffleNet-style channel shuffle (view, transpose, contiguous, view)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.gelu(self.stem(x))  # [B, 6, 8, 8]
        b = x.shape[0]
        t = x.permute(0, 2, 3, 1).reshape(b, 2, 4, 2, 4, 6).permute(0, 1, 3, 2, 4, 5)
        t = F.gelu(self.mix(t.reshape(b * 4, 16, 6)))  # windows: first dim 4 * batch
        t = t.reshape(b, 2, 2, 4, 4, 6).permute(0, 5, 1, 3, 2, 4).reshape(b, 6, 8, 8)
        t = t.view(b, 2, 3, 8, 8).transpose(1, 2).contiguous().view(b, 6, 8, 8)  # shuffle
        t = F.relu(self.head(x + t))
        return self.fc(t.amax((2, 3)))


class Standardised(nn.Module):
    """timm's weight-standardised conv (the weight the conv uses is computed from the
    parameter) and 'same' max pooling (padding with -inf)."""

    def __init__(self):
        super().__init__()
        from timm.layers import StdConv2dSame, create_pool2d

        self.conv = StdConv2dSame(3, 5, 3)
        self.pool = create_pool2d("max", 3, stride=2, padding="same")
        self.conv2 = nn.Conv2d(5, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


class Halo(nn.Module):
    """Halo attention (timm's HaloNet): keys and values from overlapping zero-padded windows cut
    with ``Tensor.unfold``, a relative-position MLP on a constant table and talking heads (a
    Linear on the attention logits) added to ``q k^T``; and an ``F.unfold`` (im2col) branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.q = nn.Conv2d(4, 4, 1)
        self.kv = nn.Conv2d(4, 8, 1)  # head h: channels 4h, 4h+1 are k; 4h+2, 4h+3 are v
        self.rel = nn.Linear(2, 1)  # reads a constant table: no channel
        self.talk = nn.Linear(2, 2)  # mixes the heads of the attention logits: no channel
        self.proj = nn.Conv2d(4, 5, 1)
        self.cols = nn.Linear(4 * 9, 3)
        self.fc = nn.Linear(5 + 3, 2)
        self.register_buffer("table", torch.randn(16, 36, 2))

    def forward(self, x):
        x = F.relu(self.stem(x))  # [B, 4, 8, 8]
        b = x.shape[0]
        # queries: 2 heads of 2 channels, 2 x 2 blocks of 4 x 4 positions
        q = self.q(x).reshape(b, 2, 2, 2, 4, 2, 4).permute(0, 1, 3, 5, 4, 6, 2)
        q = q.reshape(b * 2, 4, 16, 2)
        kv = F.pad(self.kv(x), (1, 1, 1, 1)).unfold(2, 6, 4).unfold(3, 6, 4)  # 6x6 windows
        kv = kv.reshape(b, 2, 4, 4, 36).permute(0, 1, 3, 4, 2).reshape(b * 2, 4, 36, 4)
        k, v = kv.split(2, dim=-1)
        attn = q @ k.transpose(-1, -2) + self.rel(self.table).squeeze(-1)
        attn = self.talk(attn.reshape(b, 2, 4, 16, 36).permute(0, 2, 3, 4, 1))
        attn = attn.permute(0, 4, 1, 2, 3).reshape(b * 2, 4, 16, 36).softmax(-1)
        out = (attn @ v).reshape(b, 2, 2, 2, 4, 4, 2).permute(0, 1, 6, 2, 4, 3, 5)
        y = F.relu(self.proj(out.reshape(b, 4, 8, 8))).mean((2, 3))
        cols = F.unfold(x, 3, padding=1, stride=4).transpose(1, 2)  # [B, 4, 4 * 9]
        z = F.relu(self.cols(cols)).mean(1)
        return self.fc(torch.cat([y, z], 1))


class Tokens1d(nn.Module):
    """Conv1d over tokens ``[B, C, L]``: a channel mixer and a depthwise one (EfficientViM)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv1d(4, 6, 3, padding=1)
        self.dw = nn.Conv1d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.stem(x)).flatten(2)
        x = F.gelu(self.mix(x))
        x = x + self.dw(x)
        return self.fc(x.mean(2))


class EinsumAttention(nn.Module):
    """Attention written with ``einsum`` (MViTv2): logits ``q k^T`` and a relative-position
    term ``q R`` (channels contracted), ``attn v``, and a token mixing by a parameter."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.qkv = nn.Linear(4, 12)
        self.rel = nn.Parameter(torch.randn(16, 16, 4))
        self.tokens = nn.Parameter(torch.randn(16, 16) / 4)
        self.proj = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        t = F.relu(self.stem(x)).flatten(2).transpose(1, 2)  # [B, 16 tokens, 4]
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = torch.einsum("bnc,bmc->bnm", q, k) + torch.einsum("bnc,nmc->bnm", q, self.rel)
        out = torch.einsum("bnm,bmc->bnc", attn.softmax(-1), v)
        out = torch.einsum("bnc,nm->bcm", out, self.tokens)  # channels first now
        return self.fc(F.gelu(self.proj(out.transpose(1, 2))).mean(1))


class Additive(nn.Module):
    """SwiftFormer's additive attention: per-token weights from ``q w`` (channels contracted
    with a parameter) weigh the tokens of ``q`` into one global query."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 1))
        self.proj = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        t = F.relu(self.stem(x)).flatten(2).transpose(1, 2)  # [B, 16 tokens, 4]
        q, k = self.q(t), self.k(t)
        a = F.normalize(q @ self.w, dim=1)  # [B, 16, 1]: one weight per token
        g = torch.sum(a * q, dim=1, keepdim=True)  # [B, 1, 4]: the channels of q
        return self.fc((self.proj(g * k) + q).mean(1))


class Outlook(nn.Module):
    """VOLO's outlook attention (a Linear's channels are the attention weights over the
    positions of an ``F.unfold`` window; ``F.fold`` sums the windows back), a fixed blur filter
    per channel (BlurPool), and class attention whose query is a constant (a class token)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.v = nn.Linear(4, 4)
        self.attn = nn.Linear(4, 9 * 9)
        self.proj = nn.Linear(4, 4)
        blur = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur", (blur[:, None] * blur[None, :] / 16).expand(4, 1, 3, 3))
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.q = nn.Linear(4, 4)  # reads the class token only: a constant, not scored
        self.k = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))  # [B, 4, 6, 6]
        b = x.shape[0]
        t = x.permute(0, 2, 3, 1)
        v = F.unfold(self.v(t).permute(0, 3, 1, 2), 3, padding=1)  # [B, 4 * 9, 36]
        v = v.reshape(b, 4, 9, 36).permute(0, 3, 2, 1)  # [B, 36 positions, 9 window, 4]
        a = self.attn(t).reshape(b, 36, 9, 9).softmax(-1)
        o = (a @ v).permute(0, 3, 2, 1).reshape(b, 4 * 9, 36)
        o = F.fold(o, (6, 6), 3, padding=1)  # [B, 4, 6, 6]
        o = self.proj(o.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        o = F.conv2d(F.pad(o, (1, 1, 1, 1), mode="reflect"), self.blur, stride=2, groups=4)
        tokens = o.flatten(2).transpose(1, 2)  # [B, 9, 4]
        q = self.q(self.cls.expand(b, -1, -1))
        w = (q @ self.k(tokens).transpose(1, 2)).softmax(-1)  # [B, 1, 9]
        return self.fc((w @ tokens)[:, 0])


def _vit(fused: bool):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=8,
                              depth=1, num_heads=2, mlp_ratio=2, num_classes=4)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def _convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", dims=(4, 6, 6, 8), depths=(1, 1, 1, 1),
                             num_classes=3)


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls()
    return build


MODELS = {
    "chain": (_seeded(Chain), (3, 8, 8)),
    "residual": (_seeded(Residual), (3, 8, 8)),
    "dense": (_seeded(Dense), (3, 8, 8)),
    "mobile": (_seeded(Mobile), (3, 8, 8)),
    "vit_fused": (lambda: _vit(True), (3, 16, 16)),
    "vit_matmul": (lambda: _vit(False), (3, 16, 16)),
    "convnext": (_convnext, (3, 32, 32)),
    "windows": (_seeded(Windows), (3, 8, 8)),
    "standardised": (_seeded(Standardised), (3, 9, 9)),
    "halo": (_seeded(Halo), (3, 8, 8)),
    "tokens1d": (_seeded(Tokens1d), (3, 4, 4)),
    "einsum": (_seeded(EinsumAttention), (3, 4, 4)),
    "additive": (_seeded(Additive), (3, 4, 4)),
    "outlook": (_seeded(Outlook), (3, 6, 6)),
}


def _inputs(shape, batch=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, *shape)


def score_channel_edges(graph, distances, alpha):
    """Every layer edge's curvature (the midpoint of :func:`channel_edge_bounds` at the default
    tolerance, a few ulps wide) and whether it was live."""
    upper, lower, live = channel_edge_bounds(graph, distances, alpha)
    return 0.5 * (lower + upper), live


def _trace(model, x):
    with scoring_mode(model):
        return trace_channels(model, x)


def _perturb(model, seed, zero_fraction):
    """Zero a fraction of weights (and a whole filter) to make absent edges and dead channels."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= zero_fraction)
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.weight[0].zero_()  # output channel 0 of the first conv: constant => dead or not
        if first.bias is not None:
            first.bias[0] = -1.0


# --------------------------------------------------------------------------------------------
# Engine == reference on every layer edge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.0])
def test_engine_equals_reference(name, alpha):
    build, shape = MODELS[name]
    model = build()
    _perturb(model, seed=len(name), zero_fraction=0.2)
    graph = _trace(model, _inputs(shape))
    kappa, live = score_channel_edges(graph, channel_distances(graph), alpha)
    expected = channel_reference_curvature(graph, alpha)
    layer = graph.module >= 0
    assert layer.any()
    assert torch.isfinite(kappa[layer]).all()
    assert torch.isinf(kappa[~layer]).all() and torch.isinf(expected[~layer]).all()
    diff = (kappa[layer] - expected[layer]).abs().max().item()
    assert diff <= 1e-9, f"{name}: max |engine - reference| = {diff:.3e}"


def test_engine_equals_reference_with_dead_channels():
    model = MODELS["residual"][0]()
    with torch.no_grad():
        model.a.weight[:3].zero_()
        model.a.bias[:3] = -1.0  # channels 0..2 of `a` are exactly 0 after ReLU: dead
    graph = _trace(model, _inputs((3, 8, 8)))
    start = graph.module_outputs[[n for n, _ in graph.modules].index("a.weight")]
    assert (graph.activity[:, start:start + 3] == 0).all()
    kappa, live = score_channel_edges(graph, channel_distances(graph), 0.9)
    expected = channel_reference_curvature(graph, 0.9)
    layer = graph.module >= 0
    assert (kappa[layer] - expected[layer]).abs().max() <= 1e-9
    # Their weights are zero (no edge in); every edge out of them is dead: kappa exactly 1.
    assert not ((graph.dst >= start) & (graph.dst < start + 3)).any()
    from_dead = layer & (graph.src >= start) & (graph.src < start + 3)
    assert from_dead.sum() == 3 * 6
    assert (kappa[from_dead] == 1.0).all() and not live[from_dead].any()


# --------------------------------------------------------------------------------------------
# The traced structure
# --------------------------------------------------------------------------------------------


def test_chain_edges_and_lengths():
    model = MODELS["chain"][0]()
    with torch.no_grad():
        model.c2.weight[1, 2].zero_()  # one channel block entirely zero: no edge 2 -> 1
    graph = _trace(model, _inputs((3, 8, 8)))
    names = [n for n, _ in graph.modules]
    assert names == ["c1.weight", "c2.weight", "fc.weight"]
    assert [s.count for s in graph.sets] == [3, 5, 4, 6]
    assert not (graph.module < 0).any()  # no merge in a chain
    starts = graph.module_outputs
    for k, (conv, in_start) in enumerate([(model.c1, 0), (model.c2, starts[0])]):
        w = conv.weight.detach().double()
        norms = w.pow(2).sum((2, 3)).sqrt()
        sel = graph.module == k
        o = graph.dst[sel] - starts[k]
        i = graph.src[sel] - in_start
        assert sel.sum() == int((norms > 0).sum())
        assert torch.allclose(graph.length[sel], 1.0 / norms[o, i], rtol=0, atol=1e-15)
    # fc reads 16 flattened features per channel: length = 1 / norm over those 16 weights.
    w = model.fc.weight.detach().double().view(6, 4, 16)
    sel = graph.module == 2
    o, i = graph.dst[sel] - starts[2], graph.src[sel] - starts[1]
    assert torch.allclose(graph.length[sel], 1.0 / w.pow(2).sum(2).sqrt()[o, i], atol=1e-15)
    assert graph.inputs[:3].all() and graph.inputs.sum() == 3
    assert graph.outputs[starts[2]:].all() and graph.outputs.sum() == 6


def test_residual_add_makes_merge_nodes_with_unit_edges():
    model = MODELS["residual"][0]()
    graph = _trace(model, _inputs((3, 8, 8)))
    merges = [s for s in graph.sets if s.kind == "merge"]
    assert [s.count for s in merges] == [6, 8]
    for s in merges:
        into = (graph.dst >= s.start) & (graph.dst < s.start + s.count)
        assert (graph.module[into] == -1).all() and (graph.length[into] == 1.0).all()
        assert into.sum() == 2 * s.count  # one edge from each operand's channel
    # The block's first conv reads the stem's channels; the projection reads the first merge.
    nodes, channels = graph.module_inputs[[n for n, _ in graph.modules].index("down.weight")]
    assert torch.equal(nodes.sort().values, torch.arange(merges[0].start, merges[0].start + 6))


def test_concatenation_feeds_channels_of_both_inputs():
    model = MODELS["dense"][0]()
    graph = _trace(model, _inputs((3, 8, 8)))
    names = [n for n, _ in graph.modules]
    stem, g1 = graph.module_outputs[names.index("stem.weight")], graph.module_outputs[1]
    nodes, channels = graph.module_inputs[names.index("g2.weight")]
    feeding = dict(zip(channels.tolist(), nodes.tolist()))
    assert feeding == {0: stem, 1: stem + 1, 2: stem + 2, 3: stem + 3, 4: g1, 5: g1 + 1,
                       6: g1 + 2}


def test_depthwise_conv_has_one_edge_per_channel():
    model = MODELS["mobile"][0]()
    graph = _trace(model, _inputs((3, 8, 8)))
    k = [n for n, _ in graph.modules].index("dw.weight")
    sel = graph.module == k
    assert sel.sum() == 8
    assert torch.equal(graph.src[sel] - graph.module_outputs[k - 1],
                       graph.dst[sel] - graph.module_outputs[k])


def test_distances_are_shortest_paths():
    model = MODELS["dense"][0]()
    graph = _trace(model, _inputs((3, 8, 8)))
    n = graph.num_nodes
    adjacency = scipy.sparse.csr_matrix((graph.length.numpy(), (graph.src.numpy(),
                                                                graph.dst.numpy())), (n, n))
    expected = scipy.sparse.csgraph.bellman_ford(adjacency, directed=True)
    got = channel_distances(graph).numpy()
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    assert np.allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], atol=1e-12)


def test_window_tokens_and_shuffle_keep_channel_identity():
    model = MODELS["windows"][0]()
    graph = _trace(model, _inputs((3, 8, 8)))
    names = [n for n, _ in graph.modules]
    stem, mix = graph.module_outputs[0], graph.module_outputs[1]
    nodes, channels = graph.module_inputs[names.index("mix.weight")]
    assert torch.equal(nodes[channels.argsort()], torch.arange(stem, stem + 6))
    # the shuffle sends mix channel c to position (c % 3) * 2 + c // 3 of the merge with x
    merge = next(s for s in graph.sets if s.kind == "merge")
    into = torch.nonzero((graph.dst >= merge.start) & (graph.src >= mix)
                         & (graph.src < mix + 6)).squeeze(1)
    got = {int(graph.src[e]) - mix: int(graph.dst[e]) - merge.start for e in into}
    assert got == {c: (c % 3) * 2 + c // 3 for c in range(6)}
    # per-example activities come from the window rows of the right example
    assert graph.activity.shape == (2, graph.num_nodes)


def test_standardised_weight_is_the_modules():
    model = MODELS["standardised"][0]()
    graph = _trace(model, _inputs((3, 9, 9)))
    assert [n for n, _ in graph.modules] == ["conv.weight", "conv2.weight", "fc.weight"]
    sel = graph.module == 0
    w = model.conv.weight.detach().double().view(5, -1)
    std = (w - w.mean(1, keepdim=True)) / (w.var(1, unbiased=False, keepdim=True)
                                           + model.conv.eps).sqrt()
    norms = std.view(5, 3, 9).pow(2).sum(2).sqrt()
    o, i = graph.dst[sel] - graph.module_outputs[0], graph.src[sel]
    assert torch.allclose(graph.length[sel], 1.0 / norms[o, i], rtol=1e-6)


def test_pruned_model_uses_the_masked_weight():
    model = MODELS["residual"][0]()
    torch.nn.utils.prune.l1_unstructured(model.a, "weight", amount=0.5)
    with torch.no_grad():
        model.a.weight_mask[1].zero_()  # a whole output channel masked: no edges into it
    x = _inputs((3, 8, 8))
    result = curvprune.neural_curvature(model, x, granularity="channel")
    kappa = result.kappa["a.weight"]
    assert torch.isposinf(kappa[1]).all()
    assert torch.equal(torch.isposinf(kappa), model.a.weight_mask == 0)
    graph = result.channel_graph
    k = [n for n, _ in graph.modules].index("a.weight")
    assert not (graph.dst == graph.module_outputs[k] + 1).any()


def test_attention_values_carry_channels_and_qk_are_sinks():
    model = _vit(True)
    graph = _trace(model, _inputs((3, 16, 16)))
    names = [n for n, _ in graph.modules]
    qkv = graph.module_outputs[names.index("blocks.0.attn.qkv.weight")]
    nodes, channels = graph.module_inputs[names.index("blocks.0.attn.proj.weight")]
    # proj input channel c is value channel c: qkv output 2*8 + c.
    assert torch.equal(nodes[channels.argsort()], torch.arange(qkv + 16, qkv + 24))
    q_and_k = torch.arange(qkv, qkv + 16)
    assert not torch.isin(q_and_k, graph.src).any()  # no out-edges


# --------------------------------------------------------------------------------------------
# neural_curvature(granularity="channel")
# --------------------------------------------------------------------------------------------


def test_per_weight_kappa_is_edge_kappa_and_zero_weights_are_inf():
    model = MODELS["residual"][0]()
    with torch.no_grad():
        model.a.weight[2, 1, 0, 0] = 0.0  # one element of a live channel block
    x = _inputs((3, 8, 8))
    result = curvprune.neural_curvature(model, x, granularity="channel", tolerance=1e-14)
    graph = _trace(model, x)
    expected = channel_reference_curvature(graph, 0.9)
    names = [n for n, _ in graph.modules]
    for k, name in enumerate(names):
        module = dict(model.named_modules())[name[:-len(".weight")]]
        w = module.weight.detach()
        got = result.kappa[name]
        sel = torch.nonzero(graph.module == k).squeeze(1)
        in_nodes, in_channels = graph.module_inputs[k]
        node_of = dict(zip(in_channels.tolist(), in_nodes.tolist()))
        for e in sel.tolist():
            o = int(graph.dst[e]) - graph.module_outputs[k]
            cs = [c for c, u in node_of.items() if u == int(graph.src[e])]
            for c in cs:
                block = got[o, c] if w.dim() == 2 else got[o, c % w.shape[1]]
                nonzero = (w[o, c] if w.dim() == 2 else w[o, c % w.shape[1]]) != 0
                assert torch.all(torch.where(nonzero, (block - expected[e]).abs() <= 1e-9,
                                             torch.isposinf(block)))
    assert math.isinf(result.kappa["a.weight"][2, 1, 0, 0].item())
    assert result.granularity == "channel" and result.num_examples == 2


def test_channel_scoring_leaves_model_unchanged():
    model = MODELS["mobile"][0]()
    model.train()
    model.se_reduce.weight.requires_grad_(False)
    handle = model.dw.register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curvprune.neural_curvature(model, _inputs((3, 8, 8)), granularity="channel")
    assert model.training and all(m.training for m in model.modules())
    assert not model.se_reduce.weight.requires_grad and model.expand.weight.requires_grad
    assert len(model.dw._forward_hooks) == 1
    handle.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_auto_granularity():
    chain = MODELS["chain"][0]()
    x = _inputs((3, 8, 8))
    assert curvprune.neural_curvature(chain, x, granularity="auto").granularity == "neuron"
    # 7600 bytes: the chain's channel graph fits (1904 bytes of distances, 5696 of problem
    # tables), its neuron hop tables (120 KiB) do not.
    small = curvprune.neural_curvature(chain, x, granularity="auto", memory_budget=7600)
    assert small.granularity == "channel"
    residual = MODELS["residual"][0]()
    assert curvprune.neural_curvature(residual, x, granularity="auto").granularity == "channel"
    with pytest.raises(ValueError, match="memory_budget"):
        curvprune.neural_curvature(residual, x, granularity="channel", memory_budget=1000)


def test_auto_granularity_budget_is_the_size_of_the_hop_tables_built():
    from curvprune.calibration import capture_activations
    from curvprune.graphs.neuron import NeuronGraph, layer_edges, trace_chain

    chain = MODELS["chain"][0]()
    x = _inputs((3, 8, 8))
    modules = [layer.module for layer in trace_chain(chain)]
    with torch.no_grad():
        _, ins, outs = capture_activations(chain, modules, x[:1])
    graph = NeuronGraph.build([layer_edges(m, ins[k], outs[k]) for k, m in enumerate(modules)],
                              [m.weight.detach().flatten() for m in modules], torch.device("cpu"))
    built = sum(t.numel() * t.element_size() for t in graph.hop2 + graph.hop3)
    fits = curvprune.neural_curvature(chain, x, granularity="auto", memory_budget=built)
    assert fits.granularity == "neuron"
    over = curvprune.neural_curvature(chain, x, granularity="auto", memory_budget=built - 1)
    assert over.granularity == "channel"
    # Asked for the neuron graph explicitly, the same budget is refused before the build.
    exact = curvprune.neural_curvature(chain, x, granularity="neuron", memory_budget=built)
    assert exact.granularity == "neuron"
    with pytest.raises(ValueError, match=r"hop\) tables need .* over memory_budget"):
        curvprune.neural_curvature(chain, x, granularity="neuron", memory_budget=built - 1)


def test_iterable_calibration_equals_one_batch():
    # float64, so that the forward pass rounds the same for any batch size.
    model = MODELS["residual"][0]().double()
    x = _inputs((3, 8, 8), batch=4).double()
    whole = curvprune.neural_curvature(model, x, granularity="channel")
    parts = curvprune.neural_curvature(model, [x[:1], x[1:]], granularity="channel")
    for name in whole.kappa:
        assert torch.allclose(whole.kappa[name], parts.kappa[name], rtol=0, atol=1e-12)
    assert parts.num_examples == 4


# --------------------------------------------------------------------------------------------
# Bad input and untraceable models
# --------------------------------------------------------------------------------------------


def test_halo_windows_unfold_and_talking_heads():
    model = MODELS["halo"][0]()
    graph = _trace(model, _inputs((3, 8, 8)))
    names = [n for n, _ in graph.modules]
    assert names == ["stem.weight", "q.weight", "kv.weight", "proj.weight", "cols.weight",
                     "fc.weight"]
    assert graph.unscored == ["rel", "talk"]  # constants and attention logits: no channel
    stem, q, kv = (graph.module_outputs[names.index(f"{n}.weight")] for n in ("stem", "q", "kv"))
    # proj input channel c (head c // 2, dim c % 2) is value channel 4 (c // 2) + 2 + c % 2,
    # through the padded, overlapping windows of Tensor.unfold
    nodes, channels = graph.module_inputs[names.index("proj.weight")]
    expected = torch.tensor([kv + 4 * (c // 2) + 2 + c % 2 for c in range(4)])
    assert torch.equal(nodes[channels.argsort()], expected)
    # queries and keys only weigh the mixing: no out-edges
    sinks = torch.tensor(list(range(q, q + 4)) + [kv + 4 * h + d for h in (0, 1) for d in (0, 1)])
    assert not torch.isin(sinks, graph.src).any()
    # im2col: feature f of a window is channel f // 9 of the stem (zero padding is no channel)
    nodes, channels = graph.module_inputs[names.index("cols.weight")]
    assert channels.numel() == 36 and torch.equal(nodes[channels.argsort()],
                                                  stem + torch.arange(36) // 9)
    sel = graph.module == names.index("cols.weight")
    w = model.cols.weight.detach().double().view(3, 4, 9)
    o, u = graph.dst[sel] - graph.module_outputs[names.index("cols.weight")], graph.src[sel] - stem
    assert torch.allclose(graph.length[sel], 1.0 / w.pow(2).sum(2).sqrt()[o, u])
    # unscored layers get no curvature: they are not pruned, as unused layers
    result = curvprune.neural_curvature(model, _inputs((3, 8, 8)), granularity="channel")
    assert set(result.kappa) == set(names)


def test_conv1d_on_tokens_is_a_layer():
    model = MODELS["tokens1d"][0]()
    graph = _trace(model, _inputs((3, 4, 4)))
    names = [n for n, _ in graph.modules]
    assert names == ["stem.weight", "mix.weight", "dw.weight", "fc.weight"]
    stem, mix = graph.module_outputs[0], graph.module_outputs[1]
    sel = graph.module == 1
    norms = model.mix.weight.detach().double().pow(2).sum(2).sqrt()
    o, u = graph.dst[sel] - mix, graph.src[sel] - stem
    assert sel.sum() == 6 * 4 and torch.allclose(graph.length[sel], 1.0 / norms[o, u])
    dw = graph.module == 2  # depthwise: channel c -> channel c only
    assert torch.equal(graph.src[dw] - mix, graph.dst[dw] - graph.module_outputs[2])


def test_einsum_attention_carries_value_channels():
    model = MODELS["einsum"][0]()
    graph = _trace(model, _inputs((3, 4, 4)))
    names = [n for n, _ in graph.modules]
    assert names == ["stem.weight", "qkv.weight", "proj.weight", "fc.weight"]
    qkv = graph.module_outputs[1]
    nodes, channels = graph.module_inputs[names.index("proj.weight")]
    assert torch.equal(nodes[channels.argsort()], torch.arange(qkv + 8, qkv + 12))
    assert not torch.isin(torch.arange(qkv, qkv + 8), graph.src).any()  # q, k: no out-edges


def test_additive_attention_weighs_tokens_of_the_query():
    model = MODELS["additive"][0]()
    graph = _trace(model, _inputs((3, 4, 4)))
    names = [n for n, _ in graph.modules]
    assert names == ["stem.weight", "q.weight", "k.weight", "proj.weight", "fc.weight"]
    q, k = graph.module_outputs[1], graph.module_outputs[2]
    merge = next(s for s in graph.sets if s.kind == "merge")  # g * k: channel c of q and of k
    into = (graph.dst >= merge.start) & (graph.dst < merge.start + merge.count)
    pairs = {(int(a), int(b) - merge.start) for a, b in zip(graph.src[into], graph.dst[into])}
    assert pairs == {(q + c, c) for c in range(4)} | {(k + c, c) for c in range(4)}
    nodes, channels = graph.module_inputs[names.index("proj.weight")]
    assert torch.equal(nodes[channels.argsort()], torch.arange(merge.start, merge.start + 4))


def test_outlook_fold_blur_and_constant_query():
    model = MODELS["outlook"][0]()
    graph = _trace(model, _inputs((3, 6, 6)))
    names = [n for n, _ in graph.modules]
    assert names == ["stem.weight", "v.weight", "attn.weight", "proj.weight", "k.weight",
                     "fc.weight"]
    assert graph.unscored == ["q"]
    v, attn, proj, k = (graph.module_outputs[names.index(f"{n}.weight")]
                        for n in ("v", "attn", "proj", "k"))
    # v's channels go through unfold, the outlook weights and fold to proj unchanged
    nodes, channels = graph.module_inputs[names.index("proj.weight")]
    assert torch.equal(nodes[channels.argsort()], torch.arange(v, v + 4))
    # and through the blur filter and the class attention to the head
    nodes, channels = graph.module_inputs[names.index("fc.weight")]
    assert torch.equal(nodes[channels.argsort()], torch.arange(proj, proj + 4))
    sinks = torch.cat([torch.arange(attn, attn + 81), torch.arange(k, k + 4)])
    assert not torch.isin(sinks, graph.src).any()  # attention weights and keys: no out-edges


class ChannelConv1d(nn.Module):
    """ECA: a Conv1d across the channels of a pooled map (channels laid out as positions)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        y = self.eca(x.mean((2, 3), keepdim=True).squeeze(-1).transpose(-1, -2))
        x = x * torch.sigmoid(y.transpose(-1, -2).unsqueeze(-1))
        return self.fc(x.mean((2, 3)))


class SpatialGate(nn.Module):
    """CBAM's spatial gate: a conv on channel statistics (mean and max over channels)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.spatial = nn.Conv2d(2, 1, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        x = x * torch.sigmoid(self.spatial(s))
        return self.fc(x.mean((2, 3)))


class LogitsIntoChannels(nn.Module):
    """Token-by-token similarities added to the channels: not attention, not traceable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, 4 tokens, 4 channels]
        return self.fc((t + t @ t.transpose(1, 2)).mean(1))


class ChannelEinsum(nn.Module):
    """Cross-covariance of channels (XCiT-style, by einsum): channels mix by data."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, 4 tokens, 4 channels]
        mixed = torch.einsum("bnc,bcd->bnd", t, torch.einsum("bnc,bnd->bcd", t, t).softmax(-1))
        return self.fc(mixed.mean(1))


@pytest.mark.parametrize("cls, named", [
    (ChannelEinsum, "einsum"),
    (ChannelConv1d, "eca convolves channels laid out as positions"),
    (SpatialGate, "spatial reads no traced channel"),
    (LogitsIntoChannels, "of channels and attention weights"),
])
def test_layers_and_merges_without_channels_stay_untraceable(cls, named):
    torch.manual_seed(0)
    with pytest.raises(UntraceableModel) as info:
        _trace(cls(), _inputs((3, 6, 6)))
    assert any(named in f for f in info.value.functions), info.value.functions


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.fft.fft2(self.conv(x)).abs()
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_is_named():
    with pytest.raises(UntraceableModel, match="fft2") as info:
        curvprune.neural_curvature(Spectral(), _inputs((3, 8, 8)), granularity="channel")
    assert info.value.functions == ["fft_fft2"] or "fft2" in " ".join(info.value.functions)


def test_prune_model_falls_back_to_magnitude_with_a_warning():
    torch.manual_seed(0)
    model = Spectral()
    with pytest.warns(UserWarning, match="Spectral.*magnitude"):
        report = curvprune.prune_model(model, _inputs((3, 8, 8)), 0.5, granularity="channel")
    assert report.fallback.startswith("magnitude") and report.result is None
    w = model.conv.weight_orig.detach().abs().flatten()
    fc = model.fc.weight_orig.detach().abs().flatten()
    everything = torch.cat([w, fc])
    threshold = everything.sort().values[len(everything) // 2 - 1]
    kept = torch.cat([model.conv.weight_mask.flatten(), model.fc.weight_mask.flatten()])
    assert int((kept == 0).sum()) == len(everything) // 2
    assert (everything[kept == 0] <= threshold).all()


def test_half_precision_model_is_scored_in_float64():
    model = MODELS["residual"][0]().half()
    x = _inputs((3, 8, 8)).half()
    try:
        model(x)
    except RuntimeError:  # some builds have no float16 conv on the CPU
        pytest.skip("float16 Conv2d not available on this CPU build")
    result = curvprune.neural_curvature(model, x, granularity="channel")
    graph = _trace(model, x)
    assert graph.activity.dtype == torch.float64 and graph.length.dtype == torch.float64
    expected = channel_reference_curvature(graph, 0.9)
    kappa, _ = score_channel_edges(graph, channel_distances(graph), 0.9)
    layer = graph.module >= 0
    assert (kappa[layer] - expected[layer]).abs().max() <= 1e-9
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(k.dtype == torch.float64 for k in result.kappa.values())


@pytest.mark.parametrize("bad, error, message", [
    (torch.randn(2, 3, 5), ValueError, "rejects calibration inputs"),
    (torch.randint(0, 3, (2, 3, 8, 8)), TypeError, "floating point"),
    (torch.full((2, 3, 8, 8), math.nan), ValueError, "NaN"),
])
def test_bad_calibration(bad, error, message):
    model = MODELS["residual"][0]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        curvprune.neural_curvature(model, bad, granularity="channel")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_unused_parameters_and_buffers_are_ignored():
    model = MODELS["chain"][0]()
    model.unused = nn.Linear(3, 3)
    model.register_buffer("counter", torch.zeros(1))
    result = curvprune.neural_curvature(model, _inputs((3, 8, 8)), granularity="channel")
    assert "unused.weight" not in result.kappa and set(result.kappa) == {
        "c1.weight", "c2.weight", "fc.weight"}


def test_warnings_are_not_raised_for_traceable_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvprune.prune_model(MODELS["dense"][0](), _inputs((3, 8, 8)), 0.3,
                              granularity="channel")


# --------------------------------------------------------------------------------------------
# Random networks (hypothesis): every traced construct, zero weights, dead channels
# --------------------------------------------------------------------------------------------

from conftest import profile_examples  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_BLOCKS = ["conv", "grouped", "depthwise", "residual", "concat", "gate", "window"]


class RandomNet(nn.Module):
    """A random channel DAG built from a list of block kinds (see :data:`_BLOCKS`)."""

    def __init__(self, blocks, widths, act, head_hidden, pool, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.act = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[act]
        self.pool = pool
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.kinds = list(blocks)
        self.layers = nn.ModuleList()
        c = widths[0]
        for kind, w in zip(blocks, widths[1:]):
            if kind == "conv":
                mods = nn.ModuleList([nn.Conv2d(c, w, 3, padding=1, stride=1)])
                c = w
            elif kind == "grouped":
                g = 2 if c % 2 == 0 else 1
                mods = nn.ModuleList([nn.Conv2d(c, 2 * g, 1, groups=g), nn.BatchNorm2d(2 * g)])
                c = 2 * g
            elif kind == "depthwise":
                mods = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1, groups=c)])
            elif kind == "residual":
                mods = nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(w, c, 3, padding=1)])
            elif kind == "concat":
                mods = nn.ModuleList([nn.Conv2d(c, w, 3, padding=1)])
                c = c + w
            elif kind == "gate":
                mods = nn.ModuleList([nn.Conv2d(c, max(1, w // 2), 1),
                                      nn.Conv2d(max(1, w // 2), c, 1)])
            else:  # window: a Linear over channels on tokens regrouped into windows
                mods = nn.ModuleList([nn.Linear(c, c)])
            self.layers.append(mods)
        self.fc1 = nn.Linear(c, head_hidden) if head_hidden else None
        self.fc2 = nn.Linear(head_hidden or c, 3)

    def forward(self, x):
        x = self.act(self.stem(x))
        for kind, mods in zip(self.kinds, self.layers):
            if kind in ("conv", "depthwise"):
                x = self.act(mods[0](x))
            elif kind == "grouped":
                x = self.act(mods[1](mods[0](x)))
            elif kind == "residual":
                x = self.act(x + mods[1](self.act(mods[0](x))))
            elif kind == "concat":
                x = torch.cat([x, self.act(mods[0](x))], 1)
            elif kind == "gate":
                s = torch.sigmoid(mods[1](F.relu(mods[0](x.mean((2, 3), keepdim=True)))))
                x = x * s
            else:
                b, c, h, w = x.shape
                t = x.permute(0, 2, 3, 1).reshape(b, 2, h // 2, 2, w // 2, c)
                t = t.permute(0, 1, 3, 2, 4, 5).reshape(b * 4, (h // 2) * (w // 2), c)
                t = self.act(mods[0](t)).reshape(b, 2, 2, h // 2, w // 2, c)
                x = t.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        x = F.adaptive_avg_pool2d(x, 1) if self.pool == "avg" else F.adaptive_max_pool2d(x, 1)
        x = x.flatten(1)
        if self.fc1 is not None:
            x = self.act(self.fc1(x))
        return self.fc2(x)


@st.composite
def random_nets(draw):
    blocks = draw(st.lists(st.sampled_from(_BLOCKS), min_size=1, max_size=4))
    widths = draw(st.lists(st.integers(2, 5), min_size=len(blocks) + 1,
                           max_size=len(blocks) + 1))
    return dict(blocks=blocks, widths=widths, act=draw(st.sampled_from(["relu", "gelu", "tanh"])),
                head_hidden=draw(st.sampled_from([0, 4])), pool=draw(st.sampled_from(["avg",
                                                                                       "max"])),
                seed=draw(st.integers(0, 10_000)),
                zero=draw(st.sampled_from([0.0, 0.3])),
                alpha=draw(st.sampled_from([0.0, 0.5, 0.9, 0.3])))


@settings(max_examples=profile_examples(30), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_nets())
def test_random_networks_engine_equals_reference(spec):
    spec = dict(spec)
    zero, alpha = spec.pop("zero"), spec.pop("alpha")
    model = RandomNet(**spec).eval()
    _perturb(model, seed=spec["seed"], zero_fraction=zero)
    graph = _trace(model, _inputs((3, 4, 4), seed=spec["seed"]))
    kappa, _ = score_channel_edges(graph, channel_distances(graph), alpha)
    expected = channel_reference_curvature(graph, alpha)
    layer = graph.module >= 0
    finite = torch.isfinite(kappa[layer])
    assert finite.all()
    diff = (kappa[layer] - expected[layer]).abs().max().item() if layer.any() else 0.0
    assert diff <= 1e-9, f"{spec}: max |engine - reference| = {diff:.3e}"


# --------------------------------------------------------------------------------------------
# Needed distances only (issue 16 item 1)
# --------------------------------------------------------------------------------------------


def _needed_pairs(graph):
    """Every (a, b) a layer edge's measures read: a in {i} + in(i), b in {j} + out(j)."""
    src, dst = graph.src.tolist(), graph.dst.tolist()
    ins = {v: {v} for v in range(graph.num_nodes)}
    outs = {v: {v} for v in range(graph.num_nodes)}
    for u, v in zip(src, dst):
        ins[v].add(u)
        outs[u].add(v)
    pairs = set()
    for e in torch.nonzero(graph.module >= 0).squeeze(1).tolist():
        i, j = src[e], dst[e]
        pairs.update((a, b) for a in ins[i] for b in outs[j])
    a, b = zip(*sorted(pairs))
    return torch.tensor(a), torch.tensor(b)


# The level-by-level min-plus path chooses, per row of each product, a dense product or an
# expansion of the finite entries; these force one or the other (and the default mixes them).
_PRODUCTS = {"dense": 10**18, "expanded": 0, "mixed": _channel_distances._SPARSE_COST}


@pytest.mark.parametrize("products", sorted(_PRODUCTS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_needed_distances_equal_all_pairs_on_every_needed_pair(name, products, monkeypatch):
    monkeypatch.setattr(_channel_distances, "_SPARSE_COST", _PRODUCTS[products])
    build, shape = MODELS[name]
    model = build()
    _perturb(model, seed=len(name), zero_fraction=0.2)
    graph = _trace(model, _inputs(shape))
    dense = channel_distances(graph)
    # block=1: one source per window; 7: a few sources; 1 << 25: all sources in one window.
    for block in (1, 7, 1 << 25):
        needed = needed_distances(graph, block=block)
        a, b = _needed_pairs(graph)
        assert needed.num_pairs == a.numel()  # exactly the needed pairs are stored
        got = needed[a, b]
        assert torch.isfinite(got).all()  # a path k -> i -> j -> m always exists
        assert torch.equal(got, dense[a, b])  # bitwise
    # Pairs not stored read +inf, whatever their true distance.
    stored = set(zip(a.tolist(), b.tolist()))
    other = [(u, v) for u in range(graph.num_nodes) for v in range(graph.num_nodes)
             if (u, v) not in stored][:50]
    if other:
        u, v = (torch.tensor(x) for x in zip(*other))
        assert torch.isinf(needed[u, v]).all()
    assert needed_distance_bytes(graph) == 16 * a.numel() < 8 * graph.num_nodes ** 2


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("tolerance", [0.0, 1e-14, 1e-3])
def test_curvature_on_needed_distances_is_identical(name, tolerance):
    build, shape = MODELS[name]
    model = build()
    _perturb(model, seed=len(name) + 1, zero_fraction=0.2)
    graph = _trace(model, _inputs(shape, batch=3))
    dense = channel_edge_bounds(graph, channel_distances(graph), 0.9, tolerance=tolerance)
    sparse = channel_edge_bounds(graph, needed_distances(graph), 0.9, tolerance=tolerance)
    for x, y in zip(dense, sparse):
        assert torch.equal(x, y)
    if tolerance == 0.0:
        expected = channel_reference_curvature(graph, 0.9)
        layer = graph.module >= 0
        assert (dense[0][layer] - expected[layer]).abs().max() <= 1e-9


def test_needed_distances_refused_over_budget_before_dijkstra(monkeypatch):
    graph = _trace(MODELS["residual"][0](), _inputs((3, 8, 8)))
    need = needed_distance_bytes(graph)

    def no_dijkstra(*args, **kwargs):
        raise AssertionError("Dijkstra ran")

    monkeypatch.setattr(scipy.sparse.csgraph, "dijkstra", no_dijkstra)
    monkeypatch.setattr(_channel_distances, "needed_pair_distances", no_dijkstra)
    with pytest.raises(ValueError, match="over memory_budget") as info:
        needed_distances(graph, memory_budget=need - 1)
    assert "Fewer calibration images" in str(info.value)
    monkeypatch.undo()
    assert needed_distances(graph, memory_budget=need).nbytes == need


def _graph(src, dst, length, module, num_nodes):
    """A ChannelGraph with the given edges only (what the distances read)."""
    return ChannelGraph(
        sets=[NodeSet("nodes", "layer", 0, num_nodes)], src=torch.tensor(src),
        dst=torch.tensor(dst), length=torch.tensor(length, dtype=torch.float64),
        module=torch.tensor(module), modules=[], weight_edges=[], module_inputs=[],
        module_outputs=[], inputs=torch.zeros(num_nodes, dtype=torch.bool),
        outputs=torch.zeros(num_nodes, dtype=torch.bool),
        activity=torch.zeros(1, num_nodes, dtype=torch.float64))


def _random_dag(seed, num_nodes=60, density=0.15):
    """A random DAG in topological order: parallel routes, duplicate (summed) edges, lengths
    over 16 orders of magnitude and exact ties (equal sums reached by different routes and
    roundings), about a third of the edges merges (no layer)."""
    rng = np.random.default_rng(seed)
    src, dst = np.nonzero(np.triu(rng.random((num_nodes, num_nodes)) < density, 1))
    dup = rng.random(src.size) < 0.05
    src, dst = np.concatenate([src, src[dup]]), np.concatenate([dst, dst[dup]])
    kind = rng.integers(0, 3, src.size)
    length = np.where(kind == 0, 10.0 ** rng.uniform(-8, 8, src.size),
                      np.where(kind == 1, rng.choice([0.1, 0.2, 0.3, 1.0, 1 / 3], src.size),
                               rng.uniform(0.5, 2.0, src.size)))
    module = np.where(rng.random(src.size) < 0.35, -1, 0)
    return _graph(src.tolist(), dst.tolist(), length.tolist(), module.tolist(), num_nodes)


@pytest.mark.parametrize("products", sorted(_PRODUCTS))
@pytest.mark.parametrize("seed", range(4))
def test_needed_distances_on_random_dags_are_bitwise_dijkstra(seed, products, monkeypatch):
    monkeypatch.setattr(_channel_distances, "_SPARSE_COST", _PRODUCTS[products])
    graph = _random_dag(seed, num_nodes=40 + 20 * seed, density=0.05 + 0.05 * (seed % 3))
    dense = channel_distances(graph)
    a, b = _needed_pairs(graph)
    for block in (1, 50, 1 << 25):
        needed = needed_distances(graph, block=block)
        assert torch.equal(needed.keys, a * graph.num_nodes + b)
        assert torch.equal(needed[a, b], dense[a, b])  # bitwise, +inf where no path
        old = needed_distances(graph, block=block, _by_levels=False)  # the Dijkstra windows
        assert torch.equal(needed.values, old.values)


def test_needed_distances_off_topological_order_use_dijkstra():
    """Node ids that are not a topological order (no windows): the Dijkstra path, same
    values."""
    graph = _random_dag(3, num_nodes=50)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(graph.num_nodes))
    shuffled = _graph(perm[graph.src].tolist(), perm[graph.dst].tolist(),
                      graph.length.tolist(), graph.module.tolist(), graph.num_nodes)
    assert not bool((shuffled.src < shuffled.dst).all())
    a, b = _needed_pairs(shuffled)
    assert torch.equal(needed_distances(shuffled)[a, b], channel_distances(shuffled)[a, b])


@settings(max_examples=profile_examples(20), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_nets())
def test_needed_distances_on_random_networks_equal_all_pairs(spec):
    spec = dict(spec)
    zero, _ = spec.pop("zero"), spec.pop("alpha")
    model = RandomNet(**spec).eval()
    _perturb(model, seed=spec["seed"], zero_fraction=zero)
    graph = _trace(model, _inputs((3, 4, 4), seed=spec["seed"]))
    a, b = _needed_pairs(graph)
    assert torch.equal(needed_distances(graph)[a, b], channel_distances(graph)[a, b])


# A few of the zoo's channel graphs (tests/test_matrix.py): SE gates and depthwise convs,
# windows and attention, concatenation, grouped convs, channel shuffle, class tokens.
_ZOO_GRAPHS = ["timm/efficientnet_b0", "timm/swin_tiny_patch4_window7_224", "timm/densenet121",
               "torchvision/resnext50_32x4d", "torchvision/shufflenet_v2",
               "timm/deit_tiny_distilled_patch16_224", "timm/mobilevit_xxs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _ZOO_GRAPHS)
def test_needed_distances_on_zoo_graphs_equal_all_pairs(name):
    from curvprune import zoo

    torch.manual_seed(0)
    model = zoo.create(name).eval()
    graph = _trace(model, zoo.example_input(name, batch=1))
    a, b = _needed_pairs(graph)
    needed = needed_distances(graph)
    assert torch.equal(needed.keys, a * graph.num_nodes + b)
    assert torch.equal(needed.values, channel_distances(graph)[a, b])


# --------------------------------------------------------------------------------------------
# Activities of later batches without tracing them (channel_activity)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channel_activity_equals_a_full_trace(name):
    """Another batch's activities, measured by replaying the trace's measurements, are bitwise
    those of tracing that batch, for a batch of another size too; the replay really runs on
    the convolutional models (the batch stays dimension 0 of every measured tensor; window
    attention folds it into the windows, so those models are traced in full)."""
    build, shape = MODELS[name]
    model = build()
    graph = _trace(model, _inputs(shape, batch=3, seed=1))
    if name in ("chain", "residual", "dense", "mobile", "standardised"):
        assert graph.replay is not None
    for batch, seed in ((3, 2), (1, 3), (5, 4)):
        x = _inputs(shape, batch=batch, seed=seed)
        with scoring_mode(model):
            got = channel_activity(model, x, graph)
        assert torch.equal(got, _trace(model, x).activity), (name, batch)


def test_channel_activity_refuses_another_structure():
    """A batch the model rejects, or one that gives another graph, is traced in full and
    refused with the tracer's message."""
    build, _ = MODELS["chain"]
    model = build()
    graph = _trace(model, _inputs((3, 8, 8)))
    with scoring_mode(model), pytest.raises(ValueError, match="rejects calibration inputs"):
        channel_activity(model, _inputs((3, 6, 6)), graph)
    other = _trace(model, _inputs((3, 8, 8)))
    other.sets = other.sets[:-1]  # stands for a model whose structure changed
    with scoring_mode(model), pytest.raises(ValueError, match="another channel graph"):
        channel_activity(model, _inputs((3, 8, 8)), dataclasses.replace(other, replay=None))


def test_channel_curvature_over_batches_equals_one_batch_traced_per_batch():
    """Scoring over several batches (later ones replayed) equals scoring where every batch's
    activities come from a full trace."""
    build, shape = MODELS["residual"]
    model = build()
    batches = [_inputs(shape, batch=2, seed=s) for s in (1, 2, 3)]
    replayed = curvprune.neural_curvature(model, batches, granularity="channel", tolerance=0.0)
    graph = _trace(model, batches[0])
    activity = torch.cat([_trace(model, b).activity for b in batches])
    traced = channel_edge_bounds(dataclasses.replace(graph, activity=activity),
                                 needed_distances(graph), 0.9, tolerance=0.0)[0]
    layer = graph.module >= 0
    assert torch.equal(replayed.edge_kappa[layer], traced[layer])
    assert replayed.channel_graph.replay is None  # the result keeps the structure only


# --------------------------------------------------------------------------------------------
# The structure traced on two examples, every example's activities replayed
# --------------------------------------------------------------------------------------------


def _same_graph(a, b) -> bool:
    """Equal structure, lengths and weight-to-edge maps (everything but the activities)."""
    return (a.same_structure(b) and torch.equal(a.length, b.length)
            and torch.equal(a.module, b.module) and torch.equal(a.inputs, b.inputs)
            and torch.equal(a.outputs, b.outputs)
            and all(torch.equal(x, y) for p, q in zip(a.weight_edges, b.weight_edges)
                    for x, y in zip(p, q))
            and all(torch.equal(x, y) for p, q in zip(a.module_inputs, b.module_inputs)
                    for x, y in zip(p, q)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_structure_of_two_examples_is_the_batchs(name):
    """The graph traced on the first two examples of a batch is the one traced on the whole
    batch (the tracer reads every structure from example 0; one dead channel more or less on
    an example changes no node and no edge: lengths come from the weights)."""
    build, shape = MODELS[name]
    model = build()
    x = _inputs(shape, batch=5, seed=7)
    x[1] = 0.0  # an example with (almost) every channel dead
    assert _same_graph(_trace(model, x[:2]), _trace(model, x))
    assert _same_graph(_trace(model, x[:1]), _trace(model, x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channel_curvature_traces_two_examples_and_equals_full_traces(name, monkeypatch):
    """neural_curvature traces 2 examples whatever the batch, and its curvature is bitwise the
    one computed from full traces of every batch (today's pipeline before the change)."""
    import curvprune.graphs.channel as channel_module

    build, shape = MODELS[name]
    model = build()
    batches = [_inputs(shape, batch=4, seed=11), _inputs(shape, batch=3, seed=12)]
    traced_sizes = []
    real_trace = channel_module.trace_channels

    def counting(model, inputs, device=None):
        traced_sizes.append(inputs.shape[0])
        return real_trace(model, inputs, device)

    monkeypatch.setattr(channel_module, "trace_channels", counting)
    got = curvprune.neural_curvature(model, batches, granularity="channel", tolerance=0.0)
    replayed = name in ("chain", "residual", "dense", "mobile", "standardised")
    if replayed:
        assert traced_sizes == [2]  # the replay covers all 7 examples
    monkeypatch.setattr(channel_module, "trace_channels", real_trace)
    graph = _trace(model, batches[0])
    activity = torch.cat([_trace(model, b).activity for b in batches])
    assert torch.equal(got.channel_graph.activity, activity)
    expected = channel_edge_bounds(dataclasses.replace(graph, activity=activity),
                                   needed_distances(graph), 0.9, tolerance=0.0)[0]
    layer = graph.module >= 0
    assert torch.equal(got.edge_kappa[layer], expected[layer])
    assert _same_graph(got.channel_graph, graph)


def test_replay_record_keeps_one_node_per_channel():
    """A conv feature map's replay record is one node per channel (its spatial dims are
    size 1), not one per position: the record is as small as the graph, whatever the input
    size."""
    build, shape = MODELS["residual"]
    graph = _trace(build(), _inputs(shape, batch=2))
    maps = [(nodes, full) for _, _, nodes, full in graph.replay["measures"] if len(full) == 3]
    assert maps
    for nodes, full in maps:
        assert nodes.shape[1:] == (1, 1) and nodes.shape[0] in (1, full[0])


@pytest.mark.parametrize("chunk", [1, 200])
def test_replay_measured_a_few_examples_at_a_time_is_bitwise_the_same(chunk, monkeypatch):
    """Measuring a replayed tensor one example at a time (or a part of one) gives bitwise the
    activities of one measurement on the whole batch: each mean sums the same elements in the
    same order."""
    from curvprune.graphs import _trace as trace_module

    build, shape = MODELS["mobile"]
    model = build()
    graph = _trace(model, _inputs(shape, batch=2))
    x = _inputs(shape, batch=6, seed=5)
    with scoring_mode(model):
        whole = channel_activity(model, x, graph)
        monkeypatch.setattr(trace_module, "_MEASURE_CHUNK", chunk)
        assert torch.equal(channel_activity(model, x, graph), whole)
    assert torch.equal(whole, _trace(model, x).activity)


@pytest.mark.parametrize("name", ["residual", "mobile", "vit_fused"])
def test_channel_measures_without_padded_length_tables_are_bitwise_the_same(name):
    """ChannelProblems keeps each edge's slot instead of padded length tables; its measures
    (support, masses, reach) are bitwise those of node_measures on the padded lengths, on
    examples with dead channels too; the slots and tables are those of a per-node loop."""
    from curvprune.transport import node_measures, padded_neighbours
    from curvprune.transport.measures import _padded_slots

    build, shape = MODELS[name]
    x = _inputs(shape, batch=3, seed=3)
    x[2] = 0.0
    graph = _trace(build(), x)
    n = graph.num_nodes
    for keys, others in ((graph.dst, graph.src), (graph.src, graph.dst)):
        table = padded_neighbours(keys, others, n)
        slot, width = _padded_slots(keys, n)
        assert width == table.shape[1] == int(torch.bincount(keys, minlength=n).max())
        for v in range(n):  # row v: v's values in their order, then padding
            mine = torch.nonzero(keys == v).squeeze(1)
            assert torch.equal(slot[mine], v * width + torch.arange(mine.numel()))
            assert torch.equal(table[v, :mine.numel()], others[mine])
            assert bool((table[v, mine.numel():] == -1).all())
        lengths = padded_neighbours(keys, graph.length, n, fill=0.0)
        for activity in graph.activity:
            want = node_measures(table, activity, lengths)
            got = node_measures(table, activity, graph.length, slot=slot)
            for field in ("table", "mass", "has", "reach"):
                assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_channel_graph_over_budget_is_refused_before_distances(monkeypatch):
    """A channel graph whose distances plus edge-problem tables exceed memory_budget is refused
    after tracing two examples, before the distances (or any problem) are built, with a
    message that gives the sizes and what would fit; the problems alone over the budget are
    refused before the pairs are even counted."""
    import curvprune.graphs.channel as channel_module
    from curvprune.graphs.channel import channel_problem_bytes

    build, shape = MODELS["residual"]
    model = build()
    x = _inputs(shape, batch=6)
    graph = _trace(model, x[:2])
    reserve = channel_problem_bytes(graph)
    pairs = needed_distance_bytes(graph)
    # ChannelProblems really holds the index tables and distance blocks counted, and one
    # layer's padded neighbour tables (a neighbour, a mass and a position per slot: 24 bytes)
    # are the largest counted; the layer sets are checked against a per-node loop.
    problems = ChannelProblems(graph, needed_distances(graph))
    sets = problems.sets
    held = sum(t.numel() * t.element_size() for t in (
        problems.scored, problems.length, *sets.src, *sets.dst, *sets.sources, *sets.targets,
        *sets.near, *sets.far, sets.in_lists.order, sets.in_lists.degree, sets.in_lists.start,
        sets.out_lists.order, sets.out_lists.degree, sets.out_lists.start,
        *[t for block in problems.blocks for t in (block.d_kj, block.d_im, block.d_km)]))
    widest = 0
    for g, k in enumerate(problems.layers):
        mine = graph.module == k
        sources = sorted(set(graph.src[mine].tolist()))
        targets = sorted(set(graph.dst[mine].tolist()))
        near = sorted({u for v in sources for u in graph.src[graph.dst == v].tolist()})
        far = sorted({u for v in targets for u in graph.dst[graph.src == v].tolist()})
        assert sets.sources[g].tolist() == sources and sets.targets[g].tolist() == targets
        assert sets.near[g].tolist() == near and sets.far[g].tolist() == far
        slots = (len(sources) * max(int((graph.dst == v).sum()) for v in sources)
                 + len(targets) * max(int((graph.src == v).sum()) for v in targets))
        built = (sets.in_lists.table(sets.sources[g], graph.src)[0].numel()
                 + sets.out_lists.table(sets.targets[g], graph.dst)[0].numel())
        assert built == slots
        widest = max(widest, 24 * slots)
    assert reserve == held + widest
    calls = []
    monkeypatch.setattr(channel_module, "_needed_structure",
                        lambda g, real=channel_module._needed_structure: calls.append(1)
                        or real(g))
    monkeypatch.setattr(_channel_distances, "needed_pair_distances",
                        lambda *a, **k: pytest.fail("distances computed over budget"))
    budget = reserve + pairs - 1
    with pytest.raises(ValueError, match=r"over memory_budget=.*Fewer calibration images, a "
                       r"smaller input or a tolerance would not help.*") as info:
        curvprune.neural_curvature(model, x, granularity="channel", memory_budget=budget)
    assert calls == [1] and f"memory_budget={reserve + pairs} (bytes)" in str(info.value)
    with pytest.raises(ValueError, match=r"index tables and one layer's measures") as info:
        curvprune.neural_curvature(model, x, granularity="channel", memory_budget=reserve - 1)
    assert "node pairs" not in str(info.value) and calls == [1]  # refused before counting
    monkeypatch.undo()
    fits = curvprune.neural_curvature(model, x, granularity="channel",
                                      memory_budget=reserve + pairs, tolerance=0.0)
    assert fits.num_examples == 6


@pytest.mark.parametrize("name", ["residual", "mobile", "vit_fused"])
def test_layer_problems_are_the_whole_graph_tables_renumbered(name):
    """A layer's edge problem gathers the neighbour tables of its own source and target
    channels: each row is that node's row of the all-node padded table, cut to the widest of
    the layer's nodes, each slot holds the other end of the edge it names; the layer's
    distance blocks are the all-pairs distances of its node sets, and its measures, read
    back through the sets' numbering, are bitwise the all-node measures of its nodes."""
    from curvprune.transport import node_measures, padded_neighbours

    build, shape = MODELS[name]
    x = _inputs(shape, batch=2, seed=5)
    x[1] = 0.0
    graph = _trace(build(), x)
    n = graph.num_nodes
    dense = channel_distances(graph)
    problems = ChannelProblems(graph, dense)
    sets = problems.sets
    assert problems.num_groups == len(set(graph.module[graph.module >= 0].tolist())) > 1
    for lists, nodes, keys, others, support in (
            (sets.in_lists, sets.sources, graph.dst, graph.src, sets.near),
            (sets.out_lists, sets.targets, graph.src, graph.dst, sets.far)):
        whole = padded_neighbours(keys, others, n)
        lengths = padded_neighbours(keys, graph.length, n, fill=0.0)
        for g in range(problems.num_groups):
            table, slot, edge = lists.table(nodes[g], others)
            width = table.shape[1]
            assert width == int(torch.bincount(keys, minlength=n)[nodes[g]].max())
            assert torch.equal(table, whole[nodes[g], :width])
            assert bool((whole[nodes[g], width:] == -1).all())
            assert torch.equal(table.view(-1)[slot], others[edge])
            assert torch.equal(nodes[g][torch.div(slot, width, rounding_mode="floor")],
                               keys[edge])
            for activity in graph.activity:
                problem = problems.edge_problem(g, activity, 0.0)
                got = problem.mu if nodes is sets.sources else problem.nu
                want = node_measures(whole, activity, lengths)
                rows = nodes[g]
                assert torch.equal(got.mass, want.mass[rows, :got.mass.shape[1]])
                assert bool((want.mass[rows, got.mass.shape[1]:] == 0).all())
                assert torch.equal(support[g][got.table.clamp(min=0)][got.mass > 0],
                                   want.table[rows, :got.mass.shape[1]][got.mass > 0])
                assert torch.equal(got.reach, want.reach[rows])
    for g in range(problems.num_groups):
        block = problems.blocks[g]
        assert torch.equal(block.d_kj, dense[sets.near[g][:, None], sets.targets[g]])
        assert torch.equal(block.d_im, dense[sets.sources[g][:, None], sets.far[g]])
        assert torch.equal(block.d_km, dense[sets.near[g][:, None], sets.far[g]])
    # The groups cover the scored edges once each, layer by layer.
    assert torch.equal(torch.sort(problems.scored).values,
                       torch.nonzero(graph.module >= 0).squeeze(1))
    for g, k in enumerate(problems.layers):
        part = problems.scored[problems.offsets[g]:problems.offsets[g + 1]]
        assert bool((graph.module[part] == k).all())
        assert torch.equal(sets.sources[g][sets.src[g]], graph.src[part])
        assert torch.equal(sets.targets[g][sets.dst[g]], graph.dst[part])
        assert torch.equal(problems.length[problems.offsets[g]:problems.offsets[g + 1]],
                           dense[graph.src[part], graph.dst[part]])


def test_needed_distance_lookups_in_any_order_are_the_same(monkeypatch):
    """ChannelDistances sorts large lookups before searching them (faster from cache): the
    values, +inf for pairs not stored included, are those of an unsorted search, in the
    lookup's own order and shape."""
    import curvprune.graphs.channel as channel_module

    build, shape = MODELS["residual"]
    graph = _trace(build(), _inputs(shape, batch=2, seed=2))
    needed = needed_distances(graph)
    n = graph.num_nodes
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, n, (40, 300), generator=generator)
    cols = torch.randint(0, n, (40, 300), generator=generator)
    stored = needed.keys[torch.randint(0, needed.num_pairs, (3000,), generator=generator)]
    rows[:10] = (stored // n).view(10, 300)
    cols[:10] = (stored % n).view(10, 300)
    monkeypatch.setattr(channel_module, "_SORT_LOOKUPS", 1 << 40)
    plain = needed[rows, cols]
    monkeypatch.setattr(channel_module, "_SORT_LOOKUPS", 0)
    assert torch.equal(needed[rows, cols], plain)
    assert bool(torch.isfinite(plain[:10]).all()) and bool(torch.isinf(plain[10:]).any())
    dense = channel_distances(graph)
    assert torch.equal(plain[:10], dense[rows[:10], cols[:10]])
