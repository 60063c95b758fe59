"""A registry of small image classifiers from timm and torchvision, for tests and benchmarks.

Every entry is a reduced-width, reduced-depth version of a well-known architecture. It is built
by the library's own constructor with small arguments (timm ``ResNet(channels=...)``,
``ConvNeXt(dims=...)``, ``EfficientNet``/``MobileNetV3`` from a block string, torchvision
``DenseNet(growth_rate=...)``, ``RegNet(BlockParams(...))``, ``EfficientNet(MBConvConfig...)``,
...), so it runs the same code paths and contains the same layer kinds as the full model --
depthwise and grouped convolutions, squeeze-excitation, concatenation, channel shuffle, layer
scale, timm's ``Attention``, ``nn.MultiheadAttention`` -- but has at most 64 channels in its
stems and stages (at most 128 in expansion / hidden MLP layers), fewer than 150k parameters and
fewer than 60k channel pairs (sum of ``in * out / groups`` over ``Conv2d``/``Linear``), takes a
3 x 32 x 32 input and predicts 10 classes. No pretrained weights are used, so building an entry
never touches the network. Where a library hard-codes a width (torchvision ResNet stage widths,
the 1280-wide last conv of torchvision MobileNetV2 and timm GhostNet, timm VGG's 4096-wide head,
torchvision SqueezeNet's Fire stack), the entry rebuilds just that part with the library's own
modules at a small width and says so in ``ZooEntry.notes``.

The zoo is meant for coverage matrices: run a pruning method on every entry in a few seconds on a
CPU and see which architectures it handles.

>>> from curvprune.models import zoo
>>> model = zoo.create("timm/resnet18")
>>> model(zoo.example_input("timm/resnet18")).shape
torch.Size([2, 10])

Structured pruning with Torch-Pruning works on every entry (``tests/test_zoo.py``) with::

    pruner = tp.pruner.MetaPruner(
        model, zoo.example_input(name), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.3, ignored_layers=zoo.ignored_layers(name, model),
        num_heads=zoo.attention_heads(model), prune_num_heads=False, prune_head_dims=True)
    pruner.step()
    zoo.refresh_after_pruning(model, pruner)

Two kinds of special handling are needed, both recorded here rather than hidden in the tests:

* timm attention (ViT, DeiT, PiT, MobileViT, the hybrid ViT) reshapes ``qkv`` with its stored
  ``num_heads``/``head_dim``; after head dimensions are pruned these must be refreshed
  (:func:`refresh_attention`), and timm MetaFormer's ``Scale`` keeps a stale view shape
  (:func:`refresh_after_pruning` does both).
* Torch-Pruning's tracer misreads three token shuffles -- Swin's patch merging
  (reshape/permute/flatten of 2x2 neighbours), MLP-Mixer's token-mixing transpose, PiT's
  class-token concat along the token axis -- so those entries keep the width of the affected
  residual stream (``ZooEntry.keep``, included by :func:`ignored_layers`); the other widths
  (heads' dims, MLP hidden layers) are still pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import ResNet as _TVResNet

from ..pruning.structured import (
    attention_heads,
    classifier_layers,
    refresh_after_pruning,
    refresh_attention,
)

__all__ = [
    "ZooEntry",
    "ZOO",
    "create",
    "example_input",
    "attention_heads",
    "refresh_attention",
    "refresh_after_pruning",
    "classifier_layers",
    "ignored_layers",
]

NUM_CLASSES = 10
INPUT_SIZE = (3, 32, 32)


@dataclass(frozen=True)
class ZooEntry:
    """One small architecture.

    ``build()`` returns a freshly initialised model in eval mode; it seeds with
    ``torch.manual_seed(0)`` inside a forked RNG, so two builds have identical weights and the
    caller's random state is untouched. ``input_size`` is ``(C, H, W)``.
    ``num_heads`` is left ``None``: Torch-Pruning's ``num_heads`` is keyed by the modules of one
    built model, so call :func:`attention_heads` on the model instead.
    ``notes`` says where the entry departs from a plain constructor call. ``keep(model)``, when
    set, lists layers whose output channels structured pruning must leave alone (see
    :func:`ignored_layers`).
    """

    name: str
    family: str
    build: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    num_heads: dict | None = None
    notes: str = ""
    keep: Callable[[nn.Module], list[nn.Module]] | None = field(default=None, repr=False)


ZOO: dict[str, ZooEntry] = {}


def _register(name: str, family: str, input_size=INPUT_SIZE, notes: str = "", keep=None):
    def deco(fn: Callable[[], nn.Module]):
        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
                torch.manual_seed(0)
                return fn().eval()

        build.__name__ = fn.__name__
        build.__doc__ = fn.__doc__
        ZOO[name] = ZooEntry(name, family, build, tuple(input_size), NUM_CLASSES, None, notes,
                             keep)
        return fn

    return deco


# --------------------------------------------------------------------------- classic
@_register("timm/vgg11_bn", "classic", notes="timm VGG; pre_logits/head rebuilt at width 64")
def _timm_vgg():
    """timm ``VGG`` (the class behind ``vgg11_bn``) with a 4-stage, 16..64-channel config.

    timm hard-codes the 4096-wide ``ConvMlp`` pre-logits; it is rebuilt with timm's own
    ``ConvMlp``/``ClassifierHead`` at width 64 with a 2x2 kernel (the "fc6 as a conv over the
    whole last feature map" of the original, here a 2x2 map).
    """
    from timm.layers import ClassifierHead
    from timm.models.vgg import VGG, ConvMlp

    cfg = [16, "M", 32, "M", 48, 48, "M", 64, 64, "M"]
    model = VGG(cfg, num_classes=NUM_CLASSES, mlp_ratio=1 / 64, norm_layer=nn.BatchNorm2d)
    model.pre_logits = ConvMlp(64, 64, kernel_size=2, mlp_ratio=1.0, drop_rate=0.0)
    model.head = ClassifierHead(64, NUM_CLASSES, pool_type="avg")
    model.head_hidden_size = 64
    model._initialize_weights()  # timm's VGG init, now over the rebuilt head too
    return model


@_register("torchvision/squeezenet1_1", "classic", notes="features rebuilt from Fire modules")
def _tv_squeezenet():
    """torchvision ``SqueezeNet('1_1')`` with its feature stack rebuilt from torchvision's own
    ``Fire`` modules (squeeze 1x1, then expand 1x1 and 3x3, concatenated): six of the eight
    Fire modules at 1/4 (squeeze) and 1/8 (expand) of the widths, the final 1x1 classifier conv
    resized, and torchvision's initialisation re-applied."""
    from torchvision.models.squeezenet import Fire, SqueezeNet

    model = SqueezeNet("1_1", num_classes=NUM_CLASSES)
    model.features = nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(16, 4, 8, 8),
        Fire(16, 4, 8, 8),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(16, 8, 16, 16),
        Fire(32, 8, 16, 16),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(32, 12, 24, 24),
        Fire(48, 16, 32, 32),
    )
    model.classifier[1] = nn.Conv2d(64, NUM_CLASSES, kernel_size=1)
    for m in model.modules():  # as SqueezeNet.__init__ does
        if isinstance(m, nn.Conv2d):
            if m is model.classifier[1]:
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
            else:
                nn.init.kaiming_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------- residual (timm)
@_register("timm/resnet18", "residual")
def _timm_resnet18():
    """timm ``ResNet`` with ``BasicBlock``, one block per stage, channels 16-64."""
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes=NUM_CLASSES, stem_width=16,
                  channels=(16, 32, 48, 64))


@_register("timm/resnet50d", "residual")
def _timm_resnet50d():
    """timm ``ResNet`` with ``Bottleneck`` (expansion 4), deep stem and average-pool
    downsampling (the ``-d`` variant)."""
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, (1, 1, 1, 1), num_classes=NUM_CLASSES, stem_width=8,
                  stem_type="deep", avg_down=True, channels=(4, 8, 12, 16))


@_register("timm/seresnext26", "residual")
def _timm_seresnext():
    """timm ``ResNet`` with grouped ``Bottleneck`` blocks (cardinality 4) and
    squeeze-excitation (``block_args=dict(attn_layer='se')``)."""
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, (1, 1, 1, 1), num_classes=NUM_CLASSES, stem_width=16,
                  channels=(4, 8, 12, 16), cardinality=4, base_width=32,
                  block_args=dict(attn_layer="se"))


# --------------------------------------------------------------------------- residual (torchvision)
class _NarrowResNet(_TVResNet):
    """torchvision ``ResNet`` whose four stages use ``widths`` instead of 64/128/256/512.

    torchvision hard-codes the stage widths in ``ResNet.__init__``; this subclass only overrides
    ``_make_layer`` to substitute them and resizes the final ``fc``. Blocks, stem (64 channels),
    initialisation and forward are torchvision's.
    """

    def __init__(self, block, layers, widths, **kwargs):
        self._stage_widths = list(widths)
        super().__init__(block, layers, num_classes=NUM_CLASSES, **kwargs)
        self.fc = nn.Linear(self.inplanes, NUM_CLASSES)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        planes = self._stage_widths.pop(0)
        return super()._make_layer(block, planes, blocks, stride, dilate)


@_register("torchvision/resnet18", "residual", notes="stage widths via ResNet subclass")
def _tv_resnet18():
    """torchvision ResNet with ``BasicBlock``, one block per stage, widths 8-64."""
    from torchvision.models.resnet import BasicBlock

    return _NarrowResNet(BasicBlock, [1, 1, 1, 1], (8, 16, 32, 64))


@_register("torchvision/resnet50", "residual", notes="stage widths via ResNet subclass")
def _tv_resnet50():
    """torchvision ResNet with ``Bottleneck`` (expansion 4), one block per stage."""
    from torchvision.models.resnet import Bottleneck

    return _NarrowResNet(Bottleneck, [1, 1, 1, 1], (4, 8, 12, 16))


@_register("torchvision/resnext50_32x4d", "residual", notes="stage widths via ResNet subclass")
def _tv_resnext():
    """torchvision ResNeXt: grouped 3x3 convs (``groups=4``, ``width_per_group=32``)."""
    from torchvision.models.resnet import Bottleneck

    return _NarrowResNet(Bottleneck, [1, 1, 1, 1], (8, 8, 12, 16), groups=4, width_per_group=32)


@_register("torchvision/wide_resnet50_2", "residual", notes="stage widths via ResNet subclass")
def _tv_wide_resnet():
    """torchvision Wide ResNet: bottleneck width doubled (``width_per_group=128``)."""
    from torchvision.models.resnet import Bottleneck

    return _NarrowResNet(Bottleneck, [1, 1, 1, 1], (4, 8, 12, 16), width_per_group=128)


# --------------------------------------------------------------------------- mobile
@_register("torchvision/mobilenet_v2", "mobile", notes="1280-wide last conv rebuilt at 64")
def _tv_mobilenet_v2():
    """torchvision ``MobileNetV2`` (inverted residuals, depthwise convs, ReLU6) with a small
    ``inverted_residual_setting``; its hard-coded 1280-channel last conv is rebuilt with
    torchvision's ``Conv2dNormActivation`` at 64 channels."""
    from torchvision.models import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    setting = [[1, 8, 1, 1], [6, 8, 2, 2], [6, 16, 2, 2], [6, 16, 1, 2], [4, 24, 1, 1]]
    model = MobileNetV2(num_classes=NUM_CLASSES, inverted_residual_setting=setting)
    model.features[-1] = Conv2dNormActivation(24, 64, kernel_size=1, norm_layer=nn.BatchNorm2d,
                                              activation_layer=nn.ReLU6)
    model.classifier[1] = nn.Linear(64, NUM_CLASSES)
    model.last_channel = 64
    for m in (model.features[-1][0], model.classifier[1]):  # as MobileNetV2.__init__ does
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        else:
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def _tv_mobilenet_v3(arch, width_mult):
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, _ = _mobilenet_v3_conf(arch, width_mult=width_mult, reduced_tail=True)
    return MobileNetV3(setting, last_channel=64, num_classes=NUM_CLASSES)


@_register("torchvision/mobilenet_v3_small", "mobile")
def _tv_mobilenet_v3_small():
    """torchvision ``MobileNetV3`` small config at ``width_mult=0.25``, reduced tail,
    ``last_channel=64`` (squeeze-excitation, hardswish, hardsigmoid)."""
    return _tv_mobilenet_v3("mobilenet_v3_small", 0.25)


@_register("torchvision/mobilenet_v3_large", "mobile")
def _tv_mobilenet_v3_large():
    """torchvision ``MobileNetV3`` large config at ``width_mult=0.15``, reduced tail,
    ``last_channel=64``."""
    return _tv_mobilenet_v3("mobilenet_v3_large", 0.15)


@_register("torchvision/shufflenet_v2", "mobile")
def _tv_shufflenet():
    """torchvision ``ShuffleNetV2`` (channel split, concat, channel shuffle)."""
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [16, 16, 32, 48, 64], num_classes=NUM_CLASSES)


def _timm_effnet(arch_def, cls="efficientnet", num_features=64, stem_size=16, **kwargs):
    """timm ``EfficientNet``/``MobileNetV3`` from an architecture string list, as timm's own
    ``_gen_*`` generators do, but with small channel counts."""
    from timm.models._efficientnet_builder import decode_arch_def

    if cls == "efficientnet":
        from timm.models.efficientnet import EfficientNet as Cls
    else:
        from timm.models.mobilenetv3 import MobileNetV3 as Cls
    return Cls(decode_arch_def(arch_def), num_classes=NUM_CLASSES, num_features=num_features,
               stem_size=stem_size, **kwargs)


@_register("timm/mobilenetv3_large_100", "mobile")
def _timm_mobilenetv3():
    """timm ``MobileNetV3`` (hard-swish, SE with hard-sigmoid gate, efficient head: the
    1x1 ``conv_head`` after global pooling)."""
    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import round_channels

    arch_def = [
        ["ds_r1_k3_s1_e1_c8_nre"],
        ["ir_r1_k3_s2_e4_c16_nre", "ir_r1_k3_s1_e3_c16_nre"],
        ["ir_r1_k5_s2_e3_c24_se0.25_nre"],
        ["ir_r1_k3_s2_e4_c32", "ir_r1_k3_s1_e2.5_c32"],
        ["ir_r1_k5_s2_e3_c40_se0.25"],
        ["cn_r1_k1_s1_c64"],
    ]
    se_layer = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                       rd_round_fn=round_channels)
    return _timm_effnet(arch_def, cls="mobilenetv3", act_layer=get_act_layer("hard_swish"),
                        se_layer=se_layer)


@_register("timm/mnasnet_small", "mobile")
def _timm_mnasnet():
    """timm MnasNet (timm's ``EfficientNet`` class with the ``mnasnet_small`` block string,
    ReLU, SE in later stages)."""
    arch_def = [
        ["ds_r1_k3_s1_c8"],
        ["ir_r1_k3_s2_e3_c16"],
        ["ir_r2_k3_s2_e4_c16"],
        ["ir_r2_k5_s2_e4_c24_se0.25"],
        ["ir_r1_k3_s1_e4_c24_se0.25"],
        ["ir_r1_k5_s2_e4_c32_se0.25"],
        ["ir_r1_k3_s1_e3_c40"],
    ]
    return _timm_effnet(arch_def, stem_size=8)


@_register("timm/efficientnet_lite0", "mobile")
def _timm_efficientnet_lite():
    """timm EfficientNet-Lite (no SE, ReLU6, fixed stem)."""
    arch_def = [
        ["ds_r1_k3_s1_e1_c8"],
        ["ir_r1_k3_s2_e6_c8"],
        ["ir_r1_k5_s2_e6_c16"],
        ["ir_r1_k3_s2_e6_c16"],
        ["ir_r1_k5_s1_e6_c16"],
        ["ir_r1_k5_s2_e6_c24"],
        ["ir_r1_k3_s1_e4_c32"],
    ]
    return _timm_effnet(arch_def, act_layer=nn.ReLU6, fix_stem=True)


@_register("timm/ghostnet_100", "mobile", notes="1280-wide conv_head rebuilt at 64")
def _timm_ghostnet():
    """timm ``GhostNet`` (ghost modules: a primary conv and a cheap depthwise conv,
    concatenated and sliced; SE) at ``width=0.25`` with six rows of the GhostNet-1.0 ``cfgs``
    (the 480-wide expansion cut to 384); the hard-coded 1280-wide ``conv_head`` is rebuilt at
    64 (timm leaves GhostNet at PyTorch's default initialisation, so no re-init is needed)."""
    from timm.models.ghostnet import GhostNet

    cfgs = [
        [[3, 16, 16, 0, 1]],
        [[3, 48, 24, 0, 2]],
        [[3, 72, 24, 0, 1]],
        [[5, 72, 40, 0.25, 2]],
        [[3, 240, 80, 0, 2]],
        [[5, 384, 112, 0.25, 1]],
    ]
    model = GhostNet(cfgs, num_classes=NUM_CLASSES, width=0.25, drop_rate=0.0)
    model.conv_head = nn.Conv2d(model.num_features, 64, 1, 1, 0, bias=True)
    model.head_hidden_size = 64
    model.classifier = nn.Linear(64, NUM_CLASSES)
    return model


# --------------------------------------------------------------------------- efficientnet
@_register("timm/efficientnet_b0", "efficientnet")
def _timm_efficientnet_b0():
    """timm ``EfficientNet`` with the B0 block string (MBConv, SE, SiLU), channels / 8ish,
    one block per stage."""
    arch_def = [
        ["ds_r1_k3_s1_e1_c8_se0.25"],
        ["ir_r1_k3_s2_e6_c8_se0.25"],
        ["ir_r1_k5_s2_e6_c16_se0.25"],
        ["ir_r1_k3_s2_e6_c16_se0.25"],
        ["ir_r1_k5_s1_e6_c16_se0.25"],
        ["ir_r1_k5_s2_e6_c24_se0.25"],
        ["ir_r1_k3_s1_e4_c32_se0.25"],
    ]
    return _timm_effnet(arch_def, act_layer=nn.SiLU)


@_register("torchvision/efficientnet_b0", "efficientnet")
def _tv_efficientnet_b0():
    """torchvision ``EfficientNet`` with the B0 ``MBConvConfig`` list at ``width_mult=0.08``,
    ``depth_mult=0.25``, ``last_channel=64`` (MBConv, SE, stochastic depth)."""
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, _ = _efficientnet_conf("efficientnet_b0", width_mult=0.08, depth_mult=0.25)
    return EfficientNet(setting, dropout=0.2, num_classes=NUM_CLASSES, last_channel=64)


@_register("torchvision/efficientnet_v2_s", "efficientnet")
def _tv_efficientnet_v2():
    """torchvision ``EfficientNet`` with V2-style ``FusedMBConvConfig`` + ``MBConvConfig``."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(4, 3, 2, 8, 16, 1),
        FusedMBConvConfig(4, 3, 2, 16, 16, 1),
        MBConvConfig(4, 3, 2, 16, 24, 1),
        MBConvConfig(4, 3, 1, 24, 32, 1),
    ]
    return EfficientNet(setting, dropout=0.2, num_classes=NUM_CLASSES, last_channel=64,
                        norm_layer=partial(nn.BatchNorm2d, eps=1e-3))


# --------------------------------------------------------------------------- regnet
def _tv_regnet(se_ratio):
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams(depths=[1, 1, 1, 1], widths=[16, 24, 48, 64],
                         group_widths=[8, 8, 8, 8], bottleneck_multipliers=[1.0] * 4,
                         strides=[2, 2, 2, 2], se_ratio=se_ratio)
    return RegNet(params, num_classes=NUM_CLASSES, stem_width=16)


@_register("torchvision/regnet_x_400mf", "regnet")
def _tv_regnet_x():
    """torchvision ``RegNet`` (X: grouped bottleneck, no SE) from explicit ``BlockParams``."""
    return _tv_regnet(None)


@_register("torchvision/regnet_y_400mf", "regnet")
def _tv_regnet_y():
    """torchvision ``RegNet`` (Y: with squeeze-excitation, ``se_ratio=0.25``)."""
    return _tv_regnet(0.25)


@_register("timm/regnety_002", "regnet")
def _timm_regnety():
    """timm ``RegNet`` from a ``RegNetCfg`` (quantised linear widths, groups of 8, SE)."""
    from timm.models.regnet import RegNet, RegNetCfg

    cfg = RegNetCfg(depth=4, w0=16, wa=12.0, wm=1.5, group_size=8, se_ratio=0.25, stem_width=16)
    return RegNet(cfg, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------- convnext
@_register("timm/convnext_atto", "convnext")
def _timm_convnext():
    """timm ``ConvNeXt`` (7x7 depthwise, channels-last LayerNorm, Linear MLP, layer scale)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(16, 24, 32, 32))


@_register("torchvision/convnext_tiny", "convnext")
def _tv_convnext():
    """torchvision ``ConvNeXt`` from ``CNBlockConfig`` (layer scale as a raw parameter)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [CNBlockConfig(16, 24, 1), CNBlockConfig(24, 32, 1), CNBlockConfig(32, None, 1)]
    return ConvNeXt(setting, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------- densenet
@_register("torchvision/densenet121", "densenet")
def _tv_densenet():
    """torchvision ``DenseNet`` (dense concatenation, transitions) with growth rate 8."""
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                    num_classes=NUM_CLASSES)


@_register("timm/densenet121", "densenet")
def _timm_densenet():
    """timm ``DenseNet`` with growth rate 8."""
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), bn_size=2, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------- vit
def _timm(name, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@_register("timm/vit_tiny_patch16_224", "vit")
def _timm_vit():
    """timm ``VisionTransformer`` (class token, timm ``Attention``), 4x4 patches."""
    return _timm("vit_tiny_patch16_224", **_VIT)


@_register("timm/vit_base_patch16_reg4_gap_256", "vit")
def _timm_vit_reg():
    """timm ``VisionTransformer`` with 4 register tokens, no class token, global average
    pooling; layer scale and no qkv bias added for coverage."""
    return _timm("vit_base_patch16_reg4_gap_256", **_VIT, init_values=1e-5, qkv_bias=False)


@_register("timm/deit_tiny_patch16_224", "vit")
def _timm_deit():
    """timm DeiT-tiny config (plain ``VisionTransformer``)."""
    return _timm("deit_tiny_patch16_224", **_VIT)


@_register("timm/deit_tiny_distilled_patch16_224", "vit")
def _timm_deit_distilled():
    """timm ``VisionTransformerDistilled`` (class + distillation token, two heads averaged at
    inference)."""
    return _timm("deit_tiny_distilled_patch16_224", **_VIT)


@_register("torchvision/vit_b_16", "vit")
def _tv_vit():
    """torchvision ``VisionTransformer`` (``nn.MultiheadAttention``)."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=128, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------- hybrid
@_register("timm/mobilevit_xxs", "hybrid")
def _timm_mobilevit():
    """timm MobileViT (``ByobNet``): inverted residuals + MobileViT blocks (unfold to patches,
    transformer with timm ``Attention``, fold, concat-fusion conv)."""
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

    cfg = ByoModelCfg(
        blocks=(
            _inverted_residual_block(d=1, c=16, s=1, br=2.0),
            _inverted_residual_block(d=1, c=16, s=2, br=2.0),
            _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=1,
                             patch_size=2, br=2.0),
            _mobilevit_block(d=1, c=32, s=2, transformer_dim=32, transformer_depth=1,
                             patch_size=2, br=2.0),
        ),
        stem_chs=16,
        stem_type="3x3",
        stem_pool="",
        downsample="",
        act_layer="silu",
        num_features=64,
    )
    return ByobNet(cfg, num_classes=NUM_CLASSES)


@_register("timm/vit_tiny_r_s16_p8_224", "hybrid", notes="GroupNorm with 8 groups (not 32)")
def _timm_vit_hybrid():
    """timm R+ViT hybrid: ``VisionTransformer`` with a ``HybridEmbed`` over a small timm
    ``ResNetV2`` backbone (weight-standardised ``StdConv2dSame``, GroupNorm with 8 groups instead
    of 32, two stages instead of the stem-only backbone of ``vit_tiny_r_s16_p8``), 1x1 patches
    on its 4x4 feature map."""
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    backbone = ResNetV2(layers=(1, 1), channels=(16, 32), stem_chs=16, num_classes=0,
                        global_pool="", preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8),
                        norm_layer=partial(GroupNormAct, num_groups=8))
    embed = partial(HybridEmbed, backbone=backbone)
    return _timm("vit_tiny_patch16_224", img_size=32, patch_size=1, embed_dim=32, depth=2,
                 num_heads=2, embed_layer=embed)


# --------------------------------------------------------------------------- other token mixers
def _keep_swin(model):
    # PatchMerging gathers 2x2 neighbours with reshape/permute/flatten before its norm and
    # reduction; Torch-Pruning maps the stage-0 channel indices through that wrongly, so the
    # stage-0 residual stream (written by patch_embed, attn.proj, mlp.fc2) keeps its width.
    stage = model.layers[0]
    return [model.patch_embed.proj] + [m for b in stage.blocks for m in (b.attn.proj, b.mlp.fc2)]


@_register("timm/swin_tiny_patch4_window7_224", "swin", keep=_keep_swin,
           notes="Torch-Pruning: stage-0 residual stream kept (patch merging)")
def _timm_swin():
    """timm ``SwinTransformer`` (window attention, shifted windows, relative position bias,
    patch merging)."""
    return _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                 embed_dim=16, depths=(2, 2), num_heads=(2, 2), drop_path_rate=0.0)


@_register("timm/poolformer_s12", "metaformer")
def _timm_poolformer():
    """timm PoolFormer (``MetaFormer`` with the ``poolformer_s12`` options: pooling token
    mixer, GroupNorm with one group, layer scale)."""
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(16, 16, 32, 32),
                      downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True, norm_layers=GroupNorm1,
                      layer_scale_init_values=1e-5, res_scale_init_values=None,
                      use_mlp_head=False)


def _keep_mixer(model):
    # The token-mixing MLP runs on the transposed (B, C, N) tensor; Torch-Pruning's tracer
    # couples the residual channels with the token axis there, so the residual stream and the
    # token axis keep their sizes (the hidden widths of both MLPs are still pruned).
    return [model.stem.proj] + [m for b in model.blocks
                                for m in (b.mlp_tokens.fc2, b.mlp_channels.fc2)]


@_register("timm/mixer_s16_224", "mlp", keep=_keep_mixer,
           notes="Torch-Pruning: residual stream and token axis kept (token transpose)")
def _timm_mixer():
    """timm ``MlpMixer`` (token-mixing MLP on transposed tokens, channel-mixing MLP)."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=NUM_CLASSES, img_size=32, patch_size=4, num_blocks=2, embed_dim=32)


def _keep_pit(model):
    # PiT concatenates the class token with the pooled tokens along the token axis
    # (torch.cat(dim=1)), which Torch-Pruning treats as a channel concat; the residual streams
    # (patch_embed, pooling, attn.proj, mlp.fc2) keep their widths.
    out = [model.patch_embed.conv]
    for stage in model.transformers:
        out += [m for b in stage.blocks for m in (b.attn.proj, b.mlp.fc2)]
        if stage.pool is not None:
            out += [stage.pool.conv, stage.pool.fc]
    return out


@_register("timm/pit_ti_224", "vit", keep=_keep_pit,
           notes="Torch-Pruning: residual streams kept (class-token concat on the token axis)")
def _timm_pit():
    """timm ``PoolingVisionTransformer`` (depthwise-conv token pooling between stages)."""
    return _timm("pit_ti_224", img_size=32, patch_size=4, stride=2, base_dims=(16, 16),
                 depth=(1, 1), heads=(1, 2))


# --------------------------------------------------------------------------- API
def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def create(name: str) -> nn.Module:
    """Build zoo entry ``name``: deterministic weights (seed 0), eval mode."""
    return _entry(name).build()


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    """A seeded standard-normal batch ``(batch, C, H, W)`` for zoo entry ``name``."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(batch, *_entry(name).input_size, generator=gen)


def ignored_layers(name: str, model: nn.Module) -> list[nn.Module]:
    """Layers to pass as Torch-Pruning's ``ignored_layers`` for zoo entry ``name``.

    The classifier(s), plus, for the few entries whose tensor plumbing Torch-Pruning's tracer
    misreads (Swin's patch merging, MLP-Mixer's token transpose, PiT's token concat), the layers
    writing the affected residual stream (``ZooEntry.keep``).
    """
    entry = _entry(name)
    out = classifier_layers(model)
    if entry.keep is not None:
        out += entry.keep(model)
    return out
