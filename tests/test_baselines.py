"""Baseline criteria: each score checked against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

from curvprune.baselines import (
    magnitude_scores,
    prune_per_row,
    random_scores,
    snip_scores,
    wanda_scores,
)


def small_cnn(groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, dilation=1, groups=groups), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3),
    ).eval()


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(p.requires_grad, p.grad) for p in model.parameters()],
            [m.training for m in model.modules()])


def test_magnitude_is_abs_weight_and_matches_l1_global_pruning():
    model, other = small_cnn(), small_cnn()
    scores = magnitude_scores(model)
    for (module, name), s in scores.items():
        assert torch.equal(s, getattr(module, name).detach().abs())
    params = [(m, "weight") for (m, _) in scores]
    prune.global_unstructured(params, prune.L1Unstructured, importance_scores=scores,
                              amount=0.6)
    other_params = [(m, "weight") for m in other.modules() if isinstance(m, (nn.Linear,
                                                                           nn.Conv2d))]
    prune.global_unstructured(other_params, prune.L1Unstructured, amount=0.6)
    for (m, _), (o, _) in zip(params, other_params):
        assert torch.equal(m.weight_mask, o.weight_mask)


def test_random_scores_are_seeded():
    model = small_cnn()
    a, b, c = random_scores(model, seed=1), random_scores(model, seed=1), random_scores(model,
                                                                                        seed=2)
    for key in a:
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a[key], c[key])
        assert a[key].shape == key[0].weight.shape


def _brute_force_conv_norms(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """sqrt(sum over examples and output positions of the input each weight multiplies)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (conv.kernel_size, conv.stride, conv.dilation,
                                              conv.padding)
    xp = F.pad(x.double(), (pw, pw, ph, ph))
    out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cg = conv.in_channels // conv.groups
    norms = torch.zeros(conv.weight.shape, dtype=torch.float64)
    for o in range(conv.out_channels):
        g = o // (conv.out_channels // conv.groups)
        for i in range(cg):
            for a in range(kh):
                for b in range(kw):
                    total = 0.0
                    for y in range(out_h):
                        for z in range(out_w):
                            v = xp[:, g * cg + i, y * sh + a * dh, z * sw + b * dw]
                            total += float((v ** 2).sum())
                    norms[o, i, a, b] = total ** 0.5
    return norms


@pytest.mark.parametrize("groups", [1, 2])
def test_wanda_matches_brute_force(groups):
    model = small_cnn(groups)
    x = torch.randn(5, 2, 8, 8)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0]))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    before = snapshot(model)
    scores = wanda_scores(model, [x[:2], (x[2:], torch.zeros(3, dtype=torch.long))])
    for (module, _), s in scores.items():
        w = module.weight.detach().abs().double()
        if isinstance(module, nn.Conv2d):
            expected = w * _brute_force_conv_norms(module, inputs[module])
        else:
            expected = w * inputs[module].double().norm(dim=0)[None, :]
        torch.testing.assert_close(s, expected, rtol=1e-10, atol=1e-12)
    after = snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and before[2] == after[2]


def test_snip_matches_backward_and_leaves_model_alone():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 3, (6,))
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(True)
    F.cross_entropy(reference(x), y).backward()
    before = snapshot(model)
    scores = snip_scores(model, (x, y))
    ref_modules = [m for m in reference.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for (_key, s), ref in zip(scores.items(), ref_modules):
        expected = (ref.weight.detach() * ref.weight.grad).abs().double()
        torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-9)
    after = snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1] and before[2] == after[2]
    assert model[0].weight.requires_grad is False


def test_snip_without_targets_uses_predictions():
    model = small_cnn()
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    a, b = snip_scores(model, x), snip_scores(model, (x, y))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_snip_on_pruned_model_scores_the_masked_weight():
    model = small_cnn()
    prune.random_unstructured(model[0], "weight", amount=0.5)
    scores = snip_scores(model, torch.randn(4, 2, 8, 8))
    s = scores[(model[0], "weight")]
    assert torch.all(s[model[0].weight_mask == 0] == 0)


def test_prune_per_row_prunes_the_same_count_in_each_row():
    model = small_cnn()
    linear = model[6]
    scores = torch.rand(linear.weight.shape)
    prune_per_row(linear, scores, 0.5)
    kept = linear.weight_mask.sum(1)
    assert torch.all(kept == linear.weight.shape[1] - round(0.5 * linear.weight.shape[1]))
    # the lowest scores of each row are the ones removed
    for r in range(scores.shape[0]):
        removed = scores[r][linear.weight_mask[r] == 0]
        kept_scores = scores[r][linear.weight_mask[r] == 1]
        assert removed.max() <= kept_scores.min()
    with pytest.raises(ValueError, match="amount"):
        prune_per_row(linear, scores, 1.5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        magnitude_scores(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="not Linear/Conv2d"):
        magnitude_scores(small_cnn(), modules=[nn.ReLU()])
    with pytest.raises(ValueError, match="empty"):
        wanda_scores(small_cnn(), [])
