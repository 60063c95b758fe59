"""Bad input is refused with a ValueError/TypeError that says what is wrong; the calibration
forms that are accepted (tensor, pair, list, DataLoader) give the same kappa."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ConcatNet, ResidualNet, assert_kappa_equal
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune import neural_curvature
from curvprune.transport.base import CERTIFY_TOL as EXACT  # scores exact in practice


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def _cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(n))


# --------------------------------------------------------------------------------------------
# Empty calibration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "calibration",
    [
        torch.empty(0, 5),
        [],
        (),
        [torch.empty(0, 5), torch.empty(0, 5)],
        (torch.empty(0, 5), torch.empty(0, dtype=torch.long)),
        DataLoader(TensorDataset(torch.empty(0, 5), torch.empty(0)), batch_size=4),
        iter([]),
    ],
    ids=["tensor", "list", "tuple", "empty-batches", "pair", "DataLoader", "iterator"],
)
def test_empty_calibration(calibration):
    with pytest.raises(ValueError, match="calibration set is empty"):
        neural_curvature(_mlp(), calibration)


# --------------------------------------------------------------------------------------------
# Non-finite inputs and activations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs(value):
    x = _x()
    x[1, 2] = value
    with pytest.raises(ValueError, match="calibration inputs contain NaN or Inf"):
        neural_curvature(_mlp(), x)


def test_non_finite_inputs_in_a_later_batch():
    bad = _x(2)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        neural_curvature(_mlp(), [_x(), bad])


def test_activations_overflow_to_inf():
    """Weights of 1e38 overflow float32 to inf in node layer 1."""
    model = _mlp()
    with torch.no_grad():
        model[0].weight.fill_(1e38)
        model[0].bias.zero_()
    with pytest.raises(ValueError, match="node layer 1 contain NaN or Inf"):
        neural_curvature(model, torch.ones(2, 5))


def test_activations_become_nan():
    """inf - inf in a later layer: NaN activations are refused too."""
    model = _mlp()
    with torch.no_grad():
        model[0].weight.fill_(1e38)
        model[0].bias.zero_()
        model[1] = nn.Identity()
    x = torch.ones(2, 5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        neural_curvature(model, x)


def test_output_overflow():
    model = _mlp()
    with torch.no_grad():
        model[4].weight.fill_(3e38)
        model[2].bias.fill_(5.0)
    with pytest.raises(ValueError, match=r"node layer 3 contain NaN or Inf"):
        neural_curvature(model, _x())


def test_float16_overflow():
    model = _mlp().half()
    with torch.no_grad():
        model[0].weight.fill_(6e4)
    x = torch.ones(1, 5, dtype=torch.float16)
    try:
        model(x)
    except RuntimeError:  # some builds have no float16 matmul on the CPU
        pytest.skip("float16 Linear not available on this CPU build")
    with pytest.raises(ValueError, match="NaN or Inf"):
        neural_curvature(model, x)


# --------------------------------------------------------------------------------------------
# Unsupported models
# --------------------------------------------------------------------------------------------


def test_nothing_to_score():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match="no Linear or Conv2d layer: nothing to score"):
        neural_curvature(model, _x())


@pytest.mark.parametrize(
    "model, x, fragment",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
         torch.randn(1, 1, 6, 6), r"module '1' \(MaxPool2d\)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
         torch.randn(1, 1, 6, 6), r"module '1' \(AvgPool2d\)"),
        (ResidualNet(5), _x(), "function 'add'"),
        (ConcatNet(5), _x(), "function 'cat'"),
    ],
    ids=["MaxPool2d", "AvgPool2d", "residual", "cat"],
)
def test_unsupported_model_names_the_module(model, x, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        neural_curvature(model, x)
    assert "granularity='channel'" in str(info.value)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        neural_curvature(lambda x: x, _x())


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, math.nan, math.inf, -math.inf])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        neural_curvature(_mlp(), _x(), alpha=alpha)


@pytest.mark.parametrize("alpha", ["0.5", None, True, torch.tensor(0.5), [0.5], 1j])
def test_alpha_of_wrong_type(alpha):
    with pytest.raises(TypeError, match="alpha must be a real number"):
        neural_curvature(_mlp(), _x(), alpha=alpha)


@pytest.mark.parametrize("alpha", [0, np.float64(0.5), np.float32(0.25), 0.9])
def test_alpha_accepts_real_numbers(alpha):
    result = neural_curvature(_mlp(), _x(), alpha=alpha)
    assert result.alpha == float(alpha) and isinstance(result.alpha, float)


@pytest.mark.parametrize("tolerance", [-1e-3, -math.inf, math.nan, math.inf])
@pytest.mark.parametrize("granularity", ["neuron", "channel"])
def test_tolerance_out_of_range(tolerance, granularity):
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        neural_curvature(_mlp(), _x(), tolerance=tolerance, granularity=granularity)


@pytest.mark.parametrize("tolerance", ["0.1", True, False, torch.tensor(0.1), [0.1], 1j])
def test_tolerance_of_wrong_type(tolerance):
    with pytest.raises(TypeError, match="tolerance must be a real number"):
        neural_curvature(_mlp(), _x(), tolerance=tolerance)


@pytest.mark.parametrize("tolerance, error", [(-0.5, ValueError), (math.nan, ValueError),
                                              (math.inf, ValueError), ("1e-3", TypeError),
                                              (True, TypeError)])
def test_prune_model_checks_tolerance_before_touching_the_model(tolerance, error):
    from curvprune import prune_model

    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match="tolerance must be"):
        prune_model(model, _x(), 0.5, tolerance=tolerance)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("tolerance", [0, np.float64(1e-3), np.float32(0.25), 2, 100.0])
def test_tolerance_accepts_real_numbers(tolerance):
    result = neural_curvature(_mlp(), _x(), tolerance=tolerance)
    assert result.tolerance == float(tolerance) and isinstance(result.tolerance, float)


@pytest.mark.parametrize("granularity", ["edge", "Neuron", None])
def test_unknown_granularity(granularity):
    with pytest.raises(ValueError, match="granularity must be one of"):
        neural_curvature(_mlp(), _x(), granularity=granularity)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda(device):
    with pytest.raises(ValueError, match="CUDA is not available"):
        neural_curvature(_mlp(), _x(), device=device)


def test_cuda_device_that_does_not_exist():
    match = "does not exist" if torch.cuda.is_available() else "CUDA is not available"
    with pytest.raises(ValueError, match=match):
        neural_curvature(_mlp(), _x(), device="cuda:7")


@pytest.mark.parametrize("device", ["nonsense", "gpu", "cuda:x"])
def test_invalid_device_string(device):
    with pytest.raises(ValueError, match="not a valid torch device"):
        neural_curvature(_mlp(), _x(), device=device)


def test_unsupported_device_type():
    with pytest.raises(ValueError, match="'meta' is not supported"):
        neural_curvature(_mlp(), _x(), device="meta")


def test_cpu_device_is_accepted():
    expected = neural_curvature(_mlp(), _x()).kappa
    for device in ("cpu", torch.device("cpu")):
        got = neural_curvature(_mlp(), _x(), device=device).kappa
        for name in expected:
            assert torch.equal(got[name], expected[name])


# --------------------------------------------------------------------------------------------
# Calibration of the wrong type, shape or dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "calibration, fragment",
    [
        ("abc", "calibration must be a tensor"),
        (b"abc", "calibration must be a tensor"),
        (None, "not NoneType"),
        (3.0, "not float"),
        ({"input": torch.ones(2, 5)}, "calibration is a dict"),
        ([{"input": torch.ones(2, 5)}], "batch 0 is a dict"),
        ([1, 2, 3], "batch 0 is a int"),
        ([torch.ones(2, 5), 4, 5], "batch 1 is a int"),
        (np.ones((2, 5), dtype=np.float32), "is a ndarray"),
        (["a", "b", "c"], "batch 0 is a str"),
    ],
    ids=["str", "bytes", "None", "float", "dict", "dict-batch", "ints", "tensor-then-int",
         "numpy", "strings"],
)
def test_calibration_of_wrong_type(calibration, fragment):
    with pytest.raises(TypeError, match=fragment):
        neural_curvature(_mlp(), calibration)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
def test_non_floating_inputs(dtype):
    x = torch.ones(2, 5, dtype=dtype)
    with pytest.raises(TypeError, match=f"floating point, not {dtype}"):
        neural_curvature(_mlp(), x)


@pytest.mark.parametrize(
    "model, x",
    [
        (_mlp(), torch.randn(2, 6)),  # wrong feature count
        (_mlp(), torch.randn(2, 5, dtype=torch.float64)),  # dtype the float32 model rejects
        (_cnn(), torch.randn(2, 2, 6, 6)),  # wrong channel count
        (_cnn(), torch.randn(2, 1, 7, 7)),  # spatial size the Linear head rejects
        (_cnn(), torch.randn(2, 36)),  # flat images
    ],
    ids=["features", "dtype", "channels", "spatial", "flat"],
)
def test_inputs_the_model_rejects(model, x):
    with pytest.raises(ValueError, match=r"the model rejects calibration inputs of shape"):
        neural_curvature(model, x)


def test_scalar_batch():
    with pytest.raises(ValueError, match=r"has shape \(\)"):
        neural_curvature(_mlp(), torch.tensor(1.0))


def test_one_dimensional_batch():
    """A single example without its batch dimension (shape [5]) is refused, not read as five
    scalar examples."""
    with pytest.raises(ValueError, match=r"batch 0 has shape \(5,\).*example"):
        neural_curvature(_mlp(), torch.randn(5))


def test_unbatched_image():
    """A [C, H, W] image without its batch dimension: Conv2d would take it as unbatched."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match=r"Conv2d\) received an input of shape \(1, 6, 6\)"):
        neural_curvature(model, torch.randn(1, 6, 6))


@pytest.mark.parametrize("order", [(6, 7), (7, 6)])
def test_examples_of_different_shapes(order):
    """A fully convolutional model accepts any image size, but one neural graph needs one
    shape: batches of different sizes are refused."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    batches = [torch.randn(1, 1, s, s) for s in order]
    with pytest.raises(ValueError, match="same shape"):
        neural_curvature(model, batches)


def test_sequence_input_to_linear():
    """[N, T, F] inputs: Linear acts on the last dimension only, not a chain of neurons."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"Linear\) received an input of shape \(2, 3, 5\)"):
        neural_curvature(model, torch.randn(2, 3, 5))


# --------------------------------------------------------------------------------------------
# Accepted calibration forms give the same kappa
# --------------------------------------------------------------------------------------------


def _same(a, b, atol=1e-12):
    """Same kappa up to ``atol``: a forward pass on a different batch size may round float
    activations differently (batch-size dependent GEMM/conv kernels), so the tests use float64
    models, where that is ~1e-16."""
    assert_kappa_equal(a.kappa, b.kappa, atol=atol)
    for name in a.kappa:
        assert torch.equal(a.live[name], b.live[name]), name
    assert a.num_examples == b.num_examples


def test_dataloader_pairs_match_concatenated_tensor():
    model = _cnn().double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    expected = neural_curvature(model, x, tolerance=EXACT)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    _same(neural_curvature(model, loader, tolerance=EXACT), expected)
    _same(neural_curvature(model, (x, y), tolerance=EXACT), expected)
    _same(neural_curvature(model, [x[:2], x[2:5], x[5:]], tolerance=EXACT), expected)
    _same(neural_curvature(model, [(x[:4], y[:4]), (x[4:], y[4:])], tolerance=EXACT), expected)
    _same(neural_curvature(model, iter([x[:1], x[1:]]), tolerance=EXACT), expected)
    # Order of the examples does not matter either (minimum over examples).
    _same(neural_curvature(model, x.flip(0), tolerance=EXACT), expected)


def test_dataloader_with_float32_model():
    model = _cnn()
    x = torch.randn(7, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    y = torch.zeros(7, dtype=torch.long)
    expected = neural_curvature(model, x)
    _same(neural_curvature(model, DataLoader(TensorDataset(x, y), batch_size=2)), expected,
          atol=1e-5)


def test_dataloader_of_inputs_only():
    model = _mlp().double()
    x = _x(6).double()
    expected = neural_curvature(model, x)
    _same(neural_curvature(model, DataLoader(TensorDataset(x), batch_size=4)), expected)
    _same(neural_curvature(model, DataLoader(x, batch_size=5)), expected)


def test_empty_batches_are_skipped():
    model = _mlp().double()
    x = _x(4).double()
    expected = neural_curvature(model, x)
    _same(neural_curvature(model, [torch.empty(0, 5, dtype=torch.float64), x[:2],
                                   torch.empty(0, 5, dtype=torch.float64), x[2:]]), expected)


def test_one_hot_targets_make_a_pair():
    """``(x, one_hot)`` and ``[x, one_hot]`` are one (inputs, targets) batch, not two batches."""
    model = _mlp()
    x = torch.randn(4, 5)
    one_hot = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    expected = neural_curvature(model, x).kappa
    for calibration in ((x, one_hot), [x, one_hot], [x, torch.tensor([0, 1, 2, 0])]):
        got = neural_curvature(model, calibration)
        assert got.num_examples == 4
        for name in expected:
            assert torch.equal(got.kappa[name], expected[name])


# --------------------------------------------------------------------------------------------
# Mistakes a new user makes (issue 14, item 4): every entry point gets the same checks, from
# curvprune.calibration.prepare_calibration / iter_calibration_inputs
# --------------------------------------------------------------------------------------------


def _images(n: int = 4, channels: int = 1, size: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10 + n)
    return torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)


def test_list_of_single_images_is_stacked():
    """[image, image, ...] of shape [C, H, W] (no batch dimension) is one batch of them; so is
    a list of (image, label) items as a Dataset gives them, and one such item."""
    model = _cnn().double()
    x = _images()
    y = torch.tensor([0, 1, 2, 0])
    expected = neural_curvature(model, x)
    _same(neural_curvature(model, [x[i] for i in range(4)]), expected)
    _same(neural_curvature(model, list(TensorDataset(x, y))), expected)
    _same(neural_curvature(model, [(x[i], int(y[i])) for i in range(4)]), expected)
    _same(neural_curvature(model, (x[0], 1)), neural_curvature(model, x[:1]))
    _same(neural_curvature(model, [x[1], x[2]]), neural_curvature(model, x[1:3]))


def test_list_of_single_vectors_is_stacked():
    model = _mlp().double()
    x = _x(3).double()
    _same(neural_curvature(model, [x[0], x[1], x[2]]), neural_curvature(model, x))


def test_list_of_single_images_for_a_flattening_mlp_is_stacked():
    """[C, H, W] images for Flatten -> Linear(C*H*W): one batch of them (read as batches of C
    examples they could not feed the Linear)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _same(neural_curvature(model, [x[0], x[1], x[2]]), neural_curvature(model, x))
    grey = torch.randn(3, 1, 2, 6, dtype=torch.float64)  # [1, H, W]: a batch of one as well
    _same(neural_curvature(model, [grey[0], grey[1], grey[2]]), neural_curvature(model, grey))


def test_single_examples_of_several_shapes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match=r"single examples of several shapes.*torch\.stack"):
        neural_curvature(model, [torch.randn(1, 6, 6), torch.randn(1, 7, 7)])


def test_single_images_reach_every_entry_point():
    from tests.test_pruning import tiny

    model = tiny().double()
    x = _images(3, size=7)
    images = [x[i] for i in range(3)]
    by_batch, by_list = copy.deepcopy(model), copy.deepcopy(model)
    curvprune.prune_model(by_batch, x, 0.5, allocation="wanda")
    curvprune.prune_model(by_list, images, 0.5, allocation="wanda")
    for name in ("0", "3", "5"):
        assert torch.equal(by_batch.get_submodule(name).weight_mask,
                           by_list.get_submodule(name).weight_mask)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))
    rgb = _images(3, channels=3).float()
    a, b = copy.deepcopy(conv), copy.deepcopy(conv)
    curvprune.prune_channels(a, rgb, 0.5)
    curvprune.prune_channels(b, [rgb[i] for i in range(3)], 0.5)
    assert torch.equal(a[0].weight, b[0].weight) and a[0].out_channels == 2


def _meta(model: nn.Module) -> nn.Module:
    return model.to("meta")


def test_model_on_the_meta_device():
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        neural_curvature(_meta(_mlp()), _x())
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        neural_curvature(_meta(_cnn()), torch.randn(2, 1, 6, 6), granularity="channel")
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        curvprune.prune_model(_meta(_mlp()), _x(), 0.5)
    result = neural_curvature(_mlp(), _x())
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        curvprune.prune_model(_meta(_mlp()), None, 0.5, result=result)
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        curvprune.prune_channels(_meta(_cnn()), torch.randn(2, 1, 6, 6), 0.5)


def test_channels_last_images():
    """[N, H, W, C] images: one line that says to permute, not a raw RuntimeError."""
    rgb = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    nhwc = torch.randn(2, 8, 8, 3)
    message = r"shape \(2, 8, 8, 3\), channels last.*permute to N,C,H,W"
    for granularity in ("neuron", "channel"):
        model = rgb if granularity == "channel" else _cnn()
        x = nhwc if granularity == "channel" else torch.randn(2, 6, 6, 1)
        with pytest.raises(ValueError, match="channels last.*permute to N,C,H,W"):
            neural_curvature(model, x, granularity=granularity)
    with pytest.raises(ValueError, match=message):
        curvprune.prune_channels(copy.deepcopy(rgb), nhwc, 0.5)
    with pytest.raises(ValueError, match=message):
        curvprune.prune_channels(copy.deepcopy(rgb), DataLoader(TensorDataset(nhwc), 2), 0.5)
    with pytest.raises(ValueError, match="channels last"):
        curvprune.prune_model(_cnn(), torch.randn(2, 6, 6, 1), 0.5)
    from curvprune.baselines import wanda_scores
    with pytest.raises(ValueError, match="channels last"):
        wanda_scores(_cnn(), torch.randn(2, 6, 6, 1))
    with pytest.raises(ValueError, match=r"calibration batch 1 .*channels last"):
        neural_curvature(rgb, [torch.randn(2, 3, 8, 8), nhwc], granularity="channel")
    # single channels-last images in a list: stacked, then refused the same way
    with pytest.raises(ValueError, match="channels last"):
        neural_curvature(_cnn(), [torch.randn(6, 6, 1), torch.randn(6, 6, 1)])


def _wide() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))  # 8,832 weights


def test_int_amount_that_looks_like_a_percentage_warns():
    """amount=50 keeps PyTorch's meaning (50 weights) but warns: it is under 1 % of the
    weights and may have meant 0.5."""
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    result = neural_curvature(_wide(), x)
    model = _wide()
    with pytest.warns(UserWarning, match=r"amount=50 is an int.*prunes 50 of 8832.*amount=0\.5"):
        report = curvprune.prune_model(model, None, 50, result=result)
    assert report.newly_pruned == 50
    model = _wide()
    with pytest.warns(UserWarning, match=r"amount=40 .*prunes 80 of 8832"):
        curvprune.prune_model(model, None, 40, scope="layer", result=result)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for amount, scope in [(0.5, "global"), (500, "global"), (0, "global"),
                              (50, "layer")]:  # 100 of 8832 is over 1 %
            curvprune.prune_model(_wide(), None, amount, scope=scope, result=result)
        # 50 of a 213-weight model is 23 %: a count, no warning
        from tests.test_pruning import inputs, tiny
        curvprune.prune_model(tiny(), inputs(), 50)
