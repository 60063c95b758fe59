"""``curvprune.models.create_model``: one factory for every spec the command line takes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from curvprune.models import create_model, list_models


def test_paper_names_bare_and_prefixed():
    torch.manual_seed(0)
    bare = create_model("lenet5", num_classes=5)
    torch.manual_seed(0)
    prefixed = create_model("curvprune:lenet5", num_classes=5)
    assert bare[-1].out_features == prefixed[-1].out_features == 5
    assert all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(),
                                                 prefixed.state_dict().values()))
    assert create_model("lenet5", in_channels=3)[0].in_channels == 3
    mlp = create_model("mlp", hidden=(8,), in_channels=12)  # in_channels is mlp's in_features
    assert [m.in_features for m in mlp if isinstance(m, nn.Linear)] == [12, 8]
    assert create_model("vgg9")[-1].out_features == 10


def test_timm_torchvision_zoo():
    timm_model = create_model("timm:resnet18", num_classes=7, in_channels=1)
    assert timm_model.get_classifier().out_features == 7 and timm_model.conv1.in_channels == 1
    tv = create_model("torchvision:resnet18", num_classes=4)
    assert tv.fc.out_features == 4
    from curvprune.models import zoo

    model = create_model("zoo:timm/resnet18")
    reference = zoo.create("timm/resnet18")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))
    with pytest.raises(ValueError, match="10 classes"):
        create_model("zoo:timm/resnet18", num_classes=5)


def test_saved_model_and_checkpoint(tmp_path):
    model = create_model("mlp", hidden=(6,))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = create_model(str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values()))
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    again = create_model("mlp", hidden=(6,), checkpoint=weights)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    with pytest.raises(ValueError, match="built with 3 classes \\(num_classes\\)"):
        create_model("mlp", hidden=(6,), num_classes=3, checkpoint=weights)
    with pytest.raises(ValueError, match="model file not found"):
        create_model(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("spec, match", [
    ("nosuchnet", "lenet5, mlp, vgg9.*timm:NAME.*torchvision:NAME.*zoo:NAME.*PATH"),
    ("curvprune:nosuchnet", r"choose one of \['lenet5', 'mlp', 'vgg9'\]"),
    ("zoo:timm/nosuchnet", "choose one of .*timm/resnet18"),
    ("timm:nosuchnet_xyz", "unknown timm model"),
    ("torchvision:nosuchnet", "unknown torchvision model"),
    ("hub:resnet18", "unknown model source 'hub'.*curvprune:NAME, timm:NAME"),
])
def test_unknown_spec_names_the_valid_ones(spec, match):
    with pytest.raises(ValueError, match=match):
        create_model(spec)
    with pytest.raises(TypeError, match="spec must be a str"):
        create_model(nn.Linear(2, 2))


def test_old_paths_still_work():
    from curvprune import zoo as old_zoo
    from curvprune.models import zoo as new_zoo

    assert old_zoo is new_zoo and old_zoo.ZOO is new_zoo.ZOO
    assert list_models() == ["lenet5", "mlp", "vgg9"]
    from curvprune.cli import load_model

    with pytest.warns(DeprecationWarning, match="create_model"):
        assert isinstance(load_model("lenet5"), nn.Sequential)


def test_import_stays_light():
    code = ("import sys, curvprune.models; "
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
