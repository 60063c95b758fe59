"""load_checkpoint and --checkpoint: a user's trained weights into an architecture."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune

from curvprune import load_checkpoint, zoo
from curvprune.cli import UsageError, load_model, main
from curvprune.data import FASHION_MNIST_DIR

HAVE_FMNIST = any(FASHION_MNIST_DIR.glob("t10k-images-idx3-ubyte*"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")


def small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def trained_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict that differs from a fresh ``small()`` in every parameter and buffer."""
    torch.manual_seed(seed)
    model = small()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
        model[1].running_mean.fill_(0.25)
        model[1].num_batches_tracked.fill_(7)
    return model.state_dict()


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict",
                                  "nested", "module_prefix", "whole_model"])
def test_load_checkpoint_plain_and_wrapped(wrap, tmp_path):
    state = trained_state()
    obj = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}},
        "model": {"model": state, "args": {"lr": 0.1}},
        "model_state_dict": {"model_state_dict": state},
        "nested": {"model": {"state_dict": state}},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "whole_model": None,
    }[wrap]
    if wrap == "whole_model":
        obj = small()
        obj.load_state_dict(state)
    path = tmp_path / "ck.pt"
    torch.save(obj, path)
    torch.manual_seed(0)
    model = small()
    assert load_checkpoint(model, path) is model
    assert_loaded(model, state)
    fresh = small()
    load_checkpoint(fresh, obj if wrap != "whole_model" else path)  # loaded objects work too
    assert_loaded(fresh, state)


def test_missing_counters_are_allowed_and_dtype_is_kept(tmp_path):
    state = {k: v for k, v in trained_state().items() if not k.endswith("num_batches_tracked")}
    model = small().double()
    load_checkpoint(model, state)
    assert model[0].weight.dtype == torch.float64
    assert torch.equal(model[0].weight, state["0.weight"].double())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("4.weight"), r"1 missing key\(s\): 4\.weight"),
    (lambda s: s.update(extra=torch.zeros(1)), r"1 unexpected key\(s\): extra"),
    (lambda s: s.update({"4.weight": torch.zeros(5, 144)}),
     r"1 shape mismatch\(es\): 4\.weight \(5, 144\) in the checkpoint, \(3, 144\) in the model"),
])
def test_wrong_checkpoint_is_one_clear_line(edit, message, tmp_path):
    state = trained_state()
    edit(state)
    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": state}, path)
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(model, path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert_loaded(model, before)  # nothing was loaded


def test_unreadable_or_not_a_state_dict(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*junk.pt"):
        load_checkpoint(small(), junk)
    with pytest.raises(ValueError, match="checkpoint file not found"):
        load_checkpoint(small(), tmp_path / "nowhere.pt")
    with pytest.raises(ValueError, match=r"holds a dict with keys \['epoch', 'lr'\], not a "
                                         r"state dict"):
        load_checkpoint(small(), {"epoch": 3, "lr": 0.1})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_checkpoint(trained_state(), trained_state())
    pruned = small()
    prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match="pruning hooks.*make_permanent"):
        load_checkpoint(small(), pruned.state_dict())


def test_load_model_with_checkpoint_into_a_zoo_architecture(tmp_path):
    torch.manual_seed(3)
    trained = zoo.create("timm/resnet18")
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-2.0)
    path = tmp_path / "resnet.pt"
    torch.save({"model": trained.state_dict(), "epoch": 10}, path)
    model = load_model("zoo:timm/resnet18", checkpoint=path)
    assert_loaded(model, trained.state_dict())
    with pytest.raises(UsageError, match="does not fit ResNet: .*shape mismatch"):
        load_model("zoo:timm/resnet18", checkpoint=_other_checkpoint(tmp_path))


def _other_checkpoint(tmp_path):
    """A state dict of the same architecture family at another width (a common mistake)."""
    path = tmp_path / "other.pt"
    torch.save(zoo.create("torchvision/resnet18").state_dict(), path)
    return path


@needs_fmnist
def test_cli_prunes_the_checkpoint_weights(tmp_path, capsys):
    torch.manual_seed(4)
    trained = zoo.create("timm/resnet18")
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(torch.randn_like(p))
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": trained.state_dict()}, path)
    out = tmp_path / "out"
    code = main(["prune", "--model", "zoo:timm/resnet18", "--checkpoint", str(path),
                 "--data", "fashion-mnist", "--calibration", "random", "--amount", "0.3",
                 "--no-eval", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["settings"]["checkpoint"] == str(path)
    pruned = torch.load(out / "model.pt", weights_only=False)
    reference = trained.state_dict()
    for name, value in pruned.state_dict().items():
        kept = value != 0
        assert torch.equal(value[kept], reference[name][kept]), name  # the checkpoint's values
    # a checkpoint that does not fit: one line, exit 2, for every command taking --model
    for command in (["estimate", "--no-measure"], ["analyze", "--out", str(tmp_path / "a")],
                    ["prune", "--amount", "0.3", "--out", str(tmp_path / "p")]):
        code = main([*command, "--model", "zoo:timm/resnet18", "--checkpoint",
                     str(_other_checkpoint(tmp_path)), "--calibration", "random"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "does not fit ResNet" in err, err


@needs_fmnist
def test_num_classes_matches_a_checkpoint_trained_on_other_classes(tmp_path, capsys):
    from curvprune.models import create_model

    torch.manual_seed(5)
    path = tmp_path / "lenet5_5.pt"
    torch.save(create_model("lenet5", num_classes=5).state_dict(), path)
    args = ["estimate", "--model", "curvprune:lenet5", "--checkpoint", str(path),
            "--calibration", "random", "--no-measure", "--json"]
    assert main(args) == 2  # built for the data's 10 classes by default
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "built with 10 classes (--num-classes)" in err
    assert main(args + ["--num-classes", "5"]) == 0
    edges = json.loads(capsys.readouterr().out)["edges_per_layer"]
    assert list(edges.values())[-1] == 84 * 5  # the classifier: 84 -> 5
    assert main(args + ["--num-classes", "0"]) == 2
    assert "--num-classes must be at least 1" in capsys.readouterr().err
