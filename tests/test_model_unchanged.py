"""Scoring leaves the model exactly as it found it: parameters and buffers bitwise, training
flags, hooks, requires_grad flags, no autograd graph, even when scoring fails midway."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from curvprune import neural_curvature
from curvprune.reference import reference_curvature


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout2d(0.5),
        nn.Conv2d(3, 2, 3, stride=2), nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        for bn in (model[1], model[8]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.num_batches_tracked.fill_(11)
    return model


def _snapshot(model: nn.Module) -> dict:
    hook_attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks")
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad, p.dtype, p.device,
                       p.data_ptr())
                   for n, p in model.named_parameters()},
        "buffers": {n: (b, b.clone(), b.dtype) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {(n, attr): (getattr(m, attr), dict(getattr(m, attr)))
                  for n, m in model.named_modules() for attr in hook_attrs
                  if hasattr(m, attr)},
        "modules": dict(model.named_modules()),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, module in after["modules"].items():
        assert module is before["modules"][name]
    assert after["params"].keys() == before["params"].keys()
    for name, (p, value, requires_grad, grad, dtype, device, ptr) in before["params"].items():
        now = after["params"][name]
        assert now[0] is p, f"{name}: parameter object replaced"
        assert p.dtype == dtype and p.device == device and p.data_ptr() == ptr
        # Bitwise, NaN-safe.
        assert torch.equal(_bits(p), _bits(value)), name
        assert p.requires_grad == requires_grad, f"{name}: requires_grad changed"
        assert p.grad is grad, f"{name}: .grad changed"
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, (b, value, dtype) in before["buffers"].items():
        assert after["buffers"][name][0] is b and b.dtype == dtype
        assert torch.equal(b, value), f"{name}: buffer changed"
    assert after["training"] == before["training"]
    for key, (hooks, items) in before["hooks"].items():
        now_hooks, now_items = after["hooks"][key]
        assert now_hooks is hooks, f"{key}: hook dict replaced"
        assert now_items.keys() == items.keys(), f"{key}: hooks added or removed"
        for handle_id, fn in items.items():
            assert now_items[handle_id] is fn


def _mixed(model: nn.Module) -> nn.Module:
    """Training flags and requires_grad flags mixed across submodules, with user hooks."""
    model.train()
    model[1].eval()
    model[10].eval()
    model[0].weight.requires_grad_(False)
    model[8].bias.requires_grad_(False)
    calls = []
    model[4].register_forward_hook(lambda m, i, o: calls.append("fwd"))
    model[7].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    model.register_forward_hook(lambda m, i, o: None)
    return model


@pytest.mark.parametrize("setup", ["train", "eval", "mixed"])
def test_scoring_leaves_model_unchanged(setup):
    model = _model()
    if setup == "train":
        model.train()
    elif setup == "eval":
        model.eval()
    else:
        _mixed(model)
    before = _snapshot(model)
    grad_mode = torch.is_grad_enabled()
    result = neural_curvature(model, torch.randn(4, 1, 6, 6))
    assert torch.is_grad_enabled() == grad_mode
    _assert_unchanged(model, before)
    for p in model.parameters():
        assert p.grad is None
    for tensors in (result.kappa, result.live):
        for t in tensors.values():
            assert not t.requires_grad and t.grad_fn is None


def test_train_mode_does_not_change_the_scores():
    """Scoring runs in eval mode: Dropout is off and BatchNorm uses its running statistics, so
    a model in train mode gets the same kappa as in eval mode."""
    model = _model()
    x = torch.randn(3, 1, 6, 6)
    model.eval()
    eval_kappa = neural_curvature(model, x).kappa
    model.train()
    train_kappa = neural_curvature(model, x).kappa
    for name in eval_kappa:
        assert torch.equal(eval_kappa[name], train_kappa[name])


def test_reference_leaves_model_unchanged():
    model = _mixed(_model())
    before = _snapshot(model)
    reference_curvature(model, torch.randn(1, 1, 6, 6))
    _assert_unchanged(model, before)


def test_existing_grads_are_kept():
    model = _model()
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    before = _snapshot(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    neural_curvature(model, torch.randn(2, 1, 6, 6))
    _assert_unchanged(model, before)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


def test_inputs_that_require_grad_build_no_graph():
    model = _model()
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    result = neural_curvature(model, x)
    assert x.grad is None
    for t in result.kappa.values():
        assert not t.requires_grad


@pytest.mark.parametrize(
    "bad",
    [
        torch.full((1, 1, 6, 6), float("nan")),  # NaN inputs
        torch.randn(1, 1, 7, 5),  # a shape the model rejects
        torch.randint(0, 3, (1, 1, 6, 6)),  # integer inputs
        "not a batch",  # wrong type
    ],
    ids=["nan", "shape", "int", "type"],
)
@pytest.mark.parametrize("setup", ["train", "mixed"])
def test_model_unchanged_when_scoring_fails_midway(bad, setup):
    """The first batch is scored, the second is bad: the call raises and the model is as it
    was (hooks of the capture removed, training flags restored)."""
    model = _model()
    if setup == "train":
        model.train()
    else:
        _mixed(model)
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        neural_curvature(model, [torch.randn(2, 1, 6, 6), torch.randn(1, 1, 6, 6), bad])
    _assert_unchanged(model, before)


def test_model_unchanged_when_activations_overflow():
    """A huge last layer overflows float32 to inf in the output: ValueError, model untouched."""
    model = _mixed(_model())
    with torch.no_grad():
        model[8].bias.fill_(5.0)  # BatchNorm shift: the ReLU before the last layer is positive
        model[11].weight.fill_(3e38)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        neural_curvature(model, [torch.randn(2, 1, 6, 6)])
    _assert_unchanged(model, before)


def test_model_unchanged_when_a_user_hook_raises():
    model = _model().train()
    state = {"calls": 0}

    def hook(module, inputs, output):
        state["calls"] += 1
        if state["calls"] == 2:
            raise RuntimeError("boom")

    model[7].register_forward_hook(hook)
    before = _snapshot(model)
    with pytest.raises((RuntimeError, ValueError), match="boom"):
        neural_curvature(model, [torch.randn(1, 1, 6, 6), torch.randn(1, 1, 6, 6)])
    _assert_unchanged(model, before)


def test_forward_pass_keeps_the_users_torch_threads():
    """The engine may run torch single-threaded while its solver threads work, but the model's
    forward pass must see the caller's setting (float32 kernels round differently otherwise),
    and the setting is restored afterwards."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), Probe(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        neural_curvature(model, [torch.randn(3, 6), torch.randn(2, 6)], threads=2)
        assert seen and all(n == 2 for n in seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
