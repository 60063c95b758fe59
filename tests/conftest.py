"""Shared helpers of the engine tests: random chain networks and kappa comparisons, and the
hypothesis profiles of the two test tiers.

Two hypothesis profiles: ``ci`` runs every property test with its full example count (the
counts written in the tests, hypothesis' 100 where none is written); ``dev``, the default on a
contributor's machine, runs a tenth of them (at least 5), so that
``python3 -m pytest -q -m "not slow"`` takes minutes. ``ci`` is chosen when the ``CI``
environment variable is set (``.ci/run`` sets it); ``HYPOTHESIS_PROFILE=ci`` or ``=dev``
chooses explicitly. A test that writes its own count passes it through
:func:`profile_examples`, so that it follows the profile too.

Random networks are described by a :class:`NetSpec` (drawn with hypothesis by :func:`net_specs`)
and built deterministically from it by :func:`build`, so a failing example printed by hypothesis
is a complete reproducer: ``build(NetSpec(...))`` gives the model and its calibration batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from hypothesis import settings
from hypothesis import strategies as st

# --------------------------------------------------------------------------------------------
# Hypothesis profiles: "ci" (full counts) and "dev" (a tenth)
# --------------------------------------------------------------------------------------------

_SCALE = {"ci": 1.0, "dev": 0.1}
settings.register_profile("ci", max_examples=100)
settings.register_profile("dev", max_examples=10)


def _profile_name() -> str:
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    ci = os.environ.get("CI", "").strip().lower()
    return "ci" if ci not in ("", "0", "false", "no") else "dev"


PROFILE = _profile_name()
settings.load_profile(PROFILE)  # an unknown name fails here, naming the registered ones


def profile_examples(count: int) -> int:
    """A test's own ``max_examples`` under the active profile: ``count`` under ``ci``, a tenth
    of it (at least 5) under ``dev`` (also when chosen by ``pytest --hypothesis-profile``)."""
    current = getattr(settings, "get_current_profile_name", lambda: PROFILE)()
    scale = _SCALE.get(current, 1.0)
    return count if scale >= 1 else max(5, round(count * scale))

# --------------------------------------------------------------------------------------------
# Comparing kappa dictionaries
# --------------------------------------------------------------------------------------------


def assert_kappa_equal(actual: dict, expected: dict, *, atol: float = 1e-6,
                       context: str = "") -> None:
    """``actual`` and ``expected`` agree on every weight: same names and shapes, ``+inf`` exactly
    where the other is ``+inf``, no NaN or ``-inf``, and finite values within ``atol``."""
    assert set(actual) == set(expected), f"{context}: weight names differ"
    for name, want in expected.items():
        got = actual[name].detach().cpu().to(torch.float64)
        want = want.detach().cpu().to(torch.float64)
        assert got.shape == want.shape, f"{context} {name}: shape {got.shape} != {want.shape}"
        assert not torch.isnan(got).any(), f"{context} {name}: NaN in actual"
        assert not torch.isnan(want).any(), f"{context} {name}: NaN in expected"
        assert not torch.isneginf(got).any(), f"{context} {name}: -inf in actual"
        assert not torch.isneginf(want).any(), f"{context} {name}: -inf in expected"
        inf_got, inf_want = torch.isposinf(got), torch.isposinf(want)
        if not torch.equal(inf_got, inf_want):
            where = torch.nonzero(inf_got != inf_want)[0].tolist()
            raise AssertionError(
                f"{context} {name}: +inf pattern differs at {where}: actual "
                f"{got[tuple(where)].item()!r}, expected {want[tuple(where)].item()!r}"
            )
        finite = ~inf_want
        if finite.any():
            diff = torch.where(finite, (got - want).abs(), torch.zeros_like(got))
            worst = int(diff.flatten().argmax())
            if diff.flatten()[worst] > atol:
                index = list(torch.unravel_index(torch.tensor(worst), got.shape))
                index = [int(i) for i in index]
                raise AssertionError(
                    f"{context} {name}[{index}]: actual {got.flatten()[worst].item()!r}, "
                    f"expected {want.flatten()[worst].item()!r} (|diff| "
                    f"{diff.flatten()[worst].item():.3e} > {atol:g}); "
                    f"{int((diff > atol).sum())} of {got.numel()} weights differ"
                )


# --------------------------------------------------------------------------------------------
# Random chain networks
# --------------------------------------------------------------------------------------------

ACTIVATIONS = ("relu", "tanh", "leaky_relu", "sigmoid", "none")


@dataclass(frozen=True)
class ConvSpec:
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True)
class LinearSpec:
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class HiddenSpec:
    """What follows a parametrised layer: optional eval-mode BatchNorm, then an activation."""

    activation: str = "relu"
    batchnorm: bool = False


@dataclass(frozen=True)
class NetSpec:
    """A random chain ``conv* -> flatten -> linear*`` and its calibration batch.

    ``hidden[k]`` follows layer ``k`` (the last entry follows the output layer). ``zero[k]`` is how
    weights of layer ``k`` are set to exactly 0: ``"none"``, ``"random"`` (a random subset),
    ``"rows"`` (whole output units / filters), ``"cols"`` (whole input units / channels),
    ``"all"``. ``bias_shift[k]`` is added to layer ``k``'s bias (negative: dead ReLU units).
    """

    in_shape: tuple[int, ...]
    layers: tuple[ConvSpec | LinearSpec, ...]
    hidden: tuple[HiddenSpec, ...]
    zero: tuple[str, ...]
    bias_shift: tuple[float, ...]
    weight_style: str = "normal"
    input_style: str = "normal"
    num_examples: int = 1
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)


def benchmark_module(name: str):
    """The benchmark script ``benchmarks/<name>.py`` imported as a module (for its helpers)."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def conv_out_size(size: int, kernel: int, stride: int, padding, dilation: int) -> int:
    if padding == "same":
        return size
    if padding == "valid":
        padding = 0
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(), "tanh": nn.Tanh(), "leaky_relu": nn.LeakyReLU(0.1),
        "sigmoid": nn.Sigmoid(), "none": nn.Identity(),
    }[name]


def _fill_weight(weight: torch.Tensor, style: str, gen: torch.Generator) -> None:
    shape = weight.shape
    if style == "normal":
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif style == "quantized":  # many equal |w|: ties in distances and degenerate OT problems
        levels = torch.tensor([-1.0, -0.5, 0.5, 1.0], dtype=torch.float64)
        value = levels[torch.randint(0, 4, shape, generator=gen)]
    elif style == "wide":  # magnitudes over three decades
        sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        value = sign * 10.0 ** (torch.rand(shape, generator=gen, dtype=torch.float64) * 3 - 2)
    else:
        raise ValueError(style)
    weight.copy_(value.to(weight.dtype))


def _zero_weights(weight: torch.Tensor, mode: str, gen: torch.Generator) -> None:
    if mode == "none":
        return
    if mode == "all":
        weight.zero_()
        return
    if mode == "random":
        p = float(torch.rand((), generator=gen)) * 0.7 + 0.1
        weight[torch.rand(weight.shape, generator=gen) < p] = 0
        return
    axis = 0 if mode == "rows" else 1
    size = weight.shape[axis]
    chosen = torch.rand(size, generator=gen) < 0.4
    if not chosen.any():
        chosen[int(torch.randint(0, size, (), generator=gen))] = True
    if axis == 0:
        weight[chosen] = 0
    else:
        weight[:, chosen] = 0


def build_model(spec: NetSpec) -> nn.Sequential:
    """The model of ``spec`` (float32, eval mode), its parameters drawn from ``spec.seed``."""
    gen = torch.Generator().manual_seed(spec.seed)
    modules: list[nn.Module] = []
    shape = spec.in_shape
    flattened = len(shape) == 1
    for k, (layer, after) in enumerate(zip(spec.layers, spec.hidden)):
        if isinstance(layer, ConvSpec):
            assert not flattened
            module = nn.Conv2d(shape[0], layer.out_channels, layer.kernel, stride=layer.stride,
                               padding=layer.padding, dilation=layer.dilation,
                               groups=layer.groups, bias=layer.bias)
            h = conv_out_size(shape[1], layer.kernel[0], layer.stride[0],
                              layer.padding if isinstance(layer.padding, str)
                              else layer.padding[0], layer.dilation[0])
            w = conv_out_size(shape[2], layer.kernel[1], layer.stride[1],
                              layer.padding if isinstance(layer.padding, str)
                              else layer.padding[1], layer.dilation[1])
            shape = (layer.out_channels, h, w)
        else:
            if not flattened:
                modules.append(nn.Flatten())
                shape = (math.prod(shape),)
                flattened = True
            module = nn.Linear(shape[0], layer.out_features, bias=layer.bias)
            shape = (layer.out_features,)
        with torch.no_grad():
            _fill_weight(module.weight, spec.weight_style, gen)
            _zero_weights(module.weight, spec.zero[k], gen)
            if module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5
                                  + spec.bias_shift[k])
        modules.append(module)
        if after.batchnorm:
            bn = (nn.BatchNorm1d if flattened else nn.BatchNorm2d)(shape[0])
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(shape[0], generator=gen))
                bn.running_var.copy_(torch.rand(shape[0], generator=gen) * 2 + 0.2)
                bn.weight.copy_(torch.randn(shape[0], generator=gen))
                bn.bias.copy_(torch.randn(shape[0], generator=gen) * 0.5)
                bn.num_batches_tracked.fill_(7)
            modules.append(bn)
        if after.activation != "none":
            modules.append(_activation(after.activation))
    return nn.Sequential(*modules).eval()


def build_inputs(spec: NetSpec) -> torch.Tensor:
    """The calibration batch of ``spec``: ``[num_examples, *in_shape]`` float32."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    shape = (spec.num_examples, *spec.in_shape)
    x = torch.randn(shape, generator=gen)
    if spec.input_style == "positive":
        x = x.abs()
    elif spec.input_style == "sparse":
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.zeros_like(x), x)
    elif spec.input_style == "quantized":
        x = torch.randint(0, 3, shape, generator=gen).to(torch.float32)
    return x


def build(spec: NetSpec) -> tuple[nn.Sequential, torch.Tensor]:
    return build_model(spec), build_inputs(spec)


@st.composite
def conv_specs(draw, in_shape: tuple[int, int, int], max_nodes: int,
               max_channels: int = 4) -> tuple[ConvSpec, tuple[int, int, int]]:
    """A conv layer on ``in_shape`` (any kernel/stride/padding/dilation/groups) and its output
    shape, with at most ``max_nodes`` output nodes."""
    c, h, w = in_shape
    square = draw(st.booleans())
    kh = draw(st.integers(1, 3))
    kw = kh if square else draw(st.integers(1, 3))
    dh = draw(st.sampled_from([1, 1, 2]))
    dw = dh if square else draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if padding == "same":
        pad: tuple[int, int] | str = "same"
        stride = (1, 1)
    else:
        if padding == "valid":
            pad = "valid"
        elif padding == "int":
            p = draw(st.integers(0, 2))
            pad = (p, p)
        else:
            pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ho = conv_out_size(h, kh, stride[0], pad if isinstance(pad, str) else pad[0], dh)
    wo = conv_out_size(w, kw, stride[1], pad if isinstance(pad, str) else pad[1], dw)
    if ho < 1 or wo < 1:  # the kernel does not fit: keep it, pad 'same'
        pad, stride, ho, wo = "same", (1, 1), h, w
    step = 2
    while ho * wo > max_nodes:  # too many positions: 1x1 kernel, larger stride, no padding
        pad, stride = (0, 0), (step, step)
        kh, kw, dh, dw = 1, 1, 1, 1
        ho, wo = conv_out_size(h, 1, step, 0, 1), conv_out_size(w, 1, step, 0, 1)
        step += 1
    divisors = [g for g in range(1, c + 1) if c % g == 0]
    groups = draw(st.sampled_from(divisors))
    limit = min(max_channels, max_nodes // (ho * wo))
    if limit < groups:
        groups = 1
    out_channels = groups * draw(st.integers(1, max(1, limit // groups)))
    spec = ConvSpec(out_channels, (kh, kw), stride, pad, (dh, dw), groups,
                    draw(st.booleans()))
    return spec, (out_channels, ho, wo)


@st.composite
def net_specs(draw, *, conv: bool | None = None, max_nodes: int = 60, max_convs: int = 2,
              max_linears: int = 3, max_width: int = 8, max_examples: int = 2,
              activations=ACTIVATIONS, batchnorm: bool = True, zero: bool = True,
              weight_styles=("normal", "normal", "quantized", "wide"),
              shifts=(0.0, 0.0, -0.3, -1.0, -100.0), min_layers: int = 1,
              zero_modes=("none", "none", "random", "rows", "cols", "all")) -> NetSpec:
    """A random small chain network (see :class:`NetSpec`)."""
    use_conv = draw(st.booleans()) if conv is None else conv
    layers: list[ConvSpec | LinearSpec] = []
    if use_conv:
        in_shape = draw(st.sampled_from([(1, 6, 6), (2, 5, 5), (1, 5, 4), (3, 4, 4), (2, 3, 3),
                                         (4, 3, 3)]))
        shape = in_shape
        for _ in range(draw(st.integers(1, max_convs))):
            layer, shape = draw(conv_specs(shape, max_nodes))
            layers.append(layer)
        n_linear = draw(st.integers(max(0, min_layers - len(layers)), max_linears))
    else:
        in_shape = (draw(st.integers(1, 10)),)
        n_linear = draw(st.integers(max(1, min_layers), max_linears))
    for _ in range(n_linear):
        layers.append(LinearSpec(draw(st.integers(1, max_width)), draw(st.booleans())))
    n = len(layers)
    hidden = []
    for k in range(n):
        hidden.append(HiddenSpec(
            draw(st.sampled_from(activations)),
            batchnorm and k < n - 1 and draw(st.integers(0, 3)) == 0,
        ))
    zeros = tuple(
        draw(st.sampled_from(zero_modes if zero else ["none"]))
        for _ in range(n)
    )
    bias_shift = tuple(draw(st.sampled_from(shifts)) for _ in range(n))
    return NetSpec(
        in_shape=in_shape,
        layers=tuple(layers),
        hidden=tuple(hidden),
        zero=zeros,
        bias_shift=bias_shift,
        weight_style=draw(st.sampled_from(weight_styles)),
        input_style=draw(st.sampled_from(["normal", "positive", "sparse", "quantized"])),
        num_examples=draw(st.integers(1, max_examples)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# alpha in [0, 1): the paper's value, the edges of the regimes, and random values up to 1 - 1e-6.
# Values within ~1e-12 of 1 are left out: the reference computes (1 - W1/d) / (1 - alpha), whose
# cancellation amplifies rounding in W1 by 1/(1 - alpha) (at alpha = 1 - 2**-52 it is off by
# ~0.4), so an absolute 1e-6 agreement stops being a property of the engine there.
alphas = st.one_of(
    st.sampled_from([0.0, 0.5, 0.9]),
    st.floats(0.0, 1.0 - 1e-6, allow_nan=False),
)


class ResidualNet(nn.Module):
    """Two Linear layers with a residual add: not a chain (used by the rejection tests)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


class ConcatNet(nn.Module):
    """A Linear whose output is concatenated with its input: not a chain."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(2 * width, 2)

    def forward(self, x):
        return self.b(torch.cat([self.a(x), x], dim=1))
