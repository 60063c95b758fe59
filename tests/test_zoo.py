"""The model zoo: every entry builds offline, runs, stays small and survives Torch-Pruning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from curvprune import zoo

NAMES = sorted(zoo.ZOO)
MAX_PARAMS = 150_000
MAX_CHANNEL_PAIRS = 60_000
MAX_WIDTH = 128  # hidden MLP / expansion layers; stems and stages stay <= 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: intra-op threads only add overhead (and spin against each other on a
    busy 2-core machine: 8 s single-threaded against ~60 s with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def channel_pairs(model: nn.Module) -> int:
    """Sum over Conv2d/Linear layers of in_channels * out_channels / groups."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.in_channels * m.out_channels // m.groups
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


def max_width(model: nn.Module) -> int:
    widths = [0]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            widths += [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            widths += [m.in_features, m.out_features]
    return max(widths)


def test_registry_covers_the_families():
    assert len(zoo.ZOO) >= 26
    for name, entry in zoo.ZOO.items():
        assert entry.name == name
        assert name.split("/")[0] in ("timm", "torchvision")
        assert entry.input_size == (3, 32, 32)
        assert entry.num_classes == 10
    families = {e.family for e in zoo.ZOO.values()}
    assert {"classic", "residual", "mobile", "efficientnet", "regnet", "convnext", "densenet",
            "vit", "hybrid"} <= families
    for family in ("residual", "mobile", "efficientnet", "regnet", "convnext", "densenet"):
        libs = {e.name.split("/")[0] for e in zoo.ZOO.values() if e.family == family}
        assert libs == {"timm", "torchvision"}, family


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid names:.*timm/resnet18"):
        zoo.create("resnet18")
    with pytest.raises(ValueError, match="valid names"):
        zoo.example_input("nope")
    with pytest.raises(ValueError, match="valid names"):
        zoo.ignored_layers("nope", nn.Linear(1, 1))


def test_example_input_is_seeded():
    a = zoo.example_input("timm/resnet18", batch=3)
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a, zoo.example_input("timm/resnet18", batch=3))


@pytest.mark.parametrize("name", NAMES)
def test_builds_deterministically_and_runs(name):
    model = zoo.create(name)
    assert not model.training
    x = zoo.example_input(name)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, zoo.ZOO[name].num_classes)
    assert torch.isfinite(y).all()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = zoo.create(name).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, again[key]), key
    heads = zoo.classifier_layers(model)
    assert len(heads) == (2 if "distilled" in name else 1)
    for h in heads:
        assert (h.out_features if isinstance(h, nn.Linear) else h.out_channels) == 10


@pytest.mark.parametrize("name", NAMES)
def test_is_small(name):
    model = zoo.create(name)
    assert n_params(model) < MAX_PARAMS
    assert channel_pairs(model) < MAX_CHANNEL_PAIRS
    assert max_width(model) <= MAX_WIDTH


def test_attention_heads():
    vit = zoo.create("timm/vit_tiny_patch16_224")
    heads = zoo.attention_heads(vit)
    assert set(heads) == {b.attn.qkv for b in vit.blocks}
    assert set(heads.values()) == {2}
    mha = zoo.create("torchvision/vit_b_16")
    assert set(zoo.attention_heads(mha).values()) == {2}
    assert all(isinstance(m, nn.MultiheadAttention) for m in zoo.attention_heads(mha))
    assert zoo.attention_heads(zoo.create("timm/resnet18")) == {}
    for name, count in [("timm/swin_tiny_patch4_window7_224", 4), ("timm/mobilevit_xxs", 2),
                        ("timm/pit_ti_224", 2), ("timm/vit_tiny_r_s16_p8_224", 2)]:
        heads = zoo.attention_heads(zoo.create(name))
        assert len(heads) == count, name
        assert all(isinstance(q, nn.Linear) and q.out_features % (3 * n) == 0
                   for q, n in heads.items())


def test_ignored_layers_are_the_classifier_plus_the_kept_streams():
    for name, entry in zoo.ZOO.items():
        model = zoo.create(name)
        ignored = zoo.ignored_layers(name, model)
        own = set(model.modules())
        assert all(m in own for m in ignored), name
        assert ignored[: len(zoo.classifier_layers(model))] == zoo.classifier_layers(model)
        assert (len(ignored) > len(zoo.classifier_layers(model))) == (entry.keep is not None)
    assert {n for n, e in zoo.ZOO.items() if e.keep is not None} == {
        "timm/swin_tiny_patch4_window7_224", "timm/mixer_s16_224", "timm/pit_ti_224"}


@pytest.mark.parametrize("name", NAMES)
def test_torch_pruning_structured(name):
    model = zoo.create(name)
    x = zoo.example_input(name)
    before = n_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unwrapped-parameter notices (pos_embed, cls_token)
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.3,
            ignored_layers=zoo.ignored_layers(name, model),
            num_heads=zoo.attention_heads(model),
            prune_num_heads=False,
            prune_head_dims=True,
            iterative_steps=1,
            global_pruning=False,
        )
        pruner.step()
    zoo.refresh_after_pruning(model, pruner)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, zoo.ZOO[name].num_classes)
    assert torch.isfinite(y).all()
    assert n_params(model) < before
    for h in zoo.classifier_layers(model):  # the classifier keeps its 10 outputs
        assert (h.out_features if isinstance(h, nn.Linear) else h.out_channels) == 10
