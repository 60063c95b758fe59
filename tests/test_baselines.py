"""Baseline criteria: each score checked against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

from curvprune import CurvaturePruning
from curvprune.baselines import (
    lamp_scores,
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


def lamp_brute_force(weight: torch.Tensor) -> torch.Tensor:
    """LAMP by explicit loops: order by (|w|, flat index); sum w_v^2 over v at or above u."""
    flat = [float(x) for x in weight.detach().reshape(-1)]
    rank = {i: r for r, i in enumerate(sorted(range(len(flat)), key=lambda i: (abs(flat[i]), i)))}
    out = []
    for u in range(len(flat)):
        tail = 0.0
        for v in range(len(flat)):
            if rank[v] >= rank[u]:
                tail += flat[v] ** 2
        out.append(flat[u] ** 2 / tail if tail > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(weight.shape)


def lamp_model() -> nn.Module:
    """Small CNN whose weights are rounded to a few levels: ties, zeros and negative twins."""
    model = small_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_((m.weight * 8).round() / 8)
        model[6].weight[0].zero_()
        model[6].weight[1, :4] = torch.tensor([0.25, -0.25, 0.25, 0.0])
    return model


def test_lamp_matches_brute_force_with_ties_and_zeros():
    model = lamp_model()
    scores = lamp_scores(model)
    assert len(scores) == 4
    for (module, name), s in scores.items():
        w = getattr(module, name)
        flat = w.detach().abs().reshape(-1)
        assert len(flat.unique()) < flat.numel() and (flat == 0).any()  # ties and zeros
        assert s.dtype == torch.float64 and s.shape == w.shape
        assert torch.allclose(s, lamp_brute_force(w), rtol=1e-12, atol=0)
        assert torch.all(s[w == 0] == 0)
        # the largest weight (last in the order) scores exactly 1, the rest at most 1/2
        top = max(range(flat.numel()), key=lambda i: (float(flat[i]), i))
        assert s.reshape(-1)[top] == 1.0
        others = torch.cat([s.reshape(-1)[:top], s.reshape(-1)[top + 1:]])
        assert others.max() <= 0.5
    # of two equal weights, the lower flat index is the smaller: lower score
    row = scores[(model[6], "weight")][1, :3]
    assert row[0] < row[1] < row[2]
    # an all-zero layer scores 0 everywhere, no NaN
    with torch.no_grad():
        model[8].weight.zero_()
    assert torch.equal(lamp_scores(model)[(model[8], "weight")],
                       torch.zeros_like(model[8].weight, dtype=torch.float64))


def test_lamp_tensor_is_exact_on_a_hand_example():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, -1.0, 0.0, 2.0]]))
    # order 0, -1, 2, 3: tails 14, 14, 13, 9
    s = lamp_scores(nn.Sequential(layer))[(layer, "weight")]
    assert torch.equal(s, torch.tensor([[1.0, 1 / 14, 0.0, 4 / 13]], dtype=torch.float64))


def test_lamp_global_pruning_keeps_every_layers_largest_weight():
    model = small_cnn()
    scores = lamp_scores(model)
    params = list(scores)
    total = sum(m.weight.numel() for m, _ in params)
    prune.global_unstructured(params, pruning_method=CurvaturePruning, importance_scores=scores,
                              amount=total - len(params))  # keep one weight per layer
    for module, _ in params:
        assert int(module.weight_mask.sum()) == 1
        flat = module.weight_orig.detach().abs().reshape(-1)
        assert module.weight_mask.reshape(-1)[flat.argmax()] == 1
    # global magnitude at the same amount empties layers (so the property is LAMP's)
    other = small_cnn()
    mag = magnitude_scores(other)
    prune.global_unstructured(list(mag), pruning_method=CurvaturePruning,
                              importance_scores=mag, amount=total - len(params))
    assert any(int(m.weight_mask.sum()) == 0 for m, _ in mag)


def test_lamp_within_a_layer_prunes_like_magnitude_and_reads_masks():
    model, other = small_cnn(), small_cnn()
    scores, mag = lamp_scores(model), magnitude_scores(other)
    for (m, _), (o, _) in zip(scores, mag):
        CurvaturePruning.apply(m, "weight", amount=0.6, importance_scores=scores)
        CurvaturePruning.apply(o, "weight", amount=0.6, importance_scores=mag)
        assert torch.equal(m.weight_mask, o.weight_mask)
    again = lamp_scores(model)
    for (m, _), s in again.items():
        assert torch.all(s[m.weight_mask == 0] == 0)
        assert torch.allclose(s, lamp_brute_force(m.weight), rtol=1e-12, atol=0)


def test_lamp_leaves_the_model_alone():
    model = small_cnn()
    before = snapshot(model)
    lamp_scores(model, modules=[model[0], model[8]])
    after = snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


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
